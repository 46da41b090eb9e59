"""The delivery outbox: one row per result file and destination, on :mod:`.durable_queue`.

States: ``pending`` (waiting for its next try) -> ``sent`` (the destination stored it) ->
``committed`` (the PACS confirmed it keeps it: a storage commitment N-EVENT-REPORT for a DIMSE
destination with ``storage_commitment = true``, or the per-instance success a STOW-RS response
lists). A ``sent`` row waiting on a commitment transaction that is refused or not answered within
``storage_commitment_timeout_seconds`` goes back to ``pending`` and is sent again;
``expired`` once ``delivery.retry_horizon_hours`` passed without success (kept, listed by
``dicom-node outbox``, sendable again with ``dicom-node resend``). ``destination = "*"`` means
"every configured destination" and is expanded by the delivery loop. Paths are relative to
``data_dir``. A file is queued at most once per destination: queueing it again (a re-run of a
job whose results exist) is a no-op.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
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
                transaction_uid: str | None = None,
                committed: Collection[str] = ()) -> None:
    """Rows the destination stored (attempt counted).

    Args:
        transaction_uid: the storage commitment transaction the rows now wait on (``sent``
            until :func:`apply_commitment_reports` sees the PACS's answer).
        committed: SOP Instance UIDs already confirmed (a STOW-RS ``ReferencedSOPSequence``, or
            an N-EVENT-REPORT that came on the sending association): ``committed`` at once.
    """
    with index.transaction() as conn:
        for r in sent:
            done = r["sop_uid"] in committed
            conn.execute(
                "UPDATE outbox SET state = ?, sent_at = ?, last_error = '', attempts = ?, "
                "transaction_uid = ?, committed_at = ? WHERE id = ?",
                (COMMITTED if done else SENT, now, int(r["attempts"] or 0) + 1, transaction_uid,
                 now if done else None, r["id"]),
            )


# ------------------------------------------------------------------------------------------
# Storage commitment
# ------------------------------------------------------------------------------------------


def save_commitment_report(index: Index, transaction_uid: str, committed: Sequence[str],
                           failed: Mapping[str, int], *, calling_aet: str = "",
                           now: float | None = None) -> int:
    """Keep one N-EVENT-REPORT durably (the listener or the sending association received it).

    Applying it is left to the delivery loop (:func:`apply_commitment_reports`), so a report
    that arrives before the sender wrote the transaction UID on its rows is not lost.
    """
    now = time.time() if now is None else now
    with index.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO commitment_reports (transaction_uid, calling_aet, received_at, committed, "
            "failed, applied_at) VALUES (?, ?, ?, ?, ?, NULL)",
            (transaction_uid, calling_aet, now, json.dumps(list(committed)),
             json.dumps({k: int(v) for k, v in failed.items()})),
        )
    return int(cur.lastrowid or 0)


def _uncommit(conn: sqlite3.Connection, r: dict[str, Any], why: str, *, now: float,
              horizon_seconds: float, delay: Callable[[int], float]) -> bool:
    """A ``sent`` row the PACS did not commit: pending again after backoff, or ``expired``.

    The attempt was already counted when it was sent. Returns True if it will be retried.
    """
    attempts = int(r["attempts"] or 0)
    deadline = float(r["created_at"]) + horizon_seconds
    retry_at = None if now >= deadline else min(now + delay(attempts), deadline)
    retried = record_failure(conn, OUTBOX, r["id"], attempts=attempts, error=why,
                             retry_at=retry_at, now=now)
    conn.execute("UPDATE outbox SET transaction_uid = NULL WHERE id = ?", (r["id"],))
    return retried


def apply_commitment_reports(index: Index, *, now: float, horizon_seconds: float,
                             delay: Callable[[int], float]) -> dict[str, int]:
    """Apply every unapplied report to the ``sent`` rows of its transaction.

    Committed instances become ``committed``; failed ones go back to ``pending`` (backoff) with
    the PACS's failure reason, or ``expired`` past the horizon. Instances a report does not name
    stay ``sent`` until :func:`overdue_commitments` gives up on them.
    """
    counts = {"committed": 0, "failed": 0, "expired": 0, "unknown": 0}
    with index.transaction() as conn:
        for rep in rows(conn, "SELECT * FROM commitment_reports WHERE applied_at IS NULL "
                              "ORDER BY id"):
            waiting = {r["sop_uid"]: r for r in rows(
                conn, "SELECT * FROM outbox WHERE transaction_uid = ? AND state = ?",
                (rep["transaction_uid"], SENT))}
            if not waiting:
                counts["unknown"] += 1
            for uid in json.loads(rep["committed"] or "[]"):
                for r in [waiting.pop(uid)] if uid in waiting else []:
                    conn.execute("UPDATE outbox SET state = ?, committed_at = ? WHERE id = ?",
                                 (COMMITTED, now, r["id"]))
                    counts["committed"] += 1
            for uid, reason in json.loads(rep["failed"] or "{}").items():
                if uid in waiting:
                    why = (f"storage commitment refused by {rep['calling_aet'] or 'the PACS'}: "
                           f"failure reason 0x{int(reason):04X}")
                    retried = _uncommit(conn, waiting.pop(uid), why, now=now,
                                        horizon_seconds=horizon_seconds, delay=delay)
                    counts["failed" if retried else "expired"] += 1
            conn.execute("UPDATE commitment_reports SET applied_at = ? WHERE id = ?",
                         (now, rep["id"]))
        # applied reports are only an audit trail: kept as long as an item may be retried
        conn.execute("DELETE FROM commitment_reports WHERE applied_at IS NOT NULL AND "
                     "applied_at < ?", (now - horizon_seconds,))
    return counts


def overdue_commitments(index: Index, timeouts: Mapping[str, float], *, now: float,
                        horizon_seconds: float, delay: Callable[[int], float]) -> dict[str, int]:
    """``sent`` rows whose commitment report did not come within their destination's timeout
    go back to ``pending`` (sent again under a new transaction) or ``expired``."""
    counts = {"failed": 0, "expired": 0}
    with index.transaction() as conn:
        for dest, timeout in timeouts.items():
            for r in rows(conn, "SELECT * FROM outbox WHERE destination = ? AND state = ? AND "
                                "transaction_uid IS NOT NULL AND sent_at <= ?",
                          (dest, SENT, now - timeout)):
                why = f"no storage commitment report within {timeout:g} s; sending again"
                retried = _uncommit(conn, r, why, now=now, horizon_seconds=horizon_seconds,
                                    delay=delay)
                counts["failed" if retried else "expired"] += 1
    return counts


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
