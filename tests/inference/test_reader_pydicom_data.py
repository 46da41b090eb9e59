"""The real-world (US and colour) files that ship inside pydicom's test data, read offline.

Only files present in the installed package are used (``download=False``): pydicom's larger US
samples (US1_J2KR.dcm, US1_UNCR.dcm, OBXXXX1A.dcm, ...) live in the separate pydicom-data
download, which needs the internet, so they are not part of this suite.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference.decode import decode_frames
from inference.reader import read_frames

LUMA = np.array([0.299, 0.587, 0.114])


def _path(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is missing from the installed pydicom package"
    return str(path)


def test_palette_color_us_with_regions() -> None:
    frames = read_frames(_path("examples_palette.dcm"))
    assert len(frames) == 1
    f = frames[0]
    # The 2D tissue region (120,60)-(800,518) is clipped to the 350x800 frame; the spectral
    # Doppler region (spatial format 4) is ignored.
    assert f.crop_box == (60, 120, 350, 800)
    assert f.spacing_cm == pytest.approx((0.026228787, 0.026228787))
    assert f.manufacturer == "Philips Medical Systems"
    assert 0.0 <= f.image.min() and f.image.max() <= 1.0 and f.image.std() > 0.02


def test_multiframe_jpeg_ybr422_us_frame_policies() -> None:
    path = _path("examples_ybr_color.dcm")
    middle = read_frames(path)
    assert [f.frame_number for f in middle] == [16]  # 30 frames
    assert middle[0].crop_box == (31, 84, 240, 320)
    # 0.051 cm/px over 209 rows is 10.7 cm of depth: a calibration no linear MSK probe on a thigh
    # has, so the reader reports no cm values for it (the input gate says why)
    assert middle[0].spacing_cm is None
    best = read_frames(path, frame_policy="max-contrast")
    assert len(best) == 1
    ds = pydicom.dcmread(path)
    stds = [f.image.std() for f in read_frames(ds, frame_policy="all", max_frames=30)]
    assert best[0].image.std() == pytest.approx(max(stds), rel=1e-6)
    assert len(read_frames(path, frame_policy="all")) == 16


def test_us_without_regions_gets_content_crop_excluding_text() -> None:
    small = read_frames(_path("examples_rgb_color.dcm"))[0]
    r0, c0, r1, c1 = small.crop_box
    # Text block above row ~50 and the "LYMPH NODE" label below row ~172 are outside the crop.
    assert 50 <= r0 <= 60 and 160 <= r1 <= 172 and c0 <= 10 and c1 >= 305
    big = read_frames(_path("examples_jpeg2k.dcm"))[0]  # the same screen, 2x, JPEG 2000 YBR_RCT
    assert np.abs(np.subtract(big.crop_box, np.multiply(small.crop_box, 2))).max() <= 12
    assert small.spacing_cm is None


@pytest.mark.parametrize("name", [
    "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_gdcm_KY.dcm", "SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm",
    "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_jpeg.dcm", "SC_ybr_full_422_uncompressed.dcm",
    "ExplVR_BigEnd.dcm", "examples_rgb_color.dcm", "examples_jpeg2k.dcm",
])
def test_colour_files_decode_to_luma(name: str) -> None:
    ds = pydicom.dcmread(_path(name))
    rgb = ds.pixel_array  # pydicom's own RGB (YBR converted)
    if rgb.ndim == 4:
        rgb = rgb[rgb.shape[0] // 2]
    bits = int(ds.BitsStored)
    expected = rgb.astype(np.float64) @ LUMA / ((1 << bits) - 1)
    got = decode_frames(ds)[0][1]
    # YBR files: we take Y directly, pydicom's RGB is rounded and clipped, so allow a few levels.
    assert np.abs(got - expected).mean() < 0.01
    assert np.abs(got - expected).max() < 0.04


@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
])
def test_monochrome_syntaxes_agree(name: str) -> None:
    ref = decode_frames(pydicom.dcmread(_path("MR_small.dcm")))[0][1]
    np.testing.assert_allclose(decode_frames(pydicom.dcmread(_path(name)))[0][1], ref, atol=1e-6)


def test_deflated_file() -> None:
    ds = pydicom.dcmread(_path("image_dfl.dcm"))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    img = decode_frames(ds)[0][1]
    assert img.shape == (512, 512) and img.max() == 1.0
