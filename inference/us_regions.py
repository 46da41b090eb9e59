"""Find the 2D tissue image inside an ultrasound frame, with its physical pixel size.

Scanners burn a user interface (logo, depth scale, TGC curve, text, thumbnails) around the B-mode
image. The Sequence of Ultrasound Regions (PS3.3 C.8.5.5) says where the calibrated image is: we
keep regions with RegionSpatialFormat 1 (2D) and RegionDataType 1 (tissue), skip Doppler, M-mode
and colour bars, and take |PhysicalDeltaX/Y| when the unit is cm (code 3). Side-by-side (dual)
views give two such regions: the largest is used, or each one with ``region_policy="all"``.
Objects without the sequence get a content-based crop: the largest connected bright, speckled
area, which leaves out text and flat UI bars, and colour pixels (flow boxes, colour bars); when
that crop is doubtful it is not measured in cm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from inference.errors import NoTissueRegionError

logger = logging.getLogger(__name__)

RegionPolicy = Literal["largest", "all"]
Box = tuple[int, int, int, int]

SPATIAL_2D = 1
DATA_TISSUE = 1
UNIT_CM = 3
# A calibrated region smaller than this (after clipping to the frame) is a thumbnail or a
# mis-declared region, not an image a model can read.
MIN_REGION_PX = 16
# cm values are only reported for a calibration a linear MSK probe can have (see
# inference.gate.calibration_plausible for why): a PhysicalDelta implying 40 cm of depth is wrong.
DEPTH_CM_RANGE = (1.5, 10.0)
SPACING_CM_RANGE = (0.005, 0.05)


def plausible_spacing(spacing: tuple[float, float] | None, rows: int
                      ) -> tuple[float, float] | None:
    """``spacing`` when pixel size and the depth it implies are plausible, else None (no cm)."""
    if spacing is None:
        return None
    dy, dx = spacing
    lo, hi = SPACING_CM_RANGE
    # only the upper depth bound: a shallow crop is still measured correctly
    if not (lo <= dy <= hi and lo <= dx <= hi and rows * dy <= DEPTH_CM_RANGE[1]):
        logger.info("calibration %.4f x %.4f cm/px over %d rows is implausible: no cm values",
                    dy, dx, rows)
        return None
    return spacing


@dataclass(frozen=True)
class TissueRegion:
    """A rectangle of the frame holding the 2D tissue image.

    Attributes:
        box: (row0, col0, row1, col1) in source pixel coordinates, end exclusive.
        spacing_cm: (row, col) size of one pixel in cm; None when uncalibrated.
        source: ``"sequence"`` (from the Sequence of Ultrasound Regions) or ``"content"``.
        doubt: for a ``content`` crop, why it is not sure to be the calibrated B-mode image
            (then ``spacing_cm`` is None: the image is scored but not measured in cm).
    """

    box: Box
    spacing_cm: tuple[float, float] | None
    source: str
    doubt: str | None = None

    @property
    def area(self) -> int:
        r0, c0, r1, c1 = self.box
        return max(0, r1 - r0) * max(0, c1 - c0)


def _spacing(item: Dataset) -> tuple[float, float] | None:
    """(row, col) cm per pixel from one region item; None unless both axes are in cm."""
    ux = item.get("PhysicalUnitsXDirection")
    uy = item.get("PhysicalUnitsYDirection")
    dx = item.get("PhysicalDeltaX")
    dy = item.get("PhysicalDeltaY")
    if ux != UNIT_CM or uy != UNIT_CM or dx is None or dy is None:
        return None
    dx, dy = abs(float(dx)), abs(float(dy))  # some devices store negative deltas
    if not (np.isfinite(dx) and np.isfinite(dy)) or dx <= 0 or dy <= 0:
        return None
    return (dy, dx)


def regions_from_sequence(ds: Dataset, rows: int, cols: int, *, check_calibration: bool = True
                          ) -> list[TissueRegion]:
    """All usable 2D tissue regions of ``ds``, clipped to the frame, largest first.

    Returns an empty list when the sequence is present but has no 2D tissue region (e.g. a
    Doppler-only or M-mode-only object) and ``[]`` too when the sequence is absent: callers
    tell the two apart with ``"SequenceOfUltrasoundRegions" in ds``. With ``check_calibration``
    an implausible calibration gives ``spacing_cm=None`` (no cm values); the input gate reads
    the raw one to say why.
    """
    out: list[TissueRegion] = []
    for item in ds.get("SequenceOfUltrasoundRegions", []) or []:
        spatial, data = item.get("RegionSpatialFormat"), item.get("RegionDataType")
        if spatial != SPATIAL_2D or data != DATA_TISSUE:
            continue
        try:
            x0 = int(item.RegionLocationMinX0)
            y0 = int(item.RegionLocationMinY0)
            x1 = int(item.RegionLocationMaxX1)
            y1 = int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        # Max X1/Y1 are the last pixel inside the region (inclusive); clip to the frame, since
        # down-scaled exports keep the original region coordinates.
        box = (max(0, min(y0, y1)), max(0, min(x0, x1)),
               min(rows, max(y0, y1) + 1), min(cols, max(x0, x1) + 1))
        if box[2] - box[0] < MIN_REGION_PX or box[3] - box[1] < MIN_REGION_PX:
            logger.debug("skipping region %s: too small after clipping to %dx%d", box, rows, cols)
            continue
        spacing = _spacing(item)
        if check_calibration:
            spacing = plausible_spacing(spacing, box[2] - box[0])
        out.append(TissueRegion(box=box, spacing_cm=spacing, source="sequence"))
    out.sort(key=lambda r: r.area, reverse=True)
    return out


def colour_mask(rgb: np.ndarray, min_chroma: int = 48, min_saturation: float = 0.4) -> np.ndarray:
    """Pixels of ``rgb`` (H, W, >=3, 0..255) that are saturated colour (flow, bars, graphics).

    Grey B-mode has R = G = B (JPEG chroma noise stays within a few levels) and tinted (sepia)
    maps have low saturation; colour-flow boxes, colour bars and coloured annotations have both.
    """
    px = np.asarray(rgb)[..., :3].astype(np.int16)
    hi, lo = px.max(axis=-1), px.min(axis=-1)
    chroma = hi - lo
    coloured: np.ndarray = (chroma >= min_chroma) & (chroma / np.maximum(hi, 1) >= min_saturation)
    return coloured


@dataclass(frozen=True)
class ContentCrop:
    """The fallback crop found in the pixels, and whether it is sure enough to measure in cm.

    Attributes:
        box: (row0, col0, row1, col1), end exclusive.
        fill: fraction of ``box`` covered by the tissue component (a rectangle of B-mode ~1;
            a fan or a crop around a Doppler box much less).
        doubt: why the crop may not be the calibrated B-mode area (None when sure).
    """

    box: Box
    fill: float
    doubt: str | None


# A linear B-mode image fills its bounding box; below this the crop holds a fan or a hole
# (a colour box cut out, text inside) and cm values from it are not trusted.
MIN_CONTENT_FILL = 0.8
# Colour inside or against the crop beyond this fraction of its area is a colour-flow box (a
# small coloured marker or a colour bar a few pixels away is not).
MAX_COLOUR_NEAR = 0.01


def content_region(gray: np.ndarray, exclude: np.ndarray | None = None) -> Box | None:
    """Bounding box of the largest bright, textured connected area of ``gray``; None if none.

    ``exclude`` (bool, same shape) marks pixels that are never tissue, e.g. colour-flow boxes
    and colour bars found by their chroma (:func:`colour_mask`), so they cannot widen the crop.
    """
    crop = content_crop(gray, exclude)
    return None if crop is None else crop.box


def content_crop(gray: np.ndarray, exclude: np.ndarray | None = None) -> ContentCrop | None:
    """:func:`content_region` with how sure it is (see :class:`ContentCrop`).

    Speckle makes tissue locally non-dark *and* locally varied; text is thin strokes on black
    (removed by a morphological opening at a scale larger than a glyph stroke) and UI bars are
    flat (low local variance). The bounding box of the largest surviving component is the image.
    The crop is doubtful when colour pixels sit inside or against it (a Doppler box in the
    B-mode: the grey left around it is not the whole calibrated image) or when it does not fill
    its box (a sector, or a piece of the UI joined to the image).
    """
    h, w = gray.shape
    if h < MIN_REGION_PX or w < MIN_REGION_PX:
        return None
    k = int(max(5, min(h, w) // 50)) | 1
    g = gray.astype(np.float32, copy=False)
    mean = ndimage.uniform_filter(g, k)
    sq = ndimage.uniform_filter(g * g, k)
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    lit = mean[mean > 0.01]
    # "Non-dark" relative to the image's own brightness, never below ~8 grey levels.
    bright = mean > max(0.03, 0.25 * float(np.median(lit)) if lit.size else 0.03)
    textured = std > 0.01
    # Text and graphics are strokes on pure black: most of their neighbourhood is exactly dark,
    # unlike speckle, which has few near-zero pixels even in hypoechoic tissue.
    dark_frac = ndimage.uniform_filter((g < 0.02).astype(np.float32), 2 * k + 1)
    cand = bright & textured & (dark_frac < 0.4)
    excluded = None
    if exclude is not None and exclude.shape == cand.shape and bool(exclude.any()):
        excluded = ndimage.binary_dilation(exclude, iterations=2)
        cand &= ~excluded
    cand = ndimage.binary_opening(cand, structure=np.ones((2 * k + 1, 2 * k + 1), bool))
    labels, n = ndimage.label(cand)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(cand, labels, index=np.arange(1, n + 1))
    best = int(np.argmax(sizes)) + 1
    if sizes[best - 1] < 0.02 * h * w:
        return None
    sl = ndimage.find_objects((labels == best).astype(np.int32))[0]
    comp = labels[sl] == best
    # Trim edge rows/columns the component only touches sparsely (a text line or a marker that
    # survived the opening at the corner of the image).
    r0, r1 = _trim(comp.mean(axis=1))
    c0, c1 = _trim(comp[r0:r1].mean(axis=0))
    box = (sl[0].start + r0, sl[1].start + c0, sl[0].start + r1, sl[1].start + c1)
    fill = float(comp[r0:r1, c0:c1].mean())
    doubt = None
    if exclude is not None and excluded is not None:
        near = exclude[max(0, box[0] - k):box[2] + k, max(0, box[1] - k):box[3] + k]
        area = (box[2] - box[0]) * (box[3] - box[1])
        if float(near.sum()) > MAX_COLOUR_NEAR * area:
            doubt = (f"colour pixels ({float(near.sum()) / area:.0%} of its area) inside or "
                     "against the image found in the pixels")
    if doubt is None and fill < MIN_CONTENT_FILL:
        doubt = f"the image found in the pixels fills only {fill:.0%} of its box"
    return ContentCrop(box=box, fill=fill, doubt=doubt)


def _trim(fill: np.ndarray, min_fill: float = 0.3) -> tuple[int, int]:
    """First and one-past-last index whose fill fraction reaches ``min_fill``."""
    ok = np.flatnonzero(fill >= min_fill * float(fill.max()))
    return int(ok[0]), int(ok[-1]) + 1


def tissue_regions(
    ds: Dataset,
    rows: int,
    cols: int,
    gray: np.ndarray | None = None,
    *,
    region_policy: RegionPolicy = "largest",
    exclude: np.ndarray | None = None,
) -> list[TissueRegion]:
    """The tissue region(s) to crop, from the region sequence or, without one, from ``gray``.

    Args:
        ds: the US dataset (header is enough when it carries the region sequence).
        rows: frame height.
        cols: frame width.
        gray: a decoded frame, used only by the content-based fallback.
        region_policy: ``largest`` (one region) or ``all`` (each 2D tissue region, e.g. both
            halves of a side-by-side view).
        exclude: pixels the fallback never takes as tissue (:func:`colour_mask` of a colour
            frame); a crop next to them, or one that does not fill its box, gets no cm values.

    Raises:
        NoTissueRegionError: the sequence has no usable 2D tissue region, or the fallback found
            no image-like area.
    """
    sop = str(ds.get("SOPInstanceUID", "")) or None
    if "SequenceOfUltrasoundRegions" in ds and len(ds.SequenceOfUltrasoundRegions):
        regions = regions_from_sequence(ds, rows, cols)
        if not regions:
            kinds = sorted({
                (int(i.get("RegionSpatialFormat", -1) or -1),
                 int(i.get("RegionDataType", -1) or -1))
                for i in ds.SequenceOfUltrasoundRegions
            })
            raise NoTissueRegionError(
                sop, f"Sequence of Ultrasound Regions has no 2D tissue region inside the "
                f"{rows}x{cols} frame (spatial format, data type): {kinds}"
            )
        return regions if region_policy == "all" else regions[:1]
    if gray is None:
        raise NoTissueRegionError(sop, "no Sequence of Ultrasound Regions and no pixels to search")
    crop = content_crop(gray, exclude)
    if crop is None:
        raise NoTissueRegionError(
            sop, "no Sequence of Ultrasound Regions and no image-like area found in the pixels"
        )
    # a crop found in the pixels is measured only when it is sure and PixelSpacing is plausible
    spacing = plausible_spacing(pixel_spacing_cm(ds), crop.box[2] - crop.box[0])
    if crop.doubt is not None and spacing is not None:
        logger.info("image %s: no cm values: %s", sop, crop.doubt)
        spacing = None
    return [TissueRegion(box=crop.box, spacing_cm=spacing, source="content", doubt=crop.doubt)]


def pixel_spacing_cm(ds: Dataset) -> tuple[float, float] | None:
    """(row, col) cm from PixelSpacing (mm) when a device sets it instead of US regions."""
    ps = ds.get("PixelSpacing")
    try:
        if ps is not None and len(ps) == 2 and float(ps[0]) > 0 and float(ps[1]) > 0:
            return (abs(float(ps[0])) / 10.0, abs(float(ps[1])) / 10.0)
    except (TypeError, ValueError):
        pass
    return None
