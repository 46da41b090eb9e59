"""Participant-level folds and per-epoch down-sampling to parity."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.errors import TrainingError
from training.cv import balanced_indices, participant_folds, stratification_labels


def _cohort(n_participants: int = 40, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    pids, labels = [], []
    for p in range(n_participants):
        lab = int(rng.random() < 0.3)
        for _ in range(int(rng.integers(1, 6))):  # 1-5 images per participant
            pids.append(f"P{p:03d}")
            labels.append(lab)
    return pids, np.asarray(labels)


def test_folds_never_share_a_participant_and_are_stratified() -> None:
    pids, y = _cohort()
    fold_of = participant_folds(pids, y, 5, seed=42)
    assert set(fold_of.tolist()) == set(range(5))
    owner: dict[str, int] = {}
    for p, k in zip(pids, fold_of, strict=True):
        assert owner.setdefault(p, int(k)) == k, f"{p} in two folds"
    for k in range(5):
        assert 0 < y[fold_of == k].sum() < (fold_of == k).sum()  # both classes in every fold
    assert np.array_equal(fold_of, participant_folds(pids, y, 5, seed=42))
    assert not np.array_equal(fold_of, participant_folds(pids, y, 5, seed=43))


def test_too_few_participants() -> None:
    with pytest.raises(TrainingError, match="3 participants"):
        participant_folds(["a", "b", "c"], [0, 1, 0], 5, seed=0)


def test_regression_strata_are_quartiles() -> None:
    s = stratification_labels(np.linspace(4, 9, 100), "regression")
    assert sorted(set(s.tolist())) == [0, 1, 2, 3] and np.bincount(s).min() >= 24


def test_downsampling_gives_parity_every_epoch() -> None:
    y = np.array([1] * 7 + [0] * 30)
    draws = []
    for epoch in range(3):
        idx = balanced_indices(y, np.random.default_rng([0, epoch]))
        assert len(idx) == 14 and len(set(idx.tolist())) == 14
        assert y[idx].sum() == 7  # every positive, and as many negatives
        assert set(np.flatnonzero(y == 1)) <= set(idx.tolist())
        draws.append(frozenset(idx.tolist()))
    assert len(set(draws)) > 1  # a fresh subset of negatives each epoch
    # the minority may be the negatives too; one class -> everything
    assert balanced_indices(1 - y, np.random.default_rng(0)).size == 14
    assert balanced_indices(np.zeros(5), np.random.default_rng(0)).size == 5
