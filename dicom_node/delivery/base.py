"""The delivery seam: :class:`Destination`, :class:`SendOutcome` and the kind registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from dicom_node.config import Config, DestinationConfig


def is_success(status: int) -> bool:
    """DIMSE success or warning (the object was stored)."""
    return status == 0x0000 or 0xB000 <= status <= 0xB007


@dataclass(frozen=True)
class SendOutcome:
    """What a destination did with one batch of files.

    Attributes:
        statuses: SOP Instance UID -> status the destination answered (DIMSE status; a
            STOW-RS destination maps its per-instance result to the same codes).
        error: why the batch stopped early (the association dropped, the PACS was down), or None.
        retryable: False when sending the same files again cannot succeed.
        transaction_uid: set by a destination that asked for storage commitment; the stored rows
            wait for its confirmation before they count as ``committed``.
        committed: SOP Instance UIDs whose safekeeping the destination's answer itself confirmed
            (listed one by one in a STOW-RS response, or a storage commitment report on the
            sending association); those rows are ``committed`` at once.
    """

    statuses: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    retryable: bool = True
    transaction_uid: str | None = None
    committed: frozenset[str] = frozenset()

    def stored(self, sop_uid: str) -> bool:
        """True if the destination stored this instance."""
        status = self.statuses.get(sop_uid)
        return status is not None and is_success(status)


@runtime_checkable
class Destination(Protocol):
    """Somewhere results are sent to."""

    name: str

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        """Send the files (one study) in one go; never raises for a delivery failure."""
        ...


DestinationFactory = Callable[[DestinationConfig, Config], Destination]
KINDS: dict[str, DestinationFactory] = {}


def register(kind: str) -> Callable[[DestinationFactory], DestinationFactory]:
    """Class decorator: make ``kind`` in ``[[destinations]]`` build this destination."""

    def deco(factory: DestinationFactory) -> DestinationFactory:
        KINDS[kind] = factory
        return factory

    return deco
