"""Implausible calibration never yields cm values."""

from __future__ import annotations

from pydicom import Dataset

from inference.us_regions import plausible_spacing, regions_from_sequence
from tests.builders import region_item


def _ds(delta: float) -> Dataset:
    """A 300x400 tissue region (cm units) with square pixels of ``delta`` cm."""
    ds = Dataset()
    ds.SequenceOfUltrasoundRegions = [region_item((0, 0, 300, 400), delta=(delta, delta))]
    return ds


def test_forty_cm_depth_is_not_calibrated():
    assert regions_from_sequence(_ds(0.0133), 300, 400)[0].spacing_cm == (0.0133, 0.0133)
    assert regions_from_sequence(_ds(0.1333), 300, 400)[0].spacing_cm is None  # 40 cm
    assert plausible_spacing((0.001, 0.001), 300) is None  # 10 um pixels
    assert plausible_spacing(None, 300) is None


def test_content_crop_leaves_out_an_adjacent_colour_bar():
    import numpy as np

    from inference.us_regions import content_region

    rng = np.random.default_rng(0)
    gray = np.zeros((200, 300), np.float32)
    gray[20:180, 20:200] = rng.rayleigh(0.25, (160, 180)).clip(0, 1)  # B-mode speckle
    gray[20:180, 200:240] = rng.uniform(0.3, 0.9, (160, 40))  # a textured colour scale
    colour = np.zeros(gray.shape, bool)
    colour[20:180, 200:240] = True
    wide = content_region(gray)
    assert wide is not None and wide[3] >= 235  # grey-only search takes the bar as tissue
    box = content_region(gray, exclude=colour)
    assert box is not None and box[3] <= 202 and box[1] <= 24
