"""Errors of the scoring library.

Every error names the thing it is about (a UID, a path, a setting) so that the message alone tells
an operator what to fix. The application catches :class:`InferenceError` at its boundaries.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error the scoring library raises on purpose."""


class InferenceConfigError(InferenceError):
    """A scoring setting cannot be honoured (unknown device, no such CAM layer); names the setting."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ReaderError(InferenceError):
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


class ModelArtifactError(InferenceError):
    """A model directory (model.json + fold checkpoints) is missing or invalid."""


class ScoringError(InferenceError):
    """A study could not be scored; the message says which study and why."""
