"""DICOM-SEG -> per-frame rectus femoris masks, matched to the US frames they were drawn on.

A SEG says which source image and frame each of its frames belongs to (per-frame Derivation
Image Sequence -> Source Image Sequence -> Referenced SOP Instance UID / Referenced Frame
Number). We read the SEG with highdicom, pick the rectus femoris segment, and ask highdicom for
the mask of each referenced source frame. Nothing is guessed: a SEG whose references cannot be
resolved, or whose frames do not match the source geometry, raises :class:`SegmentationError`
and the reader reports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from inference.errors import SegmentationError

logger = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"
_PREFERRED_LABELS = ("rectus femoris",)


class RoiSource(str, Enum):
    """Where a scored frame's ROI came from (the values are what results and the index store).

    ``SEG``: a DICOM-SEG outlined the muscle. ``AUTO``: an automatic segmentation model drew it.
    ``WHOLE_REGION``: no ROI; the whole tissue region was scored (the missing-SEG policy allowed
    it). A ``str`` subclass so stored values and comparisons with "seg" keep working.
    """

    SEG = "seg"
    AUTO = "auto"
    WHOLE_REGION = "whole-region"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class FrameMask:
    """The ROI of one source frame, in full source-frame pixel coordinates.

    Attributes:
        source_sop_instance_uid: the US image the mask belongs to.
        frame_number: 1-based frame of that image.
        mask: bool (rows, cols) of the full source frame.
        seg_sop_instance_uid: the SEG it came from.
        seg_series_instance_uid: that SEG's series.
        segment_number: the segment used.
    """

    source_sop_instance_uid: str
    frame_number: int
    mask: np.ndarray
    seg_sop_instance_uid: str
    seg_series_instance_uid: str
    segment_number: int


def is_segmentation(ds: Dataset) -> bool:
    """True for (binary, fractional or label-map) Segmentation Storage objects."""
    return str(ds.get("SOPClassUID", "")) in (SEG_SOP_CLASS_UID, LABELMAP_SEG_SOP_CLASS_UID) or (
        ds.get("Modality") == "SEG"
    )


def is_automatic_seg(seg: Dataset | str | os.PathLike[str]) -> bool:
    """True for a DICOM-SEG whose segments are all AUTOMATIC: no human drew or checked it.

    Such a SEG (this node's own AI SEG routed back by PACS, or another AI product's) is never a
    human ROI: it is archived, but it does not count as "the SEG arrived", does not re-open a
    study and is not used as the scoring ROI or as a training reference. MANUAL and
    SEMIAUTOMATIC segments (a human drew or checked them) count as human; a SEG with any such
    segment is human. A path is read header-only; anything unreadable or malformed is "not
    automatic" (the reader then reports it like any other SEG).
    """
    try:
        if not isinstance(seg, Dataset):
            seg = pydicom.dcmread(seg, stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "Modality", "SegmentSequence"])
        if not is_segmentation(seg):
            return False
        segments = list(seg.get("SegmentSequence") or [])
        return bool(segments) and all(
            str(item.get("SegmentAlgorithmType", "") or "").strip().upper() == "AUTOMATIC"
            for item in segments)
    except Exception:  # noqa: BLE001 - hostile input: an undecodable header is not "automatic"
        return False


def seg_algorithms(seg: Dataset) -> str:
    """The algorithms named by a SEG's segments ("name version", de-duplicated), for logs.

    Algorithm names are product names, never patient data; unnamed ones read "unnamed".
    """
    names: list[str] = []
    try:
        for item in seg.get("SegmentSequence") or []:
            for alg in item.get("SegmentationAlgorithmIdentificationSequence") or []:
                name = f"{alg.get('AlgorithmName', '')} {alg.get('AlgorithmVersion', '')}".strip()
                if name and name not in names:
                    names.append(name[:64])
            name = str(item.get("SegmentAlgorithmName", "") or "").strip()
            if name and not any(n.startswith(name[:64]) for n in names):
                names.append(name[:64])
    except Exception:  # noqa: BLE001 - a malformed sequence only loses the log detail
        pass
    return ", ".join(names) or "unnamed"


def load_segmentation(ds: Dataset) -> hd.seg.Segmentation:
    """Wrap ``ds`` as a highdicom Segmentation (no copy), mapping failures to SegmentationError."""
    sop = str(ds.get("SOPInstanceUID", "")) or None
    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types on malformed SEGs
        raise SegmentationError(sop, f"unsupported or malformed DICOM-SEG: {exc}") from exc


def choose_segment(seg: hd.seg.Segmentation) -> int:
    """Segment to use: one labelled rectus femoris, else skeletal muscle, else the first."""
    numbers = list(seg.segment_numbers)
    if not numbers:
        raise SegmentationError(str(seg.SOPInstanceUID), "SEG defines no segments")
    descs = {n: seg.get_segment_description(n) for n in numbers}
    for n, d in descs.items():
        text = f"{d.segment_label} {d.segmented_property_type.meaning}".lower()
        if any(label in text for label in _PREFERRED_LABELS):
            return n
    muscle = codes.SCT.SkeletalMuscle
    for n, d in descs.items():
        t = d.segmented_property_type
        if t.value == muscle.value and t.scheme_designator == muscle.scheme_designator:
            return n
    return numbers[0]


def referenced_frames(seg: Dataset) -> dict[str, set[int]]:
    """Source SOP Instance UID -> referenced 1-based frame numbers (empty set: no frame given).

    Reads the per-frame (or shared) Derivation Image Sequence, the standard place, then falls back
    to the top-level Source Image Sequence and Referenced Series Sequence.
    """
    refs: dict[str, set[int]] = {}

    def add(item: Dataset) -> None:
        uid = item.get("ReferencedSOPInstanceUID")
        if not uid:
            return
        frames = item.get("ReferencedFrameNumber")
        got = refs.setdefault(str(uid), set())
        if frames is not None and frames != "":
            values = frames if isinstance(frames, (MultiValue, list, tuple)) else [frames]
            got.update(int(f) for f in values)

    groups = list(seg.get("PerFrameFunctionalGroupsSequence", []) or [])
    groups += list(seg.get("SharedFunctionalGroupsSequence", []) or [])
    for fg in groups:
        for der in fg.get("DerivationImageSequence", []) or []:
            for src in der.get("SourceImageSequence", []) or []:
                add(src)
    if not refs:
        for src in seg.get("SourceImageSequence", []) or []:
            add(src)
        for ser in seg.get("ReferencedSeriesSequence", []) or []:
            for inst in ser.get("ReferencedInstanceSequence", []) or []:
                add(inst)
    return refs


def masks_for_sources(
    seg: hd.seg.Segmentation, sources: Mapping[str, tuple[int, int, int]]
) -> tuple[list[FrameMask], list[str]]:
    """Masks of the chosen segment for every present source frame the SEG references.

    Args:
        seg: the segmentation (see :func:`load_segmentation`).
        sources: present US images: SOP Instance UID -> (number of frames, rows, columns).

    Returns:
        (masks, missing): one :class:`FrameMask` per referenced present frame, and the SOP
        Instance UIDs the SEG references that are not among ``sources``.

    Raises:
        SegmentationError: references that cannot be resolved to frames, geometry that does not
            match the source, or a layout highdicom cannot index.
    """
    sop = str(seg.SOPInstanceUID)
    refs = referenced_frames(seg)
    if not refs:
        raise SegmentationError(sop, "SEG references no source image")
    segment = choose_segment(seg)
    out: list[FrameMask] = []
    missing = sorted(uid for uid in refs if uid not in sources)
    for uid, frames in sorted(refs.items()):
        if uid not in sources:
            continue
        n_frames, rows, cols = sources[uid]
        if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
            raise SegmentationError(
                sop, f"SEG frames are {seg.Rows}x{seg.Columns} but source {uid} is {rows}x{cols}"
            )
        if n_frames > 1 and not frames:
            raise SegmentationError(
                sop, f"SEG references multi-frame source {uid} without Referenced Frame Number"
            )
        try:
            if n_frames > 1:
                numbers = sorted(frames)
                arr = seg.get_pixels_by_source_frame(
                    uid, source_frame_numbers=numbers, segment_numbers=[segment],
                    ignore_spatial_locations=True,
                )
            else:
                numbers = [1]
                arr = seg.get_pixels_by_source_instance(
                    [uid], segment_numbers=[segment], ignore_spatial_locations=True
                )
        except Exception as exc:  # noqa: BLE001 - highdicom raises ValueError/KeyError/RuntimeError
            raise SegmentationError(sop, f"cannot extract masks for source {uid}: {exc}") from exc
        for k, frame in enumerate(numbers):
            if frame > n_frames:
                raise SegmentationError(
                    sop, f"SEG references frame {frame} of {uid}, which has {n_frames} frame(s)"
                )
            mask = np.asarray(arr[k, :, :, 0])
            out.append(FrameMask(
                source_sop_instance_uid=uid, frame_number=frame,
                mask=(mask > 0.5) if mask.dtype.kind == "f" else mask.astype(bool),
                seg_sop_instance_uid=sop, seg_series_instance_uid=str(seg.SeriesInstanceUID),
                segment_number=segment,
            ))
    return out, missing


def crop_mask(mask: np.ndarray, crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """The part of a full-frame mask under ``crop_box`` (row0, col0, row1, col1; end exclusive)."""
    r0, c0, r1, c1 = crop_box
    return np.ascontiguousarray(mask[r0:r1, c0:c1]).astype(bool, copy=False)
