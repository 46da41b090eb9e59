"""Delivery: the :class:`Destination` seam, its implementations and the sender loop.

A destination takes result files and says what became of each (:class:`SendOutcome`). The
implementation is chosen by ``kind`` in ``[[destinations]]``: ``"dimse"`` (C-STORE,
:mod:`dicom_node.delivery.dimse`) or ``"stowrs"`` (DICOMweb, :mod:`dicom_node.delivery.stowrs`).
The outbox, retries and the loop (:mod:`dicom_node.delivery.sender`) are shared by every kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from dicom_node.config import Config, DestinationConfig
from dicom_node.errors import ConfigError


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
            (listed one by one in a STOW-RS response); those rows are ``committed`` at once.
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
_KINDS: dict[str, DestinationFactory] = {}


def register(kind: str) -> Callable[[DestinationFactory], DestinationFactory]:
    """Class decorator: make ``kind`` in ``[[destinations]]`` build this destination."""

    def deco(factory: DestinationFactory) -> DestinationFactory:
        _KINDS[kind] = factory
        return factory

    return deco


def make_destination(dest: DestinationConfig, cfg: Config) -> Destination:
    """The destination for one ``[[destinations]]`` entry.

    Raises:
        ConfigError: no implementation for its ``kind``.
    """
    from dicom_node.delivery import dimse, stowrs  # noqa: F401  (register "dimse", "stowrs")

    factory = _KINDS.get(dest.kind)
    if factory is None:
        raise ConfigError("destinations.kind", f"unknown kind {dest.kind!r} for {dest.name!r} "
                          f"(known: {', '.join(sorted(_KINDS))})")
    return factory(dest, cfg)


def make_destinations(cfg: Config) -> dict[str, Destination]:
    """Every configured destination by name."""
    return {d.name: make_destination(d, cfg) for d in cfg.destinations}
