"""Read-only named queries for operators: metrics gauges, the status page, destination health.

They run on a ``mode=ro`` connection of their own, so a scrape or a page view can never change
(or lock for writing) the index the listener and the worker write to. Every function tolerates
an index that does not exist yet or lacks a table (a node that has received nothing).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path


@contextmanager
def read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection with rows addressable by column name."""
    uri = f"file:{Path(db_path).resolve()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
        conn.row_factory = sqlite3.Row
        yield conn


def tables(conn: sqlite3.Connection) -> set[str]:
    """Names of the tables the index has."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def study_state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Studies by state."""
    if "studies" not in tables(conn):
        return {}
    return {str(r[0]): int(r[1])
            for r in conn.execute("SELECT state, count(*) FROM studies GROUP BY state")}


def outbox_state_counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """Outbox items by (destination, state)."""
    if "outbox" not in tables(conn):
        return {}
    return {(str(r[0]), str(r[1])): int(r[2]) for r in conn.execute(
        "SELECT destination, state, count(*) FROM outbox GROUP BY destination, state")}


# queue name -> (table, which rows wait)
_WAITING = {"jobs": ("jobs", "state IN ('queued', 'running')"),
            "outbox": ("outbox", "state = 'pending'")}


def queue_backlog(conn: sqlite3.Connection) -> dict[str, tuple[int, float | None]]:
    """Per queue (jobs, outbox): items waiting and the creation time of the oldest one."""
    have = tables(conn)
    out: dict[str, tuple[int, float | None]] = {}
    for name, (table, where) in _WAITING.items():
        if table in have:
            n, oldest = conn.execute(
                f"SELECT count(*), min(created_at) FROM {table} WHERE {where}").fetchone()
            out[name] = (int(n), None if oldest is None else float(oldest))
    return out


def destination_health(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Per destination: last successful send, pending and expired counts, the latest error."""
    if "outbox" not in tables(conn):
        return []
    return conn.execute(
        "SELECT destination, max(sent_at) AS last_sent, "
        "sum(state = 'pending') AS pending, sum(state = 'expired') AS expired, "
        "(SELECT last_error FROM outbox o2 WHERE o2.destination = o.destination AND "
        " o2.state != 'sent' AND o2.last_error != '' ORDER BY o2.id DESC LIMIT 1) AS error "
        "FROM outbox o GROUP BY destination"
    ).fetchall()


def recent_studies(conn: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The ``limit`` most recently received studies (state, last received, note)."""
    if "studies" not in tables(conn):
        return []
    return conn.execute(
        "SELECT study_uid, state, last_received, note FROM studies "
        "ORDER BY last_received DESC LIMIT ?", (limit,),
    ).fetchall()


def latest_jobs(conn: sqlite3.Connection, study_uids: Sequence[str]) -> dict[str, sqlite3.Row]:
    """The newest job of each of these studies (state, attempts, last error)."""
    if not study_uids or "jobs" not in tables(conn):
        return {}
    marks = ",".join("?" * len(study_uids))
    return {j["study_uid"]: j for j in conn.execute(
        f"SELECT study_uid, state, attempts, last_error FROM jobs WHERE id IN "
        f"(SELECT max(id) FROM jobs WHERE study_uid IN ({marks}) GROUP BY study_uid)",
        list(study_uids))}


def outbox_by_study(conn: sqlite3.Connection, study_uids: Sequence[str]) -> list[sqlite3.Row]:
    """Outbox items of these studies by state, with the latest error of each state."""
    if not study_uids or "outbox" not in tables(conn):
        return []
    marks = ",".join("?" * len(study_uids))
    return conn.execute(
        f"SELECT study_uid, state, count(*) AS n, max(last_error) AS err FROM outbox "
        f"WHERE study_uid IN ({marks}) GROUP BY study_uid, state", list(study_uids),
    ).fetchall()
