"""Input gate: rules, image checks on real encoded US objects, OOD score and threshold."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from inference import gate as g
from inference.gate import GateConfig, gate_config_from_dict, gate_dataset
from training.synth_nonmuscle import muscle_object, nonmuscle_object


@pytest.fixture(scope="module")
def muscle():
    return muscle_object(np.random.default_rng(0), "samsung", "", scale=0.5).dataset


def test_muscle_image_passes_with_plausible_calibration(muscle):
    v = gate_dataset(muscle, GateConfig())
    assert v.passed and v.reason == g.PASSED and v.calibration_ok
    assert 1.5 <= v.measured["depth_cm"] <= 10.0
    assert v.site_established  # SeriesDescription "RF transverse", BodyPartExamined THIGH


@pytest.mark.parametrize("kind,regions,reasons", [
    ("colour-doppler", True, {g.COLOUR}),
    ("colour-doppler", False, {g.COLOUR}),
    ("sector", True, {g.SECTOR}),
    ("sector", False, {g.SECTOR}),
    ("obstetric", True, {g.SECTOR, g.FLUID}),
    ("fluid", False, {g.FLUID}),
    ("spectral", True, {g.SPECTRAL}),
    ("spectral", False, {g.PANELS}),
])
def test_non_muscle_is_stopped_with_its_reason(kind, regions, reasons):
    ds = nonmuscle_object(kind, np.random.default_rng(3), regions=regions).dataset
    v = gate_dataset(ds, GateConfig())
    assert not v.passed
    assert v.reason in reasons, v.summary
    assert not v.site_established


def test_implausible_calibration_is_stopped_or_uncalibrated(muscle):
    ds = copy.deepcopy(muscle)  # the fixture is shared: its region items must stay intact
    for item in ds.SequenceOfUltrasoundRegions:
        item.PhysicalDeltaX = item.PhysicalDeltaY = 0.14  # ~40 cm over 300 rows
    v = gate_dataset(ds, GateConfig())
    assert not v.passed and v.reason == g.CALIBRATION and "depth" in v.detail
    lenient = gate_dataset(ds, GateConfig(require_calibration_plausible=False))
    assert lenient.passed and not lenient.calibration_ok


def test_rules_per_calling_ae_and_patterns(muscle):
    cfg = gate_config_from_dict({
        "deny_patterns": ["CARDIAC|ECHO|OB"],
        "ae": {"VASCULAR": {"allow_patterns": ["THIGH_ONLY_TAG"]},
               "THIGHBOX": {"assume_thigh": True}},
    })
    assert gate_dataset(muscle, cfg).passed
    v = gate_dataset(muscle, cfg, calling_ae="VASCULAR")
    assert not v.passed and v.reason == g.RULE_NOT_ALLOWED
    ds = muscle.copy()
    ds.StudyDescription = "Echo cardiac"
    assert gate_dataset(ds, cfg).reason == g.RULE_DENY
    ds.Modality = "OT"
    assert gate_dataset(ds, cfg).reason == g.RULE_MODALITY
    plain = muscle.copy()
    plain.BodyPartExamined, plain.SeriesDescription, plain.StudyDescription = "", "", ""
    assert not gate_dataset(plain, cfg).site_established
    assert gate_dataset(plain, cfg, calling_ae="THIGHBOX").site_established


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="gate.max_colour_fractio"):
        gate_config_from_dict({"max_colour_fractio": 0.1})
    with pytest.raises(ValueError, match="depth_cm_range"):
        gate_config_from_dict({"depth_cm_range": [10, 2]})
    with pytest.raises(ValueError, match="bad regular expression"):
        gate_config_from_dict({"deny_patterns": ["("]})
    assert gate_config_from_dict({"depth_cm_range": [2, 8]}).depth_cm_range == (2.0, 8.0)


def test_disabled_gate_passes_but_records_why():
    ds = nonmuscle_object("sector", np.random.default_rng(1), regions=True).dataset
    v = gate_dataset(ds, GateConfig(enabled=False))
    assert v.passed and v.reason == g.DISABLED and "sector" in v.detail


def test_colour_fraction_ignores_sepia_tint():
    v = np.arange(256, dtype=np.float32)
    sepia = np.stack([np.clip(v + 8, 0, 255), v * 0.93 + 4, v * 0.8], -1).astype(np.uint8)
    assert g.colour_fraction(sepia[None], 48, 0.4) == 0.0
    red = np.zeros((1, 10, 3), np.uint8)
    red[..., 0] = 200
    assert g.colour_fraction(red, 48, 0.4) == 1.0


def test_energy_score_and_threshold_keep_95_percent_of_training():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 401)
    thr = g.fit_ood_threshold(train, keep=0.95)
    assert np.mean(train <= thr) >= 0.95
    assert np.mean(train[:23] <= g.fit_ood_threshold(train[:23])) >= 0.95
    # confident logits (far from 0) have lower energy than the two-class uniform case
    e = g.energy_score(np.array([8.0, 0.0, -8.0]))
    assert e[0] < e[1] and e[2] < e[1]
    np.testing.assert_allclose(g.energy_from_probability(1 / (1 + np.exp(-np.array([8.0, 0.0])))),
                               e[:2], atol=1e-6)
    cfg = GateConfig()
    ok = g.GateVerdict("1.2", True, g.PASSED, "x")
    assert g.apply_ood(ok, thr, thr, cfg).passed
    assert g.apply_ood(ok, thr + 1.0, None, cfg).passed  # a model without threshold: recorded
    out = g.apply_ood(ok, thr + 1.0, thr, cfg)
    assert not out.passed and out.reason == g.OOD and out.measured["ood_score"] == thr + 1.0


def test_mahalanobis_separates_shifted_features():
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (200, 16))
    stats = g.fit_feature_stats(train)
    thr = g.fit_ood_threshold(g.mahalanobis_score(train, stats))
    far = g.mahalanobis_score(rng.normal(4, 1, (50, 16)), stats)
    assert np.mean(far > thr) > 0.95
