"""Persistent job queue and worker: atomic claims, backoff, failure, orphan re-queue."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicom_node.config import WorkerConfig
from dicom_node.loop import PollingLoop
from dicom_node.store.archive import Archive
from dicom_node.store.outbox import OutboxItem, add_items
from dicom_node.store.queue import (
    backoff_delay,
    claim,
    enqueue,
    fail_job,
    jobs_for,
    mark_done,
    mark_failed,
    requeue_orphans,
)
from dicom_node.worker import JobContext, Worker, run_one


@pytest.fixture
def archive(tmp_path):
    a = Archive(tmp_path / "node").init()
    yield a
    a.close()


def _study(archive: Archive, uid: str, state: str = "complete") -> None:
    with archive.transaction() as conn:
        conn.execute(
            "INSERT INTO studies (study_uid, patient_id, state, first_received, last_received, "
            "receiving_since, missing_seg, reopen_count, note) "
            "VALUES (?, 'P', ?, 0, 0, 0, 0, 0, '')",
            (uid, state),
        )


def _job(archive: Archive, uid: str, max_attempts: int = 3, payload: dict | None = None) -> int:
    _study(archive, uid)
    with archive.transaction() as conn:
        return enqueue(conn, uid, "score", payload or {"k": uid}, max_attempts=max_attempts)


def test_concurrent_claims_take_each_job_once(archive):
    for i in range(40):
        _job(archive, f"1.{i}")
    claimed: list[int] = []
    lock = threading.Lock()

    def grab():
        while (job := claim(archive)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == list(range(1, 41))
    assert {j["state"] for j in archive.query("SELECT state FROM jobs")} == {"running"}
    assert {s["state"] for s in archive.query("SELECT state FROM studies")} == {"scoring"}


def test_claims_from_two_processes_never_overlap(archive, tmp_path):
    for i in range(30):
        _job(archive, f"2.{i}")
    code = (
        "import sys; from dicom_node.store.archive import Archive\n"
        "from dicom_node.store.queue import claim\n"
        "a = Archive(sys.argv[1]).init(); ids = []\n"
        "while (j := claim(a)) is not None: ids.append(j.id)\n"
        "print(' '.join(map(str, ids)))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(archive.data_dir)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    ids = [int(x) for out in outs for x in out.split()]
    assert sorted(ids) == list(range(1, 31))


def test_retry_with_backoff_then_failed(archive):
    uid = "3.1"
    _job(archive, uid, max_attempts=2)
    job = claim(archive)
    t0 = time.time()
    assert mark_failed(archive, job, "boom 1", retry_base_seconds=100) is True
    row = jobs_for(archive, uid)[0]
    assert row["state"] == "queued" and row["last_error"] == "boom 1"
    assert row["next_attempt_at"] >= t0 + 100  # not due yet
    assert archive.study(uid)["state"] == "complete"
    assert claim(archive) is None
    job = claim(archive, now=t0 + 101)
    assert job is not None and job.attempts == 2
    assert mark_failed(archive, job, "boom 2", retry_base_seconds=100) is False
    row = jobs_for(archive, uid)[0]
    assert row["state"] == "failed" and row["last_error"] == "boom 2" and row["attempts"] == 2
    study = archive.study(uid)
    assert study["state"] == "failed" and "boom 2" in study["note"]


def test_requeue_jobs_of_dead_process(archive):
    _job(archive, "4.1")
    _job(archive, "4.2")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim(archive, pid=dead.pid)  # left running by a process that is gone
    alive = claim(archive, pid=1)  # pid 1 exists: its job must stay running
    assert alive is not None
    assert requeue_orphans(archive) == 1
    states = {j["study_uid"]: j["state"] for j in archive.query("SELECT * FROM jobs")}
    assert states == {"4.1": "queued", "4.2": "running"}
    assert archive.study("4.1")["state"] == "complete"
    job = claim(archive)
    assert job is not None and job.study_uid == "4.1" and job.attempts == 2


def test_job_of_a_zombie_process_is_requeued(archive):
    """A scoring process killed with its node stays a zombie until reaped (a container's init
    may never reap it): its job must not stay ``running`` for ever."""
    _job(archive, "4.z")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited but not yet reaped by us: a real zombie
        state = Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    assert state == "Z"
    try:
        claim(archive, pid=zombie.pid)
        assert requeue_orphans(archive) == 1
        assert jobs_for(archive, "4.z")[0]["state"] == "queued"
    finally:
        zombie.wait()


def test_worker_survives_failing_processor_and_passes_context(archive, tmp_path):
    _job(archive, "5.bad", max_attempts=2, payload={"missing_seg": True})
    _job(archive, "5.good", payload={"missing_seg": False})
    seen: list[JobContext] = []

    def processor(ctx: JobContext) -> None:
        seen.append(ctx)
        if ctx.study_uid == "5.bad":
            raise RuntimeError("model exploded")
        ctx.note = "scored ok"

    worker = Worker(archive, processor, WorkerConfig(max_attempts=2, retry_base_seconds=0.05,
                                                     poll_seconds=0.05)).start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            states = {j["study_uid"]: j["state"] for j in archive.query("SELECT * FROM jobs")}
            if states == {"5.bad": "failed", "5.good": "done"}:
                break
            time.sleep(0.05)
    finally:
        worker.stop()
    assert states == {"5.bad": "failed", "5.good": "done"}
    good_row = archive.study("5.good")
    assert good_row["state"] == "scored" and good_row["note"] == "scored ok"
    bad = archive.study("5.bad")
    assert bad["state"] == "failed" and "model exploded" in bad["note"]
    assert [c.attempt for c in seen if c.study_uid == "5.bad"] == [1, 2]
    good = next(c for c in seen if c.study_uid == "5.good")
    assert good.payload == {"missing_seg": False} and good.data_dir == archive.data_dir
    assert good.paths == ()  # no instances archived for this synthetic study


def test_run_one_returns_false_on_empty_queue(archive):
    assert run_one(archive, lambda ctx: None, WorkerConfig()) is False


def test_a_dead_worker_counts_as_an_attempt_and_ends_failed(archive):
    """Each death of the process running a job is one attempt: no endless re-queueing."""
    _job(archive, "7.poison", max_attempts=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = claim(archive, pid=dead.pid)
    assert first is not None and first.study_uid == "7.poison"
    assert requeue_orphans(archive) == 1
    row = jobs_for(archive, "7.poison")[0]
    assert (row["state"], row["attempts"]) == ("queued", 1) and "died" in row["last_error"]
    again = claim(archive, pid=dead.pid)
    assert again is not None and again.id == first.id and again.attempts == 2
    # a supervisor records the death by job id alone
    assert fail_job(archive, again.id, "scoring process killed by SIGKILL",
                    retry_base_seconds=1) is False
    row = jobs_for(archive, "7.poison")[0]
    assert (row["state"], row["attempts"]) == ("failed", 2) and "SIGKILL" in row["last_error"]
    assert archive.study("7.poison")["state"] == "failed"
    _job(archive, "7.next")
    nxt = claim(archive)
    assert nxt is not None and nxt.study_uid == "7.next"


def test_mark_done_queues_the_results_in_the_same_transaction(archive):
    _job(archive, "8.1")
    job = claim(archive)
    items = [OutboxItem("8.1", "pacs", f"results/x/{i}.dcm", f"9.{i}", "key") for i in range(3)]
    mark_done(archive, job, note="ok", outbox=items)
    rows = archive.query("SELECT destination, path, sop_uid, state, result_key FROM outbox")
    assert [(r["sop_uid"], r["state"], r["result_key"]) for r in rows] == [
        (f"9.{i}", "pending", "key") for i in range(3)]
    # queueing the same files again (a re-run of the same study version) adds nothing
    with archive.transaction() as conn:
        add_items(conn, items)
    assert len(archive.query("SELECT id FROM outbox")) == 3
    # a failure inside the transaction leaves neither the rows nor the job done
    _job(archive, "8.2")
    job2 = claim(archive)
    bad = [OutboxItem("8.2", "pacs", "results/y.dcm", "9.9"), None]
    with pytest.raises(AttributeError):
        mark_done(archive, job2, outbox=bad)  # type: ignore[list-item]
    assert jobs_for(archive, "8.2")[0]["state"] == "running"
    assert not archive.query("SELECT id FROM outbox WHERE study_uid = '8.2'")


def test_backoff_delay_doubles_to_the_ceiling_with_bounded_jitter():
    rng = random.Random(7)
    assert [backoff_delay(a, 2.0) for a in range(1, 5)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_delay(10, 2.0, 60.0) == 60.0
    spread = [backoff_delay(3, 2.0, 60.0, 0.25, rng) for _ in range(200)]
    assert all(6.0 <= d <= 10.0 for d in spread) and max(spread) - min(spread) > 1.0


def test_polling_loop_survives_a_failing_pass_and_wakes_early():
    calls: list[float] = []
    done = threading.Event()

    class Flaky(PollingLoop):
        name = "flaky"

        def poll(self) -> bool:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise RuntimeError("first pass fails")
            if len(calls) == 3:
                done.set()
            return False

    loop = Flaky(poll_seconds=3600).start()  # without wake() the second pass would take an hour
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.wake()
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.wake()
        assert done.wait(10)
    finally:
        loop.stop(timeout=5)
    assert len(calls) == 3 and loop.stopping
