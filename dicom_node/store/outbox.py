"""The delivery outbox: one row per result file and destination, on :mod:`.durable_queue`.

States: ``pending`` (waiting for its next try) -> ``sent`` (the destination stored it) ->
``committed`` (storage commitment confirmed it; only for destinations that ask for it);
``expired`` once ``delivery.retry_horizon_hours`` passed without success (kept, listed by
``dicom-node outbox``, sendable again with ``dicom-node resend``). ``destination = "*"`` means
"every configured destination" and is expanded by the delivery loop. Paths are relative to
``data_dir``. A file is queued at most once per destination: queueing it again (a re-run of a
job whose results exist) is a no-op.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.store.db import Index, rows
from dicom_node.store.durable_queue import OUTBOX, due, record_failure

PENDING, SENT, COMMITTED, EXPIRED = "pending", "sent", "committed", "expired"
OUTBOX_STATES = (PENDING, SENT, COMMITTED, EXPIRED)
DELIVERED = (SENT, COMMITTED)
ANY_DESTINATION = "*"


@dataclass(frozen=True)
class OutboxItem:
    """One file to deliver to one destination."""

    study_uid: str
    destination: str
    path: str  # relative to data_dir
    sop_uid: str
    result_key: str = ""


def add_items(conn: sqlite3.Connection, items: Iterable[OutboxItem], *,
              now: float | None = None) -> list[int]:
    """Queue items in the caller's transaction; an item already queued keeps its row."""
    now = time.time() if now is None else now
    ids: list[int] = []
    for it in items:
        old = conn.execute("SELECT id FROM outbox WHERE sop_uid = ? AND destination = ? "
                           "ORDER BY id LIMIT 1", (it.sop_uid, it.destination)).fetchone()
        if old is not None:
            ids.append(int(old[0]))
            continue
        cur = conn.execute(
            "INSERT INTO outbox (study_uid, destination, path, sop_uid, state, attempts, "
            "next_attempt_at, last_error, created_at, sent_at, result_key) "
            "VALUES (?, ?, ?, ?, ?, 0, ?, '', ?, NULL, ?)",
            (it.study_uid, it.destination, it.path, it.sop_uid, PENDING, now, now, it.result_key),
        )
        ids.append(int(cur.lastrowid or 0))
    return ids


def expand_any(index: Index, destinations: Sequence[str]) -> int:
    """Replace ``"*"`` rows by one row per configured destination (kept if none configured)."""
    if not destinations:
        return 0
    with index.transaction() as conn:
        olds = rows(conn, "SELECT * FROM outbox WHERE destination = ? AND state = ?",
                    (ANY_DESTINATION, PENDING))
        for r in olds:
            add_items(conn, [OutboxItem(r["study_uid"], name, r["path"], r["sop_uid"],
                                        r["result_key"] or "") for name in destinations],
                      now=r["created_at"])
            conn.execute("DELETE FROM outbox WHERE id = ?", (r["id"],))
    return len(olds)


def due_items(index: Index, now: float) -> list[dict[str, Any]]:
    """Pending rows due now, grouped for sending: by study, destination, id."""
    with index.transaction() as conn:
        return due(conn, OUTBOX, now, order_by="study_uid, destination, id")


def record_sent(index: Index, sent: Sequence[dict[str, Any]], *, now: float,
                transaction_uid: str | None = None) -> None:
    """Rows the destination stored (attempt counted); a commitment transaction if one was asked."""
    with index.transaction() as conn:
        for r in sent:
            conn.execute(
                "UPDATE outbox SET state = ?, sent_at = ?, last_error = '', attempts = ?, "
                "transaction_uid = ? WHERE id = ?",
                (SENT, now, int(r["attempts"] or 0) + 1, transaction_uid, r["id"]),
            )


def record_failed(index: Index, failed: Sequence[dict[str, Any]], why: str, *, now: float,
                  horizon_seconds: float, delay: Any) -> dict[str, int]:
    """A failed attempt per row: next try after ``delay(attempts)``, or ``expired`` at the horizon.

    ``retryable=False`` failures still retry (an operator may fix the file or the PACS), but the
    horizon bounds them like any other.
    """
    counts = {"failed": 0, "expired": 0}
    with index.transaction() as conn:
        for r in failed:
            attempts = int(r["attempts"] or 0) + 1
            deadline = float(r["created_at"]) + horizon_seconds
            retry_at = None if now >= deadline else min(now + delay(attempts), deadline)
            if record_failure(conn, OUTBOX, r["id"], attempts=attempts, error=why,
                              retry_at=retry_at, now=now):
                counts["failed"] += 1
            else:
                counts["expired"] += 1
    return counts


def make_due(index: Index, item_id: int | None = None, *, now: float | None = None) -> list[int]:
    """``dicom-node resend``: undelivered rows (or one of them) become pending and due now."""
    now = time.time() if now is None else now
    where, params = "state IN (?, ?)", [PENDING, EXPIRED]
    params_: list[str | int] = list(params)
    if item_id is not None:
        where += " AND id = ?"
        params_.append(item_id)
    with index.transaction() as conn:
        ids = [int(r[0]) for r in conn.execute(f"SELECT id FROM outbox WHERE {where}", params_)]
        for rid in ids:
            conn.execute("UPDATE outbox SET state = ?, next_attempt_at = ? WHERE id = ?",
                         (PENDING, now, rid))
    return ids


def outbox_rows(index: Index, states: Sequence[str] = (PENDING, EXPIRED)) -> list[dict[str, Any]]:
    """Outbox rows in the given states, oldest first."""
    marks = ",".join("?" * len(states))
    return index.query(f"SELECT * FROM outbox WHERE state IN ({marks}) ORDER BY id", tuple(states))


def outbox_summary(index: Index) -> dict[str, dict[str, int]]:
    """``{study_uid: {state: count}}`` for ``dicom-node studies``."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in index.query("SELECT study_uid, state, count(*) AS n FROM outbox "
                         "GROUP BY study_uid, state"):
        out[r["study_uid"]][str(r["state"])] = int(r["n"])
    return dict(out)
