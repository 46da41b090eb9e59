"""The fold trainer: schedule, determinism, resume after an interruption, learning at all."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import ModelSpec, create_model
from training.config import TrainConfig
from training.trainer import (
    ArrayData,
    _epoch_indices,
    load_done,
    lr_at,
    predict,
    save_done,
    train_fold,
)

CFG = TrainConfig(backbone="test_convnext", input_size=32, folds=2, epochs=3, warmup_epochs=1,
                  batch_size=8, lr=2e-3, seed=5, device="cpu")
SPEC = ModelSpec(backbone="test_convnext", input_size=32, in_chans=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (a second one only spin-waits on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n: int, seed: int) -> ArrayData:
    """Positives have a bright blob: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(np.float64)
    y[:2] = [0, 1]
    imgs = []
    for lab in y:
        # smooth (8x8-pixel) texture: like B-mode speckle after resizing, unlike white noise
        img = np.kron(rng.random((1, 4, 4)), np.ones((1, 8, 8))).astype(np.float32) * 0.3
        if lab:
            img[:, 8:24, 8:24] += 0.6
        imgs.append(img)
    clin = rng.random((n, 9)).astype(np.float32)
    return ArrayData(y=y, images=imgs, clinical=clin)


def test_lr_schedule_warmup_then_cosine() -> None:
    lrs = [lr_at(s, 100, 10, 1e-3) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))  # cosine falls
    assert lrs[55] == pytest.approx(5e-4, rel=1e-6)  # half way through the cosine
    assert lrs[100] == lrs[109] == 0.0
    assert lr_at(0, 10, 0, 1.0) == 1.0


def test_epoch_subsets_are_balanced_and_reproducible() -> None:
    y = np.array([1] * 5 + [0] * 20, dtype=float)
    a = _epoch_indices(y, True, 1, 0, 3)
    assert len(a) == 10 and y[a].sum() == 5
    assert np.array_equal(a, _epoch_indices(y, True, 1, 0, 3))
    assert len(_epoch_indices(y, False, 1, 0, 3)) == 25


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_and_resume_matches(tmp_path: Path) -> None:
    train, val = _data(40, 1), _data(16, 2)
    ref = train_fold(0, train, val, SPEC, CFG, work_dir=tmp_path / "a")
    again = train_fold(0, train, val, SPEC, CFG, work_dir=tmp_path / "b")
    assert _states_equal(ref.best_state, again.best_state)
    assert np.array_equal(ref.val_pred, again.val_pred)
    # the returned validation predictions are those of the returned (best) weights
    model = create_model(SPEC)
    model.load_state_dict(ref.best_state)
    logits = predict(model, val, 3, 8, torch.device("cpu"))
    assert np.allclose(1 / (1 + np.exp(-logits)), ref.val_pred, atol=1e-6)

    class Interrupt(Exception):
        pass

    def stop(fold: int, epoch: int) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_fold(0, train, val, SPEC, CFG, work_dir=tmp_path / "c", on_epoch_end=stop)
    seen: list[int] = []
    resumed = train_fold(0, train, val, SPEC, CFG, work_dir=tmp_path / "c", resume=True,
                         on_epoch_end=lambda f, e: seen.append(e))
    assert seen == [2]  # only the missing epoch ran
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.best_epoch == ref.best_epoch
    assert _states_equal(ref.best_state, resumed.best_state)
    assert np.array_equal(ref.val_pred, resumed.val_pred)

    # a finished fold is stored and reloaded as such
    save_done(tmp_path / "c", resumed)
    done = load_done(tmp_path / "c", 0)
    assert done is not None and np.array_equal(done.val_pred, resumed.val_pred)
    assert _states_equal(done.best_state, resumed.best_state)
    # without --resume the old checkpoints are discarded, not silently continued
    fresh = train_fold(0, train, val, SPEC, CFG, work_dir=tmp_path / "c",
                       on_epoch_end=lambda f, e: seen.append(e))
    assert seen == [2, 0, 1, 2] and _states_equal(fresh.best_state, ref.best_state)


def test_learns_a_visible_signal_and_fusion_trains(tmp_path: Path) -> None:
    train, val = _data(48, 3), _data(24, 4)
    cfg = dataclasses.replace(CFG, epochs=8, lr=3e-3)
    res = train_fold(1, train, val, SPEC, cfg, work_dir=tmp_path)
    assert res.best_score > 0.8, res.history
    assert res.val_pred.shape == (24,) and np.all((res.val_pred >= 0) & (res.val_pred <= 1))
    fusion = ModelSpec(backbone="test_convnext", input_size=32, modalities=("image", "clinical"),
                       n_clinical=9, mlp_hidden=16)
    res2 = train_fold(0, train, val, fusion, dataclasses.replace(cfg, epochs=1),
                      work_dir=tmp_path / "f")
    assert set(k.split(".")[0] for k in res2.best_state) == {"backbone", "clinical", "head"}
    assert math.isfinite(res2.best_score)


def test_regression_target(tmp_path: Path) -> None:
    data = _data(40, 5)
    data.y = 5.0 + 2.0 * data.y + np.random.default_rng(0).normal(0, 0.1, 40)
    spec = ModelSpec(backbone="test_convnext", input_size=32, target="regression")
    cfg = dataclasses.replace(CFG, target="regression", epochs=2)
    res = train_fold(0, data, data, spec, cfg, work_dir=tmp_path)
    assert res.target_scaling is not None and res.target_scaling["std"] > 0
    assert res.val_pred.min() > 2 and res.val_pred.max() < 10  # back in target units
