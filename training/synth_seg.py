"""The annotator's DICOM-SEG for a synthetic US object (highdicom, binary, one segment).

Codes come from pydicom's ``codes`` dictionary (never typed-in numbers). highdicom 0.28 builds a
SEG of a multi-frame source only when the source has a Frame of Reference, which US objects do
not; for cine loops the SEG is therefore built against a one-frame view of the header and its
references are then pointed at the outlined frame of the real loop (what a viewer-based
annotation tool records).
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundImageStorage
from pydicom.valuerep import DA, TM


def build_seg(source: Dataset, mask: np.ndarray, seg_frames: list[int], *,
              uids: dict[str, str], laterality: str, series_number: int,
              content_date: str) -> Dataset:
    """A binary DICOM-SEG with one "Rectus femoris" segment referencing ``seg_frames``.

    Args:
        source: the US object (header and pixel data as written).
        mask: bool (frames, rows, cols) in source frame coordinates; frames not listed in
            ``seg_frames`` are left empty so highdicom omits them and references only the others.
        seg_frames: 1-based source frames the annotator outlined.
        uids: ``series``, ``sop`` and ``dimension`` (organisation) UIDs.
        laterality: R or L, written as the anatomic region modifier.
        series_number: SeriesNumber of the SEG series.
        content_date: fixed ContentDate so output is deterministic.
    """
    n = int(getattr(source, "NumberOfFrames", 1) or 1)
    if len(seg_frames) != 1:
        # highdicom 0.28 builds SEGs of multi-frame sources only with a Frame of Reference,
        # which US objects do not have; one outlined frame per cine is what sonographers do.
        raise ValueError("exactly one outlined frame per source object is supported")
    frame_number = seg_frames[0]
    src = source
    if n > 1:
        # build against a one-frame view of the header, then point the references at the
        # outlined frame of the real cine loop
        src = Dataset()
        for elem in source:
            if elem.keyword != "PixelData":
                src.add(copy.deepcopy(elem))  # never alias the real header's elements
        src.file_meta = source.file_meta
        for keyword in ("NumberOfFrames", "FrameTime", "FrameIncrementPointer", "CineRate",
                        "RecommendedDisplayFrameRate"):
            if keyword in src:
                delattr(src, keyword)
        src.SOPClassUID = UltrasoundImageStorage
    arr = mask[frame_number - 1].astype(np.uint8)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Rectus femoris",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SkeletalMuscle,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        anatomic_regions=[codes.SCT.Thigh],
    )
    side = codes.SCT.Right if laterality == "R" else codes.SCT.Left
    description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
        hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)
    ]
    seg = hd.seg.Segmentation(
        source_images=[src],
        pixel_array=arr,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=uids["series"],
        series_number=series_number,
        sop_instance_uid=uids["sop"],
        instance_number=1,
        manufacturer="dicom-node synthetic annotator",
        manufacturer_model_name="synth",
        software_versions="1",
        device_serial_number="SYN-ANNOT-1",
        series_description="RF segmentation",
        omit_empty_frames=True,
    )
    if n > 1:
        _point_at_frame(seg, frame_number, source.SOPClassUID)
    # highdicom stamps creation times and a random dimension organisation UID: pin them so a
    # seed gives byte-identical files
    seg.ContentDate = seg.SeriesDate = seg.InstanceCreationDate = DA(content_date)
    seg.ContentTime = seg.SeriesTime = seg.InstanceCreationTime = TM("100000")
    for item in getattr(seg, "ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{content_date}100000"
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = uids["dimension"]
    seg.PatientOrientation = ""
    return seg


def _point_at_frame(seg: Dataset, frame_number: int, sop_class: str) -> None:
    """Make every source-image reference of ``seg`` name ``frame_number`` of the cine loop."""
    refs = []
    for fg in seg.PerFrameFunctionalGroupsSequence:
        for der in getattr(fg, "DerivationImageSequence", []):
            refs.extend(der.SourceImageSequence)
    refs.extend(getattr(seg, "SourceImageSequence", []))
    for item in refs:
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedFrameNumber = frame_number
    # the Common Instance Reference module has no frame numbers, only the class
    for series in getattr(seg, "ReferencedSeriesSequence", []):
        fresh = []
        for item in series.ReferencedInstanceSequence:  # items may be shared with the above
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            fresh.append(ref)
        series.ReferencedInstanceSequence = fresh
