"""Calibrators fitted in training and applied in serving agree; ECE and the promise check."""

from __future__ import annotations

import numpy as np
import pytest

from inference.ensemble import FoldCalibration
from training.calibration import (
    brier,
    calibrate,
    expected_calibration_error,
    fit_calibrator,
    reliability_bins,
)


def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with 25 % prevalence and raw scores pushed towards 0.5 (a balanced-trained model)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(float)
    z = 1.5 * (y - 0.5) + rng.normal(0, 1, n)
    true_p = 1 / (1 + np.exp(-(z * 1.2 - 1.1)))
    y = (rng.random(n) < true_p).astype(float)
    raw = 1 / (1 + np.exp(-z))
    return y, raw


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_lowers_the_error_on_fresh_data(method: str) -> None:
    y_fit, p_fit = _shifted(2000, 1)
    y_new, p_new = _shifted(2000, 2)
    params = fit_calibrator(method, p_fit, y_fit)
    cal = calibrate(method, params, p_new)
    assert expected_calibration_error(y_new, cal) < 0.5 * expected_calibration_error(y_new, p_new)
    assert brier(y_new, cal) < brier(y_new, p_new)
    # serving applies the stored numbers with the same result
    served = FoldCalibration.from_dict({"method": method, "folds": [params]}, 1).apply(p_new[None])
    np.testing.assert_allclose(served[0], cal)


def test_too_few_cases_give_the_identity() -> None:
    assert fit_calibrator("platt", [0.2, 0.7, 0.9], [0, 1, 1]) == {"a": 1.0, "b": 0.0}


def test_ece_and_bins_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.3, 0.6, 1.0])
    # two equal-count bins: |0 - 0.2| and |1 - 0.8|, each weight 1/2
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.2)
    assert [b["n"] for b in reliability_bins(y, p, 2)] == [2, 2]
