"""What the demo's steps hand each other: the held-out studies and the demo's own error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.errors import DicomNodeError


class DemoError(DicomNodeError):
    """A demo step failed; the message says which step and what to look at."""


@dataclass(frozen=True)
class SrSummary:
    """What the demo's table shows of one TID 1500 SR, read back with highdicom.

    Attributes:
        probability: the study-level P(sarcopenia) (no derivation), if present.
        positive: the study-level qualitative evaluation (present/absent), if present.
        spread: per-image fold standard deviations of the probability.
        csa: per-image rectus femoris cross-sectional areas (cm2), where a SEG gave the ROI.
        thickness: per-image muscle thicknesses (cm), where measured.
        images: number of per-image measurement groups.
    """

    probability: float | None
    positive: bool | None
    spread: list[float]
    csa: list[float]
    thickness: list[float]
    images: int


@dataclass
class DemoStudy:
    """One held-out study pushed to the node, and what came back for it from the PACS."""

    study_uid: str
    patient_id: str
    participant: str
    vendor: str
    truth: str
    files: list[Path]
    sr: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    summary: SrSummary | None = None
    sr_errors: int | None = None
    folder: Path | None = None
