"""The served decision is the operating point model.json describes (issue 13, "Done when").

A study is scored through the real ScoringPipeline with the tiny trained model; the probability
and the decision are recomputed by hand from the fold models' raw outputs, the calibrators and the
threshold written in model.json (formulas spelled out here, not imported from the code under test).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.config import ReaderConfig, ScoringConfig
from inference.pipeline import ScoringPipeline
from inference.transforms import eval_transforms
from tests.inference.test_pipeline import study_files


def _calibrate_by_hand(cal: dict, k: int, p: float) -> float:
    if cal is None or cal["method"] == "none":
        return p
    f = cal["folds"][k]
    if cal["method"] == "platt":
        q = min(max(p, 1e-7), 1 - 1e-7)
        return 1.0 / (1.0 + math.exp(-(f["a"] * math.log(q / (1 - q)) + f["b"])))
    assert cal["method"] == "isotonic"
    return float(np.interp(p, f["x"], f["y"]))


def test_served_decision_equals_the_reports_operating_point(tiny_model_dir: Path,
                                                            synth_cohort) -> None:  # noqa: ANN001
    _check_served_decision(tiny_model_dir, synth_cohort)


def test_physically_scaled_model_is_served_as_trained(synth_cohort, tmp_path: Path) -> None:  # noqa: ANN001
    """fov_cm is recorded in model.json and the node crops the same field of view."""
    import dataclasses

    from tests.fixtures.model import TINY_TRAIN
    from training.run import run_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run_training(synth_cohort.dicom_dir, synth_cohort.labels_csv, tmp_path / "m",
                           dataclasses.replace(TINY_TRAIN, fov_cm=6.0), n_boot=0)
    finally:
        torch.set_num_threads(threads)
    raw = json.loads((out / "model.json").read_text())
    assert raw["spec"]["fov_cm"] == 6.0
    assert raw["preprocessing"]["crop"] == "physical-fov-around-roi"
    _check_served_decision(out, synth_cohort)


def _check_served_decision(model_dir: Path, synth_cohort) -> None:  # noqa: ANN001
    tiny_model_dir = model_dir
    raw = json.loads((tiny_model_dir / "model.json").read_text())
    cal, dec = raw["calibration"], raw["decision"]
    assert cal is not None and cal["method"] in ("platt", "isotonic")
    assert len(cal["folds"]) == len(raw["folds"])
    assert dec["level"] == "study" and dec["rule"] == raw["serving"]["study_rule"] == "mean"
    assert dec["predictions"].startswith("out-of-fold-calibrated")
    exp = dec["expected"]
    assert 0.0 <= exp["sensitivity"] <= 1.0 and 0.0 <= exp["specificity"] <= 1.0
    threshold = raw["threshold"]
    assert threshold == dec["threshold"]

    pipe = ScoringPipeline(tiny_model_dir, ScoringConfig(model_dir=tiny_model_dir, torch_threads=1,
                                                         device="cpu", cam_enabled=False),
                           ReaderConfig())
    try:
        _, files = study_files(synth_cohort, "normal")
        score, _ = pipe.score_study(files, allow_missing_seg=False)
        art = pipe.artifact
        tf = eval_transforms(art.spec.input_size, art.spec.in_chans, art.spec.roi_margin,
                             raw["spec"].get("fov_cm", 0.0))
        image_probs = []
        study_fold = np.zeros(len(art.models))
        for im in score.images:
            x = tf({"image": im.frame.image[None], "mask": im.frame.mask[None],
                    "spacing_cm": im.frame.spacing_cm})["image"][None]
            with torch.inference_mode():
                raw_p = [float(torch.sigmoid(m(x))[0, 0]) for m in art.models]
            cal_p = [_calibrate_by_hand(cal, k, p) for k, p in enumerate(raw_p)]
            # channels-last vs default layout differ by ~1e-6 in the raw output; a steep isotonic
            # segment can magnify that
            np.testing.assert_allclose(im.fold_probabilities, cal_p, atol=2e-4)
            image_probs.append(float(np.mean(cal_p)))
            study_fold += np.asarray(cal_p) / len(score.images)
        by_hand = float(np.mean(image_probs))
        assert score.probability == pytest.approx(by_hand, abs=2e-4)
        assert score.positive == (by_hand >= threshold)
        assert score.fold_spread == pytest.approx(float(np.std(study_fold)), abs=2e-4)
        info = score.model
        assert info.threshold == threshold and info.calibration == cal["method"]
        assert info.expected_sensitivity == pytest.approx(exp["sensitivity"])
        assert info.expected_specificity == pytest.approx(exp["specificity"])
        assert info.image_threshold is None  # no image-level threshold: no per-image verdict
    finally:
        pipe.close()


def test_sr_carries_fold_spread_and_operating_point(tmp_path: Path) -> None:
    """The SR's study group: calibrated probability, its fold spread, threshold, expected
    sensitivity/specificity; heat maps without an image threshold carry no per-image verdict."""
    import dataclasses

    from pydicom.sr.codedict import codes

    from dicom_node import results as R
    from tests.builders import us_series
    from tests.conftest import make_config
    from tests.dicom_node.test_results import groups_by_source, make_score, measurement

    sources = us_series(2, patient_id="SYN0002", rows=96, cols=128)
    score = make_score(sources)
    score = dataclasses.replace(
        score, fold_spread=0.07,
        model=dataclasses.replace(score.model, expected_sensitivity=0.81,
                                  expected_specificity=0.74, calibration="platt"))
    cfg = make_config(tmp_path / "node")
    import highdicom as hd

    rs = R.build_results(score, {s.SOPInstanceUID: s for s in sources}, cfg.results)
    paths = R.write_results(rs, cfg)
    _, study = groups_by_source(hd.sr.srread(paths[0]))
    assert measurement(study, R.PROBABILITY) == pytest.approx(score.probability)
    assert measurement(study, R.PROBABILITY, codes.SCT.StandardDeviation) == pytest.approx(0.07)
    assert measurement(study, R.DECISION_THRESHOLD) == pytest.approx(score.model.threshold)
    assert measurement(study, R.EXPECTED_SENSITIVITY) == pytest.approx(0.81)
    assert measurement(study, R.EXPECTED_SPECIFICITY) == pytest.approx(0.74)
    im = score.images[0]
    silent = R.render_heatmap(im, "research", None)
    judged = R.render_heatmap(im, "research", 0.0)
    assert silent.shape == judged.shape and not np.array_equal(silent, judged)  # verdict text
