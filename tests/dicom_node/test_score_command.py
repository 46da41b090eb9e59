"""``dicom-node score`` (the application's offline command) on the synthetic cohort."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dicom_node.commands.score import group_by_study
from dicom_node.errors import ScoringError
from tests.inference.test_pipeline import _studies, study_files


def test_group_by_study(synth_cohort, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "notes.txt").write_text("not DICOM")
    first = _studies(synth_cohort)[0]
    one = Path(synth_cohort.out_dir) / first["files"][0]["path"]
    groups = group_by_study([Path(synth_cohort.dicom_dir), tmp_path, one])
    assert len(groups) == len(_studies(synth_cohort))
    assert len(groups[first["study_uid"]]) == len(first["files"])  # named twice, read once
    with pytest.raises(ScoringError):
        group_by_study([tmp_path / "missing"])


def test_score_command_writes_sr_heatmaps_and_summary(tiny_model_dir, synth_cohort, tmp_path) -> None:  # noqa: ANN001,E501
    from pydicom import dcmread

    from dicom_node.cli import main

    study, files = study_files(synth_cohort, "late")
    src = tmp_path / "in"
    src.mkdir()
    for f in files:
        (src / f.name).write_bytes(f.read_bytes())
    cfg = tmp_path / "config.toml"
    cfg.write_text('[node]\nallow_any_calling_aet = true\n[scoring]\nenabled = false\n')
    out = tmp_path / "out"
    rc = main(["score", str(src), "--out", str(out), "--model", str(tiny_model_dir),
               "--config", str(cfg)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["study_uid"] for s in summary] == [study["study_uid"]]
    entry = summary[0]
    assert entry["status"] == "scored" and 0 <= entry["probability"] <= 1
    sr = dcmread(entry["outputs"]["sr"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study["study_uid"]
    assert sr.PatientID == study["patient_id"]
    scs = [dcmread(p) for p in entry["outputs"]["heatmaps"]]
    n_us = sum(f["kind"] == "us" for f in study["files"])
    assert len(scs) == n_us == len(entry["images"]) == len(entry["outputs"]["previews"])
    assert all(sc.StudyInstanceUID == study["study_uid"] for sc in scs)
    assert all(Path(p).stat().st_size > 0 for p in entry["outputs"]["previews"])
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_us and {r["roi_source"] for r in rows} == {"seg"}
    assert all(float(r["csa_cm2"]) > 0 for r in rows if r["csa_cm2"])
