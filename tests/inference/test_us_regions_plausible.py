"""Implausible calibration never yields cm values."""

from __future__ import annotations

from pydicom import Dataset

from inference.us_regions import plausible_spacing, regions_from_sequence


def _ds(delta: float) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType = 1, 1
    item.RegionLocationMinX0, item.RegionLocationMinY0 = 0, 0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = 399, 299
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = item.PhysicalDeltaY = delta
    ds = Dataset()
    ds.SequenceOfUltrasoundRegions = [item]
    return ds


def test_forty_cm_depth_is_not_calibrated():
    assert regions_from_sequence(_ds(0.0133), 300, 400)[0].spacing_cm == (0.0133, 0.0133)
    assert regions_from_sequence(_ds(0.1333), 300, 400)[0].spacing_cm is None  # 40 cm
    assert plausible_spacing((0.001, 0.001), 300) is None  # 10 um pixels
    assert plausible_spacing(None, 300) is None
