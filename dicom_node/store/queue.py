"""The scoring-job queue (``jobs``) on the durable-queue primitive (:mod:`.durable_queue`).

``queued -> running -> done | failed``. A claim is one ``UPDATE ... WHERE id = (SELECT ...)
RETURNING`` inside ``BEGIN IMMEDIATE`` that also counts the attempt, so two workers (threads or
processes) never take the same job and every start counts; a failed attempt is retried after
:func:`backoff_delay` until ``max_attempts``, then the job and its study are ``failed``.

Job API (what the worker and a process supervisor use): :func:`enqueue`, :func:`claim`,
:func:`mark_done`, :func:`mark_failed` (or :func:`fail_job` by id, e.g. when the process running
it died), :func:`requeue_orphans`, :func:`jobs_for`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.store.db import Index
from dicom_node.store.durable_queue import JOBS, backoff_delay, record_failure
from dicom_node.store.outbox import OutboxItem, add_items

__all__ = ["JOB_STATES", "Job", "backoff_delay", "claim", "enqueue", "fail_job", "jobs_for",
           "mark_done", "mark_failed", "requeue_orphans"]

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "done", "failed")


# ------------------------------------------------------------------------------------------
# Scoring jobs
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One row of ``jobs`` as the worker sees it after claiming it."""

    id: int
    study_uid: str
    kind: str
    attempts: int
    max_attempts: int
    payload: dict[str, Any]


def enqueue(conn: sqlite3.Connection, study_uid: str, kind: str, payload: dict[str, Any], *,
            max_attempts: int, now: float | None = None) -> int:
    """Insert a queued job using the caller's open transaction; return its id."""
    now = time.time() if now is None else now
    cur = conn.execute(
        "INSERT INTO jobs (study_uid, kind, state, attempts, max_attempts, next_attempt_at, "
        "last_error, created_at, updated_at, worker_pid, payload) "
        "VALUES (?, ?, 'queued', 0, ?, ?, NULL, ?, ?, NULL, ?)",
        (study_uid, kind, max_attempts, now, now, now, json.dumps(payload)),
    )
    return int(cur.lastrowid or 0)


def claim(index: Index, *, pid: int | None = None, now: float | None = None) -> Job | None:
    """Atomically take the oldest due queued job (attempts += 1), or return None."""
    pid = os.getpid() if pid is None else pid
    now = time.time() if now is None else now
    with index.transaction() as conn:
        row = conn.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_pid = ?, "
            "updated_at = ? WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND "
            "next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT 1) AND state = 'queued' "
            "RETURNING id, study_uid, kind, attempts, max_attempts, payload",
            (pid, now, now),
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            "UPDATE studies SET state = 'scoring' WHERE study_uid = ? AND state = 'complete'",
            (row[1],),
        )
    return Job(id=row[0], study_uid=row[1], kind=row[2], attempts=row[3], max_attempts=row[4],
               payload=json.loads(row[5] or "{}"))


def mark_done(index: Index, job: Job, *, note: str = "",
              outbox: Sequence[OutboxItem] = (), study_state: str = "scored",
              images: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Job finished: study ``scored`` (unless re-opened meanwhile), its results queued.

    ``study_state`` ``not-applicable`` ends a study that has nothing the model may score (its
    note says why): finished without retries, but no sarcopenia verdict. ``images`` (per image:
    ``sop_uid``, ``scored``, ``reason``) replaces the study's per-image record when given.

    ``outbox`` items are inserted in the same transaction, so a job is never ``done`` without
    its results queued for delivery.
    """
    if study_state not in ("scored", "not-applicable"):
        raise ValueError(f"a finished job ends its study scored or not-applicable, not "
                         f"{study_state!r}")
    now = time.time()
    with index.transaction() as conn:
        add_items(conn, outbox, now=now)
        conn.execute("UPDATE jobs SET state = 'done', last_error = NULL, updated_at = ? "
                     "WHERE id = ?",
                     (now, job.id))
        conn.execute(
            "UPDATE studies SET state = ?, note = ? WHERE study_uid = ? "
            "AND state = 'scoring'",
            (study_state, note, job.study_uid),
        )
        if images is not None:
            conn.execute("UPDATE studies SET images = ? WHERE study_uid = ?",
                         (json.dumps([dict(i) for i in images]), job.study_uid))


def fail_job(index: Index, job_id: int, error: str, *, retry_base_seconds: float,
             now: float | None = None) -> bool:
    """Record a failed attempt of job ``job_id`` (claimed, so already counted); True if retried.

    Use this when only the id is known, e.g. the process running it died. At ``max_attempts``
    the job is ``failed`` and its study marked with the reason, so later studies flow.
    """
    now = time.time() if now is None else now
    with index.transaction() as conn:
        row = conn.execute("SELECT study_uid, attempts, max_attempts FROM jobs WHERE id = ?",
                           (job_id,)).fetchone()
        if row is None:
            return False
        study_uid, attempts, max_attempts = row[0], int(row[1] or 0), int(row[2] or 1)
        retry = attempts < max_attempts
        retry_at = now + backoff_delay(attempts, retry_base_seconds) if retry else None
        record_failure(conn, JOBS, job_id, attempts=attempts, error=error, retry_at=retry_at,
                       now=now)
        if retry:
            conn.execute(
                "UPDATE studies SET state = 'complete' WHERE study_uid = ? AND state = 'scoring'",
                (study_uid,),
            )
        else:
            conn.execute(
                "UPDATE studies SET state = 'failed', note = ? WHERE study_uid = ? "
                "AND state = 'scoring'",
                (f"job {job_id} failed after {attempts} attempts: {error}"[:2000], study_uid),
            )
    return retry


def mark_failed(index: Index, job: Job, error: str, *, retry_base_seconds: float) -> bool:
    """Record a failed attempt; re-queue with backoff or fail for good. Return True if retried."""
    return fail_job(index, job.id, error, retry_base_seconds=retry_base_seconds)


def _alive(pid: int | None) -> bool:
    """True if ``pid`` is a running process.

    A zombie counts as dead: a scoring process killed with its node (SIGKILL via PDEATHSIG)
    stays a zombie until its new parent reaps it, and a container's init may never do that;
    treating it as alive would leave its job ``running`` for ever.
    """
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (not Linux) or gone meanwhile
        return True
    # the state letter follows the command name, which is in parentheses and may hold spaces
    return stat[stat.rfind(")") + 2:stat.rfind(")") + 3] not in ("Z", "X")


def requeue_orphans(index: Index, *, retry_base_seconds: float = 0.0) -> int:
    """Jobs left ``running`` by dead processes (or an earlier life of this pid): a failed attempt.

    The claim already counted the attempt, so a job whose process keeps dying ends ``failed``
    after ``max_attempts`` instead of being retried for ever.
    """
    me = os.getpid()
    rows = index.query("SELECT id, study_uid, worker_pid FROM jobs WHERE state = 'running'")
    orphans = [r for r in rows if r["worker_pid"] == me or not _alive(r["worker_pid"])]
    for r in orphans:
        retried = fail_job(index, r["id"], f"worker process {r['worker_pid']} died",
                           retry_base_seconds=retry_base_seconds)
        log.warning("job %s (study %s): its worker process %s is gone; %s", r["id"],
                    r["study_uid"], r["worker_pid"], "re-queued" if retried else "failed")
    return len(orphans)


def jobs_for(index: Index, study_uid: str) -> list[dict[str, Any]]:
    """All jobs of one study, oldest first."""
    return index.query("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,))
