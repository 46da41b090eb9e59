"""Sarcopenia labels from measurements by the AWGS 2019 criteria (Chen et al., JAMDA 2020;21:300).

Why: hospitals record ASMI, handgrip and gait speed / chair stand rather than a "sarcopenia"
column, so the trainer derives the label the same way the paper's cohort was labelled.

Criteria (sex-specific):
    low muscle mass     ASMI (kg/m^2)  DXA: < 7.0 men, < 5.4 women;  BIA: < 7.0 men, < 5.7 women
    low muscle strength handgrip < 28 kg men, < 18 kg women
    low performance     6-m gait speed < 1.0 m/s, or 5-time chair stand >= 12 s
    sarcopenia = low mass AND (low strength OR low performance); severe = all three.

Missing values: performance counts as low when any available test is low and as normal when at
least one test is available and none is low. A row whose verdict depends on a missing value
raises :class:`~training.errors.TrainingError` naming the row and what is missing.

API::

    derive_awgs(row: Mapping[str, Any], row_id: str = "") -> AWGSResult
    label_for_row(row, row_id="") -> (label, source)   # the label column wins, else AWGS
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from training.errors import TrainingError

# (DXA, BIA) ASMI cut-offs in kg/m^2, by sex.
ASMI_CUTOFF: dict[str, dict[str, float]] = {
    "DXA": {"M": 7.0, "F": 5.4},
    "BIA": {"M": 7.0, "F": 5.7},
}
HANDGRIP_CUTOFF_KG: dict[str, float] = {"M": 28.0, "F": 18.0}
GAIT_SPEED_CUTOFF_M_S = 1.0  # low when < 1.0 m/s
CHAIR_STAND_CUTOFF_S = 12.0  # low when >= 12 s


@dataclass(frozen=True)
class AWGSResult:
    """The AWGS 2019 verdict on one row and why.

    Attributes:
        sarcopenia: low mass and (low strength or low performance).
        severe: all three low; None when a component that could make it severe is missing.
        low_muscle_mass / low_strength / low_performance: the components (None = not measured).
        reasons: human-readable findings, e.g. "ASMI 5.1 < 5.4 (DXA, F)".
    """

    sarcopenia: bool
    severe: bool | None
    low_muscle_mass: bool
    low_strength: bool | None
    low_performance: bool | None
    reasons: tuple[str, ...]

    @property
    def label(self) -> int:
        return int(self.sarcopenia)


def _num(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TrainingError(f"{key}={v!r} is not a number") from None
    return None if math.isnan(f) else f


def normalise_sex(value: Any) -> str | None:
    """'M'/'F' from common spellings (M, male, F, female, 1/0 is not guessed); None if missing."""
    if value is None:
        return None
    s = str(value).strip().upper()
    if not s:
        return None
    if s in ("M", "MALE", "MAN"):
        return "M"
    if s in ("F", "FEMALE", "WOMAN", "W"):
        return "F"
    raise TrainingError(f"sex={value!r} is not M or F")


def derive_awgs(row: Mapping[str, Any], row_id: str = "") -> AWGSResult:
    """AWGS 2019 sarcopenia from ``sex``, ``asmi``, ``asmi_method`` and function measurements.

    Args:
        row: a labels.csv row (strings or numbers; "" = missing).
        row_id: participant/study id used in error messages.
    Raises:
        TrainingError: the row lacks what the verdict needs, or holds an invalid value.
    """
    who = f"row {row_id}: " if row_id else ""
    try:
        sex = normalise_sex(row.get("sex"))
        asmi = _num(row, "asmi")
        grip = _num(row, "handgrip_kg")
        gait = _num(row, "gait_speed_m_s")
        chair = _num(row, "chair_stand_s")
    except TrainingError as exc:
        raise TrainingError(f"{who}{exc}") from None
    method = str(row.get("asmi_method") or "").strip().upper()
    missing = [k for k, v in (("sex", sex), ("asmi", asmi)) if v is None]
    if not method:
        missing.append("asmi_method")
    if missing:
        raise TrainingError(f"{who}AWGS 2019 needs {', '.join(missing)} (no label given)")
    if method not in ASMI_CUTOFF:
        raise TrainingError(f"{who}asmi_method={method!r} is not DXA or BIA")
    assert sex is not None and asmi is not None
    reasons: list[str] = []

    cut = ASMI_CUTOFF[method][sex]
    low_mass = asmi < cut
    reasons.append(f"ASMI {asmi:g} {'<' if low_mass else '>='} {cut:g} kg/m2 ({method}, {sex})")

    low_strength: bool | None = None
    if grip is not None:
        gcut = HANDGRIP_CUTOFF_KG[sex]
        low_strength = grip < gcut
        reasons.append(f"handgrip {grip:g} {'<' if low_strength else '>='} {gcut:g} kg")

    low_perf: bool | None = None
    if gait is not None:
        low_gait = gait < GAIT_SPEED_CUTOFF_M_S
        reasons.append(f"gait speed {gait:g} {'<' if low_gait else '>='} "
                       f"{GAIT_SPEED_CUTOFF_M_S:g} m/s")
        low_perf = low_gait
    if chair is not None:
        low_chair = chair >= CHAIR_STAND_CUTOFF_S
        reasons.append(f"chair stand {chair:g} {'>=' if low_chair else '<'} "
                       f"{CHAIR_STAND_CUTOFF_S:g} s")
        low_perf = bool(low_perf) or low_chair

    if not low_mass:
        sarcopenia = False
    elif low_strength or low_perf:
        sarcopenia = True
    elif low_strength is False and low_perf is False:
        sarcopenia = False
    else:
        need = "gait_speed_m_s or chair_stand_s" if low_perf is None else "handgrip_kg"
        if low_strength is None and low_perf is None:
            need = "handgrip_kg and/or gait_speed_m_s or chair_stand_s"
        raise TrainingError(f"{who}low muscle mass but AWGS 2019 also needs {need}")

    if not sarcopenia:
        severe: bool | None = False
    elif low_strength is None or low_perf is None:
        severe = None
    else:
        severe = bool(low_strength and low_perf)
    verdict = "severe sarcopenia" if severe else "sarcopenia" if sarcopenia else "no sarcopenia"
    reasons.append(f"-> {verdict} (AWGS 2019)")
    return AWGSResult(sarcopenia, severe, low_mass, low_strength, low_perf, tuple(reasons))


def label_for_row(row: Mapping[str, Any], row_id: str = "") -> tuple[int, str]:
    """The row's binary label: the ``label`` column when given (0/1), else AWGS 2019.

    Returns:
        (label, source) where source is "label" or the AWGS reasons joined by "; ".
    """
    given = row.get("label")
    if given is not None and str(given).strip() != "":
        try:
            v = int(float(given))
        except ValueError:
            raise TrainingError(f"row {row_id}: label={given!r} is not 0/1") from None
        if v not in (0, 1):
            raise TrainingError(f"row {row_id}: label={given!r} is not 0/1")
        return v, "label"
    res = derive_awgs(row, row_id)
    return res.label, "; ".join(res.reasons)
