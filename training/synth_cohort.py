"""Synthetic participants: sarcopenia label, clinical 8-D, laboratory 14-D and AWGS 2019 tests.

The table is drawn per class so that medians and interquartile ranges look like the baseline table
of Chen et al. 2025 (J Med Internet Res 27:e70545; anchors: age 66 vs 72 years, albumin 39.9 vs
37.6 g/L, prevalence about 28 %, 86 of 357 participants with missing values). Values the paper's
table could not be looked up for are clinically plausible figures for Chinese adults over 60.
The AWGS 2019 measurements are drawn *given* the label so that the AWGS rule reproduces it, which
lets tests and the trainer's regression target check consistency. This module draws tables only
(no images), so distribution tests run in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.feature_names import CLINICAL_FEATURES, LAB_FEATURES

CLINICAL_COLUMNS: tuple[str, ...] = CLINICAL_FEATURES
LAB_COLUMNS: tuple[str, ...] = LAB_FEATURES
AWGS_COLUMNS: tuple[str, ...] = (
    "asmi", "asmi_method", "handgrip_kg", "gait_speed_m_s", "chair_stand_s",
)
# labels.csv column order (docs/contracts.md).
LABEL_COLUMNS: tuple[str, ...] = (
    "participant_id", "patient_id", "study_instance_uid", "label", "sex", "age", "height_cm",
    "weight_kg", "bmi", "calf_circumference_cm", "diabetes", "osteoporosis", *LAB_COLUMNS,
    *AWGS_COLUMNS, "vendor", "followup",
)

# (median, q1, q3) per class: index 0 = no sarcopenia, 1 = sarcopenia; "log" = right-skewed.
# Units: mmol/L lipids, % HbA1c, g/L albumin/hemoglobin, pg/mL 1,25(OH)2D, ng/mL osteocalcin,
# pmol/L FT3/FT4, nmol/L TT3/TT4, mIU/L TSH.
LAB_TARGETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], bool]] = {
    "tc": ((4.62, 3.95, 5.32), (4.41, 3.72, 5.10), False),
    "tg": ((1.32, 0.95, 1.84), (1.10, 0.80, 1.52), True),
    "hdl": ((1.21, 1.02, 1.44), (1.23, 1.03, 1.47), False),
    "ldl": ((2.71, 2.12, 3.30), (2.52, 1.98, 3.10), False),
    "hba1c": ((6.0, 5.6, 6.7), (6.1, 5.7, 6.9), True),
    "albumin": ((39.9, 37.6, 42.1), (37.6, 35.0, 40.0), False),
    "hemoglobin": ((133.0, 123.0, 143.0), (124.0, 113.0, 134.0), False),
    "vitd_1_25": ((45.0, 34.0, 58.0), (39.0, 29.0, 51.0), True),
    "osteocalcin": ((15.5, 11.8, 20.0), (17.2, 12.6, 22.6), True),
    "ft3": ((4.60, 4.20, 5.00), (4.30, 3.90, 4.72), False),
    "ft4": ((16.5, 15.0, 18.2), (16.8, 15.2, 18.6), False),
    "tt3": ((1.60, 1.40, 1.80), (1.45, 1.25, 1.66), False),
    "tt4": ((100.0, 88.0, 112.0), (98.0, 86.0, 110.0), False),
    "tsh": ((2.10, 1.40, 3.10), (2.25, 1.45, 3.35), True),
}
CLINICAL_TARGETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "age": ((66.0, 62.0, 71.0), (72.0, 67.0, 78.0)),
    "bmi": ((23.8, 21.8, 25.9), (21.6, 19.6, 23.5)),
    "calf_circumference_cm": ((34.5, 32.8, 36.2), (31.4, 29.6, 33.2)),
}
PREVALENCE_TARGETS = {"male": (0.48, 0.55), "diabetes": (0.24, 0.33), "osteoporosis": (0.16, 0.31)}
# Lab values missing more often in real cohorts (send-out assays) get more weight.
_MISSING_WEIGHTS = {
    "calf_circumference_cm": 1.0, "vitd_1_25": 4.0, "osteocalcin": 3.5, "ft3": 1.5, "ft4": 1.5,
    "tt3": 2.0, "tt4": 2.0, "tsh": 1.5, "hba1c": 1.5, "tc": 1.0, "tg": 1.0, "hdl": 1.0,
    "ldl": 1.0, "hemoglobin": 0.5, "albumin": 0.5,
}

# AWGS 2019 cut-offs (Chen LK et al., JAMDA 2020).
ASMI_CUTOFF = {("M", "DXA"): 7.0, ("F", "DXA"): 5.4, ("M", "BIA"): 7.0, ("F", "BIA"): 5.7}
GRIP_CUTOFF = {"M": 28.0, "F": 18.0}
GAIT_CUTOFF = 1.0  # m/s, 6-m usual gait speed: low if < 1.0
CHAIR_CUTOFF = 12.0  # s, 5-time chair stand: low if >= 12
# Separation of the latent muscle-quality score between classes: AUC = Phi(d / sqrt 2) = 0.85.
LATENT_SEPARATION = 1.466


@dataclass
class Participant:
    """One synthetic participant: label, features, AWGS tests and the latent image score.

    Attributes:
        index: 0-based position in the cohort (drives per-participant random streams).
        participant_id: pseudonymous id, ``P0001``...
        label: 1 = sarcopenia (AWGS 2019), 0 = not.
        values: clinical + lab + AWGS values by labels.csv column; None = missing.
        latent: sarcopenia severity of the muscle as rendered (higher = smaller, brighter,
            more heterogeneous RF); the oracle AUC is the AUC of this score.
    """

    index: int
    participant_id: str
    label: int
    values: dict[str, Any]
    latent: float


def _skewed_or_normal(rng: np.random.Generator, target: tuple[float, float, float],
                      log: bool) -> float:
    """Draw one value whose distribution has the given median and IQR."""
    med, q1, q3 = target
    if log:
        sigma = (np.log(q3) - np.log(q1)) / 1.349
        return float(np.exp(np.log(med) + sigma * rng.standard_normal()))
    return float(med + (q3 - q1) / 1.349 * rng.standard_normal())


def awgs_sarcopenia(values: dict[str, Any]) -> int:
    """Apply the AWGS 2019 rule: low ASMI and (low handgrip or low physical performance)."""
    sex, method = values["sex"], values["asmi_method"]
    low_mass = values["asmi"] < ASMI_CUTOFF[(sex, method)]
    low_strength = values["handgrip_kg"] < GRIP_CUTOFF[sex]
    low_perf = (values["gait_speed_m_s"] < GAIT_CUTOFF
                or values["chair_stand_s"] >= CHAIR_CUTOFF)
    return int(low_mass and (low_strength or low_perf))


def _awgs(rng: np.random.Generator, label: int, sex: str, latent: float) -> dict[str, Any]:
    """AWGS measurements consistent with ``label`` (drawn on the right side of each cut-off)."""
    method = "DXA" if rng.random() < 0.7 else "BIA"
    cut = ASMI_CUTOFF[(sex, method)]
    if label:
        low_mass = True
        low_strength = rng.random() < 0.8
        low_perf = rng.random() < 0.7 or not low_strength
    elif rng.random() < 0.78:
        low_mass = False  # normal mass; function may still be low ("possible sarcopenia")
        low_strength = rng.random() < 0.25
        low_perf = rng.random() < 0.25
    else:
        low_mass, low_strength, low_perf = True, False, False
    margin = abs(rng.normal(0.55, 0.35)) + 0.05 + 0.08 * max(0.0, abs(latent) - 1.0)
    asmi = cut - margin if low_mass else cut + margin
    g_cut = GRIP_CUTOFF[sex]
    grip = g_cut - abs(rng.normal(3.5, 2.5)) - 0.3 if low_strength else g_cut + abs(
        rng.normal(5.0, 4.0)) + 0.3
    # Low performance: slow gait, slow chair stands, or both.
    which = rng.integers(0, 3) if low_perf else -1
    gait = (GAIT_CUTOFF - abs(rng.normal(0.18, 0.1)) - 0.02 if which in (0, 2)
            else GAIT_CUTOFF + abs(rng.normal(0.15, 0.1)) + 0.02)
    chair = (CHAIR_CUTOFF + abs(rng.normal(2.5, 2.0)) if which in (1, 2)
             else CHAIR_CUTOFF - abs(rng.normal(2.5, 1.3)) - 0.2)
    return {
        "asmi": round(float(max(asmi, 3.0)), 2), "asmi_method": method,
        "handgrip_kg": round(float(max(grip, 4.0)), 1),
        "gait_speed_m_s": round(float(max(gait, 0.25)), 2),
        "chair_stand_s": round(float(max(chair, 5.0)), 1),
    }


def draw_participant(seed: int, index: int, prevalence: float = 0.28,
                     missing_fraction: float = 0.25) -> Participant:
    """Draw one participant from its own random stream (so workers can draw in any order).

    Labels are dealt by a low-discrepancy sequence with a seeded phase rather than coin flips,
    so every prefix of a cohort holds the target prevalence to within one participant: a
    12-participant test cohort always has both classes for cross-validation.
    """
    rng = np.random.default_rng([seed, index, 1])
    phase = float(np.random.default_rng([seed, 0x5A4C]).random())
    label = int(np.floor((index + 1) * prevalence + phase) - np.floor(index * prevalence + phase))
    rng.random()  # keep the stream position of the former coin flip
    k = label
    sex = "M" if rng.random() < PREVALENCE_TARGETS["male"][k] else "F"
    v: dict[str, Any] = {"sex": sex}
    v["age"] = int(round(np.clip(_skewed_or_normal(rng, CLINICAL_TARGETS["age"][k], False),
                                 60, 95)))
    height = rng.normal(167.0 if sex == "M" else 156.0, 5.8) - (1.8 if label else 0.0)
    bmi = float(np.clip(_skewed_or_normal(rng, CLINICAL_TARGETS["bmi"][k], False), 15.0, 36.0))
    v["height_cm"] = round(float(height), 1)
    v["weight_kg"] = round(bmi * (height / 100.0) ** 2, 1)
    v["bmi"] = round(v["weight_kg"] / (v["height_cm"] / 100.0) ** 2, 1)
    calf = _skewed_or_normal(rng, CLINICAL_TARGETS["calf_circumference_cm"][k], False)
    v["calf_circumference_cm"] = round(calf + (0.8 if sex == "M" else -0.8)
                                       + 0.35 * (bmi - 22.8), 1)
    v["diabetes"] = int(rng.random() < PREVALENCE_TARGETS["diabetes"][k])
    v["osteoporosis"] = int(rng.random() < PREVALENCE_TARGETS["osteoporosis"][k]
                            * (1.3 if sex == "F" else 0.7))
    for name, (t0, t1, log) in LAB_TARGETS.items():
        value = _skewed_or_normal(rng, t1 if label else t0, log)
        if name == "hemoglobin":
            value += 5.0 if sex == "M" else -5.0
        v[name] = round(max(value, 0.05), 2)
    latent = float(rng.normal(LATENT_SEPARATION if label else 0.0, 1.0))
    v.update(_awgs(rng, label, sex, latent - (LATENT_SEPARATION / 2)))
    if rng.random() < missing_fraction:
        names = list(_MISSING_WEIGHTS)
        w = np.array([_MISSING_WEIGHTS[n] for n in names])
        n_missing = int(rng.integers(1, 5))
        for name in rng.choice(names, size=n_missing, replace=False, p=w / w.sum()):
            v[str(name)] = None
    return Participant(index, f"P{index + 1:04d}", label, v, latent)


def draw_cohort(seed: int, participants: int, prevalence: float = 0.28,
                missing_fraction: float = 0.25) -> list[Participant]:
    """The whole table, without images (fast; used by tests and by :func:`generate_cohort`)."""
    return [draw_participant(seed, i, prevalence, missing_fraction) for i in range(participants)]


def feature_vectors(p: Participant) -> tuple[list[float | None], list[float | None]]:
    """The paper's clinical 8-D and lab 14-D vectors (sex: 1 = male), None where missing."""
    def num(name: str) -> float | None:
        value = p.values.get(name)
        if value is None:
            return None
        if name == "sex":
            return 1.0 if value == "M" else 0.0
        return float(value)

    return [num(c) for c in CLINICAL_COLUMNS], [num(c) for c in LAB_COLUMNS]
