"""The durable-queue primitive: rows with a state, attempts, a next-try time and the last error.

It serves both queues of the index: scoring jobs (:mod:`dicom_node.store.queue`, :data:`JOBS`:
``queued -> running -> done | failed``) and the delivery outbox (:mod:`dicom_node.store.outbox`,
:data:`OUTBOX`: ``pending -> sent [-> committed] | expired``). A failed attempt is retried after
:func:`backoff_delay` until the row's budget is spent, then the row moves to its queue's terminal
failure state; the last error is always kept.
"""

from __future__ import annotations

import math
import random
import sqlite3
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QueueSpec:
    """The state names of one queue table."""

    table: str
    ready: str  # waiting for its next try
    done: str  # finished successfully
    dead: str  # given up; kept with its last error
    active: str | None = None  # claimed by a worker (None: rows are never claimed)


JOBS = QueueSpec("jobs", ready="queued", done="done", dead="failed", active="running")
OUTBOX = QueueSpec("outbox", ready="pending", done="sent", dead="expired")


def backoff_delay(attempts: int, initial: float, maximum: float = math.inf, jitter: float = 0.0,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failure (the node's one retry rule).

    Doubles from ``initial`` up to ``maximum``, times a random factor in
    ``[1 - jitter, 1 + jitter]`` so that many rows failing together (a PACS outage) do not all
    come back at the same instant.
    """
    base = float(min(initial * 2 ** max(attempts - 1, 0), maximum))
    if jitter <= 0:
        return base
    return base * float((rng or random).uniform(1.0 - jitter, 1.0 + jitter))


def record_failure(conn: sqlite3.Connection, spec: QueueSpec, row_id: int, *, attempts: int,
                   error: str, retry_at: float | None, now: float) -> bool:
    """Record a failed attempt of one row in the caller's transaction.

    Args:
        attempts: the row's attempt count after this attempt.
        retry_at: when to try again, or None to give up (the row moves to ``spec.dead``).

    Returns:
        True if the row will be retried.
    """
    # jobs: a failed job keeps the pid of the process that ran its last attempt (the record names
    # it); a re-queued one is nobody's until claimed again
    extra_params: tuple[float, ...] = (now,) if spec is JOBS else ()
    if retry_at is None:
        extra = ", updated_at = ?" if spec is JOBS else ""
        conn.execute(
            f"UPDATE {spec.table} SET state = ?, attempts = ?, last_error = ?{extra} WHERE id = ?",
            (spec.dead, attempts, error[:2000], *extra_params, row_id),
        )
        return False
    extra = ", worker_pid = NULL, updated_at = ?" if spec is JOBS else ""
    conn.execute(
        f"UPDATE {spec.table} SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?"
        f"{extra} WHERE id = ?",
        (spec.ready, attempts, retry_at, error[:2000], *extra_params, row_id),
    )
    return True


def due(conn: sqlite3.Connection, spec: QueueSpec, now: float,
        order_by: str = "next_attempt_at, id") -> list[dict[str, Any]]:
    """Rows ready for a try now, in the given order."""
    cur = conn.execute(
        f"SELECT * FROM {spec.table} WHERE state = ? AND next_attempt_at <= ? ORDER BY {order_by}",
        (spec.ready, now),
    )
    names = [c[0] for c in cur.description or ()]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
