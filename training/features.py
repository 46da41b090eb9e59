"""Clinical (8-D) and laboratory (14-D) feature preprocessing, as the paper, fitted on train folds.

Why a fitted object: mean imputation, z-score outlier clipping and min-max scaling all learn
statistics; learning them on the validation fold would leak. :class:`FeaturePreprocessor` is fitted
on the training participants of a fold, and its parameters (``to_dict()``) go into ``model.json``
so the scorer applies exactly the same mapping (``from_dict()``).

Steps per column, in order (statistics from the *observed* training values):
    1. parse ("" / None / NaN = missing; sex M/F -> 1/0; yes/no/true/false -> 1/0)
    2. mean imputation
    3. z-score outlier clipping to mean ± clip_z·SD (not for 0/1 columns)
    4. min-max scaling to [0, 1] with the training min/max after clipping (constant -> 0);
       values outside the training range are clipped to [0, 1]
    5. one-hot sex (instead of 3-4): the "sex" column becomes two outputs ``sex_M``, ``sex_F`` at
       its position (a missing sex gets the training shares), so the clinical vector is 9 wide ->
       use ``n_out`` / ``output_names`` for ``ModelSpec.n_clinical``.

API::

    CLINICAL_FEATURES, LAB_FEATURES                       # contract order (docs/contracts.md)
    pre = FeaturePreprocessor(CLINICAL_FEATURES).fit(train_rows)   # rows: Mapping[str, Any]
    x = pre.transform(rows) -> np.ndarray float32 (n, pre.n_out)
    FeaturePreprocessor.from_dict(pre.to_dict())
    parse_patient_age("072Y") -> 72.0
    header_clinical(ds) -> {"age", "sex", "height_cm", "weight_kg"} from a pydicom header
    fill_from_header(row, header) -> (new_row, filled_keys)   # only fills what the row lacks
    complete_cases(rows, columns, ids=None) -> (kept_indices, dropped [(id, reason)])
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from inference.feature_names import CLINICAL_FEATURES, LAB_FEATURES  # noqa: F401 - re-exported
from training.errors import TrainingError

log = logging.getLogger(__name__)

CATEGORICAL: dict[str, tuple[str, str]] = {"sex": ("M", "F")}  # value coded 1, value coded 0

_SYNONYMS = {"M": "MALE", "F": "FEMALE"}
_TRUE = {"1", "1.0", "y", "yes", "true", "t", "m", "male"}
_FALSE = {"0", "0.0", "n", "no", "false", "f", "female", "w"}


def parse_value(column: str, value: Any) -> float:
    """One raw cell -> float (NaN when missing); sex M -> 1, F -> 0."""
    if value is None:
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    s = str(value).strip()
    if not s or s.lower() in ("nan", "na", "none", "null"):
        return float("nan")
    if column in CATEGORICAL:
        pos, neg = CATEGORICAL[column]
        up = s.upper()
        if up in (pos, _SYNONYMS.get(pos)):
            return 1.0
        if up in (neg, _SYNONYMS.get(neg)):
            return 0.0
        if up == "O":  # DICOM "other": not a category the model knows
            return float("nan")
        raise TrainingError(f"{column}={value!r} is not {pos} or {neg}")
    try:
        return float(s)
    except ValueError:
        low = s.lower()
        if low in _TRUE:
            return 1.0
        if low in _FALSE:
            return 0.0
        raise TrainingError(f"{column}={value!r} is not a number") from None


def raw_matrix(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> np.ndarray:
    """Rows -> float64 (n, len(columns)) with NaN for missing values."""
    out = np.full((len(rows), len(columns)), np.nan, dtype=np.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            out[i, j] = parse_value(c, r.get(c))
    return out


@dataclass
class FeaturePreprocessor:
    """Mean imputation -> z clipping -> min-max scaling -> one-hot sex, fitted on training rows.

    Attributes:
        columns: input columns in model order.
        clip_z: outlier bound in training SDs (None = no clipping).
        mean, sd, lo, hi, vmin, vmax, binary: per-column fitted parameters (see module docstring).
    """

    columns: tuple[str, ...]
    clip_z: float | None = 3.0
    mean: list[float] = field(default_factory=list)
    sd: list[float] = field(default_factory=list)
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)
    vmin: list[float] = field(default_factory=list)
    vmax: list[float] = field(default_factory=list)
    binary: list[bool] = field(default_factory=list)
    n_fit: int = 0

    def __post_init__(self) -> None:
        self.columns = tuple(self.columns)

    @property
    def fitted(self) -> bool:
        return self.n_fit > 0

    @property
    def output_names(self) -> list[str]:
        """Output column names (sex expanded to sex_M, sex_F)."""
        out: list[str] = []
        for c in self.columns:
            out += [f"{c}_{v}" for v in CATEGORICAL[c]] if c in CATEGORICAL else [c]
        return out

    @property
    def n_out(self) -> int:
        return len(self.output_names)

    def fit(self, rows: Sequence[Mapping[str, Any]]) -> "FeaturePreprocessor":
        """Learn the parameters from training rows only; returns self."""
        if not rows:
            raise TrainingError("cannot fit feature preprocessing on zero rows")
        x = raw_matrix(rows, self.columns)
        self.mean, self.sd, self.lo, self.hi, self.vmin, self.vmax, self.binary = ([] for _ in
                                                                                     range(7))
        for j, c in enumerate(self.columns):
            col = x[:, j]
            obs = col[~np.isnan(col)]
            if obs.size == 0:
                log.warning("feature %s is missing in every training row; it is set to 0", c)
                mean, sd, binary = 0.0, 0.0, True
            else:
                mean, sd = float(obs.mean()), float(obs.std())
                binary = bool(np.all((obs == 0) | (obs == 1)))
            if self.clip_z is not None and not binary and sd > 0:
                lo, hi = mean - self.clip_z * sd, mean + self.clip_z * sd
            else:
                lo, hi = -math.inf, math.inf
            filled = np.clip(np.where(np.isnan(col), mean, col), lo, hi)
            self.mean.append(mean)
            self.sd.append(sd)
            self.lo.append(lo)
            self.hi.append(hi)
            self.vmin.append(float(filled.min()))
            self.vmax.append(float(filled.max()))
            self.binary.append(binary)
        self.n_fit = len(rows)
        return self

    def transform(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Apply the fitted mapping; float32 (n, n_out)."""
        if not self.fitted:
            raise TrainingError("FeaturePreprocessor.transform called before fit")
        x = raw_matrix(rows, self.columns)
        outs: list[np.ndarray] = []
        for j, c in enumerate(self.columns):
            col = np.where(np.isnan(x[:, j]), self.mean[j], x[:, j])
            if c in CATEGORICAL:
                # already 0/1 (no scaling); an imputed row carries the training share of each
                outs += [col, 1.0 - col]
                continue
            col = np.clip(col, self.lo[j], self.hi[j])
            rng = self.vmax[j] - self.vmin[j]
            col = np.clip((col - self.vmin[j]) / rng, 0.0, 1.0) if rng > 0 else np.zeros_like(col)
            outs.append(col)
        if not outs:
            return np.zeros((len(rows), 0), dtype=np.float32)
        return np.stack(outs, axis=1).astype(np.float32)

    def fit_transform(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.fit(rows).transform(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (infinite clip bounds as None) for model.json."""
        def f(v: list[float]) -> list[float | None]:
            return [None if math.isinf(a) else a for a in v]

        return {
            "columns": list(self.columns), "output_names": self.output_names,
            "clip_z": self.clip_z, "mean": self.mean, "sd": self.sd, "clip_low": f(self.lo),
            "clip_high": f(self.hi), "min": self.vmin, "max": self.vmax, "binary": self.binary,
            "n_fit": self.n_fit,
            "steps": ["mean_impute", "zscore_clip", "minmax_0_1", "one_hot_sex"],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeaturePreprocessor":
        """Inverse of :meth:`to_dict`."""
        return cls(
            columns=tuple(d["columns"]), clip_z=d.get("clip_z"), mean=list(d["mean"]),
            sd=list(d["sd"]),
            lo=[-math.inf if v is None else float(v) for v in d["clip_low"]],
            hi=[math.inf if v is None else float(v) for v in d["clip_high"]],
            vmin=list(d["min"]), vmax=list(d["max"]), binary=list(d["binary"]),
            n_fit=int(d["n_fit"]),
        )


# ------------------------------------------------------------------------------------------------
# Values from the DICOM header
# ------------------------------------------------------------------------------------------------

_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_patient_age(value: Any) -> float | None:
    """DICOM AS ("072Y", "006M", "010W", "020D") -> years; None when empty or malformed."""
    s = str(value or "").strip().upper()
    if len(s) != 4 or not s[:3].isdigit() or s[3] not in _AGE_UNITS:
        return None
    return int(s[:3]) * _AGE_UNITS[s[3]]


def _age_from_dates(birth: Any, on: Any) -> float | None:
    try:
        b = _dt.datetime.strptime(str(birth)[:8], "%Y%m%d").date()
        d = _dt.datetime.strptime(str(on)[:8], "%Y%m%d").date()
    except ValueError:
        return None
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return float(years) if years >= 0 else None


def _positive(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and not math.isnan(f) else None


def header_clinical(ds: Any) -> dict[str, Any]:
    """Age (years), sex (M/F), height (cm) and weight (kg) from a DICOM header, where present.

    PatientAge is preferred; otherwise age comes from PatientBirthDate and StudyDate. PatientSize
    is in metres, PatientWeight in kg (PS3.3 C.7.2.2). Sex "O" or empty is treated as missing.
    """
    out: dict[str, Any] = {}
    age = parse_patient_age(getattr(ds, "PatientAge", None))
    if age is None:
        age = _age_from_dates(getattr(ds, "PatientBirthDate", ""),
                              getattr(ds, "StudyDate", "") or getattr(ds, "ContentDate", ""))
    if age is not None:
        out["age"] = age
    sex = str(getattr(ds, "PatientSex", "") or "").strip().upper()
    if sex in ("M", "F"):
        out["sex"] = sex
    size = _positive(getattr(ds, "PatientSize", None))
    if size is not None:
        out["height_cm"] = size * 100.0
    weight = _positive(getattr(ds, "PatientWeight", None))
    if weight is not None:
        out["weight_kg"] = weight
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (
        isinstance(v, str) and not v.strip())


def fill_from_header(row: Mapping[str, Any], header: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                                  list[str]]:
    """Fill the row's missing age/sex/height/weight from ``header`` (and BMI from those).

    Returns:
        (new row, names of the filled keys). Values the labels file gives always win.
    """
    new = dict(row)
    filled = []
    for k in ("age", "sex", "height_cm", "weight_kg"):
        if _missing(new.get(k)) and k in header:
            new[k] = header[k]
            filled.append(k)
    if _missing(new.get("bmi")):
        h, w = _positive(new.get("height_cm")), _positive(new.get("weight_kg"))
        if h is not None and w is not None:
            new["bmi"] = w / (h / 100.0) ** 2
            filled.append("bmi")
    return new, filled


def complete_cases(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   ids: Sequence[str] | None = None) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of rows with every column present, and (id, reason) for the dropped ones."""
    kept: list[int] = []
    dropped: list[tuple[str, str]] = []
    for i, r in enumerate(rows):
        gone = [c for c in columns if math.isnan(parse_value(c, r.get(c)))]
        if gone:
            dropped.append((ids[i] if ids is not None else str(i),
                            "complete cases: missing " + ", ".join(gone)))
        else:
            kept.append(i)
    return kept, dropped
