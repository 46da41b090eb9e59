"""The index database: one schema, one connection helper, per-thread connections.

Every table the node keeps lives in ``node.data_dir/index.sqlite`` and is declared here:
``patients``, ``studies``, ``series``, ``instances`` (the archive), ``jobs`` (scoring queue),
``outbox`` (delivery queue) and ``commitment_reports`` (storage commitment answers). Connections
use WAL, a busy timeout and ``synchronous=FULL`` so a committed row survives power loss and
other processes (``dicom-node studies``, ``resend``) wait instead of failing. Writes in one
process are serialised by one lock and use ``BEGIN IMMEDIATE``. Columns are only ever added, so
an older index opens unchanged.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

STUDY_STATES = ("receiving", "complete", "held", "rejected", "scoring", "scored", "not-applicable",
                "failed")

SCHEMA: dict[str, tuple[dict[str, Any], str]] = {
    "patients": ({"patient_id": str, "first_seen": float, "last_seen": float}, "patient_id"),
    "studies": (
        {
            "study_uid": str, "patient_id": str, "state": str, "first_received": float,
            "last_received": float, "completed_at": float, "completion_reason": str,
            "missing_seg": int, "reopen_count": int, "note": str,
            # start of the current receiving episode (first instance, or the re-open); the
            # max-wait ceiling counts from here so a re-opened study gets a fresh ceiling
            "receiving_since": float,
            # JSON list, per image of the last finished job: sop_uid, scored, reason
            "images": str,
        },
        "study_uid",
    ),
    "series": (
        {"series_uid": str, "study_uid": str, "modality": str, "sop_class_uid": str,
         "series_number": int},
        "series_uid",
    ),
    "instances": (
        {
            "sop_uid": str, "study_uid": str, "series_uid": str, "sop_class_uid": str,
            "modality": str, "path": str, "sha256": str, "size": int, "transfer_syntax": str,
            "calling_aet": str, "received_at": float, "manufacturer": str, "model_name": str,
            "rows": int, "columns": int, "frames": int, "photometric": str,
            "referenced_sop_uids": str,
            # 1: a SEG whose segments are all AUTOMATIC (never a human ROI)
            "automatic_seg": int,
        },
        "sop_uid",
    ),
    "jobs": (
        {
            "id": int, "study_uid": str, "kind": str, "state": str, "attempts": int,
            "max_attempts": int, "next_attempt_at": float, "last_error": str,
            "created_at": float, "updated_at": float, "worker_pid": int, "payload": str,
        },
        "id",
    ),
    "outbox": (
        {
            "id": int, "study_uid": str, "destination": str, "path": str, "sop_uid": str,
            "state": str, "attempts": int, "next_attempt_at": float, "last_error": str,
            "created_at": float, "sent_at": float,
            # the exactly-once key of the result set the file belongs to
            "result_key": str,
            # storage commitment: the N-ACTION transaction a `sent` row waits on
            "transaction_uid": str, "committed_at": float,
        },
        "id",
    ),
    # storage commitment N-EVENT-REPORTs as received (the delivery loop applies them to outbox)
    "commitment_reports": (
        {"id": int, "transaction_uid": str, "calling_aet": str, "received_at": float,
         "committed": str, "failed": str, "applied_at": float},
        "id",
    ),
}
_NOT_NULL: dict[str, set[str]] = {
    "patients": {"patient_id"}, "studies": {"study_uid"}, "series": {"series_uid"},
    "instances": {"sop_uid"}, "jobs": set(),
    "outbox": {"study_uid", "destination", "path", "state"},
    "commitment_reports": {"transaction_uid"},
}
_INDEXES = (
    ("instances", ["study_uid"]),
    ("series", ["study_uid"]),
    ("studies", ["state"]),
    ("jobs", ["state", "next_attempt_at"]),
    ("jobs", ["study_uid"]),
    ("outbox", ["state", "next_attempt_at"]),
    ("outbox", ["study_uid"]),
    ("outbox", ["sop_uid", "destination"]),
    ("outbox", ["transaction_uid"]),
    ("commitment_reports", ["applied_at"]),
)


def open_db(db_path: Path) -> sqlite_utils.Database:
    """A connection in autocommit mode (transactions are explicit), WAL and a busy timeout."""
    conn = sqlite3.connect(str(db_path), timeout=30.0, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return sqlite_utils.Database(conn)


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create missing tables/indexes (idempotent; columns are added, never renamed)."""
    for name, (columns, pk) in SCHEMA.items():
        table = db.table(name)
        if not table.exists():
            table.create(columns, pk=pk, not_null=_NOT_NULL[name] or None, if_not_exists=True)
        else:
            existing = table.columns_dict
            for col, tp in columns.items():
                if col not in existing:
                    table.add_column(col, tp)
    for name, cols in _INDEXES:
        db.table(name).create_index(cols, if_not_exists=True)


class Index:
    """The index database of one data folder; safe to share between threads."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._dbs: list[sqlite_utils.Database] = []

    def init_schema(self) -> None:
        """Create or upgrade the schema (the folder must exist)."""
        with self._lock:
            ensure_schema(self.db())

    def db(self) -> sqlite_utils.Database:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = open_db(self.db_path)
            self._local.db = db
            with self._lock:
                self._dbs.append(db)
        return db

    def close(self) -> None:
        """Close every connection opened through this object."""
        with self._lock:
            for db in self._dbs:
                try:
                    db.conn.close()
                except sqlite3.Error:
                    pass
            self._dbs.clear()
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the process-wide write lock."""
        with self._lock:
            conn = self.db().conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str,
              params: tuple[Any, ...] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (read-only helper)."""
        cur = self.db().conn.execute(sql, params)
        names = [c[0] for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def rows(conn: sqlite3.Connection, sql: str,
         params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a query on an open connection, as dicts."""
    cur = conn.execute(sql, params)
    names = [c[0] for c in cur.description or ()]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
