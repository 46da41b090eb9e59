"""Nested vs optimistic selection, and the backbone comparison under the same folds."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from dicom_node.config import config_from_dict
from tests.fixtures.model import TINY_TRAIN


def test_nested_selection_never_selects_on_the_outer_fold(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    assert raw["selection"]["mode"] == "nested"
    every = set().union(*(f["val_participants"] for f in raw["folds"]))
    for f in raw["folds"]:
        sel, outer = set(f["selection_participants"]), set(f["val_participants"])
        assert sel and not sel & outer and sel <= every - outer
    assert raw["calibration"]["fitted_on"].startswith("inner-validation")
    assert "Nested selection" in (tiny_model_dir / "report.md").read_text()


def test_optimistic_selection_is_explicit_and_labelled(synth_cohort, tmp_path: Path) -> None:  # noqa: ANN001
    from training.run import run_training

    cfg = dataclasses.replace(TINY_TRAIN, modalities=("clinical",), tabular_epochs=3,
                              mlp_hidden=8, selection="optimistic")
    out = run_training(synth_cohort.dicom_dir, synth_cohort.labels_csv, tmp_path / "m", cfg,
                       n_boot=0)
    raw = json.loads((out / "model.json").read_text())
    for f in raw["folds"]:
        assert f["selection_participants"] == f["val_participants"]
    assert raw["decision"]["predictions"].endswith("(optimistic selection)")
    assert "optimistic" in raw["calibration"]["fitted_on"]
    assert "Optimistic cross-validation" in (out / "report.md").read_text()


@pytest.mark.slow
def test_backbones_train_under_the_same_folds_into_one_table(synth_cohort, tmp_path: Path) -> None:  # noqa: ANN001
    import torch

    from dicom_node.commands.train import train_command
    from training.oof import read_oof

    cfg = dataclasses.replace(config_from_dict({"node": {"allow_any_calling_aet": True},
                                                "scoring": {"enabled": False}}), train=TINY_TRAIN)
    out = tmp_path / "cmp"
    args = argparse.Namespace(archive=synth_cohort.dicom_dir, labels=synth_cohort.labels_csv,
                              out=out, epochs=None, backbone=None, modalities=None, resume=False,
                              also=None, keep_checkpoints=False,
                              backbones=["test_convnext", "test_resnet"])
    threads = torch.get_num_threads()
    try:
        assert train_command(args, cfg) == 0
    finally:
        torch.set_num_threads(threads)
    table = (out / "backbones.md").read_text()
    assert "| test_convnext |" in table and "| test_resnet |" in table
    rows = json.loads((out / "backbones.json").read_text())
    assert rows[1]["vs"] == "test_convnext" and 0.0 <= rows[1]["p_value"] <= 1.0
    assert rows[1]["paired"] and rows[1]["n_matched"] == rows[0]["n"]
    a, b = (read_oof(out / n) for n in ("test_convnext", "test_resnet"))
    fold = {(r.participant_id, r.fold) for r in a.records}
    assert fold == {(r.participant_id, r.fold) for r in b.records}  # the same folds
    for n in ("test_convnext", "test_resnet"):
        assert json.loads((out / n / "model.json").read_text())["spec"]["backbone"] == n
