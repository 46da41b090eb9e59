"""Plain data passed between the reader, the scorer, the trainer and the results writer.

These dataclasses are the contracts between packages: the reader produces :class:`USFrame`, the
scoring pipeline produces :class:`StudyScore`, ``dicom_node.results`` turns a ``StudyScore`` into
DICOM. They hold numpy arrays and UIDs only, never pydicom datasets, so each side can be tested
without the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from inference.roi import RoiSource

if TYPE_CHECKING:
    from inference.gate import GateVerdict


@dataclass
class USFrame:
    """One ultrasound frame cropped to its 2D tissue region, with its ROI mask if a SEG exists.

    Attributes:
        sop_instance_uid: SOP Instance UID of the source US image.
        series_instance_uid: its Series Instance UID.
        study_instance_uid: its Study Instance UID.
        sop_class_uid: its SOP Class UID (US Image or US Multi-frame Image Storage).
        frame_number: 1-based DICOM frame number (1 for single-frame objects).
        image: float32 grayscale, shape (H, W), values 0..1, cropped to the tissue region.
        crop_box: (row0, col0, row1, col1) of the crop in source pixel coordinates (end exclusive).
        spacing_cm: (row, col) physical size of one pixel in cm, from the US region calibration
            (absolute values); None when the object carries no calibration.
        mask: bool (H, W) aligned with ``image``, True inside the rectus femoris ROI; None when no
            SEG references this frame.
        seg_sop_instance_uid: SOP Instance UID of the DICOM-SEG the mask came from.
        seg_series_instance_uid: its Series Instance UID.
        segment_number: segment number inside that SEG.
        patient_id: Patient ID (never the name).
        manufacturer: Manufacturer tag, for per-vendor reporting.
        model_name: ManufacturerModelName tag.
        source_rows: Rows of the full source frame (before cropping).
        source_cols: Columns of the full source frame.
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    frame_number: int
    image: np.ndarray
    crop_box: tuple[int, int, int, int]
    spacing_cm: tuple[float, float] | None = None
    mask: np.ndarray | None = None
    seg_sop_instance_uid: str | None = None
    seg_series_instance_uid: str | None = None
    segment_number: int | None = None
    patient_id: str = ""
    manufacturer: str = ""
    model_name: str = ""
    source_rows: int = 0
    source_cols: int = 0


@dataclass
class MuscleMeasurements:
    """Quantitative rectus femoris measurements from the ROI and the US calibration.

    Attributes:
        csa_cm2: cross-sectional area of the ROI in cm^2 (None without calibration).
        thickness_cm: maximal antero-posterior extent of the ROI in cm (None without calibration).
        echo_intensity_mean: mean grey level inside the ROI on a 0-255 scale.
        echo_intensity_sd: standard deviation of the grey level inside the ROI (heterogeneity).
    """

    csa_cm2: float | None
    thickness_cm: float | None
    echo_intensity_mean: float
    echo_intensity_sd: float


@dataclass
class ImageScore:
    """The ensemble's verdict on one frame.

    Attributes:
        frame: the scored frame (UIDs, crop, mask reference).
        probability: mean over the fold models of the sarcopenia probability.
        fold_probabilities: one probability per fold model.
        fold_spread: standard deviation of ``fold_probabilities`` (an uncertainty).
        heatmap: float32 (H, W) in 0..1 aligned with ``frame.image`` (Grad-CAM averaged over folds);
            None when CAM is switched off.
        measurements: muscle measurements; None when the frame has no ROI.
        roi_source: where the ROI came from (:class:`inference.roi.RoiSource`: SEG, AUTO or
            WHOLE_REGION when the tissue region was scored without one).
        gate: the input gate's verdict on the source image (None when no gate ran).
    """

    frame: USFrame
    probability: float
    fold_probabilities: list[float]
    fold_spread: float
    heatmap: np.ndarray | None = None
    measurements: MuscleMeasurements | None = None
    roi_source: RoiSource = RoiSource.SEG
    gate: GateVerdict | None = None

    @property
    def site_established(self) -> bool:
        """The thigh is established as finding site (by the header or the sender's rules)."""
        return self.gate is not None and self.gate.site_established


@dataclass
class ModelInfo:
    """Identity of the model that produced a score (IHE AI Results: the algorithm as a device)."""

    name: str
    version: str
    model_uid: str
    backbone: str
    threshold: float
    n_folds: int
    calibration: str = "none"  # "platt", "isotonic" or "none": the scale of the probabilities
    expected_sensitivity: float | None = None  # at ``threshold``, as cross-validation measured
    expected_specificity: float | None = None
    image_threshold: float | None = None  # per-image verdicts (heat maps) only when set
    decision_level: str = "participant"


@dataclass
class StudyScore:
    """The ensemble's verdict on one study.

    Attributes:
        study_instance_uid: the scored study.
        patient_id: its Patient ID.
        probability: study probability by ``rule`` over the image probabilities.
        positive: probability >= model threshold ("Sarcopenia present").
        rule: the aggregation rule used (mean / max / median).
        images: one entry per scored frame.
        fold_spread: standard deviation over folds of each fold's study probability (its
            calibrated images pooled by ``rule``); an uncertainty on ``probability``.
        model: identity of the model.
        skipped: (SOP Instance UID, reason) for objects that could not be used.
        timings_ms: per-stage wall time, for logs and benchmarks.
        gate: the input gate's verdict on every US image of the study, scored or not.
        roi_model: the segmenter that drew the ``RoiSource.AUTO`` masks (None when no image was
            scored on an automatic ROI).
    """

    study_instance_uid: str
    patient_id: str
    probability: float
    positive: bool
    rule: str
    images: list[ImageScore]
    model: ModelInfo
    skipped: list[tuple[str, str]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    gate: list[GateVerdict] = field(default_factory=list)
    fold_spread: float | None = None
    roi_model: ModelInfo | None = None
