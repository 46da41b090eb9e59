"""Deliver results to PACS: a durable outbox in SQLite, C-STORE per study, retried with backoff.

Results are written into the archive first (``results.write_results``) and then queued here, one
outbox row per file and destination. :class:`DeliveryLoop` sends each study's due rows for one
destination over ONE association (``scu.store_files``: minimal contexts, TCP_NODELAY, optional
TLS). A failed send is retried with exponential backoff and jitter until
``delivery.retry_horizon_hours`` after the row was created; then the row becomes ``expired`` but
stays in the outbox, visible in ``dicom-node outbox`` and sendable with ``dicom-node resend``.
All state lives in the table, so a restarted node carries on where it stopped.

Table ``outbox`` (in ``node.data_dir/index.sqlite``): id, study_uid, destination, path (relative to
data_dir), sop_uid, state (pending|sent|expired), attempts, next_attempt_at, last_error,
created_at, sent_at. Times are Unix epoch seconds. ``destination = "*"`` means "every configured
destination" and is expanded on the next delivery pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path

import sqlite_utils
from pydicom import dcmread

from dicom_node.config import Config, DeliveryConfig, DestinationConfig, TLSConfig
from dicom_node.errors import DeliveryError
from dicom_node.ops.metrics import record_send
from dicom_node.ops.status import human_time
from dicom_node.scu import store_files

log = logging.getLogger(__name__)

PENDING, SENT, EXPIRED = "pending", "sent", "expired"
ANY_DESTINATION = "*"
_COLUMNS = {
    "id": int, "study_uid": str, "destination": str, "path": str, "sop_uid": str, "state": str,
    "attempts": int, "next_attempt_at": float, "last_error": str, "created_at": float,
    "sent_at": float,
}


def _connect(db_path: Path) -> sqlite_utils.Database:
    """A fresh connection (one per call/thread) that waits for writers instead of failing."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db_path), timeout=30.0)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def ensure_outbox(db: sqlite_utils.Database) -> sqlite_utils.db.Table:
    """Create the outbox table and its indexes if they do not exist yet."""
    table = db["outbox"]
    if not table.exists():
        table.create(_COLUMNS, pk="id", not_null={"study_uid", "destination", "path", "state"},
                     defaults={"attempts": 0, "last_error": ""}, if_not_exists=True)
        table.create_index(["state", "next_attempt_at"], if_not_exists=True)
        table.create_index(["study_uid"], if_not_exists=True)
    return table  # type: ignore[return-value]


def _dest_name(d: str | DestinationConfig) -> str:
    return d.name if isinstance(d, DestinationConfig) else str(d)


def enqueue(
    db_path: Path,
    study_uid: str,
    paths: Sequence[Path],
    destinations: Iterable[str | DestinationConfig] | None = None,
) -> list[int]:
    """Queue result files (already durably written under data_dir) for delivery.

    Args:
        db_path: the node's ``index.sqlite``; paths are stored relative to its folder (data_dir).
        study_uid: the study the files belong to (one association per study and destination).
        paths: result files.
        destinations: destination names (or configs); None = every configured destination,
            resolved by the delivery loop.

    Returns:
        The outbox ids, one per file and destination (existing undelivered rows are reused).
    """
    data_dir = Path(db_path).parent.resolve()
    names = [ANY_DESTINATION] if destinations is None else [_dest_name(d) for d in destinations]
    now = time.time()
    ids: list[int] = []
    with closing(_connect(db_path).conn) as conn:
        db = sqlite_utils.Database(conn)
        table = ensure_outbox(db)
        with conn:
            for p in paths:
                p = Path(p)
                sop_uid = str(dcmread(p, stop_before_pixels=True,
                                      specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                try:
                    rel = str(p.resolve().relative_to(data_dir))
                except ValueError:
                    rel = str(p.resolve())
                for name in names:
                    existing = list(table.rows_where(
                        "sop_uid = ? and destination = ? and state != ?", [sop_uid, name, SENT],
                        select="id"))
                    if existing:
                        ids.append(int(existing[0]["id"]))
                        continue
                    table.insert({
                        "study_uid": study_uid, "destination": name, "path": rel,
                        "sop_uid": sop_uid, "state": PENDING, "attempts": 0,
                        "next_attempt_at": now, "last_error": "", "created_at": now,
                        "sent_at": None,
                    })
                    ids.append(int(table.last_pk))
    log.info("study %s: queued %d file(s) for %s", study_uid, len(paths), ", ".join(names))
    return ids


def retry_delay(attempts: int, cfg: DeliveryConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failure: doubling from the initial delay up to
    the ceiling, times a random factor in ``[1 - jitter, 1 + jitter]`` so that many queued studies
    do not hit a recovering PACS at the same instant."""
    base = min(cfg.retry_initial_seconds * 2 ** max(attempts - 1, 0), cfg.retry_max_seconds)
    j = cfg.jitter_fraction
    return base * (rng or random).uniform(1.0 - j, 1.0 + j)


def tls_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Client TLS context for a destination, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def _is_success(status: int) -> bool:
    return status == 0x0000 or 0xB000 <= status <= 0xB007


class DeliveryLoop:
    """Background thread that sends due outbox rows; state lives only in SQLite."""

    def __init__(self, cfg: Config, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.db_path = cfg.node.db_path
        self.data_dir = cfg.node.data_dir
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._destinations = {d.name: d for d in cfg.destinations}
        with closing(_connect(self.db_path).conn) as conn:
            ensure_outbox(sqlite_utils.Database(conn))

    # -- thread control ------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to finish its current send and stop; waits for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None
                              else self.cfg.delivery.timeout_seconds * 3 + 5)
            self._thread = None

    def wake(self) -> None:
        """Run a pass now (e.g. right after enqueue) instead of at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep delivering other studies whatever one pass hit
                log.exception("delivery pass failed")
            self._wake.wait(self.cfg.delivery.poll_seconds)
            self._wake.clear()

    # -- one pass ------------------------------------------------------------------------
    def run_once(self, now: float | None = None) -> dict[str, int]:
        """Send every due row, grouped by (study, destination); returns counts by outcome."""
        now = time.time() if now is None else now
        counts = {"sent": 0, "failed": 0, "expired": 0}
        with closing(_connect(self.db_path).conn) as conn:
            db = sqlite_utils.Database(conn)
            table = ensure_outbox(db)
            self._expand_any(db, table)
            rows = list(table.rows_where(
                "state = ? and next_attempt_at <= ?", [PENDING, now],
                order_by="study_uid, destination, id"))
            groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
            for row in rows:
                groups[(row["study_uid"], row["destination"])].append(row)
            for (study_uid, dest_name), group in groups.items():
                if self._stop.is_set() and self._thread is not None:
                    break
                outcome = self._send_group(db, table, study_uid, dest_name, group)
                for k, v in outcome.items():
                    counts[k] += v
        return counts

    def _expand_any(self, db: sqlite_utils.Database, table: sqlite_utils.db.Table) -> None:
        """Replace "*" rows by one row per configured destination (kept if none configured)."""
        if not self._destinations:
            return
        rows = list(table.rows_where("destination = ? and state != ?", [ANY_DESTINATION, SENT]))
        if not rows:
            return
        with db.conn:
            for row in rows:
                for name in self._destinations:
                    new = {k: v for k, v in row.items() if k != "id"}
                    new["destination"] = name
                    table.insert(new)
                table.delete(row["id"])

    def _send_group(self, db: sqlite_utils.Database, table: sqlite_utils.db.Table,
                    study_uid: str, dest_name: str, rows: list[dict]) -> dict[str, int]:
        dest = self._destinations.get(dest_name)
        if dest is None:
            why = ("no destinations configured" if dest_name == ANY_DESTINATION
                   else f"destination {dest_name!r} is not in the config")
            return self._failed(db, table, rows, why)
        files: list[Path] = []
        ok_rows: list[dict] = []
        missing: list[dict] = []
        for row in rows:
            p = Path(row["path"])
            p = p if p.is_absolute() else self.data_dir / p
            if p.is_file():
                files.append(p)
                ok_rows.append(row)
            else:
                missing.append(row)
        counts = {"sent": 0, "failed": 0, "expired": 0}
        if missing:
            for k, v in self._failed(db, table, missing, "result file missing").items():
                counts[k] += v
        if not files:
            return counts
        t_send = time.perf_counter()
        try:
            results = store_files(
                dest.host, dest.port, files,
                calling_aet=self.cfg.node.ae_title, called_aet=dest.ae_title,
                tls_context=tls_context(dest.tls), max_pdu=self.cfg.node.max_pdu or 131072,
                timeout=self.cfg.delivery.timeout_seconds,
            )
            error = None
        except Exception as exc:  # noqa: BLE001 - any failure of this send is recorded and retried
            if not isinstance(exc, (DeliveryError, OSError)):
                log.exception("study %s: unexpected error sending to %s", study_uid, dest_name)
            results = list(getattr(exc, "partial", []))
            error = str(exc) or type(exc).__name__
        statuses = dict(results)
        sent = [r for r in ok_rows
                if r["sop_uid"] in statuses and _is_success(statuses[r["sop_uid"]])]
        now = time.time()
        with db.conn:
            for r in sent:
                table.update(r["id"], {"state": SENT, "sent_at": now, "last_error": "",
                                       "attempts": r["attempts"] + 1})
        counts["sent"] += len(sent)
        record_send(dest_name, ok_rows, sent, t_send)
        failed = [r for r in ok_rows if r not in sent]
        if failed:
            reasons = []
            for r in failed:
                if r["sop_uid"] in statuses:
                    reasons.append(f"{r['sop_uid']}: status 0x{statuses[r['sop_uid']]:04X}")
            why = error or "; ".join(reasons) or "not stored"
            for k, v in self._failed(db, table, failed, why).items():
                counts[k] += v
        log.info("study %s: %d/%d result(s) delivered to %s%s", study_uid, len(sent), len(rows),
                 dest_name, f" ({error})" if error else "")
        return counts

    def _failed(self, db: sqlite_utils.Database, table: sqlite_utils.db.Table,
                rows: list[dict], why: str) -> dict[str, int]:
        """Record a failed attempt: schedule the next one, or expire after the horizon."""
        now = time.time()
        horizon = self.cfg.delivery.retry_horizon_hours * 3600.0
        counts = {"failed": 0, "expired": 0}
        with db.conn:
            for r in rows:
                attempts = int(r["attempts"] or 0) + 1
                deadline = float(r["created_at"]) + horizon
                if now >= deadline:
                    table.update(r["id"], {"state": EXPIRED, "attempts": attempts,
                                           "last_error": why[:2000]})
                    counts["expired"] += 1
                    log.warning("study %s: outbox item %s to %s expired after %d attempts: %s",
                                r["study_uid"], r["id"], r["destination"], attempts, why)
                else:
                    nxt = min(now + retry_delay(attempts, self.cfg.delivery, self._rng), deadline)
                    table.update(r["id"], {"attempts": attempts, "next_attempt_at": nxt,
                                           "last_error": why[:2000]})
                    counts["failed"] += 1
        return counts


# ------------------------------------------------------------------------------------------
# Queries and CLI
# ------------------------------------------------------------------------------------------


def outbox_rows(db_path: Path, states: Sequence[str] = (PENDING, EXPIRED)) -> list[dict]:
    """Outbox rows in the given states, oldest first (for the CLI and ``studies``)."""
    if not Path(db_path).exists():
        return []
    with closing(_connect(db_path).conn) as conn:
        table = ensure_outbox(sqlite_utils.Database(conn))
        marks = ",".join("?" * len(states))
        return list(table.rows_where(f"state in ({marks})", list(states), order_by="id"))


def outbox_summary(db_path: Path) -> dict[str, dict[str, int]]:
    """``{study_uid: {state: count}}`` for ``dicom-node studies``."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in outbox_rows(db_path, (PENDING, SENT, EXPIRED)):
        out[r["study_uid"]][r["state"]] = out[r["study_uid"]].get(r["state"], 0) + 1
    return dict(out)


def _fmt_time(t: float | None) -> str:
    return human_time(t)


def outbox_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node outbox``: results not delivered yet (pending or expired) and why."""
    rows = outbox_rows(cfg.node.db_path)
    if getattr(args, "json", False):  # machine times: epoch seconds as stored
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("outbox: nothing waiting (every queued result was delivered)")
        return 0
    print(f"{'id':>5} {'state':8} {'dest':10} {'tries':>5} {'next try':25}  study / error")
    for r in rows:
        nxt = _fmt_time(r["next_attempt_at"]) if r["state"] == PENDING else "-"
        print(f"{r['id']:>5} {r['state']:8} {r['destination'][:10]:10} {r['attempts']:>5} "
              f"{nxt:25}  {r['study_uid']}")
        if r["last_error"]:
            print(f"{'':>5} last error: {r['last_error']}")
    n_exp = sum(r["state"] == EXPIRED for r in rows)
    print(f"outbox: {len(rows) - n_exp} pending, {n_exp} expired (dicom-node resend retries now)")
    return 0


def resend_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node resend [--id N]``: make undelivered items due now and send them once."""
    db_path = cfg.node.db_path
    item_id = getattr(args, "id", None)
    now = time.time()
    with closing(_connect(db_path).conn) as conn:
        db = sqlite_utils.Database(conn)
        table = ensure_outbox(db)
        where, params = "state in (?, ?)", [PENDING, EXPIRED]
        if item_id is not None:
            where += " and id = ?"
            params.append(item_id)
        targets = [r["id"] for r in table.rows_where(where, params, select="id")]
        with conn:
            for rid in targets:
                table.update(rid, {"state": PENDING, "next_attempt_at": now})
    if not targets:
        print("resend: nothing to send" + (f" (no undelivered item {item_id})" if item_id else ""))
        return 0 if item_id is None else 1
    loop = DeliveryLoop(cfg)
    counts = loop.run_once(now=now)
    left = outbox_rows(db_path)
    print(f"resend: {counts['sent']} delivered, {counts['failed']} still pending, "
          f"{counts['expired']} expired")
    for r in left:
        if r["last_error"]:
            print(f"  {r['id']}: {r['state']}: {r['last_error']}")
    return 0 if counts["failed"] == 0 and counts["expired"] == 0 else 1
