"""The job worker: claims queued jobs and runs a pluggable processor on each study.

The processor is any ``Callable[[JobContext], None]``; the scoring pipeline provides one
(``dicom_node.processing.build_processor``), and :func:`archive_only_processor` is used when
``scoring.enabled = false``. A processor signals failure by raising: the job is retried with
exponential backoff up to ``worker.max_attempts``, then marked failed with its reason, and the
loop goes on with the next job (one bad study never stops the node). A
:class:`~dicom_node.errors.PermanentJobError` (bad input) fails the job at once; a
:class:`~dicom_node.errors.NothingToScoreError` ends it, and its study ``not-applicable``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config import WorkerConfig
from dicom_node.errors import NothingToScoreError, PermanentJobError
from dicom_node.loop import PollingLoop
from dicom_node.ops.metrics import record_job
from dicom_node.store.archive import Archive
from dicom_node.store.outbox import OutboxItem
from dicom_node.store.queue import Job, claim, mark_done, mark_failed

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """Everything a processor needs about one job.

    Attributes:
        job_id: the ``jobs.id`` row.
        study_uid: the study to process.
        attempt: 1 for the first try, 2 for the first retry, ...
        payload: the job's JSON payload (see :mod:`dicom_node.completion` for the keys, e.g.
            ``missing_seg`` / ``allow_missing_seg`` / ``completion_reason``).
        paths: absolute paths of every archived instance of the study, in arrival order.
        data_dir: the node's data folder (``results/`` and ``failed/`` live under it).
        note: a processor may set a short human-readable outcome; it is stored in
            ``studies.note`` when the job succeeds.
        sop_uids: SOP Instance UIDs of ``paths``, same order (the study version's identity).
        outbox: files a processor wants delivered; they are queued in the same transaction
            that marks the job done (never one without the other).
        study_state: how a finished job leaves its study: ``scored``, or ``not-applicable``
            when nothing in it may be scored (see :func:`finish_not_applicable`).
        images: per image, why it was or was not scored (``sop_uid``, ``scored``, ``reason``),
            stored with the study when the job finishes (``studies --json``).
        automatic_seg_uids: the all-AUTOMATIC SEGs among ``sop_uids``: archived, but no input
            to scoring (not part of the study version's identity).
    """

    job_id: int
    study_uid: str
    attempt: int
    payload: dict[str, Any]
    paths: tuple[Path, ...]
    data_dir: Path
    note: str = field(default="")
    sop_uids: tuple[str, ...] = ()
    outbox: list[OutboxItem] = field(default_factory=list)
    study_state: str = "scored"
    images: list[dict[str, Any]] = field(default_factory=list)
    automatic_seg_uids: tuple[str, ...] = ()


def finish_not_applicable(ctx: JobContext, exc: NothingToScoreError) -> JobContext:
    """Classify a study with nothing to score as finished ``not-applicable`` (no retry).

    Called where a job's outcome is reported: by the processor that catches the error to
    publish a "not assessable" SR, and by the worker / scoring process when the error escapes
    a processor (it is picklable, so it also crosses the process boundary intact).
    """
    ctx.study_state = "not-applicable"
    if not ctx.note.startswith("not-applicable"):
        reasons = "; ".join(f"{u}: {r}" for u, r in exc.reasons)
        ctx.note = (exc.state + (f"; {reasons}" if reasons else ""))[:2000]
    if not ctx.images:
        by_uid: dict[str, list[str]] = {}
        for u, r in exc.reasons:
            by_uid.setdefault(u, []).append(r)
        ctx.images = [{"sop_uid": u, "scored": False, "reason": "; ".join(rs)}
                      for u, rs in by_uid.items()]
    return ctx


Processor = Callable[[JobContext], None]


def archive_only_processor(ctx: JobContext) -> None:
    """Used when scoring is disabled: the study stays archived, nothing is scored."""
    ctx.note = "archive-only: scoring disabled (scoring.enabled = false); not scored"
    log.info("study %s: job %s archive-only (%d instances), not scored", ctx.study_uid,
             ctx.job_id, len(ctx.paths))


def run_one(archive: Archive, processor: Processor, cfg: WorkerConfig) -> bool:
    """Claim and run at most one job; return True if a job was processed (ok or not)."""
    job = claim(archive)
    if job is None:
        return False
    _run(archive, processor, cfg, job)
    return True


def job_context(archive: Archive, job: Job) -> JobContext:
    """The context a processor gets for a claimed job (also used by a scoring process)."""
    files = archive.study_files(job.study_uid)
    automatic = archive.query("SELECT sop_uid FROM instances WHERE study_uid = ? AND "
                              "automatic_seg = 1", (job.study_uid,))
    return JobContext(
        job_id=job.id, study_uid=job.study_uid, attempt=job.attempts, payload=job.payload,
        paths=tuple(p for _, p in files), data_dir=archive.data_dir,
        sop_uids=tuple(u for u, _ in files),
        automatic_seg_uids=tuple(sorted(r["sop_uid"] for r in automatic)),
    )


def _run(archive: Archive, processor: Processor, cfg: WorkerConfig, job: Job) -> None:
    ctx = job_context(archive, job)
    log.info("job %s (study %s): attempt %d/%d, %d instances", job.id, job.study_uid,
             job.attempts, job.max_attempts, len(ctx.paths))
    try:
        processor(ctx)
    except NothingToScoreError as exc:  # terminal, not a failure
        finish_not_applicable(ctx, exc)
    except Exception as exc:  # noqa: BLE001 - any failure of a job is recorded, never fatal
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PermanentJobError):  # bad input: this attempt is the last
            job = dataclasses.replace(job, max_attempts=job.attempts)
        retried = mark_failed(archive, job, error, retry_base_seconds=cfg.retry_base_seconds)
        log.error("job %s (study %s): attempt %d failed: %s; %s", job.id, job.study_uid,
                  job.attempts, error, "will retry" if retried else "giving up")
        log.debug("job %s traceback:\n%s", job.id, traceback.format_exc())
        record_job("retry" if retried else "failed")
        return
    mark_done(archive, job, note=ctx.note, outbox=ctx.outbox, study_state=ctx.study_state,
              images=ctx.images or None)
    record_job("done" if ctx.study_state == "scored" else ctx.study_state)
    log.info("job %s (study %s): done%s", job.id, job.study_uid,
             f" ({ctx.note})" if ctx.note else "")


class Worker(PollingLoop):
    """Background thread polling the queue every ``cfg.poll_seconds``."""

    name = "worker"

    def __init__(self, archive: Archive, processor: Processor, cfg: WorkerConfig) -> None:
        super().__init__(cfg.poll_seconds)
        self.archive = archive
        self.processor = processor
        self.cfg = cfg

    def start(self) -> Worker:
        log.info("worker started (pid %d)", os.getpid())
        super().start()
        return self

    def poll(self) -> bool:
        return run_one(self.archive, self.processor, self.cfg)
