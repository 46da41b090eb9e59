"""The sender: due outbox rows go to their destination, one batch per study and destination.

Results are archived first and queued in the outbox (:mod:`dicom_node.store.outbox`) in the same
transaction that ends their job. :class:`DeliveryLoop` sends each study's due rows for one
destination in one :meth:`~dicom_node.delivery.Destination.send` (one association for DIMSE). A
failed send is retried with :func:`~dicom_node.store.durable_queue.backoff_delay` (exponential,
jittered)
until ``delivery.retry_horizon_hours`` after the row was created; then the row becomes
``expired`` but stays listed by ``dicom-node outbox`` and sendable with ``dicom-node resend``.
All state lives in the index, so a restarted node carries on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.config import Config, DeliveryConfig, DestinationConfig
from dicom_node.delivery import make_destinations
from dicom_node.delivery.base import Destination, SendOutcome
from dicom_node.loop import PollingLoop
from dicom_node.ops.metrics import record_send
from dicom_node.ops.status import human_time
from dicom_node.store.db import Index
from dicom_node.store.durable_queue import backoff_delay
from dicom_node.store.outbox import (
    ANY_DESTINATION,
    COMMITTED,
    EXPIRED,
    PENDING,
    SENT,
    OutboxItem,
    add_items,
    apply_commitment_reports,
    due_items,
    expand_any,
    make_due,
    overdue_commitments,
    record_failed,
    record_sent,
)
from dicom_node.store.outbox import (
    outbox_rows as _rows,
)

log = logging.getLogger(__name__)


def _index(db_path: Path) -> Index:
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    index = Index(db_path)
    index.init_schema()
    return index


def retry_delay(attempts: int, cfg: DeliveryConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed send (the node's backoff, jittered)."""
    return backoff_delay(attempts, cfg.retry_initial_seconds, cfg.retry_max_seconds,
                         cfg.jitter_fraction, rng)


def enqueue(db_path: Path, study_uid: str, paths: Sequence[Path],
            destinations: Iterable[str | DestinationConfig] | None = None) -> list[int]:
    """Queue files already durably written under data_dir (for tools and tests; jobs queue
    their results through :func:`dicom_node.store.queue.mark_done`).

    Returns:
        The outbox ids, one per file and destination (rows already queued are reused).
    """
    data_dir = Path(db_path).parent.resolve()
    names = [ANY_DESTINATION] if destinations is None else [
        d.name if isinstance(d, DestinationConfig) else str(d) for d in destinations]
    items = []
    for p in paths:
        sop_uid = str(dcmread(p, stop_before_pixels=True,
                              specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        try:
            rel = str(Path(p).resolve().relative_to(data_dir))
        except ValueError:
            rel = str(Path(p).resolve())
        items += [OutboxItem(study_uid, name, rel, sop_uid) for name in names]
    index = _index(db_path)
    try:
        with index.transaction() as conn:
            ids = add_items(conn, items)
    finally:
        index.close()
    log.info("study %s: queued %d file(s) for %s", study_uid, len(paths), ", ".join(names))
    return ids


def outbox_rows(db_path: Path, states: Sequence[str] = (PENDING, EXPIRED)) -> list[dict[str, Any]]:
    """Outbox rows in the given states, oldest first (for the CLI and tests)."""
    if not Path(db_path).exists():
        return []
    index = _index(db_path)
    try:
        return _rows(index, states)
    finally:
        index.close()


class DeliveryLoop(PollingLoop):
    """Background thread that sends due outbox rows; state lives only in the index."""

    name = "delivery"

    def __init__(self, cfg: Config, rng: random.Random | None = None,
                 destinations: dict[str, Destination] | None = None) -> None:
        super().__init__(cfg.delivery.poll_seconds)
        self.cfg = cfg
        self.data_dir = cfg.node.data_dir
        self._rng = rng or random.Random()
        self.destinations = make_destinations(cfg) if destinations is None else destinations
        self.index = _index(cfg.node.db_path)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current send and stop."""
        super().stop(timeout if timeout is not None else self.cfg.delivery.timeout_seconds * 3 + 5)
        self.index.close()

    def poll(self) -> bool:
        self.run_once()
        return False

    def run_once(self, now: float | None = None) -> dict[str, int]:
        """Send every due row, grouped by (study, destination); returns counts by outcome."""
        now = time.time() if now is None else now
        counts = {"sent": 0, "failed": 0, "expired": 0}
        expand_any(self.index, list(self.destinations))
        self._commitments(now)
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for row in due_items(self.index, now):
            groups[(row["study_uid"], row["destination"])].append(row)
        for (study_uid, dest_name), group in groups.items():
            if self.stopping:
                break
            for k, v in self._send_group(study_uid, dest_name, group).items():
                counts[k] += v
        return counts

    def _send_group(self, study_uid: str, dest_name: str,
                    rows: list[dict[str, Any]]) -> dict[str, int]:
        counts = {"sent": 0, "failed": 0, "expired": 0}
        dest = self.destinations.get(dest_name)
        if dest is None:
            why = ("no destinations configured" if dest_name == ANY_DESTINATION
                   else f"destination {dest_name!r} is not in the config")
            return self._failed(rows, why, counts)
        present: list[tuple[dict[str, Any], Path]] = []
        missing: list[dict[str, Any]] = []
        for row in rows:
            p = Path(row["path"])
            p = p if p.is_absolute() else self.data_dir / p
            (present.append((row, p)) if p.is_file() else missing.append(row))
        if missing:
            self._failed(missing, "result file missing", counts)
        if not present:
            return counts
        t_send = time.perf_counter()
        try:
            outcome = dest.send([p for _, p in present])
        except Exception as exc:
            log.exception("study %s: unexpected error sending to %s", study_uid, dest_name)
            outcome = SendOutcome({}, error=f"{type(exc).__name__}: {exc}")
        now = time.time()
        sent = [r for r, _ in present if outcome.stored(r["sop_uid"])]
        record_sent(self.index, sent, now=now, transaction_uid=outcome.transaction_uid,
                    committed=outcome.committed)
        counts["sent"] += len(sent)
        record_send(dest_name, [r for r, _ in present], sent, t_send)
        failed = [r for r, _ in present if not outcome.stored(r["sop_uid"])]
        if failed:
            reasons = [f"{r['sop_uid']}: status 0x{outcome.statuses[r['sop_uid']]:04X}"
                       for r in failed if r["sop_uid"] in outcome.statuses]
            self._failed(failed, outcome.error or "; ".join(reasons) or "not stored", counts)
        log.info("study %s: %d/%d result(s) delivered to %s%s", study_uid, len(sent), len(rows),
                 dest_name, f" ({outcome.error})" if outcome.error else "")
        return counts

    def _commitments(self, now: float) -> None:
        """Apply storage commitment reports; re-send rows whose report is overdue."""
        horizon = self.cfg.delivery.retry_horizon_hours * 3600.0

        def delay(attempts: int) -> float:
            return retry_delay(attempts, self.cfg.delivery, self._rng)

        got = apply_commitment_reports(self.index, now=now, horizon_seconds=horizon, delay=delay)
        if got["failed"] or got["expired"]:
            log.warning("storage commitment refused for %d item(s) (%d will be sent again)",
                        got["failed"] + got["expired"], got["failed"])
        if got["committed"]:
            log.info("storage commitment confirmed %d item(s)", got["committed"])
        if got["unknown"]:
            log.warning("%d storage commitment report(s) matched no item waiting for one "
                        "(late, after a re-send, or not for this node)", got["unknown"])
        timeouts = {d.name: d.storage_commitment_timeout_seconds for d in self.cfg.destinations
                    if d.storage_commitment}
        late = overdue_commitments(self.index, timeouts, now=now, horizon_seconds=horizon,
                                   delay=delay)
        if late["failed"] or late["expired"]:
            log.warning("%d item(s) got no storage commitment report in time (%d will be sent "
                        "again)", late["failed"] + late["expired"], late["failed"])

    def _failed(self, rows: list[dict[str, Any]], why: str,
                counts: dict[str, int]) -> dict[str, int]:
        """Record a failed attempt: schedule the next one, or expire after the horizon."""
        got = record_failed(
            self.index, rows, why, now=time.time(),
            horizon_seconds=self.cfg.delivery.retry_horizon_hours * 3600.0,
            delay=lambda attempts: retry_delay(attempts, self.cfg.delivery, self._rng),
        )
        if got["expired"]:
            log.warning("study %s: %d outbox item(s) to %s expired after the retry horizon: %s",
                        rows[0]["study_uid"], got["expired"], rows[0]["destination"], why)
        for k, v in got.items():
            counts[k] += v
        return counts


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def _fmt_time(t: float | None) -> str:
    return human_time(t)


def outbox_command(args: argparse.Namespace | None, cfg: Config) -> int:
    """``dicom-node outbox``: results not delivered yet (pending or expired) and why, results
    stored but still waiting for a storage commitment report, and how many are done."""
    rows = [r for r in outbox_rows(cfg.node.db_path, (PENDING, EXPIRED, SENT))
            if r["state"] != SENT or r["transaction_uid"]]
    if getattr(args, "json", False):  # machine times: epoch seconds as stored
        print(json.dumps(rows, indent=2))
        return 0
    done = _delivered_counts(cfg)
    tail = f"; delivered: {done[SENT]} sent, {done[COMMITTED]} committed"
    if not rows:
        print("outbox: nothing waiting (every queued result was delivered)" + tail)
        return 0
    print(f"{'id':>5} {'state':8} {'dest':10} {'tries':>5} {'next try':25}  study / error")
    for r in rows:
        nxt = _fmt_time(r["next_attempt_at"]) if r["state"] == PENDING else "-"
        print(f"{r['id']:>5} {r['state']:8} {r['destination'][:10]:10} {r['attempts']:>5} "
              f"{nxt:25}  {r['study_uid']}")
        if r["state"] == SENT:
            print(f"{'':>5} stored {_fmt_time(r['sent_at'])}, waiting for storage commitment "
                  f"{r['transaction_uid']}")
        elif r["last_error"]:
            print(f"{'':>5} last error: {r['last_error']}")
    n_exp = sum(r["state"] == EXPIRED for r in rows)
    n_wait = sum(r["state"] == SENT for r in rows)
    print(f"outbox: {len(rows) - n_exp - n_wait} pending, {n_exp} expired (dicom-node resend "
          f"retries now), {n_wait} waiting for commitment{tail}")
    return 0


def _delivered_counts(cfg: Config) -> dict[str, int]:
    """Rows in ``sent`` (stored, no commitment asked or still waiting) and ``committed``."""
    got = {SENT: 0, COMMITTED: 0}
    for r in outbox_rows(cfg.node.db_path, (SENT, COMMITTED)):
        got[r["state"]] += 1
    return got


def resend_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node resend [--id N]``: make undelivered items due now and send them once."""
    item_id = getattr(args, "id", None)
    now = time.time()
    loop = DeliveryLoop(cfg)
    try:
        targets = make_due(loop.index, item_id, now=now)
        if not targets:
            which = f" (no undelivered item {item_id})" if item_id else ""
            print(f"resend: nothing to send{which}")
            return 0 if item_id is None else 1
        counts = loop.run_once(now=now)
    finally:
        loop.index.close()
    left = outbox_rows(cfg.node.db_path)
    print(f"resend: {counts['sent']} delivered, {counts['failed']} still pending, "
          f"{counts['expired']} expired")
    for r in left:
        if r["last_error"]:
            print(f"  {r['id']}: {r['state']}: {r['last_error']}")
    return 0 if counts["failed"] == 0 and counts["expired"] == 0 else 1
