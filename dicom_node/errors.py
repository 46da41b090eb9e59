"""Exception hierarchy for dicom-node.

Every error names the thing it is about (a config key, a UID, a path) so that an operator can act
on the message alone. Catch :class:`DicomNodeError` at process boundaries (CLI, worker loop).
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of every error dicom-node raises on purpose."""


class ConfigError(DicomNodeError):
    """A configuration value is missing or invalid; the message names the TOML key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ValidationError(DicomNodeError):
    """An inbound dataset cannot be accepted; carries the DIMSE status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"0x{status:04X}: {reason}")


class ArchiveError(DicomNodeError):
    """Writing to or indexing the archive failed."""


class OutOfResourcesError(ArchiveError):
    """Disk space below the configured reserve (answered as 0xA700)."""


class ReaderError(DicomNodeError):
    """A DICOM object cannot be turned into an image/mask; names the SOP Instance UID and why."""

    def __init__(self, sop_instance_uid: str | None, reason: str) -> None:
        self.sop_instance_uid = sop_instance_uid
        self.reason = reason
        super().__init__(f"{sop_instance_uid or '<unknown SOP Instance UID>'}: {reason}")


class UnsupportedTransferSyntaxError(ReaderError):
    """Pixel data is compressed with a syntax no installed decoder handles."""


class NoTissueRegionError(ReaderError):
    """No 2D tissue region could be found in the image."""


class SegmentationError(ReaderError):
    """A DICOM-SEG has an unsupported layout or references nothing present."""


class ModelArtifactError(DicomNodeError):
    """A model directory (model.json + fold checkpoints) is missing or invalid."""


class ScoringError(DicomNodeError):
    """A study could not be scored; the message says which study and why."""


class DeliveryError(DicomNodeError):
    """Sending to a destination failed (association refused, non-success status, timeout).

    Attributes:
        destination: the destination's name (or ``AET@host:port`` when no name is known).
        reason: what went wrong, without patient data.
        retryable: False when sending the same files again cannot succeed (unreadable file,
            no acceptable presentation context); the outbox retries the others.
        status: the DIMSE/HTTP status that caused it, if any.
        partial: ``(SOP Instance UID, status)`` pairs received before the failure.
    """

    def __init__(self, reason: str, *, destination: str = "", retryable: bool = True,
                 status: int | None = None,
                 partial: list[tuple[str, int]] | None = None) -> None:
        self.destination = destination
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.partial: list[tuple[str, int]] = list(partial or [])
        super().__init__(f"{destination}: {reason}" if destination else reason)


class ResultsError(DicomNodeError):
    """SR/heat maps cannot be built for a study (e.g. no source header for any scored image)."""


class TrainingError(DicomNodeError):
    """Training data or settings do not allow a run (e.g. one class only, no usable studies)."""
