"""Cohort loading from a node archive / folder, label matching, and ``dicom-node evaluate``."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import config_from_dict
from training.data import index_archive, match_studies, read_labels


@pytest.fixture(scope="module")
def archive_dir(synth_cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic cohort stored through the node's own Archive (index.sqlite + files)."""
    from dicom_node.store.archive import Archive
    from dicom_node.validate import validate

    data_dir = tmp_path_factory.mktemp("node") / "data"
    arc = Archive(data_dir).init()
    for p in sorted(synth_cohort.dicom_dir.rglob("*.dcm")):
        raw = p.read_bytes()
        ds = pydicom.dcmread(p)
        ts = str(ds.file_meta.TransferSyntaxUID)
        info = validate(ds, affected_sop_class=str(ds.SOPClassUID),
                        affected_sop_instance=str(ds.SOPInstanceUID), transfer_syntax=ts)
        arc.store(raw, info, calling_aet="TEST", transfer_syntax=ts)
    arc.close()
    return data_dir


def test_archive_index_matches_folder(archive_dir: Path, synth_cohort) -> None:
    a = index_archive(archive_dir)
    f = index_archive(synth_cohort.dicom_dir)
    assert set(a) == set(f)
    for study in a:
        assert a[study][0] == f[study][0]
        assert len(a[study][1]) == len(f[study][1])
        assert all(p.is_file() and archive_dir in p.parents for p in a[study][1])


def test_labels_by_patient_id_and_awgs(synth_cohort, tmp_path: Path) -> None:
    rows = read_labels(synth_cohort.labels_csv)
    index = index_archive(synth_cohort.dicom_dir)
    given, _ = match_studies(rows, index)
    # a hospital file: no study UID, no label column values, only the AWGS measurements
    stripped = [{**r, "study_instance_uid": "", "label": ""} for r in rows]
    derived, excluded = match_studies(stripped, index)
    assert not excluded
    assert {r.study_uid: r.label for r in derived} == {r.study_uid: r.label for r in given}
    assert all(r.label_source != "label" for r in derived)
    # a row whose patient has no images is listed, not dropped silently
    rows2 = [*rows, {**rows[0], "patient_id": "NOBODY", "study_instance_uid": ""}]
    _, excluded = match_studies(rows2, index)
    assert excluded == [("NOBODY", "no images for this row in the archive")]


def test_evaluate_command_on_archive(archive_dir: Path, synth_cohort, tiny_model_dir: Path,
                                     tmp_path: Path) -> None:
    from dicom_node.commands.train import evaluate_command

    cfg = config_from_dict({"node": {"allow_any_calling_aet": True}, "scoring": {"enabled": False}})
    out = tmp_path / "external"
    args = argparse.Namespace(model=tiny_model_dir, archive=archive_dir,
                              labels=synth_cohort.labels_csv, out=out)
    assert evaluate_command(args, cfg) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    trained = json.loads((tiny_model_dir / "model.json").read_text())
    assert ev["model_uid"] == trained["model_uid"]
    assert ev["threshold"] == pytest.approx(trained["threshold"])
    auc = ev["metrics"]["image"]["participant"]["auc"]["auc"]
    assert 0.0 <= auc <= 1.0
    assert {tuple(e) for e in ev["excluded_studies"]} == \
        {tuple(e) for e in trained["excluded_studies"]}
    with (out / "oof.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == trained["n_samples"]
    assert "external validation" in (out / "report.md").read_text()
    # the operating-point promise: CV's prediction next to what this cohort shows, pooled as served
    op = ev["operating_point"]
    assert op["predicted_by_cv"] == pytest.approx(trained["decision"]["expected"])
    assert op["level"] == trained["decision"]["level"] and op["threshold"] == ev["threshold"]
    assert 0.0 <= op["observed"]["sensitivity"] <= 1.0 and 0.0 <= op["observed"]["ece"] <= 1.0
    assert op["calibration"] == trained["calibration"]["method"]
    assert "predicted by CV" in (out / "operating_point.md").read_text()


def test_header_fills_clinical_and_complete_cases(synth_cohort, tmp_path: Path) -> None:
    from training.data import load_cohort
    from training.features import CLINICAL_FEATURES, LAB_FEATURES, parse_value

    rows = read_labels(synth_cohort.labels_csv)
    header_keys = ("age", "sex", "height_cm", "weight_kg", "bmi")
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, **{k: "" for k in header_keys}} for r in rows)
    cohort = load_cohort(synth_cohort.dicom_dir, labels, input_size=32, roi_margin=0.1,
                         modalities=("clinical", "lab"), complete_cases=True)
    by_study = {r["study_instance_uid"]: r for r in rows}
    assert cohort.header_filled == len(cohort.studies) + sum(
        1 for e in cohort.excluded if e[1].startswith("complete cases"))
    for s in cohort.samples:
        assert s.image is None and s.sop_uid == ""  # one row per study for tabular models
        orig = by_study[s.study_uid]
        assert s.row["sex"] == orig["sex"]
        assert float(s.row["age"]) == pytest.approx(float(orig["age"]), abs=1)
        assert float(s.row["height_cm"]) == pytest.approx(float(orig["height_cm"]), abs=0.6)
        for c in (*CLINICAL_FEATURES, *LAB_FEATURES):  # complete cases: nothing missing
            assert parse_value(c, s.row.get(c)) == parse_value(c, s.row.get(c)), c
    dropped = [e for e in cohort.excluded if e[1].startswith("complete cases")]
    assert dropped, "the synthetic cohort has missing lab values: some rows must be dropped"
    # the image-only combination drops the same participants (the paper's complete-case cohort)
    image_only = load_cohort(synth_cohort.dicom_dir, labels, input_size=32, roi_margin=0.1,
                             modalities=("image",), complete_cases=True)
    # (a study without a usable ROI is excluded for that reason first)
    assert {e[0] for e in image_only.excluded if e[1].startswith("complete cases")} <= \
        {e[0] for e in dropped}
    assert {e[0] for e in image_only.excluded if e[1].startswith("complete cases")}
    assert not {s.study_uid for s in image_only.samples} & {e[0] for e in dropped}
    assert {s.study_uid for s in image_only.samples} <= {s.study_uid for s in cohort.samples}


def test_interrupted_run_resumes_to_the_same_model(synth_cohort, tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    """Kill the run in fold 1, resume: fold 0 is not retrained and the result is identical."""
    import torch

    from tests.fixtures.model import TINY_TRAIN
    from training.oof import read_oof
    from training.run import run_training

    class Interrupt(Exception):
        pass

    def stop(fold: int, epoch: int) -> None:
        if fold == 1 and epoch == 0:
            raise Interrupt

    out = tmp_path / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Interrupt):
            run_training(synth_cohort.dicom_dir, synth_cohort.labels_csv, out, TINY_TRAIN,
                         on_epoch_end=stop, n_boot=0)
        assert not out.exists() and (tmp_path / "model.work").is_dir()
        ran: list[tuple[int, int]] = []
        run_training(synth_cohort.dicom_dir, synth_cohort.labels_csv, out, TINY_TRAIN,
                     resume=True, on_epoch_end=lambda f, e: ran.append((f, e)), n_boot=0)
    finally:
        torch.set_num_threads(threads)
    assert ran == [(1, 1)]  # only what was missing
    assert not (tmp_path / "model.work").exists()
    a = {(r.sop_instance_uid, r.fold): r.probability for r in read_oof(out).records}
    b = {(r.sop_instance_uid, r.fold): r.probability for r in read_oof(tiny_model_dir).records}
    assert a == b
    ja = json.loads((out / "model.json").read_text())
    jb = json.loads((tiny_model_dir / "model.json").read_text())
    assert ja["threshold"] == jb["threshold"] and ja["model_uid"] != jb["model_uid"]


def test_tabular_models_train_per_study_with_their_own_epochs(synth_cohort, tmp_path: Path
                                                              ) -> None:
    import dataclasses

    from tests.fixtures.model import TINY_TRAIN
    from training.oof import read_oof
    from training.run import run_training

    cfg = dataclasses.replace(TINY_TRAIN, modalities=("clinical", "lab"), tabular_epochs=5,
                              mlp_hidden=16)
    out = run_training(synth_cohort.dicom_dir, synth_cohort.labels_csv, tmp_path / "m", cfg,
                       also=["lab"], n_boot=0)
    raw = json.loads((out / "model.json").read_text())
    assert raw["spec"]["arch"] == "fusion" and raw["spec"]["n_clinical"] == 9
    assert all(len(f["history"]) == 5 for f in raw["folds"])
    assert set(raw["cv_metrics"]) == {"clinical+lab", "lab"}
    oof = read_oof(out)
    for combo in ("clinical+lab", "lab"):
        rows = oof.select(modalities=combo).records
        assert len(rows) == len({r.study_instance_uid for r in rows}) == raw["n_studies"]
    # studies without a SEG are usable for tabular models: none excluded for want of an ROI
    assert not [e for e in raw["excluded_studies"] if "ROI" in e[1]]
    assert "SHAP" in (out / "report.md").read_text()
