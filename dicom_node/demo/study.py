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
        csa: per-image rectus femoris cross-sectional areas (cm2), where an ROI (a human SEG
            or the automatic segmenter) gave one.
        thickness: per-image muscle thicknesses (cm), where measured.
        echo: per-image mean echo intensities (0-255), where measured.
        images: number of per-image measurement groups.
        roi: where each per-image group's ROI came from: ``auto`` (the node's segmenter),
            ``seg`` (a DICOM-SEG that came with the study), ``whole`` (whole tissue region) or
            ``not scored``.
    """

    probability: float | None
    positive: bool | None
    spread: list[float]
    csa: list[float]
    thickness: list[float]
    images: int
    echo: list[float] = field(default_factory=list)
    roi: list[str] = field(default_factory=list)


@dataclass
class DemoStudy:
    """One held-out study pushed to the node, and what came back for it from the PACS.

    ``segs`` are the node's AI DICOM-SEGs (automatic ROIs), ``dice`` their per-frame Dice against
    the generator's truth mask, ``seg_errors`` the dciodvfy errors summed over them.
    """

    study_uid: str
    patient_id: str
    participant: str
    vendor: str
    truth: str
    files: list[Path]
    sr: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    segs: list[Path] = field(default_factory=list)
    summary: SrSummary | None = None
    sr_errors: int | None = None
    seg_errors: int | None = None
    dice: list[float] = field(default_factory=list)
    folder: Path | None = None
