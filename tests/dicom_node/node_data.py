"""Tiny synthetic US images and SEGs for the node's tests (independent of training/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import UltrasoundImageStorage


def make_us(
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    patient_id: str = "P001",
    size: int = 64,
    seed: int = 0,
    instance_number: int = 1,
) -> Dataset:
    """A 64x64 MONOCHROME2 US Image Storage instance with the tags the node indexes."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundImageStorage
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "TestVendor"
    ds.ManufacturerModelName = "T1"
    ds.BodyPartExamined = "THIGH"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 255, (size, size), dtype=np.uint8).tobytes()
    return ds


def make_seg(source: Dataset):
    """A binary highdicom Segmentation of ``source`` (one segment, a centred square)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.zeros((source.Rows, source.Columns), dtype=bool)
    mask[source.Rows // 4 : 3 * source.Rows // 4, source.Columns // 4 : 3 * source.Columns // 4] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="RF",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SkeletalMuscle,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="TestVendor",
        manufacturer_model_name="Seg",
        software_versions="1",
        device_serial_number="1",
    )
    return seg


def write(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(folder: Path, n: int, *, study_uid: str | None = None, patient_id: str = "P001",
                seed: int = 0) -> list[Path]:
    """``n`` US instances of one study/series written to ``folder``."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        write(make_us(study_uid, series_uid, patient_id=patient_id, seed=seed + i,
                      instance_number=i + 1), folder)
        for i in range(n)
    ]


def set_raw(ds: Dataset, keyword: str, value: str) -> Dataset:
    """Set an element to an invalid value even when pydicom runs with strict validation."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        tag = tag_for_keyword(keyword)
        ds.add_new(tag, dictionary_VR(tag), value)
    finally:
        config.settings.writing_validation_mode = old
    return ds


def make_tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 made with the openssl CLI: (cert, key)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key
