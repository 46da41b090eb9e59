"""Out-of-fold predictions: the one file format that metrics, the report and ``compare`` read.

Why a file: the threshold, the CV metrics, the report and ``dicom-node compare`` are all recomputed
from these predictions, so a run can be audited (and two runs compared case by case) without
re-training.

File: ``MODEL_DIR/oof.csv``, one row per scored image frame per modality combination, columns
(in this order; extra columns are kept on read and ignored)::

    participant_id      CV grouping unit (pseudonymous)
    study_instance_uid  the study the frame belongs to
    sop_instance_uid    the US image ("" for clinical/lab-only models: one row per study)
    frame_number        1-based frame number (1 for single-frame objects and non-image rows)
    fold                the fold whose *validation* set held this row (0-based)
    label               1/0 for binary targets; the continuous target (e.g. ASMI) for regression
    probability         predicted probability (binary) or predicted value (regression)
    vendor              Manufacturer (per-vendor breakdown; "" when unknown)
    modalities          modality combination, "+"-joined in the order image, clinical, lab
                        (e.g. "image", "image+clinical+lab")

API (for the trainer, D1's ``training/run.py``)::

    table = OOFTable.from_records([{"participant_id": ..., "study_instance_uid": ..., ...}, ...])
    write_oof(model_dir / "oof.csv", table)          # atomic (tmp + os.replace)
    table = read_oof(model_dir)                       # a dir (-> dir/oof.csv) or a csv path
    table.combinations() -> list[str]; table.select(modalities="image") -> OOFTable
    table.arrays() -> (labels float64, probabilities float64)
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from inference.durable import write_durable
from training.errors import TrainingError

OOF_FILENAME = "oof.csv"
OOF_COLUMNS: tuple[str, ...] = (
    "participant_id",
    "study_instance_uid",
    "sop_instance_uid",
    "frame_number",
    "fold",
    "label",
    "probability",
    "vendor",
    "modalities",
)
_REQUIRED = ("participant_id", "study_instance_uid", "fold", "label", "probability")
MODALITY_ORDER = ("image", "clinical", "lab")


def combination_name(modalities: Iterable[str]) -> str:
    """Canonical name of a modality combination ("image+clinical+lab"), order-independent."""
    mods = set(modalities)
    unknown = mods - set(MODALITY_ORDER)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}")
    return "+".join(m for m in MODALITY_ORDER if m in mods)


@dataclass
class OOFRecord:
    """One out-of-fold prediction (a row of ``oof.csv``)."""

    participant_id: str
    study_instance_uid: str
    fold: int
    label: float
    probability: float
    sop_instance_uid: str = ""
    frame_number: int = 1
    vendor: str = ""
    modalities: str = "image"
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class OOFTable:
    """Out-of-fold predictions as a list of :class:`OOFRecord` with array helpers."""

    records: list[OOFRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_records(cls, rows: Iterable[Mapping[str, Any] | OOFRecord]) -> "OOFTable":
        """Build from dicts (keys = OOF_COLUMNS; unknown keys go to ``extra``) or OOFRecords."""
        out: list[OOFRecord] = []
        for i, r in enumerate(rows):
            if isinstance(r, OOFRecord):
                out.append(r)
                continue
            missing = [c for c in _REQUIRED if c not in r or r[c] is None or r[c] == ""]
            if missing:
                raise TrainingError(f"out-of-fold row {i}: missing {', '.join(missing)}")
            mods = r.get("modalities") or "image"
            if not isinstance(mods, str):
                mods = combination_name(mods)
            out.append(
                OOFRecord(
                    participant_id=str(r["participant_id"]),
                    study_instance_uid=str(r["study_instance_uid"]),
                    fold=int(r["fold"]),
                    label=float(r["label"]),
                    probability=float(r["probability"]),
                    sop_instance_uid=str(r.get("sop_instance_uid") or ""),
                    frame_number=int(r.get("frame_number") or 1),
                    vendor=str(r.get("vendor") or ""),
                    modalities=mods,
                    extra={**{k: str(v) for k, v in r.items()
                              if k not in OOF_COLUMNS and k != "extra"},
                           **dict(r.get("extra") or {})},
                )
            )
        return cls(out)

    def combinations(self) -> list[str]:
        """Modality combinations present, in first-seen order."""
        return list(dict.fromkeys(r.modalities for r in self.records))

    def select(self, *, modalities: str | None = None, fold: int | None = None,
               vendor: str | None = None) -> "OOFTable":
        """Rows matching every given filter."""
        return OOFTable([
            r for r in self.records
            if (modalities is None or r.modalities == modalities)
            and (fold is None or r.fold == fold)
            and (vendor is None or r.vendor == vendor)
        ])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) as float64 arrays."""
        y = np.array([r.label for r in self.records], dtype=np.float64)
        p = np.array([r.probability for r in self.records], dtype=np.float64)
        return y, p

    def column(self, name: str) -> list[Any]:
        """Values of one column (also ``extra`` columns, "" where absent)."""
        if name in OOF_COLUMNS:
            return [getattr(r, name) for r in self.records]
        return [r.extra.get(name, "") for r in self.records]


def write_oof(path: Path, table: OOFTable) -> Path:
    """Write ``table`` as CSV atomically (:func:`inference.durable.write_durable`); returns the path."""
    path = Path(path)
    if path.is_dir():
        path = path / OOF_FILENAME
    extra_cols = list(dict.fromkeys(k for r in table.records for k in r.extra))
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow([*OOF_COLUMNS, *extra_cols])
    for r in table.records:
        w.writerow([
            r.participant_id, r.study_instance_uid, r.sop_instance_uid, r.frame_number,
            r.fold, repr(float(r.label)), repr(float(r.probability)), r.vendor, r.modalities,
            *(r.extra.get(c, "") for c in extra_cols),
        ])
    write_durable(path, fh.getvalue().encode("utf-8"))
    return path


def read_oof(path: Path) -> OOFTable:
    """Read ``oof.csv`` (``path`` may be the model dir); raise TrainingError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / OOF_FILENAME
    if not path.is_file():
        raise TrainingError(f"no out-of-fold predictions at {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    try:
        return OOFTable.from_records(rows)
    except (TrainingError, ValueError) as exc:
        raise TrainingError(f"{path}: {exc}") from None
