"""Agreement statistics for automatic vs reference measurements (CSA, thickness).

Muscle ultrasound papers report agreement as ICC(2,1), the standard error of measurement and a
Bland-Altman analysis (DeepACSA; the SARCO paper's measurements), so the segmenter's report does
the same. ICC follows Shrout & Fleiss (1979) from a two-way ANOVA, written with numpy so the
training stack needs no extra statistics package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def icc_2_1(ratings: np.ndarray) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single rater (Shrout & Fleiss).

    Args:
        ratings: (n subjects, k raters/methods), no missing values, n >= 2, k >= 2.

    Returns:
        (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n); NaN when all values are equal.
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must be (n>=2, k>=2), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("ratings contain missing or infinite values")
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    return float((msr - mse) / denom) if denom > 0 else float("nan")


@dataclass(frozen=True)
class Agreement:
    """Automatic vs reference agreement for one measurement.

    Attributes:
        n: pairs compared.
        icc: ICC(2,1) (NaN below 2 pairs).
        sem: standard error of measurement, SD(differences) / sqrt(2) (= sqrt(MSE) for k=2).
        bias: mean(automatic - reference), in the measurement's unit.
        bias_percent: bias relative to the mean reference value (%).
        loa_low / loa_high: Bland-Altman 95 % limits of agreement (bias -/+ 1.96 SD).
        mean_reference: mean reference value.
    """

    n: int
    icc: float
    sem: float
    bias: float
    bias_percent: float
    loa_low: float
    loa_high: float
    mean_reference: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in asdict(self).items()}


def agreement(automatic: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray
              ) -> Agreement:
    """ICC(2,1), SEM and Bland-Altman bias/limits of paired measurements."""
    a = np.asarray(automatic, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError("automatic and reference need the same length")
    n = int(a.size)
    nan = float("nan")
    if n == 0:
        return Agreement(0, nan, nan, nan, nan, nan, nan, nan)
    d = a - r
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else nan
    mean_ref = float(r.mean())
    return Agreement(
        n=n,
        icc=icc_2_1(np.stack([a, r], axis=1)) if n > 1 else nan,
        sem=sd / np.sqrt(2.0) if n > 1 else nan,
        bias=bias,
        bias_percent=100.0 * bias / mean_ref if mean_ref else nan,
        loa_low=bias - 1.96 * sd if n > 1 else nan,
        loa_high=bias + 1.96 * sd if n > 1 else nan,
        mean_reference=mean_ref,
    )
