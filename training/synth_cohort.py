"""Synthetic participants: sarcopenia label, clinical 8-D, laboratory 14-D and AWGS 2019 tests.

The table is drawn per class so that medians, rates, prevalence (101 of 357) and the share with a
missing value (86 of 357) follow Table 1 of Chen et al. 2025 (J Med Internet Res 27:e70545), and
so that the clinical, laboratory and image signals rank as the paper's models did.
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

# Chen et al. 2025, Table 1 (training + internal validation cohort, n = 256 / 101): the figures a
# generated cohort is checked against. (median, q1, q3) per class, index 0 = no sarcopenia,
# 1 = sarcopenia; rates are fractions. Two IQRs in the published table cannot be right (the calf
# circumference IQR of the non-sarcopenic group repeats the BMI row; the 1,25(OH)2D IQR of the
# sarcopenic group does not contain its median): only their medians are used.
PAPER_TABLE1: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "age": ((66.0, 62.0, 69.75), (72.0, 66.0, 80.5)),
    "height_cm": ((164.0, 158.0, 170.0), (163.0, 157.0, 170.0)),
    "weight_kg": ((66.75, 57.85, 75.30), (62.50, 55.45, 70.25)),
    "bmi": ((24.70, 22.48, 26.89), (23.53, 21.45, 25.25)),
    "calf_circumference_cm": ((35.00,), (33.34, 32.90, 34.00)),
    "tc": ((4.31, 3.72, 5.01), (4.39, 3.57, 4.95)),
    "tg": ((1.32, 0.96, 2.08), (1.28, 0.91, 1.77)),
    "hdl": ((1.17, 0.99, 1.40), (1.20, 1.00, 1.50)),
    "ldl": ((2.50, 2.00, 3.06), (2.60, 1.90, 3.12)),
    "hba1c": ((8.28, 6.69, 9.91), (7.98, 6.31, 9.64)),
    "albumin": ((39.90, 38.00, 41.98), (37.60, 35.55, 39.75)),
    "hemoglobin": ((132.0, 122.0, 145.0), (124.0, 115.0, 133.5)),
    "vitd_1_25": ((22.06, 17.06, 33.50), (21.10,)),
    "osteocalcin": ((11.75, 9.73, 14.87), (12.12, 9.89, 12.61)),
    "ft3": ((4.84, 4.44, 5.16), (4.64, 4.42, 4.97)),
    "ft4": ((15.27, 13.90, 16.65), (14.99, 13.65, 16.35)),
    "tt3": ((1.51, 1.32, 1.70), (1.51, 1.32, 1.59)),
    "tt4": ((97.55, 86.85, 109.55), (99.70, 90.20, 111.35)),
    "tsh": ((1.69, 1.19, 2.59), (2.03, 1.40, 3.02)),
}
PAPER_RATES: dict[str, tuple[float, float]] = {
    "male": (117 / 256, 53 / 101), "diabetes": (208 / 256, 72 / 101),
    "osteoporosis": (79 / 256, 41 / 101),
}
PAPER_PREVALENCE = 101 / 357
PAPER_MISSING_FRACTION = 86 / 357
# 0.28 rather than 0.2829: within 1 % of the paper, and the label sequence of the seeds that
# tests and the demo rely on (every vendor of a 12-participant cohort has both classes) is kept.
DEFAULT_PREVALENCE = 0.28

# What the generator draws. Medians are the paper's except albumin and hemoglobin: drawn with the
# published medians and IQRs they alone would separate the classes better (AUC about 0.70) than
# the paper's whole laboratory MLP did (0.646), so their class gap is narrowed, keeping the
# direction (each median within 2 % of the paper's). Spreads are the paper's IQRs where they are
# credible. Lab values share one nutrition/inflammation factor per participant
# (LAB_FACTOR_LOADING), as albumin, hemoglobin and FT3 do in real cohorts. Measured on 2,000
# participants (CV logistic regression): clinical AUC about 0.76, laboratory about 0.64, image
# oracle about 0.85, the paper's ranking (0.827 > 0.784 > 0.646).
# Units: mmol/L lipids, % HbA1c, g/L albumin/hemoglobin, ng/mL 1,25(OH)2D and osteocalcin,
# pmol/L FT3/FT4, nmol/L TT3/TT4, mIU/L TSH.  "log" = right-skewed (log-normal).
LAB_TARGETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], bool]] = {
    "tc": ((4.31, 3.72, 5.01), (4.39, 3.57, 4.95), False),
    "tg": ((1.32, 0.96, 2.08), (1.28, 0.91, 1.77), True),
    "hdl": ((1.17, 0.99, 1.40), (1.20, 1.00, 1.50), False),
    "ldl": ((2.50, 2.00, 3.06), (2.60, 1.90, 3.12), False),
    "hba1c": ((8.28, 6.69, 9.91), (7.98, 6.31, 9.64), False),
    "albumin": ((39.4, 37.4, 41.5), (38.3, 36.2, 40.4), False),
    "hemoglobin": ((130.0, 119.0, 142.0), (125.5, 115.0, 136.0), False),
    "vitd_1_25": ((22.06, 17.06, 33.50), (21.10, 16.50, 31.00), True),
    "osteocalcin": ((11.75, 9.73, 14.87), (12.12, 9.89, 14.90), True),
    "ft3": ((4.84, 4.44, 5.16), (4.70, 4.30, 5.05), False),
    "ft4": ((15.27, 13.90, 16.65), (14.99, 13.65, 16.35), False),
    "tt3": ((1.51, 1.32, 1.70), (1.51, 1.32, 1.66), False),
    "tt4": ((97.55, 86.85, 109.55), (99.70, 90.20, 111.35), False),
    "tsh": ((1.69, 1.19, 2.59), (1.90, 1.30, 2.85), True),
}
# Loading of each lab value on the shared factor (sign: direction in worse nutrition).
LAB_FACTOR_LOADING: dict[str, float] = {
    "albumin": -0.6, "hemoglobin": -0.5, "ft3": -0.45, "tsh": 0.3, "tt3": -0.3, "tc": -0.2,
    "ldl": -0.2, "hdl": 0.1, "osteocalcin": 0.1,
}
CLINICAL_TARGETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "age": ((66.0, 62.0, 69.75), (72.0, 66.0, 80.5)),
    "bmi": ((24.70, 22.48, 26.89), (23.53, 21.45, 25.25)),
    "calf_circumference_cm": ((35.0, 33.0, 37.0), (33.34, 32.0, 34.7)),
}
# Heights (cm) by sex, chosen so that the mixed-sex median is the paper's 1.64 / 1.63 m.
HEIGHT_BY_SEX = {"M": 169.5, "F": 158.5}
HEIGHT_SD = 5.8
PREVALENCE_TARGETS = {"male": PAPER_RATES["male"], "diabetes": PAPER_RATES["diabetes"],
                      "osteoporosis": PAPER_RATES["osteoporosis"]}
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
# Separation of the latent muscle-quality score between classes: AUC = Phi(d / sqrt 2) = 0.845.
LATENT_SEPARATION = 1.435


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
                      log: bool, *, factor: float = 0.0, loading: float = 0.0) -> float:
    """Draw one value whose distribution has the given median and IQR.

    ``factor`` (standard normal, shared by several variables of one participant) with weight
    ``loading`` correlates variables without changing any one's median or IQR.
    """
    med, q1, q3 = target
    z = loading * factor + np.sqrt(1.0 - loading**2) * rng.standard_normal()
    if log:
        sigma = (np.log(q3) - np.log(q1)) / 1.349
        return float(np.exp(np.log(med) + sigma * z))
    return float(med + (q3 - q1) / 1.349 * z)


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


def draw_participant(seed: int, index: int, prevalence: float = DEFAULT_PREVALENCE,
                     missing_fraction: float = PAPER_MISSING_FRACTION) -> Participant:
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
    height = rng.normal(HEIGHT_BY_SEX[sex], HEIGHT_SD) - (1.0 if label else 0.0)
    bmi_target = CLINICAL_TARGETS["bmi"][k]
    bmi = float(np.clip(_skewed_or_normal(rng, bmi_target, False), 15.0, 38.0))
    v["height_cm"] = round(float(height), 1)
    v["weight_kg"] = round(bmi * (height / 100.0) ** 2, 1)
    v["bmi"] = round(v["weight_kg"] / (v["height_cm"] / 100.0) ** 2, 1)
    calf = _skewed_or_normal(rng, CLINICAL_TARGETS["calf_circumference_cm"][k], False)
    # calf circumference follows body size within each class (the class median is kept)
    v["calf_circumference_cm"] = round(calf + (0.8 if sex == "M" else -0.8)
                                       + 0.35 * (bmi - bmi_target[0]), 1)
    v["diabetes"] = int(rng.random() < PREVALENCE_TARGETS["diabetes"][k])
    v["osteoporosis"] = int(rng.random() < PREVALENCE_TARGETS["osteoporosis"][k]
                            * (1.3 if sex == "F" else 0.7))
    factor = float(rng.standard_normal())  # shared nutrition/inflammation factor
    for name, (t0, t1, log) in LAB_TARGETS.items():
        value = _skewed_or_normal(rng, t1 if label else t0, log,
                                  factor=factor, loading=LAB_FACTOR_LOADING.get(name, 0.0))
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


def draw_cohort(seed: int, participants: int, prevalence: float = DEFAULT_PREVALENCE,
                missing_fraction: float = PAPER_MISSING_FRACTION) -> list[Participant]:
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
