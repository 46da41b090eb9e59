"""The scoring processor end to end on a small archive built by the node's own archive module."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.completion import check_studies
from dicom_node.errors import ModelArtifactError
from dicom_node.processing import build_processor, find_predecessor
from dicom_node.store.archive import Archive
from dicom_node.store.queue import enqueue
from dicom_node.store.resultsets import study_folder
from dicom_node.store.studies import study_table
from dicom_node.validate import validate
from dicom_node.worker import run_one
from tests.conftest import make_config
from tests.inference.test_pipeline import study_files


def _store_study(archive: Archive, files: list[Path]) -> None:
    for f in files:
        ds = dcmread(f)
        ts = ds.file_meta.TransferSyntaxUID
        info = validate(ds, affected_sop_class=ds.SOPClassUID,
                        affected_sop_instance=ds.SOPInstanceUID, transfer_syntax=ts)
        archive.store(f.read_bytes(), info, calling_aet="MODALITY", transfer_syntax=ts)


def _config(tmp_path: Path, model_dir: Path, **scoring: object):  # noqa: ANN202
    return make_config(
        tmp_path / "node",
        scoring={"enabled": True, "model_dir": str(model_dir), "device": "cpu", **scoring},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )


def _sr_files(results: Path) -> list[Path]:
    return [p for p in results.glob("*/*.dcm")
            if dcmread(p, stop_before_pixels=True).Modality == "SR"]


def _run_due(archive: Archive, processor, cfg) -> bool:
    with archive.transaction() as conn:  # jobs queued "in the future" by check_studies: due now
        conn.execute("UPDATE jobs SET next_attempt_at = 0")
    return run_one(archive, processor, cfg.worker)


def test_processor_scores_archives_queues_and_notes(tiny_model_dir, synth_cohort, tmp_path) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    archive = Archive(cfg.node.data_dir).init()
    try:
        study, files = study_files(synth_cohort, "normal")
        uid = study["study_uid"]
        us_files = [f for f in files
                    if dcmread(f, stop_before_pixels=True).Modality == "US"]
        seg_files = [f for f in files if f not in us_files]
        assert us_files and seg_files
        _store_study(archive, us_files)  # the SEG comes late: scored on the whole region first
        taken = check_studies(archive, cfg.completion, max_attempts=2, now=time.time() + 3600)
        assert [t[0] for t in taken] == [uid] and taken[0][1].payload["allow_missing_seg"]
        processor = build_processor(cfg)
        assert _run_due(archive, processor, cfg)

        row = archive.study(uid)
        assert row["state"] == "scored", row
        assert row["note"].startswith("p=") and "whole region" in row["note"]
        job = archive.query("SELECT state, last_error FROM jobs WHERE study_uid = ?", (uid,))[0]
        assert job["state"] == "done"

        results = study_folder(cfg.node.results_dir, uid)
        assert results.name != uid and uid not in str(results)  # no UID in a path
        written = sorted(results.glob("*/*.dcm"))
        assert len(written) == 1 + len(us_files)
        srs = _sr_files(results)
        assert len(srs) == 1
        sr1 = dcmread(srs[0])
        assert sr1.StudyInstanceUID == uid and sr1.PatientID == study["patient_id"]
        outbox = archive.query("SELECT id, destination, state, path, sop_uid FROM outbox "
                               "WHERE study_uid = ?", (uid,))
        assert len(outbox) == len(written)
        assert {r["destination"] for r in outbox} == {"pacs"}
        assert {r["state"] for r in outbox} == {"pending"}
        assert all((cfg.node.data_dir / r["path"]).is_file() for r in outbox)

        # the same study version again (a crash before the job was marked done, or a re-run):
        # the published set is queued again, nothing is rescored and no row is duplicated
        with archive.transaction() as conn:
            conn.execute("UPDATE studies SET state = 'complete' WHERE study_uid = ?", (uid,))
            enqueue(conn, uid, "score", {"allow_missing_seg": True}, max_attempts=2)
        pipeline = processor.pipeline
        assert run_one(archive, processor, cfg.worker)
        assert processor.pipeline is pipeline  # the model is loaded once per process
        assert _sr_files(results) == srs and sorted(results.glob("*/*.dcm")) == written
        assert archive.query("SELECT id, destination, state, path, sop_uid FROM outbox "
                             "WHERE study_uid = ?", (uid,)) == outbox
        assert archive.study(uid)["note"] == row["note"]

        # the late SEG makes a new study version: rescored, the first SR is its predecessor
        _store_study(archive, seg_files)
        check_studies(archive, cfg.completion, max_attempts=2, now=time.time() + 7200)
        assert _run_due(archive, processor, cfg)
        srs = _sr_files(results)
        assert len(srs) == 2
        sr2 = dcmread(next(p for p in srs if dcmread(p).SOPInstanceUID != sr1.SOPInstanceUID))
        series_ref = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        ref = series_ref.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == sr1.SOPInstanceUID
        assert find_predecessor(cfg.node.results_dir, uid).SOPInstanceUID == sr2.SOPInstanceUID
        new_set = set(results.glob("*/*.dcm")) - set(written)
        assert len(new_set) == 1 + len(us_files)
        assert len(archive.query("SELECT id FROM outbox WHERE study_uid = ?", (uid,))) == (
            len(outbox) + len(new_set))
    finally:
        archive.close()


def test_unusable_study_fails_the_job_with_the_reasons(tiny_model_dir, synth_cohort,
                                                       tmp_path) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    archive = Archive(cfg.node.data_dir).init()
    try:
        study, files = study_files(synth_cohort, "none")
        uid = study["study_uid"]
        _store_study(archive, files)
        with archive.transaction() as conn:
            conn.execute("UPDATE studies SET state = 'complete' WHERE study_uid = ?", (uid,))
            enqueue(conn, uid, "score", {"allow_missing_seg": False}, max_attempts=1)
        assert run_one(archive, build_processor(cfg), cfg.worker)
        job = archive.query("SELECT state, last_error FROM jobs WHERE study_uid = ?", (uid,))[0]
        assert job["state"] == "failed"
        assert "ScoringError" in job["last_error"] and "DICOM-SEG" in job["last_error"]
        assert archive.study(uid)["state"] == "failed"
        assert not study_folder(cfg.node.results_dir, uid).exists()
        assert not archive.query("SELECT * FROM outbox")
    finally:
        archive.close()


def test_build_processor_refuses_a_broken_artifact(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(ModelArtifactError, match="does not exist"):
        build_processor(_config(tmp_path, tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    raw = json.loads((broken / "model.json").read_text())
    (broken / raw["folds"][-1]["file"]).unlink()
    with pytest.raises(ModelArtifactError, match=raw["folds"][-1]["file"]):
        build_processor(_config(tmp_path, broken))


def test_build_processor_refuses_a_config_that_contradicts_the_model(tiny_model_dir, tmp_path) -> None:  # noqa: ANN001,E501
    card = json.loads((tiny_model_dir / "model.json").read_text())
    other = "max" if card["serving"]["study_rule"] != "max" else "median"
    with pytest.raises(ModelArtifactError, match=f"scoring.study_rule = '{other}'"):
        build_processor(_config(tmp_path, tiny_model_dir, study_rule=other))
    processor = build_processor(_config(tmp_path, tiny_model_dir,
                                         study_rule=card["serving"]["study_rule"]))
    assert processor.pipeline.policy.study_rule == card["serving"]["study_rule"]


@pytest.mark.parametrize("not_assessable", ["none", "sr"])
def test_nothing_to_score_ends_not_applicable_without_retry(tiny_model_dir, synth_cohort, tmp_path,
                                                            not_assessable) -> None:
    import dataclasses

    import numpy as np

    from training.synth_nonmuscle import nonmuscle_object

    cfg = _config(tmp_path, tiny_model_dir)
    cfg = dataclasses.replace(cfg, results=dataclasses.replace(
        cfg.results, not_assessable=not_assessable))
    archive = Archive(cfg.node.data_dir).init()
    try:
        ds = nonmuscle_object("sector", np.random.default_rng(2), regions=True).dataset
        path = tmp_path / "sector.dcm"
        ds.save_as(path, enforce_file_format=True)
        uid = str(ds.StudyInstanceUID)
        _store_study(archive, [path])
        with archive.transaction() as conn:
            conn.execute("UPDATE studies SET state = 'complete' WHERE study_uid = ?", (uid,))
            enqueue(conn, uid, "score", {"allow_missing_seg": True}, max_attempts=3)
        assert run_one(archive, build_processor(cfg), cfg.worker)
        job = archive.query("SELECT state, attempts FROM jobs WHERE study_uid = ?", (uid,))[0]
        assert job["state"] == "done" and job["attempts"] == 1
        note = archive.study(uid)["note"]
        assert note.startswith("not-applicable: ") and "sector-geometry" in note
        assert archive.study(uid)["state"] == "not-applicable"
        row = next(r for r in study_table(archive) if r["study_uid"] == uid)
        assert row["state"] == "not-applicable"
        assert [(i["sop_uid"], i["scored"]) for i in row["images"]] == [(ds.SOPInstanceUID, False)]
        assert "sector-geometry" in row["images"][0]["reason"]
        srs = _sr_files(study_folder(cfg.node.results_dir, uid))
        queued = archive.query("SELECT sop_uid FROM outbox WHERE study_uid = ?", (uid,))
        if not_assessable == "none":
            assert not srs and not queued
        else:
            assert len(srs) == 1
            sr = dcmread(srs[0])
            assert "Undetermined" in str(sr) and "Thigh" not in str(sr)
            assert [r["sop_uid"] for r in queued] == [sr.SOPInstanceUID]
    finally:
        archive.close()
