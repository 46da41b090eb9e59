"""Study completion: idle, max wait, SEG waiting, each on_missing_seg policy, re-open.

Most tests drive :func:`check_studies` with explicit clock values (no sleeping); one test runs
the real monitor thread and worker behind the listener with a short idle time.
"""

from __future__ import annotations

import io
import json
import time

import pytest

from dicom_node.completion import check_studies
from dicom_node.config import CompletionConfig
from dicom_node.scu import store_files
from dicom_node.store.archive import Archive
from dicom_node.store.queue import claim, jobs_for, mark_done
from dicom_node.validate import validate
from tests.builders import make_seg, make_us
from tests.conftest import make_config
from tests.dicom_node.node_harness import running_node, wait_for


def _store(archive: Archive, ds, at: float) -> None:
    """Archive ``ds`` as if received at time ``at`` (the clock is set on the rows)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    info = validate(ds, affected_sop_class=ds.SOPClassUID, affected_sop_instance=ds.SOPInstanceUID,
                    transfer_syntax=ds.file_meta.TransferSyntaxUID)
    archive.store(buf.getvalue(), info, calling_aet="TEST",
                  transfer_syntax=ds.file_meta.TransferSyntaxUID)
    with archive.transaction() as conn:
        conn.execute("UPDATE studies SET last_received = ? WHERE study_uid = ?",
                     (at, ds.StudyInstanceUID))
        conn.execute(
            "UPDATE studies SET first_received = ?, receiving_since = ? WHERE study_uid = ? "
            "AND first_received > ?", (at, at, ds.StudyInstanceUID, at),
        )


def _cfg(**kw) -> CompletionConfig:
    base = dict(idle_seconds=10, max_wait_seconds=100, require_seg=False,
                on_missing_seg="score-whole-region", poll_seconds=1)
    base.update(kw)
    return CompletionConfig(**base)


@pytest.fixture
def archive(tmp_path):
    a = Archive(tmp_path / "node").init()
    yield a
    a.close()


def _state(archive, uid):
    return archive.study(uid)["state"]


def test_idle_timeout_completes_and_queues_once(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    _store(archive, us, at=1000)
    assert check_studies(archive, _cfg(), max_attempts=3, now=1005) == []
    assert _state(archive, uid) == "receiving"
    done = check_studies(archive, _cfg(), max_attempts=3, now=1010)
    assert [(u, d.state, d.reason) for u, d in done] == [(uid, "complete", "idle")]
    assert check_studies(archive, _cfg(), max_attempts=3, now=2000) == []
    jobs = jobs_for(archive, uid)
    assert len(jobs) == 1 and jobs[0]["state"] == "queued" and jobs[0]["kind"] == "score"
    payload = json.loads(jobs[0]["payload"])
    assert payload["completion_reason"] == "idle" and payload["missing_seg"] is True
    assert payload["allow_missing_seg"] is True  # require_seg = false: score the whole region
    study = archive.study(uid)
    assert study["completion_reason"] == "idle" and study["missing_seg"] == 1


def test_max_wait_completes_a_study_that_never_goes_quiet(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    _store(archive, us, at=1000)
    for i, t in enumerate(range(1005, 1100, 5)):  # an instance every 5 s, idle is 10 s
        _store(archive, make_us(uid, us.SeriesInstanceUID, seed=i + 1), at=t)
        assert check_studies(archive, _cfg(), max_attempts=3, now=t + 1) == []
    _store(archive, make_us(uid, us.SeriesInstanceUID, seed=99), at=1099)
    done = check_studies(archive, _cfg(), max_attempts=3, now=1100)
    assert [(d.state, d.reason) for _, d in done] == [("complete", "max-wait")]
    assert len(jobs_for(archive, uid)) == 1


def test_require_seg_waits_past_idle_then_completes_when_seg_arrives(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    cfg = _cfg(require_seg=True)
    _store(archive, us, at=1000)
    assert check_studies(archive, cfg, max_attempts=3, now=1050) == []  # idle, but no SEG yet
    assert _state(archive, uid) == "receiving"
    _store(archive, make_seg(us), at=1060)
    assert check_studies(archive, cfg, max_attempts=3, now=1065) == []
    done = check_studies(archive, cfg, max_attempts=3, now=1070)
    assert [(d.state, d.reason, d.missing_seg) for _, d in done] == [("complete", "idle", False)]
    payload = json.loads(jobs_for(archive, uid)[0]["payload"])
    assert payload["missing_seg"] is False and payload["allow_missing_seg"] is False
    assert payload["us_count"] == 1 and payload["seg_count"] == 1


@pytest.mark.parametrize(
    "policy, state, jobs",
    [("score-whole-region", "complete", 1), ("hold", "held", 0), ("reject", "rejected", 0)],
)
def test_on_missing_seg_policies_at_max_wait(archive, policy, state, jobs):
    us = make_us()
    uid = us.StudyInstanceUID
    cfg = _cfg(require_seg=True, on_missing_seg=policy)
    _store(archive, us, at=1000)
    assert check_studies(archive, cfg, max_attempts=3, now=1099) == []
    done = check_studies(archive, cfg, max_attempts=3, now=1100)
    assert [(d.state, d.reason) for _, d in done] == [(state, "max-wait-missing-seg")]
    study = archive.study(uid)
    assert study["state"] == state and study["missing_seg"] == 1 and study["note"]
    assert len(jobs_for(archive, uid)) == jobs
    if jobs:
        payload = json.loads(jobs_for(archive, uid)[0]["payload"])
        assert payload["missing_seg"] is True and payload["allow_missing_seg"] is True
        assert payload["missing_seg_sop_uids"] == [us.SOPInstanceUID]


def test_late_seg_releases_a_held_study(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    cfg = _cfg(require_seg=True, on_missing_seg="hold")
    _store(archive, us, at=1000)
    check_studies(archive, cfg, max_attempts=3, now=1100)
    assert _state(archive, uid) == "held"
    _store(archive, make_seg(us), at=1200)
    study = archive.study(uid)
    assert study["state"] == "receiving" and study["reopen_count"] == 1
    done = check_studies(archive, cfg, max_attempts=3, now=1210)
    assert [(d.state, d.missing_seg) for _, d in done] == [("complete", False)]


def test_instance_after_scored_reopens_and_queues_a_new_job(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    _store(archive, us, at=1000)
    check_studies(archive, _cfg(), max_attempts=3, now=1010)
    job = claim(archive)
    assert job is not None and _state(archive, uid) == "scoring"
    mark_done(archive, job, note="scored")
    assert _state(archive, uid) == "scored"
    _store(archive, make_us(uid, us.SeriesInstanceUID, seed=5), at=2000)
    study = archive.study(uid)
    assert study["state"] == "receiving" and study["reopen_count"] == 1
    done = check_studies(archive, _cfg(), max_attempts=3, now=2010)
    assert [d.state for _, d in done] == ["complete"]
    jobs = jobs_for(archive, uid)
    assert [j["state"] for j in jobs] == ["done", "queued"]
    assert json.loads(jobs[1]["payload"])["reopen_count"] == 1
    assert json.loads(jobs[1]["payload"])["instance_count"] == 2


def test_instance_before_queued_job_runs_supersedes_it(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    _store(archive, us, at=1000)
    check_studies(archive, _cfg(), max_attempts=3, now=1010)
    _store(archive, make_us(uid, us.SeriesInstanceUID, seed=5), at=1020)
    check_studies(archive, _cfg(), max_attempts=3, now=1030)
    jobs = jobs_for(archive, uid)
    assert [j["state"] for j in jobs] == ["done", "queued"]
    assert "superseded" in jobs[0]["last_error"]
    job = claim(archive)
    assert job is not None and job.id == jobs[1]["id"]  # only the fresh job is runnable


def test_duplicate_resend_does_not_reopen(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    _store(archive, us, at=1000)
    check_studies(archive, _cfg(), max_attempts=3, now=1010)
    _store(archive, us, at=1020)  # identical bytes: acknowledged, nothing changes
    assert _state(archive, uid) == "complete"
    assert len(jobs_for(archive, uid)) == 1


@pytest.mark.network
def test_monitor_and_worker_threads_end_to_end(tmp_path):
    """Real listener + monitor + worker: US then a late SEG -> one job, scored archive-only."""
    cfg = make_config(tmp_path / "node", completion={
        "idle_seconds": 0.5, "max_wait_seconds": 30, "poll_seconds": 0.1, "require_seg": True})
    with running_node(cfg) as archive:
        us = make_us()

        def send(items):
            return store_files("127.0.0.1", cfg.node.port, items, calling_aet="PYNETDICOM",
                               called_aet="DICOMNODE")

        assert send([us]) == [(us.SOPInstanceUID, 0)]
        # well past the idle time (0.5 s) the study still waits for its SEG
        wait_for(lambda: archive.study(us.StudyInstanceUID)["last_received"] < time.time() - 1.5,
                 timeout=10)
        assert archive.study(us.StudyInstanceUID)["state"] == "receiving"  # waiting for its SEG
        seg = make_seg(us)
        assert send([seg]) == [(seg.SOPInstanceUID, 0)]
        wait_for(lambda: archive.study(us.StudyInstanceUID)["state"] == "scored", timeout=20)
        study = archive.study(us.StudyInstanceUID)
        assert "archive-only" in study["note"] and study["missing_seg"] == 0
        assert [j["state"] for j in jobs_for(archive, us.StudyInstanceUID)] == ["done"]


def test_auto_waits_seg_wait_seconds_then_segments_and_a_late_seg_reopens(archive):
    us = make_us()
    uid = us.StudyInstanceUID
    cfg = _cfg(require_seg=True, on_missing_seg="auto", seg_wait_seconds=30)
    _store(archive, us, at=1000)
    assert check_studies(archive, cfg, max_attempts=3, now=1020) == []  # quiet, SEG may come
    done = check_studies(archive, cfg, max_attempts=3, now=1030)
    assert [(d.state, d.reason) for _, d in done] == [("complete", "seg-wait-auto")]
    payload = json.loads(jobs_for(archive, uid)[0]["payload"])
    assert payload["auto_roi"] is True and payload["allow_missing_seg"] is False
    job = claim(archive)
    mark_done(archive, job, note="scored on the automatic ROI")
    _store(archive, make_seg(us), at=1100)  # the human SEG arrives after the automatic scoring
    assert archive.study(uid)["state"] == "receiving"
    done = check_studies(archive, cfg, max_attempts=3, now=1111)
    assert [(d.state, d.missing_seg) for _, d in done] == [("complete", False)]
    payload = json.loads(jobs_for(archive, uid)[-1]["payload"])
    assert payload["auto_roi"] is False and payload["seg_count"] == 1
