"""Step 1: a synthetic cohort, the held-out studies the demo pushes, and the training set."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

from dicom_node.demo.study import DemoError, DemoStudy

Manifest = dict[str, Any]
Row = dict[str, str]


def generate(out: Path, participants: int, seed: int) -> Manifest:
    """Write the cohort (DICOM US + SEG, labels.csv, manifest.json) and return its manifest."""
    from training.synthetic import generate_cohort

    generate_cohort(out, participants, seed)
    manifest: Manifest = json.loads((out / "manifest.json").read_text())
    if not (out / "labels.csv").exists():
        raise DemoError(f"cohort generator wrote no labels.csv in {out}")
    return manifest


def read_labels(path: Path) -> list[Row]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def participant_of(row: Row) -> str:
    return row.get("participant_id") or row.get("patient_id") or ""


def _baseline(value: object) -> bool:
    return str(value) in ("", "0")


def split(manifest: Manifest, labels: list[Row], held_out: int
          ) -> tuple[set[str], list[dict[str, Any]]]:
    """Pick held-out participants: round-robin over vendors, alternating the label."""
    by_study = {r.get("study_instance_uid", ""): r for r in labels}
    by_patient = {r.get("patient_id", ""): r for r in labels}
    buckets: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for st in manifest.get("studies", []):
        row = by_study.get(st["study_uid"]) or by_patient.get(st.get("patient_id", ""), {})
        if not _baseline(st.get("followup", row.get("followup", "0"))):
            continue
        label = str(st.get("label", row.get("label", "")))
        buckets.setdefault((st.get("vendor", "?"), label), []).append(st)
    vendors = sorted({v for v, _ in buckets})
    chosen: list[dict[str, Any]] = []
    picks = [(v, lab) for _ in range(held_out) for v in vendors for lab in ("1", "0")]
    for key in picks:
        if len(chosen) >= held_out:
            break
        if buckets.get(key):
            chosen.append(buckets[key].pop(0))
    held = {st.get("participant_id") or participant_of(by_patient.get(st.get("patient_id", ""),
                                                                     {})) for st in chosen}
    return held, chosen


def training_set(cohort: Path, manifest: Manifest, labels: list[Row], held: set[str],
                 out: Path) -> tuple[Path, Path, int, int]:
    """Hard-link the non-held-out studies into ``out`` and write their labels.csv.

    Returns the DICOM folder, the labels file and the numbers of positive and negative
    baseline participants (they bound the number of folds).
    """
    train_rows = [r for r in labels if participant_of(r) not in held]
    keep_patients = {r.get("patient_id", "") for r in train_rows}
    dicom = out / "dicom"
    for st in manifest.get("studies", []):
        if st.get("patient_id", "") not in keep_patients:
            continue
        for f in st["files"]:
            src = cohort / f["path"]
            dst = dicom / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    labels_path = out / "labels.csv"
    with labels_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(labels[0].keys()))
        w.writeheader()
        w.writerows(train_rows)
    baseline = [r for r in train_rows if _baseline(r.get("followup", "0"))]
    pos = sum(1 for r in baseline if r.get("label") == "1")
    neg = sum(1 for r in baseline if r.get("label") == "0")
    return dicom, labels_path, pos, neg


def held_out_studies(cohort: Path, chosen: list[dict[str, Any]], labels: list[Row]
                     ) -> dict[str, DemoStudy]:
    """The chosen studies keyed by Study Instance UID, with their US objects only.

    Their DICOM-SEGs are left out on purpose: a scanner sends none, so the node has to find the
    ROI itself (automatic segmenter) and the demo compares that with the generator's truth.
    """
    by_patient = {r.get("patient_id", ""): r for r in labels}
    studies: dict[str, DemoStudy] = {}
    for st in chosen:
        row = by_patient.get(st.get("patient_id", ""), {})
        files = [f for f in st["files"] if f.get("kind", "us") != "seg"]
        studies[st["study_uid"]] = DemoStudy(
            study_uid=st["study_uid"], patient_id=st.get("patient_id", ""),
            participant=participant_of(row), vendor=st.get("vendor", "?"),
            truth={"1": "sarcopenia", "0": "no sarcopenia"}.get(row.get("label", ""), "?"),
            files=[cohort / f["path"] for f in files])
    return studies
