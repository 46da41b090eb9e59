"""The OOD check: fitted on the training images at train time, stored in model.json, served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicom_node.config import ReaderConfig, ScoringConfig
from dicom_node.errors import ModelArtifactError
from inference.errors import NothingToScoreError
from inference.gate import OOD
from inference.ood import OodModel
from inference.pipeline import ScoringPipeline
from tests.inference.test_pipeline import study_files
from training.ood import fit_ood


class _Net(nn.Module):
    """A fixed random conv backbone with pooled output, like an ImageClassifier's."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(1, 24, 5, stride=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(24, 1)


def _speckle(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.rayleigh(0.25, (n, 1, 32, 32)).clip(0, 1).astype(np.float32)


def test_fit_lets_95_percent_of_training_images_pass_and_separates_other_images():
    rng = np.random.default_rng(0)
    train = _speckle(200, rng)
    models = [_Net(1), _Net(2)]
    ood = fit_ood(models, train, in_chans=1, dims=8)
    s_train = ood.scores(models, torch.from_numpy(train))
    assert np.mean(s_train <= ood.threshold) >= 0.95
    # a bright, flat image and a checkerboard are nothing like speckle
    flat = np.full((10, 1, 32, 32), 0.9, np.float32)
    checker = np.indices((32, 32)).sum(0) % 2
    chk = np.repeat(checker[None, None].astype(np.float32), 10, axis=0)
    assert (ood.scores(models, torch.from_numpy(flat)) > ood.threshold).all()
    assert (ood.scores(models, torch.from_numpy(chk)) > ood.threshold).all()
    # what model.json stores reads back to the same scores
    back = OodModel.from_dict(json.loads(json.dumps(ood.to_dict())))
    assert back is not None
    assert np.allclose(back.scores(models, torch.from_numpy(flat)),
                       ood.scores(models, torch.from_numpy(flat)))


def test_malformed_block_is_an_artifact_error():
    assert OodModel.from_dict(None) is None
    with pytest.raises(ModelArtifactError, match="ood"):
        OodModel.from_dict({"method": "mahalanobis-rp", "dims": 4, "threshold": 1.0,
                            "folds": [{"seed": 0, "mean": [0.0], "precision": [[1.0]]}]})


def _with_threshold(model_dir: Path, tmp_path: Path, threshold: float) -> Path:
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    raw = json.loads((out / "model.json").read_text())
    raw["ood"]["threshold"] = threshold
    (out / "model.json").write_text(json.dumps(raw))
    return out


def test_train_writes_the_ood_block(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    ood = raw["ood"]
    assert ood["method"] == "mahalanobis-rp" and ood["keep"] >= 0.95
    assert len(ood["folds"]) == len(raw["folds"]) and ood["n_train"] >= 8
    assert np.isfinite(ood["threshold"]) and ood["threshold"] > 0


def test_serving_stops_images_above_the_models_threshold(tiny_model_dir, synth_cohort,
                                                         tmp_path) -> None:  # noqa: ANN001
    _, files = study_files(synth_cohort, "normal")
    scoring = ScoringConfig(model_dir=tiny_model_dir, torch_threads=1, device="cpu")
    low = _with_threshold(tiny_model_dir, tmp_path, 0.0)
    pipe = ScoringPipeline(low, scoring, ReaderConfig())
    try:
        with pytest.raises(NothingToScoreError) as err:
            pipe.score_study(files, allow_missing_seg=False)
    finally:
        pipe.close()
    assert err.value.verdicts and all(v.reason == OOD for v in err.value.verdicts)
    assert "out-of-distribution" in err.value.state
    assert err.value.sources  # headers for a "not assessable" SR

    pipe = ScoringPipeline(tiny_model_dir, scoring, ReaderConfig())
    try:
        score, _ = pipe.score_study(files, allow_missing_seg=False)
    finally:
        pipe.close()
    assert score.images and all("ood_score" in im.gate.measured for im in score.images)
    assert all(im.gate.measured["ood_score"] <= pipe.ood.threshold for im in score.images)
