"""One modality combination of a run: its name, its features per fold, its results.

Shared by :mod:`training.run` (training), :mod:`training.run_report` (the report) and
:mod:`training.evaluate` (external validation) so none of them imports another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.model import ModelSpec
from training.data import Sample
from training.errors import TrainingError
from training.trainer import ArrayData, FoldResult

VALID_MODALITIES = ("image", "clinical", "lab")


@dataclass
class ComboResult:
    """One modality combination trained on every fold."""

    modalities: tuple[str, ...]
    spec: ModelSpec
    folds: list[FoldResult]
    oof: np.ndarray  # per-sample out-of-fold prediction (raw model probability)
    scalers: list[dict[str, Any]] = field(default_factory=list)  # per fold
    # per fold: (sample indices, raw probabilities, labels) the epoch was selected on; nested
    # selection: the inner-validation participants, where the calibrator is fitted too
    selection_sets: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    selection: str = "nested"


def parse_combination(text: str | Sequence[str]) -> tuple[str, ...]:
    """"image+clinical" or ["image", "clinical"] -> ("image", "clinical") in canonical order."""
    parts = text.replace(",", "+").split("+") if isinstance(text, str) else list(text)
    mods = {p.strip() for p in parts if p.strip()}
    bad = mods - set(VALID_MODALITIES)
    if bad or not mods:
        raise TrainingError(f"modality combination {text!r}: use image, clinical, lab joined by +")
    return tuple(m for m in VALID_MODALITIES if m in mods)


def scaled_features(samples: Sequence[Sample], train_idx: np.ndarray, mods: tuple[str, ...]
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Scale clinical/lab features with parameters fitted on the training studies only."""
    from training.features import CLINICAL_FEATURES, LAB_FEATURES, FeaturePreprocessor

    arrays: dict[str, np.ndarray] = {}
    params: dict[str, Any] = {}
    seen: dict[str, dict[str, Any]] = {}
    for i in train_idx:  # one row per study, not per image, so multi-image studies don't weigh more
        seen.setdefault(samples[i].study_uid, samples[i].row)
    for name, cols in (("clinical", CLINICAL_FEATURES), ("lab", LAB_FEATURES)):
        if name in mods:
            pre = FeaturePreprocessor(cols).fit(list(seen.values()))
            arrays[name] = pre.transform([s.row for s in samples])
            params[name] = pre.to_dict()
    return arrays, params


def subset_data(samples: Sequence[Sample], idx: np.ndarray, feats: dict[str, np.ndarray],
            mods: tuple[str, ...], y: np.ndarray) -> ArrayData:
    return ArrayData(
        y=y[idx],
        images=[samples[i].image for i in idx] if "image" in mods else None,  # type: ignore[misc]
        clinical=feats["clinical"][idx] if "clinical" in mods else None,
        lab=feats["lab"][idx] if "lab" in mods else None,
    )


def format_metric(m: dict[str, Any]) -> str:
    a = m.get("auc")
    if isinstance(a, dict):
        return f"AUC {a.get('auc', float('nan')):.3f} ({a.get('ci_low', 0):.3f}-{a.get('ci_high', 0):.3f})"
    if "ccc" in m:
        return f"MAPE {m['mape']:.1f}% CCC {m['ccc']:.3f}"
    return "n/a"
