"""ICC(2,1), SEM and Bland-Altman against textbook values."""

from __future__ import annotations

import numpy as np
import pytest

from training.segmentation_stats import agreement, icc_2_1

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges. Published: ICC(1,1) = .17,
# ICC(2,1) = .29, ICC(3,1) = .71.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6],
                          [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)


def test_icc_2_1_matches_shrout_fleiss_table() -> None:
    assert icc_2_1(SHROUT_FLEISS) == pytest.approx(0.2898, abs=5e-4)


def test_icc_is_one_for_identical_raters_and_drops_with_a_constant_offset() -> None:
    x = np.array([1.0, 2.0, 4.0, 7.0, 3.0])
    assert icc_2_1(np.stack([x, x], 1)) == pytest.approx(1.0)
    # absolute agreement: a systematic offset lowers ICC(2,1) (ICC(3,1) would stay 1)
    assert icc_2_1(np.stack([x, x + 1.0], 1)) < 0.95


def test_icc_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        icc_2_1(np.ones((1, 2)))
    with pytest.raises(ValueError):
        icc_2_1(np.array([[1.0, np.nan], [2.0, 3.0]]))


def test_bland_altman_bias_limits_and_sem() -> None:
    ref = np.array([4.0, 5.0, 6.0, 7.0])
    auto = ref + np.array([0.1, 0.3, 0.1, 0.3])  # differences: mean .2, SD .11547
    ag = agreement(auto, ref)
    sd = np.std([0.1, 0.3, 0.1, 0.3], ddof=1)
    assert ag.n == 4
    assert ag.bias == pytest.approx(0.2)
    assert ag.bias_percent == pytest.approx(0.2 / 5.5 * 100)
    assert ag.loa_low == pytest.approx(0.2 - 1.96 * sd)
    assert ag.loa_high == pytest.approx(0.2 + 1.96 * sd)
    assert ag.sem == pytest.approx(sd / np.sqrt(2))
    assert agreement([], []).to_dict()["icc"] is None
