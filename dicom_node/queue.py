"""Persistent job queue in the index database (``jobs`` table): queued -> running -> done/failed.

Claims are one ``UPDATE ... WHERE id = (SELECT ...) RETURNING *`` inside ``BEGIN IMMEDIATE``, so
two workers (threads or processes) can never take the same job. A job left ``running`` by a
process that died counts as a failed attempt at start-up (re-queued, or failed at
``max_attempts``). Failures are retried with exponential
backoff until ``max_attempts``; the last error is always kept.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from dicom_node.archive import Archive

log = logging.getLogger(__name__)


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


def claim(archive: Archive, *, pid: int | None = None, now: float | None = None) -> Job | None:
    """Atomically take the oldest due queued job (attempts += 1), or return None."""
    pid = os.getpid() if pid is None else pid
    now = time.time() if now is None else now
    with archive.transaction() as conn:
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


def mark_done(archive: Archive, job: Job, *, note: str = "") -> None:
    """Job finished: study ``scored`` (unless a new instance re-opened it meanwhile)."""
    now = time.time()
    with archive.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done', last_error = NULL, updated_at = ? WHERE id = ?",
                     (now, job.id))
        conn.execute(
            "UPDATE studies SET state = 'scored', note = ? WHERE study_uid = ? AND state = 'scoring'",
            (note, job.study_uid),
        )


def mark_failed(archive: Archive, job: Job, error: str, *, retry_base_seconds: float) -> bool:
    """Record a failed attempt; re-queue with backoff or fail for good. Return True if retried."""
    now = time.time()
    error = error[:2000]
    retry = job.attempts < job.max_attempts
    with archive.transaction() as conn:
        if retry:
            delay = retry_base_seconds * 2 ** (job.attempts - 1)
            conn.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ?, last_error = ?, "
                "updated_at = ?, worker_pid = NULL WHERE id = ?",
                (now + delay, error, now, job.id),
            )
            conn.execute(
                "UPDATE studies SET state = 'complete' WHERE study_uid = ? AND state = 'scoring'",
                (job.study_uid,),
            )
        else:
            conn.execute(
                "UPDATE jobs SET state = 'failed', last_error = ?, updated_at = ? WHERE id = ?",
                (error, now, job.id),
            )
            conn.execute(
                "UPDATE studies SET state = 'failed', note = ? WHERE study_uid = ? AND state = 'scoring'",
                (f"job {job.id} failed after {job.attempts} attempts: {error}"[:2000], job.study_uid),
            )
    return retry


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_orphans(archive: Archive, *, retry_base_seconds: float = 0.0) -> int:
    """Count jobs left ``running`` by dead processes as failed attempts (re-queued or failed).

    The attempt was used up when the job was claimed; a process that died during it (often
    because of that very study) must not get it back, or a poison study would loop for ever.
    """
    me = os.getpid()
    rows = archive.query("SELECT id, study_uid, kind, attempts, max_attempts, payload, worker_pid "
                         "FROM jobs WHERE state = 'running'")
    orphans = [r for r in rows if r["worker_pid"] == me or not _alive(r["worker_pid"])]
    for r in orphans:
        job = Job(id=r["id"], study_uid=r["study_uid"], kind=r["kind"], attempts=r["attempts"],
                  max_attempts=r["max_attempts"], payload=json.loads(r["payload"] or "{}"))
        retried = mark_failed(archive, job, f"worker process {r['worker_pid']} died during the job",
                              retry_base_seconds=retry_base_seconds)
        log.warning("job %s (study %s): worker process %s died during attempt %d/%d; %s",
                    job.id, job.study_uid, r["worker_pid"], job.attempts, job.max_attempts,
                    "re-queued" if retried else "failed")
    return len(orphans)


def jobs_for(archive: Archive, study_uid: str) -> list[dict[str, Any]]:
    """All jobs of one study, oldest first."""
    return archive.query("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,))
