"""Participant-level cross-validation folds and per-epoch down-sampling of the majority class.

Why participant level: images (and follow-up studies) of one person are strongly correlated; if
they fell in both the training and the validation folds the CV AUC would be optimistic. The split
depends only on the participants, their labels and the seed, so every DDP rank (and a resumed run)
computes the same folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from training.errors import TrainingError


def stratification_labels(labels: Sequence[float], target: str = "binary") -> np.ndarray:
    """Integer classes to stratify on: the label itself, or target quartiles for regression."""
    y = np.asarray(labels, dtype=np.float64)
    if target == "binary":
        return y.astype(int)
    edges = np.quantile(y, [0.25, 0.5, 0.75])
    return np.searchsorted(edges, y, side="right").astype(int)


def participant_folds(
    participant_ids: Sequence[str], strata: Sequence[int], n_folds: int, seed: int
) -> np.ndarray:
    """Fold number (0..n_folds-1) of every sample, grouped by participant and stratified.

    Raises:
        TrainingError: fewer participants than folds, or a class too small to stratify.
    """
    groups = np.asarray(participant_ids)
    y = np.asarray(strata, dtype=int)
    n_groups = len(set(groups.tolist()))
    if n_groups < n_folds:
        raise TrainingError(f"{n_groups} participants cannot be split into {n_folds} folds")
    fold_of = np.full(len(y), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        fold_of[val_idx] = k
    if (fold_of < 0).any():  # pragma: no cover - sklearn assigns every sample
        raise TrainingError("cross-validation left samples unassigned")
    return fold_of


def balanced_indices(labels: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """All minority-class indices plus an equal random draw of the majority class, shuffled.

    The paper down-samples negative images to parity each epoch, so every epoch sees all
    positives and a fresh subset of negatives. With a single class, everything is returned.
    """
    y = np.asarray(labels).astype(int)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        idx = np.arange(len(y))
    elif len(neg) > len(pos):
        idx = np.concatenate([pos, rng.choice(neg, size=len(pos), replace=False)])
    else:
        idx = np.concatenate([neg, rng.choice(pos, size=len(neg), replace=False)])
    return rng.permutation(idx)


def inner_validation_mask(
    participant_ids: Sequence[str], strata: Sequence[int], n_splits: int, seed: int
) -> np.ndarray:
    """Nested selection: True for the samples of an outer training fold held out for validation.

    One stratified participant-level split (1/``n_splits`` of the participants), seeded, so the
    epoch is selected and the calibrator fitted on participants the outer fold never sees.
    """
    n_groups = len(set(np.asarray(participant_ids).tolist()))
    fold_of = participant_folds(participant_ids, strata, max(2, min(n_splits, n_groups)), seed)
    return fold_of == 0
