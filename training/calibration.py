"""Per-fold probability calibrators and the calibration error: fitted here, applied in serving.

Why per fold: the node averages the fold models' probabilities, and a fold model's sigmoid output
is not a probability of sarcopenia (it was trained on negatives down-sampled to parity, so it is
shifted towards 0.5). Each fold model is therefore calibrated on its own inner-validation
participants (never on the outer fold whose predictions become the out-of-fold results), the node
averages the calibrated probabilities, and the threshold is chosen on that scale. The fitted
calibrators are plain numbers in model.json; :func:`inference.ensemble.apply_calibrator` is the
one formula both sides use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.ensemble import apply_calibrator

log = logging.getLogger(__name__)

METHODS = ("platt", "isotonic")
MIN_PER_CLASS = 2  # fewer calibration cases of a class than this: identity (logged)


def fit_calibrator(method: str, p_raw: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Fit one fold's calibrator on raw probabilities and binary labels.

    Platt: logistic regression of the label on the logit (sklearn, almost unregularised).
    Isotonic: sklearn's isotonic regression, stored as its breakpoints (interpolated between,
    clipped outside). Too few cases of a class: the identity calibrator, with a warning.
    """
    p = np.asarray(p_raw, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64).astype(int)
    if min(int((t == 1).sum()), int((t == 0).sum())) < MIN_PER_CLASS:
        log.warning("calibration: %d positive / %d negative cases, too few to fit; identity used",
                    int((t == 1).sum()), int((t == 0).sum()))
        return {"a": 1.0, "b": 0.0} if method == "platt" else {"x": [0.0, 1.0], "y": [0.0, 1.0]}
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        q = np.clip(p, 1e-7, 1 - 1e-7)
        z = np.log(q / (1 - q)).reshape(-1, 1)
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(z, t)
        return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, t)
        return {"x": [float(v) for v in iso.X_thresholds_],
                "y": [float(v) for v in iso.y_thresholds_]}
    raise ValueError(f"unknown calibration method {method!r}")


def calibrate(method: str, params: dict[str, Any], p_raw: Sequence[float]) -> np.ndarray:
    """Apply a fitted calibrator (the serving formula)."""
    return apply_calibrator(method, params, np.asarray(p_raw, dtype=np.float64))


def expected_calibration_error(y: Sequence[float], p: Sequence[float], n_bins: int = 10
                               ) -> float:
    """ECE with equal-count bins: the case-weighted mean |observed rate - mean probability|."""
    yy = np.asarray(y, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    if yy.size == 0:
        return float("nan")
    order = np.argsort(pp, kind="stable")
    ece = 0.0
    for idx in np.array_split(order, min(n_bins, yy.size)):
        if idx.size:
            ece += idx.size / yy.size * abs(float(yy[idx].mean()) - float(pp[idx].mean()))
    return float(ece)


def reliability_bins(y: Sequence[float], p: Sequence[float], n_bins: int = 10
                     ) -> list[dict[str, float]]:
    """Equal-count bins for a reliability diagram: mean probability, observed rate, n."""
    yy = np.asarray(y, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    out = []
    for idx in np.array_split(np.argsort(pp, kind="stable"), min(n_bins, max(yy.size, 1))):
        if idx.size:
            out.append({"mean_probability": float(pp[idx].mean()),
                        "observed_rate": float(yy[idx].mean()), "n": int(idx.size)})
    return out


def brier(y: Sequence[float], p: Sequence[float]) -> float:
    yy = np.asarray(y, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    return float(np.mean((pp - yy) ** 2)) if yy.size else float("nan")
