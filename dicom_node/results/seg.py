"""The AI-generated DICOM-SEG the node returns to PACS with its SR and heat maps.

When the ROI came from the automatic segmenter, the PACS should hold that outline too: a
radiologist can check it next to the image, and the SR's measurements can point at it. The object
is a binary highdicom Segmentation with one segment, "Rectus femoris muscle", marked AUTOMATIC,
whose Algorithm Identification names the segmentation model (name, version, model UID), and
which references the exact source image and frame it was computed on.

Coding: pydicom's dictionaries have no rectus-femoris-specific SNOMED CT concept, so the segment
is typed as SCT 127954009 "Skeletal muscle" (category SCT 85756007 "Tissue") with the anatomic
region SCT 68367000 "Thigh" plus the laterality modifier and the label naming the muscle: the same
coding as the annotator SEGs the node reads, so ``inference.roi`` picks either alike.

US images have no Frame of Reference, and highdicom 0.28 builds a SEG of a multi-frame source
only with one, so cine loops are built against a one-frame view of the header and the references
then point at the segmented frame of the loop.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundImageStorage, generate_uid

logger = logging.getLogger(__name__)

SEGMENT_LABEL = "Rectus femoris muscle"
_PAIRED = ("R", "L")
_CINE_KEYWORDS = ("NumberOfFrames", "FrameTime", "FrameIncrementPointer", "CineRate",
                  "RecommendedDisplayFrameRate", "FrameTimeVector")


@dataclass(frozen=True)
class SegmentationModelId:
    """The segmenter as named in the SEG's Algorithm Identification Sequence.

    Attributes:
        name: model name (``model.json`` "name").
        version: model version.
        model_uid: the artifact's model UID (written as an algorithm parameter).
        manufacturer: who runs it (the SEG's Manufacturer).
    """

    name: str
    version: str
    model_uid: str
    manufacturer: str = "dicom-node"


def full_frame_mask(mask: np.ndarray, crop_box: tuple[int, int, int, int], rows: int,
                    cols: int) -> np.ndarray:
    """Put a mask of the tissue-region crop back into the full source frame (bool rows x cols)."""
    r0, c0, r1, c1 = crop_box
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (r1 - r0, c1 - c0):
        raise ValueError(f"mask {mask.shape} does not match crop box {crop_box}")
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise ValueError(f"crop box {crop_box} outside the {rows}x{cols} frame")
    full = np.zeros((rows, cols), dtype=bool)
    full[r0:r1, c0:c1] = mask
    return full


def _laterality(src: Dataset) -> str | None:
    for kw in ("Laterality", "ImageLaterality"):
        value = str(src.get(kw, "") or "").upper()
        if value in _PAIRED:
            return value
    return None


def _one_frame_view(source: Dataset) -> Dataset:
    """A single-frame US header copy of a cine loop (no pixel data), see the module docstring."""
    view = Dataset()
    for elem in source:
        if elem.keyword != "PixelData":
            view.add(copy.deepcopy(elem))
    if hasattr(source, "file_meta"):
        view.file_meta = source.file_meta
    for kw in _CINE_KEYWORDS:
        if kw in view:
            delattr(view, kw)
    view.SOPClassUID = UltrasoundImageStorage
    return view


def _point_at_frame(seg: Dataset, frame_number: int, sop_class: str) -> None:
    """Every source-image reference of ``seg`` names ``frame_number`` of the real cine loop."""
    refs = []
    for fg in seg.PerFrameFunctionalGroupsSequence:
        for der in getattr(fg, "DerivationImageSequence", []):
            refs.extend(der.SourceImageSequence)
    refs.extend(getattr(seg, "SourceImageSequence", []))
    for item in refs:
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedFrameNumber = frame_number
    for series in getattr(seg, "ReferencedSeriesSequence", []):
        fresh = []
        for item in series.ReferencedInstanceSequence:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            fresh.append(ref)
        series.ReferencedInstanceSequence = fresh


def build_ai_seg(
    source: Dataset,
    mask: np.ndarray,
    frame_number: int,
    model: SegmentationModelId,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 901,
    instance_number: int = 1,
    device_serial_number: str = "dicom-node",
) -> hd.seg.Segmentation:
    """A binary DICOM-SEG of the automatic RF outline on one source frame.

    Args:
        source: the US image header (pixel data not needed; Rows/Columns must be present).
        mask: bool (Rows, Columns) in full source-frame coordinates (see :func:`full_frame_mask`).
        frame_number: 1-based frame of ``source`` the mask was computed on.
        model: the segmenter's identity.
        series_instance_uid / sop_instance_uid: fixed UIDs (new ones by default).
        series_number / instance_number: numbering of the AI SEG series.
        device_serial_number: the node's identity as the creating device.

    Raises:
        ValueError: an empty mask, a shape that is not the source frame, a bad frame number.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, cols = int(source.Rows), int(source.Columns)
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    if mask.shape != (rows, cols):
        raise ValueError(f"mask {mask.shape} is not the source frame size {(rows, cols)}")
    if not mask.any():
        raise ValueError("the automatic mask is empty; an empty SEG is never sent")
    if not (1 <= frame_number <= n_frames):
        raise ValueError(f"frame {frame_number} outside 1..{n_frames}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name[:64], family=codes.cid7162.ArtificialIntelligence,
        version=str(model.version)[:64] or "unknown", source=model.manufacturer[:64] or None,
        parameters={"model_uid": model.model_uid},
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SkeletalMuscle,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Thigh],
    )
    side = _laterality(source)
    if side is not None:
        mod = codes.SCT.Right if side == "R" else codes.SCT.Left
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            hd.sr.CodedConcept(mod.value, mod.scheme_designator, mod.meaning)]
    src = _one_frame_view(source) if n_frames > 1 else source
    seg = hd.seg.Segmentation(
        source_images=[src],
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=model.manufacturer[:64],
        manufacturer_model_name=model.name[:64],
        software_versions=str(model.version)[:64] or "unknown",
        device_serial_number=device_serial_number[:64],
        series_description="AI RF segmentation (automatic)",
        content_label="AI_RF_SEG",
        content_description="Automatic rectus femoris outline, research use only",
        omit_empty_frames=True,
    )
    if n_frames > 1:
        _point_at_frame(seg, frame_number, str(source.SOPClassUID))
    # dciodvfy: PatientOrientation is Type 2C for a SEG without a frame of reference
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = ""
    return seg
