"""model.json carries what serving must reproduce; old files still read; a contradicting config is
refused with both values named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from inference.artifact import (
    SCHEMA_VERSION,
    Decision,
    ServingPolicy,
    load_artifact,
    read_card,
)
from inference.config import ReaderConfig, ScoringConfig
from inference.errors import ModelArtifactError
from inference.pipeline import policy_conflicts, read_servable_card
from tests.inference.test_model import SPEC, _edit, _write

REFERENCE_RUNS = Path(__file__).resolve().parents[2] / "docs" / "reference-runs"


def test_model_json_records_decision_policy_and_preprocessing(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    raw = json.loads((out / "model.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 2
    assert raw["decision"] == {"threshold": 0.4, "method": "youden_j", "level": "participant",
                               "rule": "mean", "predictions": "out-of-fold", "expected": {},
                               "image_threshold": None}
    assert raw["serving"] == {"frame_policy": "middle", "region_policy": "largest",
                              "study_rule": "mean"}
    assert raw["calibration"] is None
    assert raw["preprocessing"]["crop"] == "roi-box-plus-margin"
    assert raw["preprocessing"]["roi_margin"] == SPEC.roi_margin
    card = load_artifact(out).card
    assert card.decision == Decision(threshold=0.4) and card.policy == ServingPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.spec.input_size = 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.decision.threshold = 0.1  # type: ignore[misc]


def test_schema_1_file_loads_with_the_values_it_was_trained_with(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)

    def to_v1(raw: dict) -> None:
        for key in ("decision", "serving", "calibration"):
            raw.pop(key)
        raw["schema_version"] = 1
        raw["spec"]["frame_policy"] = "all"

    _edit(out, to_v1)
    card = load_artifact(out).card
    assert card.schema_version == 1 and card.calibration is None
    assert card.policy == ServingPolicy(frame_policy="all")
    assert card.decision == Decision(threshold=0.4)


@pytest.mark.parametrize("name", ["model300", "model300-resnet10t", "model300-tabular"])
def test_reference_runs_still_read(name: str) -> None:
    card = read_card(REFERENCE_RUNS / name, require_fold_files=False)
    assert card.schema_version == 1 and card.policy == ServingPolicy()
    assert 0 < card.threshold < 1 and card.decision.level == "participant"


def test_config_contradicting_the_model_is_refused_naming_both_values(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    card = read_card(out)
    assert policy_conflicts(card, ScoringConfig(), ReaderConfig()) == []
    same = ReaderConfig(frame_policy="middle", region_policy="largest")
    assert policy_conflicts(card, ScoringConfig(study_rule="mean"), same) == []
    with pytest.raises(ModelArtifactError, match=r"reader.frame_policy = 'all'.*'middle'"):
        read_servable_card(out, ScoringConfig(), ReaderConfig(frame_policy="all"))
    with pytest.raises(ModelArtifactError, match=r"scoring.study_rule = 'max'.*'mean'"):
        read_servable_card(out, ScoringConfig(study_rule="max"), ReaderConfig())
    with pytest.raises(ModelArtifactError, match=r"reader.region_policy = 'all'.*'largest'"):
        read_servable_card(out, ScoringConfig(), ReaderConfig(region_policy="all"))


def test_only_image_binary_models_are_servable(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    _edit(out, lambda r: r["spec"].update(target="regression"))
    with pytest.raises(ModelArtifactError, match="not a binary classifier"):
        read_servable_card(out, ScoringConfig(), ReaderConfig())


def test_calibration_table_is_checked_and_applied(tmp_path: Path) -> None:
    import numpy as np

    out, _ = _write(tmp_path)
    n = len(json.loads((out / "model.json").read_text())["folds"])
    platt = {"method": "platt", "folds": [{"a": 2.0, "b": -1.0}] * n}
    _edit(out, lambda r: r.update(calibration=platt))
    card = read_card(out)
    assert card.calibrator.method == "platt" and card.info.calibration == "platt"
    got = card.calibrator.apply(np.full((n, 1), 0.5))
    np.testing.assert_allclose(got, 1 / (1 + np.exp(1.0)))  # logit(0.5) = 0 -> sigmoid(-1)
    _edit(out, lambda r: r.update(calibration={"method": "platt", "folds": [{"a": 1.0}] * n}))
    with pytest.raises(ModelArtifactError, match="a and b"):
        read_card(out)
    _edit(out, lambda r: r.update(calibration={"method": "platt", "folds": []}))
    with pytest.raises(ModelArtifactError, match="one calibrator per fold"):
        read_card(out)
    iso = {"method": "isotonic", "folds": [{"x": [0.2, 0.8], "y": [0.1, 0.9]}] * n}
    _edit(out, lambda r: r.update(calibration=iso))
    np.testing.assert_allclose(read_card(out).calibrator.apply(np.full((n, 2), [0.0, 0.5])),
                               np.tile([0.1, 0.5], (n, 1)))
    _edit(out, lambda r: r.update(calibration={"method": "isotonic",
                                               "folds": [{"x": [0.8, 0.2], "y": [0.1, 0.9]}] * n}))
    with pytest.raises(ModelArtifactError, match="increasing"):
        read_card(out)
    _edit(out, lambda r: r.update(calibration={"method": "beta", "folds": []}))
    with pytest.raises(ModelArtifactError, match="not platt"):
        read_card(out)
