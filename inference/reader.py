"""Read a study's US images and DICOM-SEGs into cropped, calibrated frames with aligned masks.

This is the one reading layer used by the node, the trainer and the scorer, so all three see
the same pixels. Per US object: decode (``inference.decode``) -> find the 2D tissue region
(``inference.us_regions``) -> crop. Per SEG: match its frames to the source frames
(``inference.roi``) and crop each mask with the same box as its image. Whatever cannot be used
is returned in ``StudyRead.problems`` as (SOP Instance UID, reason), so the node can record why,
instead of failing silently or guessing.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.decode import (
    FramePolicy,
    decode_frames,
    frame_indices,
    number_of_frames,
    sop_uid_of,
)
from inference.errors import ReaderError, SegmentationError
from inference.roi import (
    FrameMask,
    crop_mask,
    is_automatic_seg,
    is_segmentation,
    load_segmentation,
    masks_for_sources,
    seg_algorithms,
)
from inference.types import USFrame
from inference.us_regions import RegionPolicy, colour_mask, tissue_regions

logger = logging.getLogger(__name__)

# The reason recorded for a usable image that no DICOM-SEG references (informational: the image
# is still in ``StudyRead.frames`` with ``mask=None``).
NO_SEG_REASON = "no DICOM-SEG references this image"
# The reason recorded for a SEG whose segments are all AUTOMATIC (see inference.roi).
AUTOMATIC_SEG_REASON = "automatic DICOM-SEG (no human delineation); not used as the ROI"


@dataclass
class StudyRead:
    """What :func:`read_study` could make of a study's files.

    Attributes:
        frames: cropped frames of every usable US object; ``mask`` is set where a SEG matched.
        problems: (SOP Instance UID, or the file path when unreadable, human-readable reason) for
            objects that could not be used, SEGs that matched nothing and images without SEG.
        datasets: SOP Instance UID -> header of each usable US source (Pixel Data removed), for
            building results.
    """

    frames: list[USFrame] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    datasets: dict[str, Dataset] = field(default_factory=dict)


def _load(path_or_dataset: str | os.PathLike[str] | Dataset) -> Dataset:
    if isinstance(path_or_dataset, Dataset):
        return path_or_dataset
    try:
        return pydicom.dcmread(path_or_dataset)
    except Exception as exc:  # noqa: BLE001 - missing file, not DICOM, truncated header
        raise ReaderError(None, f"{path_or_dataset}: not readable as DICOM: {exc}") from exc


def read_frames(
    path_or_dataset: str | os.PathLike[str] | Dataset,
    *,
    frame_policy: FramePolicy = "middle",
    max_frames: int = 16,
    region_policy: RegionPolicy = "largest",
    frame_numbers: Sequence[int] | None = None,
) -> list[USFrame]:
    """Decode one US object into frames cropped to its tissue region (no mask).

    Args:
        path_or_dataset: a DICOM file or a full dataset with Pixel Data.
        frame_policy: cine frame choice: ``all`` / ``middle`` / ``max-contrast``.
        max_frames: cap on frames for ``all``.
        region_policy: ``largest`` 2D tissue region, or ``all`` regions (side-by-side views give
            one USFrame per region, same frame number, different ``crop_box``).
        frame_numbers: decode exactly these 1-based frames (overrides ``frame_policy``).

    Raises:
        UnsupportedTransferSyntaxError: no decoder for the pixel data.
        NoTissueRegionError: no 2D tissue region in the region sequence or the pixels.
        ReaderError: anything else that makes the object unusable (names the SOP Instance UID).
    """
    ds = _load(path_or_dataset)
    sop = sop_uid_of(ds)
    if is_segmentation(ds):
        raise ReaderError(sop, "object is a DICOM-SEG, not an ultrasound image")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ReaderError(sop, "object has no Rows/Columns (not an image)") from None
    if "SequenceOfUltrasoundRegions" in ds and len(ds.SequenceOfUltrasoundRegions):
        regions = tissue_regions(ds, rows, cols, region_policy=region_policy)
        decoded = decode_frames(ds, contrast_box=regions[0].box, frame_policy=frame_policy,
                                max_frames=max_frames, frame_numbers=frame_numbers)
    else:
        # Content-based crop: find the region on the middle frame (cine geometry is static).
        first = decode_frames(ds, frame_policy="middle", frame_numbers=frame_numbers[:1]
                              if frame_numbers else None)
        regions = tissue_regions(ds, rows, cols, first[0][1], region_policy=region_policy,
                                 exclude=_colour_pixels(ds))
        if (frame_policy == "middle" and frame_numbers is None) or (
                frame_numbers is not None and len(set(frame_numbers)) == 1):
            decoded = first
        else:
            decoded = decode_frames(ds, contrast_box=regions[0].box, frame_policy=frame_policy,
                                    max_frames=max_frames, frame_numbers=frame_numbers)
    common: dict[str, Any] = dict(
        sop_instance_uid=str(sop or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
        model_name=str(ds.get("ManufacturerModelName", "")),
        source_rows=rows,
        source_cols=cols,
    )
    out: list[USFrame] = []
    for frame_number, gray in decoded:
        for region in regions:
            r0, c0, r1, c1 = region.box
            out.append(USFrame(
                frame_number=frame_number,
                image=np.ascontiguousarray(gray[r0:r1, c0:c1], dtype=np.float32),
                crop_box=region.box,
                spacing_cm=region.spacing_cm,
                **common,
            ))
    return out


def _colour_pixels(ds: Dataset) -> np.ndarray | None:
    """Saturated colour pixels of a colour object's middle frame (never tissue); None for grey.

    The grey frames the reader works on hide colour-flow boxes and colour bars, which the
    content-based crop must leave out.
    """
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    if int(ds.get("SamplesPerPixel", 1) or 1) < 3 and pi != "PALETTE COLOR":
        return None
    from inference.gate import decode_display_frame

    try:
        frame = decode_display_frame(ds)
    except ValueError:
        return None
    return colour_mask(frame) if frame.ndim == 3 else None


def _seg_order(ds: Dataset) -> tuple[str, str, int]:
    """Sort key: later SEGs (by content date/time, then instance number) win for a frame."""
    return (str(ds.get("ContentDate", "")), str(ds.get("ContentTime", "")),
            int(ds.get("InstanceNumber", 0) or 0))


def read_study(
    paths: Sequence[Path],
    *,
    frame_policy: FramePolicy = "middle",
    max_frames: int = 16,
    region_policy: RegionPolicy = "largest",
    automatic_segs: bool = False,
) -> StudyRead:
    """Read every object of a study: US frames cropped and calibrated, SEG masks aligned.

    SEGs are matched first, so a cine whose annotated frame is not the policy's frame is read at
    the annotated frame(s) (for ``middle``/``max-contrast``; ``all`` adds them to its frames).
    A SEG whose segments are all AUTOMATIC (:func:`inference.roi.is_automatic_seg`) is reported
    and left out, so the study reads exactly as without it: an AI outline is not a human ROI.

    Args:
        paths: the study's DICOM files (US images, SEGs; anything else is reported and skipped).
        frame_policy: see :func:`read_frames`.
        max_frames: see :func:`read_frames`.
        region_policy: see :func:`read_frames`.
        automatic_segs: use all-AUTOMATIC SEGs as masks too (to check an AI SEG against its
            source image); never for scoring or training.

    Returns:
        A :class:`StudyRead`; it never raises for a bad object, it reports it.
    """
    result = StudyRead()
    images: dict[str, Dataset] = {}
    segs: list[Dataset] = []
    automatic: list[Dataset] = []
    for path in paths:
        try:
            ds: Dataset = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            result.problems.append((str(path), f"not readable as DICOM: {exc}"))
            continue
        sop = sop_uid_of(ds) or str(path)
        if is_segmentation(ds):
            (segs if automatic_segs or not is_automatic_seg(ds) else automatic).append(ds)
        elif "PixelData" in ds:
            if sop in images:
                logger.info("duplicate instance %s ignored", sop)
                continue
            images[sop] = ds
        else:
            what = getattr(ds.get("SOPClassUID"), "name", None) or str(ds.get("SOPClassUID", "?"))
            result.problems.append((sop, f"not an image or DICOM-SEG ({what}); skipped"))
    study = next((str(d.get("StudyInstanceUID", "")) for d in images.values()), "")
    extra = {"study_uid": study}
    for seg_ds in automatic:
        seg_uid = sop_uid_of(seg_ds) or "?"
        result.problems.append((seg_uid, AUTOMATIC_SEG_REASON))
        logger.info("study %s: automatic DICOM-SEG %s (%s) not used as the ROI", study, seg_uid,
                    seg_algorithms(seg_ds), extra=extra)

    geometry: dict[str, tuple[int, int, int]] = {}
    for sop, ds in images.items():
        try:
            geometry[sop] = (number_of_frames(ds), int(ds.Rows), int(ds.Columns))
        except (AttributeError, TypeError, ValueError):
            pass  # read_frames below reports it

    masks = _match_segs(segs, geometry, result, extra)

    annotated: dict[str, list[int]] = defaultdict(list)
    for sop, frame in masks:
        annotated[sop].append(frame)
    for sop, ds in images.items():
        frame_numbers = None
        ann = sorted(annotated.get(sop, []))
        if ann and geometry[sop][0] > 1:
            if frame_policy == "all":
                chosen = {i + 1 for i in frame_indices(geometry[sop][0], "all", max_frames)}
                frame_numbers = sorted(chosen | set(ann))
            else:
                middle = geometry[sop][0] // 2 + 1
                frame_numbers = [min(ann, key=lambda f: (abs(f - middle), f))]
        try:
            frames = read_frames(ds, frame_policy=frame_policy, max_frames=max_frames,
                                 region_policy=region_policy, frame_numbers=frame_numbers)
        except ReaderError as exc:
            result.problems.append((exc.sop_instance_uid or sop, exc.reason))
            logger.warning("unusable image %s: %s", sop, exc.reason, extra=extra)
            continue
        unmatched = []
        for fr in frames:
            fm = masks.get((sop, fr.frame_number))
            if fm is None:
                unmatched.append(fr.frame_number)
                continue
            fr.mask = crop_mask(fm.mask, fr.crop_box)
            fr.seg_sop_instance_uid = fm.seg_sop_instance_uid
            fr.seg_series_instance_uid = fm.seg_series_instance_uid
            fr.segment_number = fm.segment_number
        if unmatched:
            unmatched = sorted(set(unmatched))
            if len(unmatched) == len({f.frame_number for f in frames}):
                reason = NO_SEG_REASON
            else:
                reason = f"no DICOM-SEG mask for frame(s) {unmatched}"
            result.problems.append((sop, reason))
        result.frames.extend(frames)
        if "PixelData" in ds:
            del ds.PixelData  # headers only downstream; frees the study's pixel bytes
        result.datasets[sop] = ds
    logger.info("read study %s: %d frame(s), %d with mask, %d problem(s)", study,
                len(result.frames), sum(f.mask is not None for f in result.frames),
                len(result.problems), extra=extra)
    return result


def _match_segs(
    segs: list[Dataset],
    geometry: dict[str, tuple[int, int, int]],
    result: StudyRead,
    extra: dict[str, str],
) -> dict[tuple[str, int], FrameMask]:
    """(source SOP UID, frame) -> mask from the SEGs; problems go to ``result.problems``."""
    masks: dict[tuple[str, int], FrameMask] = {}
    for seg_ds in sorted(segs, key=_seg_order):
        seg_uid = sop_uid_of(seg_ds) or "?"
        try:
            seg = load_segmentation(seg_ds)
            found, missing = masks_for_sources(seg, geometry)
        except SegmentationError as exc:
            result.problems.append((exc.sop_instance_uid or seg_uid, exc.reason))
            logger.warning("unusable SEG %s: %s", seg_uid, exc.reason, extra=extra)
            continue
        if not found:
            result.problems.append((seg_uid, "DICOM-SEG references none of the images in this "
                                    f"study (references {', '.join(missing)})"))
            continue
        if missing:
            result.problems.append((seg_uid, f"DICOM-SEG also references {len(missing)} image(s) "
                                    f"not in this study: {', '.join(missing)}"))
        for fm in found:
            key = (fm.source_sop_instance_uid, fm.frame_number)
            if key in masks:
                result.problems.append((masks[key].seg_sop_instance_uid, f"superseded by later "
                                        f"DICOM-SEG {seg_uid} for {key[0]} frame {key[1]}"))
            masks[key] = fm
    return masks
