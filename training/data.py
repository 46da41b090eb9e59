"""Training data: an archive (index.sqlite) or any DICOM folder + labels.csv -> per-image samples.

Each labelled study is read with the same reader the scorer uses (``inference.reader``), every
usable frame is preprocessed once with the shared deterministic transforms
(``inference.transforms.preprocess_transforms``) and cached in memory as a float32 (1, S, S) array;
only the random augmentations run per epoch. Studies that give no usable image+ROI are not
silently dropped: they are returned in :attr:`Cohort.excluded` with the reason, for the report.
"""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import InferenceError
from training.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass
class StudyRecord:
    """One labelled study: its row of labels.csv (header-filled) and its files."""

    study_uid: str
    patient_id: str
    participant_id: str
    label: float
    row: dict[str, Any]
    paths: list[Path] = field(default_factory=list)
    label_source: str = "label"


@dataclass
class Sample:
    """One training unit: an image frame (or a whole study for clinical/lab-only models)."""

    participant_id: str
    study_uid: str
    sop_uid: str
    frame_number: int
    label: float
    vendor: str
    row: dict[str, Any]
    image: np.ndarray | None = None  # float32 (1, S, S), preprocessed, 0..1


@dataclass
class Cohort:
    """Samples plus everything that did not make it in (with reasons)."""

    samples: list[Sample]
    studies: list[StudyRecord]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (study uid / row id, reason)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (sop uid, reason) from reader
    header_filled: int = 0

    @property
    def sop_uids(self) -> list[str]:
        return sorted({s.sop_uid for s in self.samples if s.sop_uid})


def read_labels(path: Path) -> list[dict[str, str]]:
    """labels.csv as dict rows; must be keyed by ``study_instance_uid`` or ``patient_id``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"labels file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [dict(r) for r in csv.DictReader(fh)]
    if not rows:
        raise TrainingError(f"labels file {path} has no rows")
    cols = set(rows[0])
    if not cols & {"study_instance_uid", "patient_id"}:
        raise TrainingError(f"labels file {path} needs a study_instance_uid or patient_id column")
    return rows


def index_archive(source: Path) -> dict[str, tuple[str, list[Path]]]:
    """study uid -> (patient id, files), from a node data dir (index.sqlite) or a DICOM folder."""
    source = Path(source)
    db = source / "index.sqlite"
    if db.is_file():
        return _index_sqlite(source, db)
    if source.is_dir():
        return _index_folder(source)
    raise TrainingError(f"{source} is neither a node data dir (index.sqlite) nor a folder")


def _index_sqlite(data_dir: Path, db: Path) -> dict[str, tuple[str, list[Path]]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        pats = dict(con.execute("SELECT study_uid, patient_id FROM studies").fetchall())
        out: dict[str, tuple[str, list[Path]]] = {}
        for study, rel in con.execute("SELECT study_uid, path FROM instances ORDER BY path"):
            out.setdefault(study, (pats.get(study) or "", []))[1].append(data_dir / rel)
    finally:
        con.close()
    return out


def _index_folder(folder: Path) -> dict[str, tuple[str, list[Path]]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: dict[str, tuple[str, list[Path]]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() in (".npz", ".csv", ".json", ".txt", ".md"):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "PatientID"])
        except (InvalidDicomError, OSError, ValueError):
            continue
        study = str(getattr(ds, "StudyInstanceUID", "") or "")
        if study:
            out.setdefault(study, (str(getattr(ds, "PatientID", "") or ""), []))[1].append(p)
    return out


def _row_label(row: Mapping[str, Any], row_id: str, target: str,
               regression_column: str) -> tuple[float, str]:
    if target == "regression":
        v = row.get(regression_column)
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            f = float("nan")
        if math.isnan(f):
            raise TrainingError(f"row {row_id}: regression target {regression_column!r} missing")
        return f, regression_column
    from training.awgs import label_for_row

    lab, source = label_for_row(row, row_id)
    return float(lab), source


def match_studies(rows: Sequence[Mapping[str, str]], index: Mapping[str, tuple[str, list[Path]]],
                  *, target: str = "binary", regression_column: str = "asmi"
                  ) -> tuple[list[StudyRecord], list[tuple[str, str]]]:
    """Pair label rows with archived studies (by Study UID, else by Patient ID)."""
    by_patient: dict[str, list[str]] = {}
    for study, (pid, _) in index.items():
        by_patient.setdefault(pid, []).append(study)
    records: list[StudyRecord] = []
    excluded: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        suid = (row.get("study_instance_uid") or "").strip()
        pid = (row.get("patient_id") or "").strip()
        row_id = suid or pid or f"row {i + 2}"
        studies = [suid] if suid else sorted(by_patient.get(pid, []))
        studies = [s for s in studies if s in index]
        if not studies:
            excluded.append((row_id, "no images for this row in the archive"))
            continue
        try:
            label, source = _row_label(row, row_id, target, regression_column)
        except TrainingError as exc:
            excluded.append((row_id, f"no label: {exc}"))
            continue
        for s in studies:
            if s in seen:
                continue
            seen.add(s)
            patient = pid or index[s][0]
            participant = (row.get("participant_id") or "").strip() or patient or s
            records.append(StudyRecord(s, patient, participant, label, dict(row),
                                       list(index[s][1]), source))
    return records, excluded


def load_cohort(
    source: Path,
    labels_csv: Path,
    *,
    input_size: int,
    roi_margin: float,
    modalities: Sequence[str] = ("image",),
    frame_policy: str = "middle",
    max_frames: int = 16,
    target: str = "binary",
    regression_column: str = "asmi",
    complete_cases: bool = False,
    require_roi: bool = True,
    fov_cm: float = 0.0,
) -> Cohort:
    """Read every labelled study once and build the in-memory sample list.

    Args:
        require_roi: frames without a matching DICOM-SEG ROI are skipped (the paper trains on
            ROI-masked images); False lets an external validation use the whole tissue region.
        fov_cm: > 0: physically scaled crops (a fixed field of view in cm around the ROI); a
            study whose frames carry no pixel spacing is then excluded with the reason.
    """
    from inference.transforms import preprocess_transforms
    from training.features import (
        CLINICAL_FEATURES,
        LAB_FEATURES,
        fill_from_header,
        header_clinical,
    )
    from training.features import complete_cases as cc

    rows = read_labels(labels_csv)
    index = index_archive(source)
    records, excluded = match_studies(rows, index, target=target,
                                      regression_column=regression_column)
    use_image = "image" in modalities
    pre = preprocess_transforms(input_size, roi_margin, fov_cm)
    samples: list[Sample] = []
    problems: list[tuple[str, str]] = []
    kept: list[StudyRecord] = []
    filled_total = 0
    for rec in records:
        try:
            read = _read(rec.paths, frame_policy, max_frames)
        except (InferenceError, TrainingError) as exc:
            excluded.append((rec.study_uid, f"unreadable: {exc}"))
            continue
        problems.extend(read.problems)
        if read.datasets:
            header = header_clinical(next(iter(read.datasets.values())))
            rec.row, filled = fill_from_header(rec.row, header)
            filled_total += bool(filled)
        frames = [f for f in read.frames if f.mask is not None and f.mask.any()] \
            if require_roi else list(read.frames)
        vendor = rec.row.get("vendor") or (read.frames[0].manufacturer if read.frames else "")
        if use_image and not frames:
            why = "no frames" if not read.frames else "no usable ROI (no SEG matched a frame)"
            excluded.append((rec.study_uid, why))
            continue
        kept.append(rec)
        if not use_image:
            samples.append(Sample(rec.participant_id, rec.study_uid, "", 1, rec.label, vendor,
                                  rec.row))
            continue
        if fov_cm > 0 and not any(f.spacing_cm for f in frames):
            kept.pop()
            excluded.append((rec.study_uid, "no pixel spacing (US region calibration) for the "
                                            "physically scaled crop"))
            continue
        for f in frames:
            if fov_cm > 0 and not f.spacing_cm:
                continue
            d = {"image": f.image[None].astype(np.float32), "spacing_cm": f.spacing_cm}
            if f.mask is not None:
                d["mask"] = f.mask[None]
            img = np.asarray(pre(d)["image"], dtype=np.float32)
            samples.append(Sample(rec.participant_id, rec.study_uid, f.sop_instance_uid,
                                  f.frame_number, rec.label, f.manufacturer or vendor, rec.row,
                                  img))
    if complete_cases:
        # as the paper: a participant missing any clinical or laboratory value is left out of
        # every combination, the image-only one included, so all combinations share one cohort
        cols = [*CLINICAL_FEATURES, *LAB_FEATURES]
        keep_idx, dropped = cc([r.row for r in kept], cols, [r.study_uid for r in kept])
        dropped_ids = {d[0] for d in dropped}
        excluded.extend(dropped)
        kept = [kept[i] for i in keep_idx]
        samples = [s for s in samples if s.study_uid not in dropped_ids]
    if not samples:
        raise TrainingError(
            f"no usable samples from {source} with {labels_csv} ({len(excluded)} excluded; first: "
            f"{excluded[0] if excluded else 'none'})"
        )
    log.info("cohort: %d samples from %d studies (%d participants); %d excluded; "
             "%d studies completed from the DICOM header", len(samples), len(kept),
             len({r.participant_id for r in kept}), len(excluded), filled_total)
    return Cohort(samples, kept, excluded, problems, filled_total)


def _read(paths: Sequence[Path], frame_policy: str, max_frames: int) -> Any:
    from inference.reader import read_study

    return read_study(list(paths), frame_policy=frame_policy, max_frames=max_frames)
