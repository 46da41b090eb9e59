"""Delivery: the :class:`Destination` seam, its implementations and the sender loop.

A destination takes result files and says what became of each (:class:`SendOutcome`). The
implementation is chosen by ``kind`` in ``[[destinations]]``: ``"dimse"`` (C-STORE,
:mod:`dicom_node.delivery.dimse`) or ``"stowrs"`` (DICOMweb, :mod:`dicom_node.delivery.stowrs`).
The outbox, retries and the loop (:mod:`dicom_node.delivery.sender`) are shared by every kind.
"""

from __future__ import annotations

from dicom_node.config import Config, DestinationConfig
from dicom_node.delivery import dimse, stowrs  # noqa: F401 - register kinds "dimse", "stowrs"
from dicom_node.delivery.base import (
    KINDS,
    Destination,
    DestinationFactory,
    SendOutcome,
    is_success,
    register,
)
from dicom_node.errors import ConfigError

__all__ = ["Destination", "DestinationFactory", "SendOutcome", "is_success", "make_destination",
           "make_destinations", "register"]


def make_destination(dest: DestinationConfig, cfg: Config) -> Destination:
    """The destination for one ``[[destinations]]`` entry.

    Raises:
        ConfigError: no implementation for its ``kind``.
    """
    factory = KINDS.get(dest.kind)
    if factory is None:
        raise ConfigError("destinations.kind", f"unknown kind {dest.kind!r} for {dest.name!r} "
                          f"(known: {', '.join(sorted(KINDS))})")
    return factory(dest, cfg)


def make_destinations(cfg: Config) -> dict[str, Destination]:
    """Every configured destination by name."""
    return {d.name: make_destination(d, cfg) for d in cfg.destinations}
