"""Exception hierarchy of the node application.

Every error names the thing it is about (a config key, a UID, a path) so that an operator can act
on the message alone. The libraries own their errors (:mod:`inference.errors`,
:mod:`training.errors`); they are re-exported here so application code has one place to import
from. Catch :data:`USER_ERRORS` at process boundaries (CLI, worker loop).
"""

from __future__ import annotations

from inference.errors import (
    InferenceConfigError,
    InferenceError,
    ModelArtifactError,
    NothingToScoreError,
    NoTissueRegionError,
    ReaderError,
    ScoringError,
    SegmentationError,
    UnsupportedTransferSyntaxError,
)
from training.errors import TrainConfigError, TrainingError

__all__ = [
    "USER_ERRORS",
    "ArchiveError",
    "ConfigError",
    "DeliveryError",
    "DicomNodeError",
    "InferenceConfigError",
    "InferenceError",
    "ModelArtifactError",
    "NoTissueRegionError",
    "NothingToScoreError",
    "PermanentJobError",
    "OutOfResourcesError",
    "ReaderError",
    "ResultsError",
    "ScoringError",
    "SegmentationError",
    "TrainConfigError",
    "TrainingError",
    "UnsupportedTransferSyntaxError",
    "ValidationError",
]


class DicomNodeError(Exception):
    """Base class of every error the node application raises on purpose."""


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


class PermanentJobError(DicomNodeError):
    """The job's input can never succeed (bad input, not a passing fault): end it at once with
    this reason instead of retrying. Transient faults (disk, network, PACS) stay other errors."""


# Errors an operator can act on from the message alone: printed, not traced, at the CLI.
USER_ERRORS: tuple[type[Exception], ...] = (DicomNodeError, InferenceError, TrainingError)
