"""The benchmark's input: N uncompressed 600×800 RGB US instances, generated once into a cache.

Uncompressed explicit VR little endian, as a modality sends by default. Five images per study so
the node sees realistic study grouping; pixel content is random-ish speckle (content does not
matter for ingest, size does).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
DEFAULT_CACHE = Path(os.environ.get("DICOM_NODE_BENCH_CACHE",
                                    Path.home() / ".cache" / "dicom-node-bench"))


def _instance(pixels: bytes, study_uid: str, series_uid: str, patient: str, number: int,
              rows: int, cols: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = patient, "BENCH^ANON"
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20250101", "120000", ""
    ds.ReferringPhysicianName, ds.StudyID = "", "1"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "US", "BenchVendor", "Bench-1"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.BodyPartExamined, ds.Laterality = "THIGH", "R"
    ds.ImageType, ds.PatientOrientation = ["ORIGINAL", "PRIMARY"], ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    region = Dataset()  # one calibrated 2D tissue region, as every vendor writes it
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 100, 60
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 101, rows - 61
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.008
    ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = pixels
    return ds


def us_instances(n: int = 500, rows: int = 600, cols: int = 800, per_study: int = 5,
                 cache: Path = DEFAULT_CACHE) -> Path:
    """Return a folder holding ``n`` US instances (created on first use, reused afterwards)."""
    folder = cache / f"us2_{n}_{rows}x{cols}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grey = (rng.gamma(2.0, 40.0, size=(rows, cols)).clip(0, 255)).astype(np.uint8)
    pixels = np.repeat(grey[:, :, None], 3, axis=2).tobytes()
    study_uid = series_uid = patient = ""
    for i in range(n):
        if i % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
            patient = f"BENCH{i // per_study:05d}"
        ds = _instance(pixels, study_uid, series_uid, patient, i % per_study + 1, rows, cols)
        ds.save_as(folder / f"us_{i:05d}.dcm", enforce_file_format=True)
    done.touch()
    return folder
