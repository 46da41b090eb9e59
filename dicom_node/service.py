"""``dicom-node serve`` (listener + completion + worker + sender) and ``dicom-node studies``.

``serve`` wires the parts together and owns their life cycle: start-up sweeps temp files and
unpublished result folders and counts a job left running by a dead process as a failed attempt;
SIGTERM/SIGINT stop the listener first (no new instances), then completion, the worker (after
its current job) and the sender.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

from dicom_node.completion import CompletionMonitor
from dicom_node.config import Config
from dicom_node.flow.supervisor import Supervisor
from dicom_node.ops.http import start_status_server
from dicom_node.ops.status import human_time
from dicom_node.scp import start_scp
from dicom_node.store.archive import Archive
from dicom_node.store.queue import requeue_orphans
from dicom_node.store.resultsets import sweep_temp
from dicom_node.store.studies import images_summary, study_table
from dicom_node.worker import Processor, Worker, archive_only_processor

log = logging.getLogger(__name__)


def _processor(cfg: Config) -> Processor:
    if not cfg.scoring.enabled:
        log.info("scoring disabled: studies are archived only (archive-only jobs)")
        return archive_only_processor
    # heavy (torch): only when scoring
    from dicom_node.processing import build_processor

    return build_processor(cfg)


def serve_command(args: argparse.Namespace, cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; return 0 after a clean shutdown."""
    archive = Archive(cfg.node.data_dir, disk_reserve_mb=cfg.node.disk_reserve_mb).init()
    sweep_temp(cfg.node.results_dir)  # result sets a crash left unpublished
    n = requeue_orphans(archive, retry_base_seconds=cfg.worker.retry_base_seconds)
    if n:
        log.warning("%d job(s) left running by a previous process counted as failed attempts", n)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    worker: Worker | Supervisor | None = None
    delivery = None
    if cfg.worker.enabled:
        processor = _processor(cfg)  # the whole model check runs now: a broken one stops serve
        if cfg.scoring.enabled:
            # scoring decodes untrusted pixel data: supervised processes do it, never this one
            del processor
            worker = Supervisor(archive, cfg)
        else:
            worker = Worker(archive, processor, cfg.worker)
    if cfg.scoring.enabled and cfg.destinations:
        # another module's loop; import only if used
        from dicom_node.delivery.sender import DeliveryLoop

        delivery = DeliveryLoop(cfg)
    monitor = CompletionMonitor(archive, cfg.completion, max_attempts=cfg.worker.max_attempts)
    # ready once a scoring process has its model loaded (archive-only: nothing to wait for)
    status_server = start_status_server(
        cfg, worker.ready_check if isinstance(worker, Supervisor) else None)
    server = start_scp(cfg.node, archive)
    if status_server is not None:
        status_server.listener_started(server)
    monitor.start()
    if worker is not None:
        worker.start()
    if delivery is not None:
        delivery.start()
    log.info("node %s ready (data dir %s)", cfg.node.ae_title, archive.data_dir)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()  # stop accepting and end open associations first
        monitor.stop()
        if worker is not None:
            worker.stop()
        if delivery is not None:
            delivery.stop()
        if status_server is not None:
            status_server.stop()
        archive.close()
        log.info("node stopped")
    return 0


def studies_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node studies [--json]``: print the studies table."""
    db_path = cfg.node.db_path
    if not db_path.exists():
        print(f"no index at {db_path} (has the node received anything?)")
        return 1
    archive = Archive(cfg.node.data_dir)
    try:
        rows = study_table(archive)
    finally:
        archive.close()
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"studies in {cfg.node.data_dir}")
    table.add_column("study", overflow="fold")
    table.add_column("patient", overflow="fold")
    table.add_column("state", no_wrap=True)
    for col in ("inst", "US", "SEG", "AI SEG"):
        table.add_column(col, justify="right", no_wrap=True)
    for col in ("last received", "job", "delivery", "images", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        job = r["job"]
        job_s = "-" if job is None else f"{job['id']} {job['state']} ({job['attempts']})"
        delivery = ", ".join(f"{k} {v}" for k, v in sorted(r.get("delivery", {}).items())) or "-"
        table.add_row(
            r["study_uid"], r["patient_id"], r["state"], str(r["instances"]), str(r["us"]),
            str(r["seg"]), str(r["automatic_seg"]), human_time(r["last_received"]),
            job_s, delivery, images_summary(r.get("images") or []), (r["note"] or "")[:60],
        )
    # a pipe or log file has no width: give the UIDs room instead of rich's 80-column default
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0
