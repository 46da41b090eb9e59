"""The reader's own crop without a region sequence: colour left out, a doubtful crop no cm."""

from __future__ import annotations

import numpy as np
import pytest

from inference.reader import read_frames
from inference.us_regions import colour_mask, content_crop
from tests.builders import base_us, gray_of, phantom, set_native
from training.synth_nonmuscle import muscle_object, nonmuscle_object

ROWS, COLS, BOX = 192, 256, (40, 32, 168, 160)


def _rgb_us(rgb: np.ndarray, spacing_mm: float | None = 0.2):
    ds = base_us(ROWS, COLS)  # no region sequence
    set_native(ds, rgb[None], "RGB")
    if spacing_mm is not None:
        ds.PixelSpacing = [spacing_mm, spacing_mm]
    return ds


def test_colour_box_against_the_image_is_left_out_and_not_measured():
    rgb = phantom(ROWS, COLS, box=BOX)
    # a colour-flow box glued to the right of the B-mode: textured, so grey-only search takes it
    rng = np.random.default_rng(1)
    vel = rng.uniform(0.4, 1.0, (128, 60))
    rgb[40:168, 160:220] = np.stack([vel * 230, vel * 50, vel * 20], -1).astype(np.uint8)
    grey_only = content_crop(gray_of(rgb))
    assert grey_only is not None and grey_only.box[3] >= 215  # the grey reader took the box
    frames = read_frames(_rgb_us(rgb))
    r0, c0, r1, c1 = frames[0].crop_box
    assert c1 <= 163 and c0 <= 36 and r0 <= 44 and r1 >= 164
    assert frames[0].spacing_cm is None  # unsure crop: scored, never measured in cm


def test_clean_grey_image_in_a_colour_object_keeps_its_calibration():
    frames = read_frames(_rgb_us(phantom(ROWS, COLS, box=BOX)))
    assert frames[0].spacing_cm == pytest.approx((0.02, 0.02))
    r0, c0, r1, c1 = frames[0].crop_box
    assert abs(r0 - 40) <= 4 and abs(c0 - 32) <= 4 and abs(r1 - 168) <= 4 and abs(c1 - 160) <= 4


@pytest.mark.parametrize("kind", ["colour-doppler", "sector", "obstetric"])
def test_synthetic_non_muscle_crops_are_doubtful(kind):
    ds = nonmuscle_object(kind, np.random.default_rng(7), regions=False).dataset
    ds.PixelSpacing = [0.1, 0.1]
    frames = read_frames(ds)
    assert frames[0].spacing_cm is None


def test_synthetic_muscle_crop_without_regions_is_sure():
    ds = muscle_object(np.random.default_rng(3), "samsung", "", regions=False).dataset
    ds.PixelSpacing = [0.12, 0.12]
    frames = read_frames(ds)
    assert frames[0].spacing_cm == pytest.approx((0.012, 0.012))


def test_colour_mask_ignores_tinted_grey():
    sepia = np.stack([np.full((8, 8), v) for v in (200, 170, 140)], -1).astype(np.uint8)
    assert not colour_mask(sepia).any()
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 220
    assert colour_mask(red).all()
