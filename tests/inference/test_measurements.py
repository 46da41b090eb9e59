"""RF measurements against analytic shapes (disk, ellipse, rectangle, bar)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.measurements import measure_roi


def _ellipse(shape: tuple[int, int], centre: tuple[int, int], a: float, b: float) -> np.ndarray:
    """Pixels whose centres lie inside the ellipse with row semi-axis a, column semi-axis b."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return ((rr - centre[0]) / a) ** 2 + ((cc - centre[1]) / b) ** 2 <= 1.0


def test_disk_area_and_thickness() -> None:
    r, sp = 60, (0.01, 0.01)
    mask = _ellipse((200, 220), (100, 110), r, r)
    m = measure_roi(np.full(mask.shape, 0.5, np.float32), mask, sp)
    assert m.csa_cm2 == pytest.approx(math.pi * (r * 0.01) ** 2, rel=0.01)
    assert m.thickness_cm == pytest.approx((2 * r + 1) * 0.01)  # rows c-r .. c+r inclusive


def test_ellipse_anisotropic_spacing_uses_row_direction_for_thickness() -> None:
    a, b, sp = 20, 70, (0.02, 0.005)  # flat ellipse: 41 rows tall, 141 columns wide
    mask = _ellipse((100, 200), (50, 100), a, b)
    m = measure_roi(np.zeros(mask.shape, np.float32), mask, sp)
    assert m.csa_cm2 == pytest.approx(math.pi * a * b * sp[0] * sp[1], rel=0.01)
    assert m.thickness_cm == pytest.approx((2 * a + 1) * sp[0])


def test_rectangle_exact_and_thickness_is_maximal_column_extent() -> None:
    mask = np.zeros((50, 60), bool)
    mask[10:20, 5:45] = True  # 10 x 40
    mask[20:35, 30:32] = True  # a deeper tongue: columns 30-31 span rows 10..34 = 25 rows
    m = measure_roi(np.zeros(mask.shape, np.float32), mask, (0.1, 0.05))
    assert m.csa_cm2 == pytest.approx((400 + 30) * 0.1 * 0.05)
    assert m.thickness_cm == pytest.approx(25 * 0.1)


def test_echo_intensity_on_0_255_scale() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True
    image = np.ones((10, 10), np.float32)  # outside the ROI: must not count
    image[2:4, 2:6] = 100 / 255
    image[4:6, 2:6] = 200 / 255
    m = measure_roi(image, mask, (0.1, 0.1))
    assert m.echo_intensity_mean == pytest.approx(150.0, abs=1e-3)
    assert m.echo_intensity_sd == pytest.approx(50.0, abs=1e-3)


def test_uncalibrated_gives_no_lengths_but_echo() -> None:
    mask = _ellipse((40, 40), (20, 20), 10, 10)
    m = measure_roi(np.full(mask.shape, 0.2, np.float32), mask, None)
    assert m.csa_cm2 is None and m.thickness_cm is None
    assert m.echo_intensity_mean == pytest.approx(51.0, abs=1e-3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        measure_roi(np.zeros((5, 5)), np.zeros((5, 5), bool), (0.1, 0.1))
    with pytest.raises(ValueError, match="shape"):
        measure_roi(np.zeros((5, 5)), np.ones((5, 6), bool), (0.1, 0.1))
