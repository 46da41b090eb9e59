"""Vendor profiles and the DICOM objects a scanner would send: US images, cine loops and SEGs.

Each profile mimics what a family of real scanners exports, so the reader meets the same quirks it
meets in hospitals: RGB screen captures in JPEG baseline (YBR_FULL_422), MONOCHROME2 in RLE,
uncompressed RGB and palette color; burned-in annotation outside the imaging area; a Sequence of
Ultrasound Regions with cm/pixel deltas (some negative), several regions (side-by-side elastography,
an M-mode strip); multi-frame cine with fragmented JPEG frames and an empty basic offset table.
US objects are written with pydicom the way a modality does (there is no highdicom constructor
for US images); their segmentations are built in ``training.synth_seg``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

STUDY_DATE = "20250301"  # fixed dates: output must be byte-identical for a seed
FOLLOWUP_DATE = "20250901"
SERIES_TIME = "093000"


@dataclass(frozen=True)
class VendorProfile:
    """How one scanner family exports images.

    Attributes:
        name: profile key used in labels.csv/manifest (``supersonic``, ``mindray``, ``samsung``).
        manufacturer: Manufacturer tag.
        models: (ManufacturerModelName, TransducerData) pairs to choose from.
        rows, cols: full frame size at image_scale 1.
        tissue: (row0, col0, row1, col1) of the tissue region as fractions of the frame.
        depth_cm: imaging depth shown in the tissue region.
        photometric: RGB or MONOCHROME2 (palette color is a per-object quirk).
        transfer_syntax: JPEG baseline, RLE lossless or explicit VR little endian.
        cine_prob: probability that an object is a multi-frame cine loop.
        quirk_prob: probability of the profile's multi-region / palette quirk per object.
        negative_delta: write PhysicalDeltaX as a negative number (seen on some devices).
        software: SoftwareVersions.
    """

    name: str
    manufacturer: str
    models: tuple[tuple[str, str], ...]
    rows: int
    cols: int
    tissue: tuple[float, float, float, float]
    depth_cm: float
    photometric: str
    transfer_syntax: str
    cine_prob: float
    quirk_prob: float
    negative_delta: bool
    software: str


PROFILES: dict[str, VendorProfile] = {
    "supersonic": VendorProfile(
        name="supersonic", manufacturer="SuperSonic Imagine",
        models=(("Aixplorer", "SL10-2"),), rows=768, cols=1024,
        tissue=(0.10, 0.14, 0.90, 0.86), depth_cm=4.5, photometric="RGB",
        transfer_syntax=JPEGBaseline8Bit, cine_prob=0.1, quirk_prob=0.15, negative_delta=False,
        software="V12.3.1",
    ),
    "mindray": VendorProfile(
        name="mindray", manufacturer="Mindray",
        models=(("M9", "SL10-3"), ("MX7", "SL13-3")), rows=600, cols=800,
        tissue=(0.09, 0.12, 0.93, 0.88), depth_cm=4.8, photometric="MONOCHROME2",
        transfer_syntax=RLELossless, cine_prob=0.1, quirk_prob=0.15, negative_delta=True,
        software="01.05.00",
    ),
    "samsung": VendorProfile(
        name="samsung", manufacturer="SAMSUNG MEDISON CO., LTD.",
        models=(("R10", "SL12-3"), ("RS85", "SL12-3")), rows=720, cols=960,
        tissue=(0.11, 0.12, 0.92, 0.88), depth_cm=4.0, photometric="RGB",
        transfer_syntax=ExplicitVRLittleEndian, cine_prob=0.0, quirk_prob=0.2,
        negative_delta=False, software="2.01.00.0123",
    ),
}


@dataclass
class Layout:
    """Where things are in one object's frame (pixel coordinates, end exclusive).

    Attributes:
        rows, cols: frame size.
        tissue_box: the 2D tissue region that holds the RF (row0, col0, row1, col1).
        spacing_cm: (row, col) cm per pixel inside the tissue region.
        regions: every ultrasound region to declare (dict of region attributes).
        quirk: "" or one of "side-by-side", "m-mode", "palette", "planar".
    """

    rows: int
    cols: int
    tissue_box: tuple[int, int, int, int]
    spacing_cm: tuple[float, float]
    regions: list[dict[str, Any]]
    quirk: str = ""


def _region(box: tuple[int, int, int, int], dx: float, dy: float, *, fmt: int = 1,
            dtype: int = 1, units_x: int = 3, units_y: int = 3) -> dict[str, Any]:
    r0, c0, r1, c1 = box
    return {
        "RegionSpatialFormat": fmt, "RegionDataType": dtype, "RegionFlags": 0,
        "RegionLocationMinX0": c0, "RegionLocationMinY0": r0,
        "RegionLocationMaxX1": c1 - 1, "RegionLocationMaxY1": r1 - 1,
        "PhysicalUnitsXDirection": units_x, "PhysicalUnitsYDirection": units_y,
        "PhysicalDeltaX": dx, "PhysicalDeltaY": dy,
    }


def make_layout(profile: VendorProfile, scale: float, quirk: str) -> Layout:
    """Frame geometry for one object; ``quirk`` changes the region layout."""
    rows, cols = int(round(profile.rows * scale)), int(round(profile.cols * scale))
    f0, f1, f2, f3 = profile.tissue
    box = (int(rows * f0), int(cols * f1), int(rows * f2), int(cols * f3))
    regions: list[dict[str, Any]] = []
    if quirk == "side-by-side":
        # elastography map (colour flow data) on the left, the B-mode on the right, as Aixplorer
        # SWE dual view does: the first region is *not* the tissue one.
        mid = cols // 2
        w = min(mid - int(cols * 0.04), box[3] - box[1])
        h = box[2] - box[0]
        left = (box[0], mid - w - 4, box[2], mid - 4)
        right = (box[0], mid + 4, box[2], mid + 4 + w)
        box = right
        sp = profile.depth_cm / h
        regions.append(_region(left, sp, sp, dtype=2))
    elif quirk == "m-mode":
        # B-mode on top, an M-mode time-motion strip below (x in seconds).
        strip_h = int((box[2] - box[0]) * 0.32)
        mmode = (box[2] - strip_h, box[1], box[2], box[3])
        box = (box[0], box[1], box[2] - strip_h - int(rows * 0.02), box[3])
        sp = profile.depth_cm * 0.75 / (box[2] - box[0])
        regions.append(_region(mmode, 0.004, sp * 2.0, fmt=2, dtype=1, units_x=4, units_y=3))
    h = box[2] - box[0]
    depth = profile.depth_cm * (0.75 if quirk == "m-mode" else 1.0)
    sp = depth / h
    dx = -sp if profile.negative_delta else sp
    regions.insert(0 if quirk != "side-by-side" else 1, _region(box, dx, sp))
    return Layout(rows, cols, box, (sp, sp), regions, quirk)


def ui_template(profile_name: str, model: str, transducer: str, layout: Layout) -> np.ndarray:
    """Burned-in screen furniture (logo, parameters, depth scale, grey bar) as an RGB frame.

    Cached per profile/model/geometry: every image of a cohort shares a handful of screens.
    """
    return _ui_cached(profile_name, model, transducer, layout.rows, layout.cols, layout.quirk,
                      layout.tissue_box, layout.spacing_cm[0])


@lru_cache(maxsize=64)
def _ui_cached(profile_name: str, model: str, transducer: str, rows: int, cols: int,
               quirk: str, box: tuple[int, int, int, int], spacing_cm: float) -> np.ndarray:
    img = Image.new("RGB", (cols, rows), (0, 0, 0))
    d = ImageDraw.Draw(img)
    p = PROFILES[profile_name]
    fg = (220, 220, 220)
    d.rectangle([0, 0, cols - 1, int(rows * 0.06)], fill=(24, 32, 48))
    d.text((8, 4), f"{p.manufacturer}  {model}", fill=fg)
    d.text((cols // 2, 4), "MSK  Thigh  RF", fill=fg)
    d.text((8, int(rows * 0.12)), f"{transducer}\nMSK Gen\nFr 28Hz\nGn 52\nDR 60\nMI 0.9\n"
                                  f"TIs 0.2", fill=fg)
    d.text((cols - int(cols * 0.12), rows - 30), "ANON\n2025-03-01", fill=fg)
    # grey bar at the right edge
    for i in range(64):
        y0 = int(rows * 0.25) + i * 3
        d.rectangle([cols - 14, y0, cols - 6, y0 + 2], fill=(255 - 4 * i,) * 3)
    # depth scale left of the tissue region: a tick every 0.5 cm, labelled every cm
    r0, c0, r1, _ = box
    x = max(c0 - 10, 0)
    for k in range(int((r1 - r0) * spacing_cm / 0.5) + 1):
        y = r0 + int(round(k * 0.5 / spacing_cm))
        d.line([x, y, x + (6 if k % 2 == 0 else 3), y], fill=fg)
        if k % 2 == 0 and x >= 12:
            d.text((x - 10, y - 5), str(k // 2), fill=fg)
    if quirk == "side-by-side":
        d.text((8, rows - 40), "SWE  kPa 0-180", fill=(240, 200, 0))
    return np.asarray(img, dtype=np.uint8)


def _elasto_colour(gray: np.ndarray) -> np.ndarray:
    """Shear-wave map over B-mode: stiffer (brighter echo) tissue shown redder in a box."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    stiff = np.clip(gray.astype(np.float32) / 255.0, 0, 1)
    colour = np.stack([stiff * 255, (1 - np.abs(stiff - 0.5) * 2) * 200, (1 - stiff) * 255], -1)
    h, w = gray.shape
    box = np.zeros(gray.shape, bool)
    box[h // 6: h * 5 // 6, w // 6: w * 5 // 6] = True
    rgb[box] = 0.45 * rgb[box] + 0.55 * colour[box]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def compose_frame(gray_tissue: np.ndarray, layout: Layout, ui: np.ndarray,
                  mmode: np.ndarray | None = None, focus_row: int | None = None) -> np.ndarray:
    """Place the rendered tissue (and the extra regions) into the full RGB screen frame.

    ``focus_row`` (frame row of the transmit focus) gets the usual small focal-zone marker
    just right of the tissue region.
    """
    frame = ui.copy()
    r0, c0, r1, c1 = layout.tissue_box
    frame[r0:r1, c0:c1] = gray_tissue[..., None]
    if focus_row is not None and r0 + 4 <= focus_row < r1 - 4 and c1 + 8 < layout.cols:
        for i in range(5):  # a left-pointing triangle, 5 px high
            frame[focus_row - 2 + i, c1 + 2 + abs(i - 2):c1 + 7] = (240, 240, 120)
    for reg in layout.regions:
        box = (reg["RegionLocationMinY0"], reg["RegionLocationMinX0"],
               reg["RegionLocationMaxY1"] + 1, reg["RegionLocationMaxX1"] + 1)
        if box == layout.tissue_box:
            continue
        h, w = box[2] - box[0], box[3] - box[1]
        if reg["RegionDataType"] == 2:  # side-by-side elastography of the same view
            g = gray_tissue[:h, :w]
            frame[box[0]:box[0] + g.shape[0], box[1]:box[1] + g.shape[1]] = _elasto_colour(g)
        elif mmode is not None:
            frame[box[0]:box[2], box[1]:box[3]] = mmode[:h, :w, None]
    return frame


def mmode_strip(gray_tissue: np.ndarray, rows: int, cols: int,
                rng: np.random.Generator) -> np.ndarray:
    """Time-motion strip: one central scan line repeated over time with slow wobble."""
    line = gray_tissue[:, gray_tissue.shape[1] // 2].astype(np.float32)
    src = np.linspace(0, len(line) - 1, rows)
    col = np.interp(src, np.arange(len(line)), line)
    wob = np.sin(np.linspace(0, 6 * np.pi, cols) + rng.uniform(0, 6)) * 2.0
    idx = np.clip(np.arange(rows)[:, None] + wob[None, :], 0, rows - 1).astype(int)
    return col[idx].astype(np.uint8)


SEPIA_LUT = np.stack([
    np.clip(np.arange(256) * 1.00 + 8, 0, 255),
    np.clip(np.arange(256) * 0.93 + 4, 0, 255),
    np.clip(np.arange(256) * 0.80, 0, 255),
], axis=1).astype(np.uint16) * 257  # 16-bit LUT entries


def _jpeg(frame: np.ndarray) -> bytes:
    """Baseline JPEG, 4:2:2 chroma subsampling (what YBR_FULL_422 means)."""
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=90, subsampling=1)
    return buf.getvalue()


def build_us(frames: list[np.ndarray], *, profile: VendorProfile, layout: Layout,
             model: tuple[str, str], patient: dict[str, Any], uids: dict[str, str],
             instance_number: int, series_number: int, laterality: str,
             study_date: str, frame_time_ms: float = 35.7) -> Dataset:
    """One US Image (or US Multi-frame Image) object from composed RGB screen frames.

    Args:
        frames: full-size RGB uint8 frames (rows, cols, 3), already composed with the UI.
        profile: the scanner family.
        layout: frame geometry and regions.
        model: (ManufacturerModelName, TransducerData).
        patient: PatientID, PatientName, PatientSex, PatientAge, PatientSize, PatientWeight.
        uids: study, series, sop UIDs.
        instance_number: InstanceNumber.
        series_number: SeriesNumber.
        laterality: R or L.
        study_date: StudyDate (fixed per study).
        frame_time_ms: FrameTime of cine loops.
    """
    multi = len(frames) > 1
    ds = Dataset()
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = SERIES_TIME
    secs = 9 * 3600 + 30 * 60 + instance_number * 12  # one image every 12 s after 09:30
    ds.ContentTime = ds.AcquisitionTime = (
        f"{secs // 3600:02d}{secs % 3600 // 60:02d}{secs % 60:02d}")
    ds.AccessionNumber = uids["accession"]
    ds.Modality = "US"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = "Synthetic Geriatrics Clinic"
    ds.ReferringPhysicianName = ""
    ds.StationName = f"{model[0]}-01"
    ds.StudyDescription = "US MSK Thigh"
    ds.SeriesDescription = "RF transverse"
    ds.ManufacturerModelName = model[0]
    ds.SoftwareVersions = profile.software
    ds.DeviceSerialNumber = "SYN0001"
    for key, value in patient.items():
        setattr(ds, key, value)
    ds.BodyPartExamined = "THIGH"
    ds.ImageLaterality = laterality  # (Laterality must then be absent: General Series 2C)
    ds.TransducerData = [model[1], "", ""]
    ds.ProcessingFunction = "MSK"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"
    ds.SequenceOfUltrasoundRegions = DicomSequence([_region_item(r) for r in layout.regions])

    arr = np.stack(frames)  # (F, R, C, 3)
    ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if multi:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = f"{frame_time_ms:.1f}"
        ds.FrameIncrementPointer = 0x00181063
        ds.CineRate = int(round(1000.0 / frame_time_ms))
        ds.RecommendedDisplayFrameRate = ds.CineRate
    ts = profile.transfer_syntax if layout.quirk != "palette" else ExplicitVRLittleEndian
    if layout.quirk == "palette":
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "PALETTE COLOR"
        # frames arrive RGB; the grey UI/tissue are indices into the sepia LUT
        idx = arr[..., 0]
        for ch, name in enumerate(("Red", "Green", "Blue")):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{name}PaletteColorLookupTableData", SEPIA_LUT[:, ch].tobytes())
        pixels = idx[0] if not multi else idx
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    elif profile.photometric == "MONOCHROME2":
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        # integer Rec. 601 luma of the composed screen (the tissue itself is already grey)
        grey = ((arr[..., 0].astype(np.uint16) * 77 + arr[..., 1].astype(np.uint16) * 150
                 + arr[..., 2].astype(np.uint16) * 29) >> 8).astype(np.uint8)
        ds.PixelData = np.ascontiguousarray(grey[0] if not multi else grey).tobytes()
    else:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "RGB"
        if ts == JPEGBaseline8Bit:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            encoded = [_jpeg(f) for f in arr]
            # cine: two fragments per frame and an empty basic offset table, as many scanners do
            ds.PixelData = encapsulate(encoded, fragments_per_frame=2 if multi else 1,
                                       has_bot=False)
            ds["PixelData"].VR = "OB"
            ds.LossyImageCompression = "01"
            ratio = arr.nbytes / max(1, sum(len(e) for e in encoded))
            ds.LossyImageCompressionRatio = f"{ratio:.2f}"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
        elif layout.quirk == "planar":
            # colour-by-plane (all R, then all G, then all B per frame): legal, and rare
            ds.PlanarConfiguration = 1
            planes = arr.transpose(0, 3, 1, 2)
            ds.PixelData = np.ascontiguousarray(planes[0] if not multi else planes).tobytes()
        else:
            ds.PixelData = np.ascontiguousarray(arr[0] if not multi else arr).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds.file_meta = meta
    if ts == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif ts == JPEGBaseline8Bit and "YBR" in ds.PhotometricInterpretation:
        ds.file_meta.TransferSyntaxUID = UID(JPEGBaseline8Bit)
    return ds


def _region_item(region: dict[str, Any]) -> Dataset:
    item = Dataset()
    for key, value in region.items():
        setattr(item, key, value)
    return item
