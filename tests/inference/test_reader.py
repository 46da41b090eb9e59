"""Decode + tissue-region crop on small built objects of every photometric / transfer syntax."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from dicom_node.errors import (
    NoTissueRegionError,
    ReaderError,
    UnsupportedTransferSyntaxError,
)
from inference.decode import decode_frames
from inference.reader import read_frames, read_study
from inference.us_regions import content_region
from tests.builders import (
    COLS, ROWS, TISSUE, base_us, build, phantom, region_item, save, set_jpeg, set_native,
)

PHOTOMETRICS = ["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR"]
SYNTAXES = ["native", "rle", "jpegls", "j2k", "deflate"]


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("photometric", PHOTOMETRICS)
def test_lossless_decode_matches_truth(tmp_path: Path, photometric: str, syntax: str) -> None:
    ds, expected = build(photometric, syntax)
    ds = pydicom.dcmread(save(ds, tmp_path / "a.dcm"))
    frames = read_frames(ds)
    assert len(frames) == 1
    f = frames[0]
    assert f.crop_box == TISSUE
    r0, c0, r1, c1 = TISSUE
    assert f.image.dtype == np.float32 and f.image.shape == (r1 - r0, c1 - c0)
    # YBR_FULL is stored with 8-bit rounding of Y, so allow one grey level.
    np.testing.assert_allclose(f.image, expected[0, r0:r1, c0:c1], atol=1.5 / 255)


@pytest.mark.parametrize("planar", [0, 1])
def test_jpeg_baseline_ybr422_any_planar_configuration(tmp_path: Path, planar: int) -> None:
    ds, expected = build("RGB", "jpeg", planar=planar)
    ds = pydicom.dcmread(save(ds, tmp_path / "j.dcm"))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    img = decode_frames(ds)[0][1]
    assert np.abs(img - expected[0]).mean() < 0.01


def test_native_rgb_planar_one() -> None:
    ds, expected = build("RGB", "native", planar=1)
    np.testing.assert_allclose(decode_frames(ds)[0][1], expected[0], atol=1e-6)


def test_fragmented_multiframe_jpeg_without_offset_table(tmp_path: Path) -> None:
    ds = base_us(frames=4, regions=[region_item(TISSUE)])
    rgb = np.stack([phantom(seed=i, shift=4 * i) for i in range(4)])
    expected = set_jpeg(ds, rgb, fragments_per_frame=3, has_bot=False)
    ds = pydicom.dcmread(save(ds, tmp_path / "cine.dcm"))
    frames = read_frames(ds, frame_policy="all")
    assert [f.frame_number for f in frames] == [1, 2, 3, 4]
    r0, c0, r1, c1 = TISSUE
    for f in frames:
        assert np.abs(f.image - expected[f.frame_number - 1, r0:r1, c0:c1]).mean() < 0.01


def test_frame_policies() -> None:
    ds = base_us(frames=7, regions=[region_item(TISSUE)])
    rgb = np.stack([phantom(seed=i) for i in range(7)])
    rgb[5, 20:84, 16:112] = np.where(np.indices((64, 96)).sum(0) % 2, 255, 0)[..., None]
    set_native(ds, rgb, "MONOCHROME2")
    assert [f.frame_number for f in read_frames(ds)] == [4]  # middle of 7
    assert [f.frame_number for f in read_frames(ds, frame_policy="max-contrast")] == [6]
    assert [f.frame_number for f in read_frames(ds, frame_policy="all")] == list(range(1, 8))
    capped = [f.frame_number for f in read_frames(ds, frame_policy="all", max_frames=3)]
    assert capped == [1, 4, 7]


def test_negative_delta_and_units() -> None:
    ds, _ = build(regions=[region_item(TISSUE, delta=(-0.011, -0.009))])
    assert read_frames(ds)[0].spacing_cm == pytest.approx((0.011, 0.009))
    ds, _ = build(regions=[region_item(TISSUE, units=4)])  # seconds: not a length
    assert read_frames(ds)[0].spacing_cm is None


def test_side_by_side_regions_and_doppler_strip() -> None:
    left, right = (20, 4, 84, 60), (20, 66, 84, 126)
    regions = [region_item(left), region_item(right, delta=(0.02, 0.02)),
               region_item((86, 0, 96, 128), spatial=4, data_type=10),  # spectral strip
               region_item((0, 0, 10, 128), spatial=1, data_type=2)]  # colour flow box
    ds, _ = build(regions=regions)
    largest = read_frames(ds)
    assert [f.crop_box for f in largest] == [right]  # right view is one column wider
    assert largest[0].spacing_cm == pytest.approx((0.02, 0.02))
    both = read_frames(ds, region_policy="all")
    assert sorted(f.crop_box for f in both) == sorted([left, right])


def test_region_clipped_to_frame_and_no_tissue_region() -> None:
    ds, _ = build(regions=[region_item((20, 16, 400, 500))])
    assert read_frames(ds)[0].crop_box == (20, 16, ROWS, COLS)
    ds, _ = build(regions=[region_item(TISSUE, spatial=3, data_type=3)])  # M-mode only
    with pytest.raises(NoTissueRegionError) as err:
        read_frames(ds)
    assert err.value.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB"])
def test_content_crop_without_region_sequence(photometric: str) -> None:
    ds, _ = build(photometric, regions=[])
    del ds.SequenceOfUltrasoundRegions
    f = read_frames(ds)[0]
    # Text strokes above and the colour bar to the right are excluded; box within 3 px.
    assert np.abs(np.subtract(f.crop_box, TISSUE)).max() <= 3
    assert f.spacing_cm is None
    ds.PixelSpacing = [0.1, 0.2]  # mm
    assert read_frames(ds)[0].spacing_cm == pytest.approx((0.01, 0.02))


def test_content_crop_finds_nothing_on_blank_image() -> None:
    assert content_region(np.zeros((64, 64), np.float32)) is None
    ds = base_us()
    set_native(ds, np.zeros((1, ROWS, COLS, 3), np.uint8), "MONOCHROME2")
    with pytest.raises(NoTissueRegionError):
        read_frames(ds)


def test_jpeg_xl_is_unsupported_and_named(tmp_path: Path) -> None:
    ds, _ = build()
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom can write it
    path = save(ds, tmp_path / "jxl.dcm")
    # pydicom refuses to write a syntax it does not know; patch the (same-length) UID to JPEG XL.
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"1.2.840.10008.1.2.4.100\x00", b"1.2.840.10008.1.2.4.112\x00", 1))
    with pytest.raises(UnsupportedTransferSyntaxError) as err:
        read_frames(path)
    assert err.value.sop_instance_uid == ds.SOPInstanceUID
    assert "1.2.840.10008.1.2.4.112" in str(err.value)
    good = save(build()[0], tmp_path / "ok.dcm")
    study = read_study([path, good, tmp_path / "missing.dcm"])
    assert len(study.frames) == 1
    reasons = dict(study.problems)
    assert "decoder" in reasons[ds.SOPInstanceUID]
    assert "not readable" in reasons[str(tmp_path / "missing.dcm")]


def test_corrupt_pixel_data_is_a_reader_error(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"not dicom")
    with pytest.raises(ReaderError, match="not readable as DICOM"):
        read_frames(tmp_path / "x.dcm")
    ds, _ = build()
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(ReaderError, match="could not be decoded"):
        read_frames(ds)


def test_decode_speed_budget_is_reasonable(tmp_path: Path) -> None:
    """Five 600x800 JPEG US images decode through the reader without error (speed is benched)."""
    paths = []
    for i in range(5):
        ds = base_us(600, 800, regions=[region_item((60, 80, 560, 720))])
        set_jpeg(ds, phantom(600, 800, box=(60, 80, 560, 720), seed=i)[None])
        paths.append(save(ds, tmp_path / f"{i}.dcm"))
    study = read_study(paths)
    assert len(study.frames) == 5 and all(f.image.shape == (500, 640) for f in study.frames)
    assert all(r == "no DICOM-SEG references this image" for _, r in study.problems)
    assert all("PixelData" not in d for d in study.datasets.values())
