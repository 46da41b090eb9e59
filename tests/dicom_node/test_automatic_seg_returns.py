"""The node's own AI SEG (or another AI's) coming back by C-STORE is archived, never a human ROI.

PACS auto-routing or a user re-sending a study brings the node's AUTOMATIC DICOM-SEG back. It must
be acknowledged and kept, but it must not count as "the SEG arrived", must not re-open a finished
study (a rescore would send another AI SEG: a loop) and must not change what is scored.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.completion import check_studies
from dicom_node.config import CompletionConfig
from dicom_node.processing import build_processor
from dicom_node.results.seg import SegmentationModelId, build_ai_seg
from dicom_node.scu import store_files
from dicom_node.store.archive import Archive
from dicom_node.store.queue import claim, jobs_for, mark_done
from dicom_node.store.resultsets import sets_of
from dicom_node.store.studies import study_table
from dicom_node.validate import validate
from dicom_node.worker import job_context, run_one
from tests.builders import make_seg, make_us, rf_mask
from tests.conftest import make_config
from tests.dicom_node.node_harness import running_node, wait_for
from tests.inference.test_pipeline import study_files

MODEL = SegmentationModelId(name="dicom-node RF segmenter", version="3",
                            model_uid="1.2.826.0.1.3680043.8.498.12345")
PERMISSIVE_QC = {"min_confidence": 0.0, "min_csa_cm2": 0.0, "max_csa_cm2": 1e6,
                 "min_thickness_cm": 0.0, "max_thickness_cm": 1e6, "max_second_component": 1.0}


def _store(archive: Archive, ds: pydicom.Dataset, at: float | None = None) -> None:
    """Archive ``ds`` as the listener does (validate, then store); optionally set the clock."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    ts = ds.file_meta.TransferSyntaxUID
    info = validate(ds, affected_sop_class=ds.SOPClassUID,
                    affected_sop_instance=ds.SOPInstanceUID, transfer_syntax=ts)
    archive.store(buf.getvalue(), info, calling_aet="PACS", transfer_syntax=ts)
    if at is not None:
        with archive.transaction() as conn:
            conn.execute("UPDATE studies SET last_received = ? WHERE study_uid = ?",
                         (at, ds.StudyInstanceUID))
            conn.execute("UPDATE studies SET first_received = ?, receiving_since = ? "
                         "WHERE study_uid = ? AND first_received > ?",
                         (at, at, ds.StudyInstanceUID, at))


def _own_seg(us: pydicom.Dataset) -> pydicom.Dataset:
    header = pydicom.Dataset()
    header.update({e.tag: e for e in us if e.keyword != "PixelData"})
    header.file_meta = us.file_meta
    return build_ai_seg(header, rf_mask(int(us.Rows), int(us.Columns), center=(32, 32),
                                        radii=(10, 20)), 1, MODEL)


def _cfg(**kw: object) -> CompletionConfig:
    base: dict = dict(idle_seconds=10, max_wait_seconds=100, require_seg=True,
                      on_missing_seg="auto", seg_wait_seconds=30, poll_seconds=1)
    base.update(kw)
    return CompletionConfig(**base)


@pytest.fixture
def archive(tmp_path: Path):  # noqa: ANN201
    a = Archive(tmp_path / "node").init()
    yield a
    a.close()


def test_an_automatic_seg_is_archived_but_does_not_cover_an_image(archive: Archive) -> None:
    us = make_us()
    uid = us.StudyInstanceUID
    ai = _own_seg(us)
    _store(archive, us, at=1000)
    _store(archive, ai, at=1001)
    row = archive.query("SELECT automatic_seg, referenced_sop_uids FROM instances "
                        "WHERE sop_uid = ?", (ai.SOPInstanceUID,))[0]
    assert row["automatic_seg"] == 1 and us.SOPInstanceUID in row["referenced_sop_uids"]
    # quiet but inside the SEG wait: a human SEG may still come (the AI SEG is not one)
    assert check_studies(archive, _cfg(), max_attempts=3, now=1020) == []
    done = check_studies(archive, _cfg(), max_attempts=3, now=1040)
    assert [(d.state, d.reason, d.missing_seg) for _, d in done] == [
        ("complete", "seg-wait-auto", True)]
    payload = json.loads(jobs_for(archive, uid)[0]["payload"])
    assert payload["auto_roi"] is True and payload["seg_count"] == 0
    assert payload["automatic_seg_count"] == 1
    assert payload["missing_seg_sop_uids"] == [us.SOPInstanceUID]
    job = claim(archive)
    assert job is not None
    assert job_context(archive, job).automatic_seg_uids == (ai.SOPInstanceUID,)
    # `dicom-node studies` counts it apart from the human SEGs
    row = next(r for r in study_table(archive) if r["study_uid"] == uid)
    assert (row["us"], row["seg"], row["automatic_seg"]) == (1, 0, 1)


def test_another_vendors_automatic_seg_does_not_release_a_held_study(archive: Archive) -> None:
    us = make_us()
    uid = us.StudyInstanceUID
    cfg = _cfg(on_missing_seg="hold")
    _store(archive, us, at=1000)
    check_studies(archive, cfg, max_attempts=3, now=1100)
    assert archive.study(uid)["state"] == "held"
    _store(archive, make_seg(us, algorithm_type="AUTOMATIC"), at=1200)
    study = archive.study(uid)
    assert study["state"] == "held" and study["reopen_count"] == 0
    assert jobs_for(archive, uid) == []
    _store(archive, make_seg(us), at=1300)  # a human SEG still re-opens it
    assert archive.study(uid)["state"] == "receiving"
    done = check_studies(archive, cfg, max_attempts=3, now=1310)
    assert [(d.state, d.missing_seg) for _, d in done] == [("complete", False)]
    payload = json.loads(jobs_for(archive, uid)[0]["payload"])
    assert payload["seg_count"] == 1 and payload["automatic_seg_count"] == 1


def test_the_own_seg_after_scoring_creates_no_job(archive: Archive) -> None:
    us = make_us()
    uid = us.StudyInstanceUID
    _store(archive, us, at=1000)
    check_studies(archive, _cfg(), max_attempts=3, now=1040)
    job = claim(archive)
    assert job is not None
    mark_done(archive, job, note="scored on the automatic ROI")
    ai = _own_seg(us)
    _store(archive, ai, at=2000)  # routed back by PACS
    study = archive.study(uid)
    assert study["state"] == "scored" and study["reopen_count"] == 0
    assert study["note"] == "scored on the automatic ROI"
    assert check_studies(archive, _cfg(), max_attempts=3, now=5000) == []
    assert [j["state"] for j in jobs_for(archive, uid)] == ["done"]
    assert ai.SOPInstanceUID in {u for u, _ in archive.study_files(uid)}  # archived, not lost


@pytest.mark.network
def test_the_own_seg_over_c_store_is_acknowledged_and_changes_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "node", completion={
        "idle_seconds": 0.3, "max_wait_seconds": 30, "poll_seconds": 0.1,
        "require_seg": False})
    with running_node(cfg) as archive:
        us = make_us()
        uid = us.StudyInstanceUID

        def send(items: list[pydicom.Dataset]) -> list[tuple[str, int]]:
            return store_files("127.0.0.1", cfg.node.port, items, calling_aet="PYNETDICOM",
                               called_aet="DICOMNODE")

        assert send([us]) == [(us.SOPInstanceUID, 0)]
        wait_for(lambda: archive.study(uid)["state"] == "scored", timeout=20)
        ai = _own_seg(us)
        assert send([ai]) == [(ai.SOPInstanceUID, 0)]
        assert archive.query("SELECT automatic_seg FROM instances WHERE sop_uid = ?",
                             (ai.SOPInstanceUID,)) == [{"automatic_seg": 1}]
        time.sleep(1.0)  # several idle periods and monitor polls: nothing may follow
        study = archive.study(uid)
        assert study["state"] == "scored" and study["reopen_count"] == 0
        assert [j["state"] for j in jobs_for(archive, uid)] == ["done"]


def _scoring_config(data_dir: Path, model_dir: Path, seg_dir: Path):  # noqa: ANN202
    return make_config(
        data_dir,
        completion={"require_seg": True, "on_missing_seg": "auto", "seg_wait_seconds": 1,
                    "idle_seconds": 1, "max_wait_seconds": 60},
        scoring={"enabled": True, "model_dir": str(model_dir), "device": "cpu",
                 "torch_threads": 1, "segmentation_model_dir": str(seg_dir)},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )


def _score_all(archive: Archive, processor, cfg) -> None:  # noqa: ANN001
    check_studies(archive, cfg.completion, max_attempts=2, now=time.time() + 3600)
    with archive.transaction() as conn:  # queued "in the future" by the clock above: due now
        conn.execute("UPDATE jobs SET next_attempt_at = 0")
    assert run_one(archive, processor, cfg.worker)


def test_a_study_with_the_own_ai_seg_scores_exactly_as_without_it(
        tiny_model_dir: Path, tiny_segmenter_dir: Path, synth_cohort, tmp_path: Path) -> None:  # noqa: ANN001
    seg_dir = tmp_path / "segmenter"
    shutil.copytree(tiny_segmenter_dir, seg_dir)
    raw = json.loads((seg_dir / "model.json").read_text())
    raw["qc"] = PERMISSIVE_QC  # the tiny test segmenter is weak; QC lives in its model.json
    (seg_dir / "model.json").write_text(json.dumps(raw))
    study, files = study_files(synth_cohort, "none")
    uid = study["study_uid"]

    # 1. images only: scored on the automatic ROI; the results include the node's AI SEGs
    cfg = _scoring_config(tmp_path / "first", tiny_model_dir, seg_dir)
    processor = build_processor(cfg)
    first = Archive(cfg.node.data_dir).init()
    try:
        for f in files:
            _store(first, pydicom.dcmread(f))
        _score_all(first, processor, cfg)
        row = first.study(uid)
        assert row["state"] == "scored" and "automatic ROI" in row["note"], row["note"]
        (result,) = sets_of(cfg.node.results_dir, uid)
        ai_segs = [pydicom.dcmread(p) for _, p in result.files
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
        assert ai_segs
        # 2. PACS routes them back: archived, no re-open, no job, nothing sent again
        outbox = first.query("SELECT id FROM outbox WHERE study_uid = ?", (uid,))
        for s in ai_segs:
            _store(first, s)
        assert first.study(uid)["state"] == "scored" and first.study(uid)["reopen_count"] == 0
        assert check_studies(first, cfg.completion, max_attempts=2,
                             now=time.time() + 7200) == []
        assert not run_one(first, processor, cfg.worker)
        assert len(jobs_for(first, uid)) == 1
        assert first.query("SELECT id FROM outbox WHERE study_uid = ?", (uid,)) == outbox
        first_images = json.loads(first.study(uid)["images"])
    finally:
        first.close()

    # 3. the study re-sent to a node with its AI SEGs: scored on the automatic ROI exactly as
    #    without them (same score, same study version, so even the same result UIDs)
    cfg2 = _scoring_config(tmp_path / "second", tiny_model_dir, seg_dir)
    second = Archive(cfg2.node.data_dir).init()
    try:
        for ds in [pydicom.dcmread(f) for f in files] + ai_segs:
            _store(second, ds)
        _score_all(second, build_processor(cfg2), cfg2)
        row2 = second.study(uid)
        payload = json.loads(jobs_for(second, uid)[0]["payload"])
        assert payload["auto_roi"] is True and payload["automatic_seg_count"] == len(ai_segs)
        assert row2["state"] == "scored"
        assert row2["note"].split(";")[0] == row["note"].split(";")[0]  # p, verdict, ROI counts
        images2 = {i["sop_uid"]: i for i in json.loads(row2["images"])}
        for im in first_images:
            assert images2[im["sop_uid"]] == im  # every image: scored (auto), same reason
        ai_uids = {str(s.SOPInstanceUID) for s in ai_segs}
        assert all(not images2[u]["scored"] and "automatic DICOM-SEG" in images2[u]["reason"]
                   for u in ai_uids)
        (result2,) = sets_of(cfg2.node.results_dir, uid)
        assert result2.key == result.key
        assert {u for u, _ in result2.files} == {u for u, _ in result.files}
    finally:
        second.close()
