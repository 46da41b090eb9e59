"""Decode any supported DICOM pixel data to float32 grayscale frames in 0..1.

Ultrasound devices send RGB, YBR_FULL(_422), palette color or monochrome pixels, native or
compressed (JPEG, JPEG-LS, JPEG 2000, RLE, deflate), single- or multi-frame. The model wants one
grey channel, so every photometric interpretation is reduced to luma here, using pydicom's pixel
handlers and the installed pylibjpeg/gdcm plugins. For YBR data the decoder is asked for the raw
samples and the Y channel is used directly: it *is* the BT.601 luma, and skipping the colour
conversion roughly halves decode time for JPEG US images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import (
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

from inference.errors import ReaderError, UnsupportedTransferSyntaxError

logger = logging.getLogger(__name__)

FramePolicy = Literal["all", "middle", "max-contrast"]
Box = tuple[int, int, int, int]

# BT.601 luma weights, the same that define Y in YBR_FULL.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_YBR = ("YBR_FULL", "YBR_FULL_422")
_JPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)


def sop_uid_of(ds: Dataset) -> str | None:
    """SOP Instance UID of ``ds`` (None when absent), for error messages."""
    uid = ds.get("SOPInstanceUID")
    return str(uid) if uid else None


def transfer_syntax_of(ds: Dataset) -> UID:
    """Transfer syntax of a dataset read from file or built in memory (native LE default)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        ts = "1.2.840.10008.1.2" if ds.is_implicit_VR else "1.2.840.10008.1.2.1"
        if ds.is_little_endian is False:
            ts = "1.2.840.10008.1.2.2"
    return UID(str(ts))


def check_decodable(ds: Dataset) -> None:
    """Raise before any work when ``ds`` has no pixels or no installed decoder handles them.

    Raises:
        ReaderError: no Pixel Data (or float/double pixel data) in the object.
        UnsupportedTransferSyntaxError: e.g. JPEG XL, or JPEG 2000 without openjpeg/gdcm.
    """
    sop = sop_uid_of(ds)
    if "PixelData" not in ds:
        raise ReaderError(sop, "object has no Pixel Data (not an image)")
    ts = transfer_syntax_of(ds)
    name = ts.name if ts.is_transfer_syntax else "unknown transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            sop, f"no pixel data decoder for transfer syntax {name} ({ts})"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise UnsupportedTransferSyntaxError(
            sop, f"transfer syntax {name} ({ts}) needs a decoder plugin that is missing: {missing}"
        )


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, treating absent/empty/0 as one frame."""
    return max(1, int(get_nr_frames(ds, warn=False)))


def frame_indices(n_frames: int, policy: FramePolicy, max_frames: int) -> list[int]:
    """0-based frames to decode for ``policy`` (max-contrast needs them all, capped later)."""
    if n_frames <= 1:
        return [0]
    if policy == "middle":
        return [n_frames // 2]
    if policy == "all" and n_frames > max_frames:
        # Evenly spread over the loop so a long cine is still represented end to end.
        return sorted({int(round(x)) for x in np.linspace(0, n_frames - 1, max(1, max_frames))})
    return list(range(n_frames))


def to_gray(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """One decoded frame (H, W) or (H, W, 3) -> float32 (H, W) in 0..1.

    Args:
        arr: pixels as returned by the decoder for this frame.
        ds: the dataset (palette LUTs, bit depth).
        photometric: photometric interpretation of ``arr`` as reported by the decoder.
    """
    pi = photometric.upper()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        peak = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else float(rgb.max() or 1)
        if rgb.dtype == np.uint16 and int(rgb.max(initial=0)) <= 255:
            peak = 255.0  # 8-bit LUT entries stored in 16-bit words
        return (rgb[..., :3].astype(np.float32) @ _LUMA) / np.float32(peak)
    if arr.ndim == 3:
        if pi in _YBR:
            gray = arr[..., 0].astype(np.float32)
        else:  # RGB (also what J2K YBR_ICT/RCT decode to)
            gray = arr[..., :3].astype(np.float32) @ _LUMA
        return _scale(gray, bits, signed=False)
    gray = arr.astype(np.float32)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    out = _scale(gray, bits, signed=signed)
    if pi == "MONOCHROME1":
        out = 1.0 - out
    return out


def _scale(gray: np.ndarray, bits: int, *, signed: bool) -> np.ndarray:
    """Fixed scaling for 8-bit unsigned data (every US device), min-max otherwise."""
    if bits <= 8 and not signed:
        return np.clip(gray * np.float32(1.0 / ((1 << bits) - 1)), 0.0, 1.0)
    lo, hi = float(gray.min()), float(gray.max())
    if hi <= lo:
        return np.zeros_like(gray, dtype=np.float32)
    return ((gray - lo) / np.float32(hi - lo)).astype(np.float32)


def _iter_gray(ds: Dataset, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (0-based index, gray frame) decoding only ``indices``."""
    sop = sop_uid_of(ds)
    ts = transfer_syntax_of(ds)
    decoder = get_decoder(ts)
    opts: dict = {}
    if ts in _JPEG_SYNTAXES and int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        # JPEG (ISO 10918) frames are always decoded colour-by-pixel; a PlanarConfiguration of 1
        # in such a header is a device quirk that would scramble the samples if honoured.
        opts["planar_configuration"] = 0
    # Pillow decodes baseline JPEG ~4x faster than gdcm/pylibjpeg here with identical samples
    # (measured: decode dominates reading); anything it cannot do falls back to the others.
    plugin = "pillow" if ts == JPEGBaseline8Bit and "pillow" in decoder.available_plugins else ""
    done = 0

    def run(plugin: str) -> Iterator[tuple[int, np.ndarray]]:
        if len(indices) == 1:
            arr, meta = decoder.as_array(
                ds, index=indices[0], raw=True, decoding_plugin=plugin, **opts)
            yield indices[0], _gray_from(arr, ds, meta)
            return
        frames = decoder.iter_array(ds, indices=indices, raw=True, decoding_plugin=plugin, **opts)
        for i, (arr, meta) in zip(indices, frames):
            yield i, _gray_from(arr, ds, meta)

    try:
        try:
            for item in run(plugin):
                done += 1
                yield item
        except Exception as exc:  # noqa: BLE001 - every plugin raises its own types
            if not plugin or done:
                raise
            logger.debug("%s: %s failed (%s); trying every decoder plugin", sop, plugin, exc)
            yield from run("")
    except ReaderError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ReaderError(sop, f"pixel data could not be decoded: {exc}") from exc


def _gray_from(arr: np.ndarray, ds: Dataset, meta: dict) -> np.ndarray:
    pi = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    if pi.upper() in ("YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422") and arr.ndim == 3:
        logger.debug("decoder kept %s samples; treating as RGB", pi)
        pi = "RGB"
    return to_gray(arr, ds, pi)


def contrast(gray: np.ndarray, box: Box | None) -> float:
    """Standard deviation inside ``box`` (the tissue region): the max-contrast frame score."""
    if box is not None:
        r0, c0, r1, c1 = box
        gray = gray[r0:r1, c0:c1]
    return float(gray.std()) if gray.size else 0.0


def decode_frames(
    ds: Dataset,
    *,
    frame_policy: FramePolicy = "middle",
    max_frames: int = 16,
    contrast_box: Box | None = None,
    frame_numbers: Sequence[int] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Decode the frames chosen by ``frame_policy`` to float32 grayscale (H, W) in 0..1.

    Args:
        ds: a full dataset with Pixel Data.
        frame_policy: ``all`` (evenly spread, at most ``max_frames``), ``middle`` (one frame) or
            ``max-contrast`` (the frame with the highest grey-level standard deviation inside
            ``contrast_box``; frames are streamed so a long cine is never held in memory).
        max_frames: cap for ``all``.
        contrast_box: (row0, col0, row1, col1) tissue region scored by ``max-contrast``.
        frame_numbers: decode exactly these 1-based frames instead (e.g. the frames a DICOM-SEG
            annotates); overrides ``frame_policy``.

    Returns:
        (1-based frame number, image) pairs in frame order.

    Raises:
        UnsupportedTransferSyntaxError: no decoder for the transfer syntax.
        ReaderError: no pixel data, or the decoder failed.
    """
    check_decodable(ds)
    try:
        n = number_of_frames(ds)
    except (TypeError, ValueError) as exc:
        raise ReaderError(sop_uid_of(ds), f"invalid Number of Frames: {exc}") from exc
    if frame_numbers:
        bad = [f for f in frame_numbers if not 1 <= f <= n]
        if bad:
            raise ReaderError(sop_uid_of(ds), f"frame(s) {bad} out of range 1..{n}")
        return [(i + 1, gray) for i, gray in _iter_gray(ds, sorted({f - 1 for f in frame_numbers}))]
    indices = frame_indices(n, frame_policy, max_frames)
    if frame_policy == "max-contrast" and len(indices) > 1:
        best: tuple[float, int, np.ndarray] | None = None
        for i, gray in _iter_gray(ds, indices):
            score = contrast(gray, contrast_box)
            if best is None or score > best[0]:
                best = (score, i, gray)
        assert best is not None
        return [(best[1] + 1, best[2])]
    return [(i + 1, gray) for i, gray in _iter_gray(ds, indices)]
