"""AWGS 2019 derivation against hand-worked cases for both sexes and both ASMI methods."""

from __future__ import annotations

import pytest

from dicom_node.errors import TrainingError
from training.awgs import derive_awgs, label_for_row


def row(**kw):
    base = {"sex": "", "asmi": "", "asmi_method": "", "handgrip_kg": "", "gait_speed_m_s": "",
            "chair_stand_s": "", "label": ""}
    return {**base, **{k: str(v) for k, v in kw.items()}}


@pytest.mark.parametrize(
    "kw, sarc, severe",
    [
        # men, DXA: cut-off 7.0; grip 28
        (dict(sex="M", asmi=6.9, asmi_method="DXA", handgrip_kg=27, gait_speed_m_s=1.2),
         True, False),
        (dict(sex="M", asmi=7.0, asmi_method="DXA", handgrip_kg=20, gait_speed_m_s=0.6),
         False, False),
        (dict(sex="M", asmi=6.5, asmi_method="DXA", handgrip_kg=30, gait_speed_m_s=1.1,
              chair_stand_s=11.9), False, False),
        (dict(sex="M", asmi=6.5, asmi_method="BIA", handgrip_kg=25, gait_speed_m_s=0.8),
         True, True),
        # men, BIA: same 7.0 cut-off; performance low by chair stand only (>= 12 s)
        (dict(sex="M", asmi=6.99, asmi_method="BIA", handgrip_kg=28, chair_stand_s=12),
         True, False),
        # women, DXA 5.4 vs BIA 5.7: ASMI 5.5 is low by BIA only
        (dict(sex="F", asmi=5.5, asmi_method="DXA", handgrip_kg=15, gait_speed_m_s=0.7),
         False, False),
        (dict(sex="F", asmi=5.5, asmi_method="BIA", handgrip_kg=15, gait_speed_m_s=0.7),
         True, True),
        # women grip cut-off 18: 18 is normal, 17.9 low
        (dict(sex="F", asmi=5.0, asmi_method="DXA", handgrip_kg=18, gait_speed_m_s=1.0),
         False, False),
        (dict(sex="F", asmi=5.0, asmi_method="DXA", handgrip_kg=17.9, gait_speed_m_s=1.0),
         True, False),
        # gait 0.99 low even when chair stand is normal
        (dict(sex="F", asmi=5.0, asmi_method="DXA", handgrip_kg=20, gait_speed_m_s=0.99,
              chair_stand_s=10), True, False),
    ],
)
def test_hand_worked_cases(kw, sarc, severe):
    r = derive_awgs(row(**kw), "P1")
    assert r.sarcopenia is sarc
    assert r.severe is severe
    assert r.reasons[-1].startswith("-> ")


def test_reasons_name_the_cutoffs():
    r = derive_awgs(row(sex="F", asmi=5.5, asmi_method="bia", handgrip_kg=15, gait_speed_m_s=0.7))
    assert "ASMI 5.5 < 5.7 kg/m2 (BIA, F)" in r.reasons
    assert "handgrip 15 < 18 kg" in r.reasons
    assert "gait speed 0.7 < 1 m/s" in r.reasons
    assert r.low_muscle_mass and r.low_strength and r.low_performance


def test_normal_mass_needs_nothing_else():
    r = derive_awgs(row(sex="M", asmi=8.0, asmi_method="DXA"))
    assert not r.sarcopenia and r.low_strength is None


def test_severity_unknown_when_a_component_is_missing():
    r = derive_awgs(row(sex="M", asmi=6.0, asmi_method="DXA", handgrip_kg=20))
    assert r.sarcopenia and r.severe is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(asmi=6.0, asmi_method="DXA"), "needs sex"),
        (dict(sex="M", asmi_method="DXA"), "needs asmi"),
        (dict(sex="M", asmi=6.0), "asmi_method"),
        (dict(sex="M", asmi=6.0, asmi_method="CT"), "not DXA or BIA"),
        (dict(sex="M", asmi=6.0, asmi_method="DXA", handgrip_kg=30), "gait_speed_m_s or chair"),
        (dict(sex="M", asmi=6.0, asmi_method="DXA", gait_speed_m_s=1.2), "handgrip_kg"),
        (dict(sex="M", asmi=6.0, asmi_method="DXA"), "handgrip_kg and/or"),
        (dict(sex="X", asmi=6.0, asmi_method="DXA"), "not M or F"),
        (dict(sex="M", asmi="abc", asmi_method="DXA"), "not a number"),
    ],
)
def test_clear_errors(kw, match):
    with pytest.raises(TrainingError, match=match) as ei:
        derive_awgs(row(**kw), "P9")
    assert "row P9" in str(ei.value)


def test_label_column_wins_over_measurements():
    r = row(sex="M", asmi=6.0, asmi_method="DXA", handgrip_kg=20, label=0)
    assert label_for_row(r, "P1") == (0, "label")
    lab, why = label_for_row({**r, "label": ""}, "P1")
    assert lab == 1 and "AWGS 2019" in why
    with pytest.raises(TrainingError, match="not 0/1"):
        label_for_row({**r, "label": "2"}, "P1")
