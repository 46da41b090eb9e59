"""Scoring in supervised processes: poison studies, hung jobs and killed workers.

Real scoring processes load the tiny trained model; the poison inputs really crash or exhaust a
decoder (a JPEG baseline image declaring 32 bits makes GDCM abort the process; an RLE image of
65535 x 65535 makes the decoder ask for 4 GiB, refused under ``worker.max_memory_mb``). They are
filed through the archive's own store function, as if an earlier node version had acknowledged
them, because the listener may refuse them at C-STORE time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, RLELossless

from dicom_node.store.archive import Archive
from dicom_node.completion import CompletionMonitor
from dicom_node.config import Config
from dicom_node.flow.scorer import job_error
from dicom_node.flow.supervisor import Supervisor, death_cause
from dicom_node.store.queue import claim, enqueue, jobs_for, requeue_orphans
from dicom_node.scu import store_files
from dicom_node.validate import InstanceInfo, validate
from tests.builders import make_us
from tests.conftest import free_port, make_config
from tests.dicom_node.node_harness import ServeProcess, wait_for, write_toml

STORESCP = "/usr/bin/storescp"


# -- inputs ----------------------------------------------------------------------------------
def jpeg_32_bit(study_uid: str | None = None) -> Dataset:
    """JPEG baseline whose header says BitsAllocated 32: GDCM's codec aborts the process."""
    ds = make_us(study_uid, patient_id="POISON1")
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(buf, format="JPEG")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated = 32
    return ds


def rle_65535(study_uid: str | None = None) -> Dataset:
    """RLE with Rows = Columns = 65535 and a 2-byte segment: the decoder allocates ~4 GiB."""
    ds = make_us(study_uid, patient_id="POISON2")
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = 65535
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)
    ds.PixelData = encapsulate([header + bytes([0x81, 0])])
    ds["PixelData"].VR = "OB"
    return ds


def file_raw(archive: Archive, ds: Dataset) -> None:
    """File a dataset through the archive's store function without the inbound checks."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    info = InstanceInfo(
        sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, patient_id=ds.PatientID, modality="US",
        series_number=1, manufacturer="TestVendor", model_name="T1", rows=ds.Rows,
        columns=ds.Columns, frames=1, photometric="MONOCHROME2", referenced_sop_uids=(),
    )
    archive.store(buf.getvalue(), info, calling_aet="STORESCU",
                  transfer_syntax=ds.file_meta.TransferSyntaxUID)


def file_valid(archive: Archive, paths: list[Path]) -> None:
    """File real instances the way the listener does (validated first)."""
    for path in paths:
        ds = dcmread(path)
        ts = ds.file_meta.TransferSyntaxUID
        info = validate(ds, affected_sop_class=ds.SOPClassUID,
                        affected_sop_instance=ds.SOPInstanceUID, transfer_syntax=ts)
        archive.store(path.read_bytes(), info, calling_aet="STORESCU", transfer_syntax=ts)


def cohort_studies(cohort, n: int) -> list[tuple[str, list[Path]]]:
    """``n`` synthetic studies sent in one go with their SEGs: (study UID, files)."""
    manifest = json.loads(cohort.manifest.read_text())
    chosen = [s for s in manifest["studies"]
              if any(f["kind"] == "seg" for f in s["files"])
              and not any(f["send_late"] for f in s["files"])][:n]
    assert len(chosen) == n
    return [(s["study_uid"], [cohort.out_dir / f["path"] for f in s["files"]]) for s in chosen]


def scoring_config(tmp_path: Path, model_dir: Path, **worker: object) -> Config:
    return make_config(
        tmp_path / "node",
        completion={"idle_seconds": 0.5, "max_wait_seconds": 30, "poll_seconds": 0.2,
                    "require_seg": False},
        worker={"poll_seconds": 0.2, "retry_base_seconds": 0.2, **worker},
        scoring={"enabled": True, "model_dir": str(model_dir), "device": "cpu",
                 "torch_threads": 1},
    )


# -- fast: attempts survive a restart of the node ----------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_job_counts_its_attempt_and_fails_at_max(tmp_path):
    archive = Archive(tmp_path / "node").init()
    try:
        for uid, max_attempts in (("9.1", 1), ("9.2", 2)):
            file_raw(archive, make_us(uid))
            with archive.transaction() as conn:
                conn.execute("UPDATE studies SET state = 'complete' WHERE study_uid = ?", (uid,))
                enqueue(conn, uid, "score", {}, max_attempts=max_attempts)
        dead = _dead_pid()
        assert claim(archive, pid=dead) is not None and claim(archive, pid=dead) is not None
        assert requeue_orphans(archive) == 2
        (failed,), (requeued,) = jobs_for(archive, "9.1"), jobs_for(archive, "9.2")
        assert failed["state"] == "failed" and failed["attempts"] == 1
        assert f"worker process {dead} died" in failed["last_error"]
        assert archive.study("9.1")["state"] == "failed"
        assert "died" in archive.study("9.1")["note"]
        assert requeued["state"] == "queued" and requeued["attempts"] == 1
        assert archive.study("9.2")["state"] == "complete"
        again = claim(archive)
        assert again is not None and again.study_uid == "9.2" and again.attempts == 2
    finally:
        archive.close()


def test_death_cause_names_the_signal():
    assert death_cause(-signal.SIGABRT) == "worker died: SIGABRT"
    assert death_cause(-signal.SIGKILL) == "worker died: SIGKILL"
    assert death_cause(3) == "worker died: exit code 3"


# -- slow: real scoring processes ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.network
@pytest.mark.lenient_pydicom  # the poison headers are what they are
def test_poison_studies_fail_after_max_attempts_while_valid_ones_are_delivered(
        synth_cohort, tiny_model_dir, tmp_path):
    port, pacs_port = free_port(), free_port()
    data = tmp_path / "node"
    archive = Archive(data).init()
    abort_uid, oom_uid = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102"
    file_raw(archive, jpeg_32_bit(abort_uid))
    file_raw(archive, rle_65535(oom_uid))
    archive.close()
    valid = cohort_studies(synth_cohort, 2)

    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(received), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    config = write_toml({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "data_dir": str(data),
                 "allowed_calling_aets": ["PYNETDICOM", "ECHOSCU"], "disk_reserve_mb": 0},
        "completion": {"idle_seconds": 1.0, "max_wait_seconds": 60, "poll_seconds": 0.2,
                       "require_seg": False},
        "worker": {"poll_seconds": 0.2, "retry_base_seconds": 0.2, "max_attempts": 2,
                   "max_memory_mb": 1024, "job_timeout_seconds": 300},
        "scoring": {"enabled": True, "model_dir": str(tiny_model_dir), "device": "cpu",
                    "torch_threads": 1},
        "delivery": {"retry_initial_seconds": 1, "retry_max_seconds": 2, "poll_seconds": 0.5,
                     "timeout_seconds": 10},
    }, tmp_path / "config.toml")
    with config.open("a") as f:
        f.write(f'\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                f"port = {pacs_port}\n")
    log_path = tmp_path / "serve.log"
    node = ServeProcess(config, port, log_path).start(timeout=120)
    archive = Archive(data)
    try:
        for _uid, files in valid:  # pushed while the poison is queued (the worker is loading)
            acked = store_files("127.0.0.1", port, files, calling_aet="PYNETDICOM",
                                called_aet="DICOMNODE", timeout=30)
            assert [s for _u, s in acked] == [0] * len(files)

        def settled() -> bool:
            assert node.proc is not None and node.proc.poll() is None, log_path.read_text()[-3000:]
            states = {u: (archive.study(u) or {}).get("state") for u in (abort_uid, oom_uid)}
            scored = all((archive.study(u) or {}).get("state") == "scored" for u, _f in valid)
            sent = archive.query("SELECT count(*) AS n FROM outbox WHERE state != 'sent'")
            return (scored and states[abort_uid] == "failed" and states[oom_uid] is not None
                    and states[oom_uid] not in ("receiving", "complete", "scoring")
                    and sent[0]["n"] == 0)

        wait_for(settled, timeout=400, interval=0.5)
        assert node.proc.poll() is None  # the listener never went down
        (abort_job,), (oom_job,) = jobs_for(archive, abort_uid), jobs_for(archive, oom_uid)
        assert abort_job["state"] == "failed" and abort_job["attempts"] == 2
        assert abort_job["last_error"] == "worker died: SIGABRT"
        assert "worker died: SIGABRT" in archive.study(abort_uid)["note"]
        # the 4 GiB allocation was refused under worker.max_memory_mb (without the limit it
        # succeeds and the decoder fails later on the short segment); the input gate then ends
        # the study not-applicable, with no retry and no process death
        assert oom_job["state"] == "done" and oom_job["attempts"] == 1
        assert "Unable to allocate 4.00 GiB" in archive.study(oom_uid)["note"]
        # the poison was queued first, and the valid studies were still scored on their first try
        for uid, _files in valid:
            (job,) = jobs_for(archive, uid)
            assert job["state"] == "done" and job["attempts"] == 1
            assert job["id"] > abort_job["id"]
        srs = [dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
        srs = [d for d in srs if d.Modality == "SR"]
        assert sorted(d.StudyInstanceUID for d in srs) == sorted(u for u, _f in valid)
        text = log_path.read_text()
        assert text.count("worker died: SIGABRT during a job") == 2
        assert text.count("scoring worker 0: started") == 3  # first start + one per abort
        assert "POISON" not in text
    finally:
        archive.close()
        node.stop()
        pacs.terminate()
        pacs.wait(10)


def _stopped_worker(sup: Supervisor) -> int:
    """Wait for the loaded scoring process and freeze it: the next job it gets cannot finish."""
    (pid,) = wait_for(sup.pids, timeout=180)  # type: ignore[misc]
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.slow
def test_a_job_over_its_wall_time_is_killed_and_recorded(synth_cohort, tiny_model_dir, tmp_path):
    cfg = scoring_config(tmp_path, tiny_model_dir, max_attempts=1, job_timeout_seconds=5)
    archive = Archive(cfg.node.data_dir).init()
    ((uid, files),) = cohort_studies(synth_cohort, 1)
    sup = Supervisor(archive, cfg).start()
    monitor = CompletionMonitor(archive, cfg.completion, max_attempts=1).start()
    try:
        pid = _stopped_worker(sup)  # a hung decoder, as far as the supervisor can tell
        file_valid(archive, files)
        wait_for(lambda: (archive.study(uid) or {}).get("state") == "failed", timeout=120)
        (job,) = jobs_for(archive, uid)
        assert job["state"] == "failed" and job["attempts"] == 1 and job["worker_pid"] == pid
        assert job["last_error"] == "killed: exceeded worker.job_timeout_seconds (5 s)"
        assert "exceeded worker.job_timeout_seconds" in archive.study(uid)["note"]
        # the frozen process is gone and a fresh one is loaded in its place
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        (fresh,) = wait_for(sup.pids, timeout=180)  # type: ignore[misc]
        assert fresh != pid
    finally:
        monitor.stop()
        sup.stop()
        archive.close()


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_job_counts_the_attempt_and_restarts_it(
        synth_cohort, tiny_model_dir, tmp_path):
    cfg = scoring_config(tmp_path, tiny_model_dir, max_attempts=2, job_timeout_seconds=300)
    archive = Archive(cfg.node.data_dir).init()
    ((uid, files),) = cohort_studies(synth_cohort, 1)
    sup = Supervisor(archive, cfg).start()
    monitor = CompletionMonitor(archive, cfg.completion, max_attempts=2).start()
    try:
        pid = _stopped_worker(sup)
        file_valid(archive, files)
        wait_for(lambda: [j for j in jobs_for(archive, uid)
                          if j["state"] == "running" and j["worker_pid"] == pid], timeout=60)
        os.kill(pid, signal.SIGKILL)
        (failed,) = wait_for(lambda: [j for j in jobs_for(archive, uid) if j["last_error"]],
                             timeout=60)  # type: ignore[misc]
        assert failed["last_error"] == "worker died: SIGKILL" and failed["attempts"] == 1
        wait_for(lambda: (archive.study(uid) or {}).get("state") == "scored", timeout=180)
        (job,) = jobs_for(archive, uid)
        assert job["state"] == "done" and job["attempts"] == 2
        assert sup.pids() and sup.pids()[0] != pid
    finally:
        monitor.stop()
        sup.stop()
        archive.close()


def test_a_refused_allocation_names_the_memory_limit():
    try:
        try:
            raise MemoryError("Unable to allocate 4.00 GiB")
        except MemoryError as exc:
            raise ValueError("pixel data could not be decoded") from exc
    except ValueError as exc:
        assert job_error(exc, 1024).startswith("exceeded worker.max_memory_mb (1024 MiB")
        assert job_error(exc, 0) == "ValueError: pixel data could not be decoded"
    as_text = RuntimeError("nothing to score (x: Unable to allocate 4.00 GiB for an array)")
    assert "exceeded worker.max_memory_mb" in job_error(as_text, 512)
    assert job_error(RuntimeError("no SEG"), 512) == "RuntimeError: no SEG"
