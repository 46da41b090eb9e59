"""The one set of US and SEG fixture builders for every test.

US builders return pydicom Datasets with a complete, valid US header (the attributes dciodvfy
asks for, and what the node indexes); ``build`` also returns the grey image (0..1) a perfect
reader must return, so reader tests compare decoded pixels with a known truth rather than with
another decoder. SEGs are built with highdicom. Everything is valid under strict pydicom
(tests/conftest.py); ``set_raw`` writes a deliberately invalid value.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sr.codedict import codes
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
LUMA = np.array([0.299, 0.587, 0.114])

ROWS, COLS = 96, 128
TISSUE = (20, 16, 84, 112)  # row0, col0, row1, col1 (end exclusive)

def phantom(rows: int = ROWS, cols: int = COLS, box: tuple[int, int, int, int] = TISSUE,
            seed: int = 0, shift: int = 0) -> np.ndarray:
    """uint8 RGB frame: black UI with text-like strokes and a colour bar, speckle in ``box``."""
    rng = np.random.default_rng(seed)
    img = np.zeros((rows, cols, 3), np.uint8)
    r0, c0, r1, c1 = box
    speckle = rng.rayleigh(0.45, (r1 - r0, c1 - c0)) * 110 + 25
    speckle += np.linspace(30, -20, r1 - r0)[:, None]  # depth attenuation
    yy, xx = np.mgrid[r0:r1, c0:c1]
    blob = ((yy - (r0 + r1) / 2 - shift) ** 2 / 120 + (xx - (c0 + c1) / 2) ** 2 / 500) < 1
    speckle[blob[:, :]] *= 0.6  # a darker "muscle" cross-section
    img[r0:r1, c0:c1] = np.clip(speckle, 0, 255).astype(np.uint8)[..., None]
    # Burned-in UI: "text" strokes on black above the image, a colour bar on the right.
    for k in range(5):
        img[4:12, 6 + 10 * k: 8 + 10 * k] = 255
        img[7:9, 6 + 10 * k: 13 + 10 * k] = 255
    img[24:80, cols - 8: cols - 4] = np.array([200, 180, 40], np.uint8)
    img[r0 + 5: r0 + 8, c0 + 10: c0 + 12] = (255, 220, 0)  # a coloured marker inside the image
    return img


def gray_of(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float64) @ LUMA / 255.0).astype(np.float32)


def region_item(box: tuple[int, int, int, int], delta: tuple[float, float] = (0.01, 0.012),
                spatial: int = 1, data_type: int = 1, units: int = 3) -> Dataset:
    """One Sequence of Ultrasound Regions item (Max X1/Y1 inclusive, as on real devices)."""
    r0, c0, r1, c1 = box
    it = Dataset()
    it.RegionSpatialFormat = spatial
    it.RegionDataType = data_type
    it.RegionFlags = 0
    it.RegionLocationMinX0 = c0
    it.RegionLocationMinY0 = r0
    it.RegionLocationMaxX1 = c1 - 1
    it.RegionLocationMaxY1 = r1 - 1
    it.PhysicalUnitsXDirection = units
    it.PhysicalUnitsYDirection = units
    it.PhysicalDeltaX = delta[1]
    it.PhysicalDeltaY = delta[0]
    return it


def base_us(rows: int = ROWS, cols: int = COLS, frames: int = 1,
            regions: list[Dataset] | None = None,
            study_uid: str | None = None, series_uid: str | None = None, *,
            patient_id: str = "RF0001", instance_number: int = 1) -> Dataset:
    """A US (multi-frame when ``frames`` > 1) header without pixel data: a right thigh."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = US_IMAGE if frames == 1 else US_MULTIFRAME
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "US"
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F"
    ds.StudyDate = "20250101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "RF ultrasound"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "TestVendor"
    ds.ManufacturerModelName = "T1"
    ds.BodyPartExamined = "THIGH"
    ds.Laterality = "R"
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063
    if regions is not None:
        ds.SequenceOfUltrasoundRegions = regions
    return ds


def set_native(ds: Dataset, frames_rgb: np.ndarray, photometric: str,
               planar: int = 0) -> np.ndarray:
    """Store (F, H, W, 3) uint8 as ``photometric``; returns the expected grey (F, H, W)."""
    gray = np.stack([gray_of(f) for f in frames_rgb])
    if photometric in ("MONOCHROME2", "MONOCHROME1"):
        g8 = np.round(gray * 255).astype(np.uint8)
        stored = 255 - g8 if photometric == "MONOCHROME1" else g8
        ds.SamplesPerPixel = 1
        ds.PixelData = stored.tobytes()
        expected = g8.astype(np.float32) / 255
    elif photometric == "PALETTE COLOR":
        g8 = np.round(gray * 255).astype(np.uint8)
        ds.SamplesPerPixel = 1
        ramp = np.arange(256, dtype=np.uint16)
        # A warm palette: index i -> (i, 0.8 i, 0.5 i); 16-bit LUT entries.
        lut = [ramp * 257, np.round(ramp * 0.8) .astype(np.uint16) * 257,
               np.round(ramp * 0.5).astype(np.uint16) * 257]
        for name, tab in zip(("Red", "Green", "Blue"), lut, strict=True):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{name}PaletteColorLookupTableData", tab.astype("<u2").tobytes())
        ds.PixelData = g8.tobytes()
        rgb = np.stack([t[g8] for t in lut], axis=-1).astype(np.float64) / 65535
        expected = (rgb @ LUMA).astype(np.float32)
    else:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = planar
        data = frames_rgb
        if photometric == "YBR_FULL":
            data = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in frames_rgb])
        expected = gray
        if planar:
            data = data.transpose(0, 3, 1, 2)
        ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds.PhotometricInterpretation = photometric
    return expected


def jpeg_frame(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG baseline YCbCr 4:2:2 (DICOM YBR_FULL_422) with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def set_jpeg(ds: Dataset, frames_rgb: np.ndarray, fragments_per_frame: int = 1,
             has_bot: bool = True, planar: int = 0) -> np.ndarray:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = planar
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([jpeg_frame(f) for f in frames_rgb],
                               fragments_per_frame=fragments_per_frame, has_bot=has_bot)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return np.stack([gray_of(f) for f in frames_rgb])


COMPRESSED = {"rle": RLELossless, "jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}


def build(photometric: str = "MONOCHROME2", syntax: str = "native", frames: int = 1,
          regions: list[Dataset] | None = None, planar: int = 0, seed: int = 0,
          rows: int = ROWS, cols: int = COLS) -> tuple[Dataset, np.ndarray]:
    """A US dataset and its expected grey frames (F, H, W)."""
    box = TISSUE if (rows, cols) == (ROWS, COLS) else (
        rows * TISSUE[0] // ROWS, cols * TISSUE[1] // COLS,
        rows * TISSUE[2] // ROWS, cols * TISSUE[3] // COLS)
    ds = base_us(rows, cols, frames, regions if regions is not None else [region_item(box)])
    rgb = np.stack([phantom(rows, cols, box=box, seed=seed + i, shift=3 * i)
                    for i in range(frames)])
    if syntax == "jpeg":
        return ds, set_jpeg(ds, rgb, planar=planar)
    expected = set_native(ds, rgb, photometric, planar=planar)
    if syntax in COMPRESSED:
        ds.compress(COMPRESSED[syntax])
    elif syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds, expected


def _centre_square(source: Dataset) -> np.ndarray:
    rows, cols = int(source.Rows), int(source.Columns)
    mask = np.zeros((rows, cols), dtype=bool)
    mask[rows // 4: 3 * rows // 4, cols // 4: 3 * cols // 4] = True
    return mask


def make_seg(sources: Dataset | Sequence[Dataset], mask: np.ndarray | None = None,
             label: str = "Rectus femoris", extra_segment: bool = False,
             algorithm_type: str = "MANUAL") -> hd.seg.Segmentation:
    """A binary highdicom SEG over single-frame ``sources``.

    ``mask`` is (N, H, W), one plane per source; without it, a centred square on each source.
    ``extra_segment`` adds a subcutaneous-fat segment 1 before the muscle segment.
    ``algorithm_type`` of the muscle segment (the extra segment stays MANUAL); a non-manual one
    names a third-party algorithm, as highdicom requires.
    """
    srcs = [sources] if isinstance(sources, Dataset) else list(sources)
    if mask is None:
        mask = np.stack([_centre_square(s) for s in srcs])
    descs = []
    pixel = mask
    if extra_segment:
        descs.append(hd.seg.SegmentDescription(
            segment_number=1, segment_label="Subcutaneous fat",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.AdiposeTissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
        other = np.zeros_like(mask)
        other[:, :5, :] = True
        pixel = np.stack([other, mask], axis=-1)
    kind = hd.seg.SegmentAlgorithmTypeValues[algorithm_type]
    algorithm = None if kind == hd.seg.SegmentAlgorithmTypeValues.MANUAL else \
        hd.AlgorithmIdentificationSequence(
            name="OtherVendor RF AI", version="2.1",
            family=codes.cid7162.ArtificialIntelligence)
    descs.append(hd.seg.SegmentDescription(
        segment_number=len(descs) + 1, segment_label=label,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SkeletalMuscle,
        algorithm_type=kind, algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Thigh]))
    return hd.seg.Segmentation(
        source_images=srcs, pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=generate_uid(), series_number=200,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="TestVendor",
        manufacturer_model_name="Seg", software_versions="1", device_serial_number="1")


def make_cine_seg(source: Dataset, mask: np.ndarray, frame_number: int) -> Dataset:
    """A SEG outlining one frame of a multi-frame US object.

    highdicom 0.28 builds SEGs of multi-frame sources only with a Frame of Reference (which US
    objects lack), so the SEG is built against a one-frame view of the header and its source
    references are then pointed at ``frame_number``, as an annotation station would write it.
    """
    view = Dataset()
    for elem in source:
        if elem.keyword not in ("PixelData", "NumberOfFrames", "FrameTime",
                                "FrameIncrementPointer"):
            view.add(elem)
    view.file_meta = source.file_meta
    view.SOPClassUID = US_IMAGE
    seg = make_seg([view], mask[None])
    for fg in seg.PerFrameFunctionalGroupsSequence:
        for der in fg.DerivationImageSequence:
            for item in der.SourceImageSequence:
                item.ReferencedSOPClassUID = source.SOPClassUID
                item.ReferencedFrameNumber = frame_number
    for item in seg.get("SourceImageSequence", []):
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedFrameNumber = frame_number
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPClassUID = source.SOPClassUID
    return seg


def rf_mask(rows: int = ROWS, cols: int = COLS, center: tuple[int, int] = (52, 64),
            radii: tuple[int, int] = (14, 30)) -> np.ndarray:
    """An elliptic "rectus femoris" mask in full-frame coordinates."""
    yy, xx = np.mgrid[:rows, :cols]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1


# ------------------------------------------------------------------------------------------
# node-level studies: small noise images, written to folders
# ------------------------------------------------------------------------------------------


def make_us(study_uid: str | None = None, series_uid: str | None = None, *,
            patient_id: str = "P001", size: int = 64, rows: int | None = None,
            cols: int | None = None, seed: int = 0, instance_number: int = 1) -> Dataset:
    """A MONOCHROME2 US Image Storage instance of random speckle (``size`` square by default)."""
    rows, cols = rows or size, cols or size
    ds = base_us(rows, cols, study_uid=study_uid, series_uid=series_uid, patient_id=patient_id,
                 instance_number=instance_number)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 255, (rows, cols), dtype=np.uint8).tobytes()
    return ds


def us_series(n: int, *, study_uid: str | None = None, patient_id: str = "P001",
              rows: int = 64, cols: int = 64, seed: int = 0) -> list[Dataset]:
    """``n`` US instances of one new series (of a new study unless ``study_uid`` is given)."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [make_us(study_uid, series_uid, patient_id=patient_id, rows=rows, cols=cols,
                    seed=seed + i, instance_number=i + 1) for i in range(n)]


def write(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    """Save ``ds`` as a DICOM file in ``folder`` (named by its SOP Instance UID by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def save(ds: Dataset, path: Path) -> Path:
    """Save ``ds`` as a DICOM file at ``path``."""
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(folder: Path, n: int, *, study_uid: str | None = None, patient_id: str = "P001",
                seed: int = 0) -> list[Path]:
    """``n`` US instances of one study/series written to ``folder``."""
    return [write(ds, folder) for ds in us_series(n, study_uid=study_uid, patient_id=patient_id,
                                                   seed=seed)]


def set_raw(ds: Dataset, keyword: str, value: str) -> Dataset:
    """Set an element to an invalid value even when pydicom runs with strict validation."""
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
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


# ------------------------------------------------------------------------------------------
# what real scanners send (issue 11): companions of a study and header/pixel quirks
# ------------------------------------------------------------------------------------------


def study_companions(us: Dataset) -> list[Dataset]:
    """What a modality sends with its images: SRs, KOS, GSPS, label-map SEG, PDF, SC."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    common = {"series_instance_uid": generate_uid(), "series_number": 10,
              "sop_instance_uid": generate_uid(), "instance_number": 1,
              "manufacturer": "TestVendor"}
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Doe^Jane"))
    obs = hd.sr.ObservationContext(observer_person_context=observer)
    report = hd.sr.MeasurementReport(
        observation_context=obs, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="m1"),
            measurements=[hd.sr.Measurement(name=codes.SCT.Diameter, value=1.0,
                                            unit=codes.UCUM.Centimeter)])])
    out = []
    for cls in (hd.sr.ComprehensiveSR, hd.sr.EnhancedSR, hd.sr.Comprehensive3DSR):
        out.append(cls(evidence=[us], content=report,
                       **{**common, "sop_instance_uid": generate_uid(),
                          "series_instance_uid": generate_uid()}))
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[us], content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.Manifest, referenced_objects=[us]),
        series_instance_uid=generate_uid(), series_number=11, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="TestVendor")
    out.append(kos)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[us], series_instance_uid=generate_uid(), series_number=12,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="TestVendor",
        manufacturer_model_name="T1", software_versions="1", device_serial_number="1",
        content_label="GSPS")
    out.append(gsps)
    mask = np.zeros((us.Rows, us.Columns), dtype=np.uint8)
    mask[10:30, 10:30] = 1
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="RF", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SkeletalMuscle,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    out.append(hd.seg.Segmentation(
        source_images=[us], pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=13,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="TestVendor",
        manufacturer_model_name="Seg", software_versions="1", device_serial_number="1"))
    return out


def encapsulated_pdf(us: Dataset) -> Dataset:
    """An Encapsulated PDF object (no highdicom builder exists for it)."""
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import EncapsulatedPDFStorage

    pdf = make_us()  # reuse the patient/study header, then turn it into a PDF document
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "PhotometricInterpretation", "PixelData"):
        del pdf[kw]
    pdf.StudyInstanceUID = us.StudyInstanceUID
    pdf.SeriesInstanceUID = generate_uid()
    pdf.SOPInstanceUID = generate_uid()
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    pdf.file_meta.MediaStorageSOPInstanceUID = pdf.SOPInstanceUID
    pdf.Modality = "DOC"
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    pdf.BurnedInAnnotation = "YES"
    pdf.DocumentTitle = "report"
    return pdf


def with_header_quirks(ds: Dataset) -> Dataset:
    """Empty Type 2 attributes (Patient ID, birth date) and a TM with 7 fractional digits."""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    set_raw(ds, "StudyTime", "120000.1234567")
    set_raw(ds, "SeriesTime", "120001.12345678")
    return ds


def with_leading_zero_uid(ds: Dataset) -> Dataset:
    """A SOP Instance UID with a leading-zero component (invalid, unambiguous, seen in the wild)."""
    uid = "1.2.826.0.1.3680043.8.498.0" + str(generate_uid())[-20:].lstrip(".")
    set_raw(ds, "SOPInstanceUID", uid)
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    finally:
        config.settings.writing_validation_mode = old
    return ds


def with_calibration_scale(ds: Dataset, factor: float) -> Dataset:
    """Multiply every region's PhysicalDelta (``factor`` 10: a 4 cm image claims 40 cm)."""
    for item in ds.get("SequenceOfUltrasoundRegions", []) or []:
        item.PhysicalDeltaX = float(item.PhysicalDeltaX) * factor
        item.PhysicalDeltaY = float(item.PhysicalDeltaY) * factor
    return ds


JPEG_XL = "1.2.840.10008.1.2.4.112"


def as_jpeg_xl(ds: Dataset) -> Dataset:
    """The object as a JPEG-XL file (the codestream is opaque here: no decoder is installed)."""
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG_XL
    return ds
