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


class NothingToScoreError(ScoringError):
    """A study holds no image the model may score (SEG-only, or every image stopped by the input
    gate). Terminal, not a failure: the job ends as ``not-applicable: <reason>``.

    Attributes:
        study_instance_uid: the study.
        reasons: (SOP Instance UID, why it was not scored) per object.
        verdicts: the input gate's verdicts (``inference.gate.GateVerdict``), possibly empty.
        sources: headers (no Pixel Data) of the gated-out images by SOP Instance UID, for a
            "not assessable" SR.
    """

    def __init__(self, study_instance_uid: str, reasons: list[tuple[str, str]],
                 verdicts: list | None = None, sources: dict | None = None) -> None:
        self.study_instance_uid = study_instance_uid
        self.reasons = list(reasons)
        self.verdicts = list(verdicts or [])
        self.sources = dict(sources or {})
        text = "; ".join(f"{u}: {r}" for u, r in self.reasons) or "no ultrasound images found"
        super().__init__(f"study {study_instance_uid}: nothing to score ({text})")

    def __reduce__(self) -> tuple:
        """Picklable (scoring may run in a worker process and hand the error back)."""
        return (type(self), (self.study_instance_uid, self.reasons, self.verdicts, self.sources))

    @property
    def state(self) -> str:
        """The study state the job layer records: ``not-applicable: <first reason>``."""
        first = self.reasons[0][1] if self.reasons else "no ultrasound images found"
        return f"not-applicable: {first}"
