"""Scoring in separate processes: claim a job, hand it to a scoring process, watch it, record it.

``serve`` runs ``worker.processes`` scoring processes (:mod:`dicom_node.flow.scorer`), each with
the model loaded once and kept between jobs (a fresh one needs 10-17 s). One thread per process
claims a job from the queue, sends it down a pipe and waits, watching three things: the process
is alive, its RSS stays under ``worker.max_rss_mb`` and the job ends within
``worker.job_timeout_seconds``. A process that dies or is killed for a limit is restarted, and the
job it was running is recorded as a failed attempt naming the cause ("worker died: SIGABRT",
"killed: exceeded worker.job_timeout_seconds (...)"); at ``worker.max_attempts`` the job and its
study are failed, so one poison study never blocks the ones after it. The listener and the
delivery loop run in the parent and never notice.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from dicom_node.config import Config
from dicom_node.flow.scorer import ChildSettings, child_main, vm_mb
from dicom_node.ops.logs import LEVELS, JsonFormatter
from dicom_node.ops.metrics import record_job, record_stage
from dicom_node.store.archive import Archive
from dicom_node.store.queue import Job, claim, mark_done, mark_failed
from dicom_node.worker import JobContext, job_context

log = logging.getLogger(__name__)

_WATCH_SECONDS = 0.2  # how often a running job's process is checked
_MAX_RESTART_DELAY = 60.0  # a process that cannot even start is retried at most this rarely
_STOP_GRACE_SECONDS = 30.0  # at shutdown the current job may finish within this


def death_cause(exitcode: int | None) -> str:
    """"worker died: SIGABRT" (or the exit code) for a scoring process that ended by itself."""
    if exitcode is None:
        return "worker died: unknown cause"
    if exitcode < 0:
        try:
            return f"worker died: {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker died: signal {-exitcode}"
    return f"worker died: exit code {exitcode}"


class _Slot:
    """One scoring process and the thread that feeds it jobs and restarts it."""

    def __init__(self, index: int, archive: Archive, cfg: Config, stop: threading.Event) -> None:
        self.index = index
        self.archive = archive
        self.cfg = cfg
        self.stop = stop
        self.stop_since: float | None = None
        self.proc: BaseProcess | None = None
        self.conn: Connection | None = None
        self.restart_delay = 1.0
        self.ready = False
        self.last_error = ""
        self.thread = threading.Thread(target=self._loop, name=f"scoring-{index}", daemon=True)

    # -- the scoring process ---------------------------------------------------------------
    def _start_process(self) -> bool:
        """Start a scoring process and wait until its model is loaded; False if it died."""
        root = logging.getLogger()
        level = logging.getLevelName(root.getEffectiveLevel())
        json_logs = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        fmt = "json" if json_logs else "text"
        settings = ChildSettings(slot=self.index, log_level=level if level in LEVELS else "INFO",
                                 log_format=fmt)
        mp = multiprocessing.get_context("spawn")
        parent_conn, child_conn = mp.Pipe()
        proc = mp.Process(target=child_main, args=(child_conn, self.cfg, settings),
                          name=f"dicom-node-scoring-{self.index}", daemon=True)
        proc.start()
        child_conn.close()
        self.proc, self.conn = proc, parent_conn
        log.info("scoring worker %d: started (pid %s), loading the model", self.index, proc.pid)
        while not self.stop.is_set():
            if parent_conn.poll(0.5):
                try:
                    _tag, pid, seconds = parent_conn.recv()
                except (EOFError, OSError):
                    break
                log.info("scoring worker %d: ready (pid %s, model loaded in %.1f s)", self.index,
                         pid, seconds)
                self.restart_delay = 1.0
                self.ready = True
                self.last_error = ""
                return True
            if not proc.is_alive():
                break
        if self.stop.is_set():
            self._end_process()
            return False
        proc.join(5)
        self.last_error = f"{death_cause(proc.exitcode)} while starting"
        log.error("scoring worker %d: %s; restarting in %.0f s", self.index, self.last_error,
                  self.restart_delay)
        self._end_process()
        self.stop.wait(self.restart_delay)
        self.restart_delay = min(self.restart_delay * 2, _MAX_RESTART_DELAY)
        return False

    def _end_process(self, *, kill: bool = False) -> None:
        """Close the pipe (the process exits by itself when idle) or kill it; reap it."""
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        self.ready = False
        if conn is not None:
            conn.close()
        if proc is None:
            return
        if kill and proc.is_alive():
            proc.kill()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        proc.close()

    # -- jobs ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                if self.proc is None and not self._start_process():
                    continue
                assert self.proc is not None
                job = claim(self.archive, pid=self.proc.pid)
                if job is not None:
                    self._run(job)
                    continue
                if not self.proc.is_alive():  # died between jobs: nothing to record
                    log.warning("scoring worker %d: %s while idle; restarting", self.index,
                                death_cause(self.proc.exitcode))
                    self._end_process()
                    continue
            except Exception:  # e.g. the database briefly unavailable
                log.exception("scoring worker %d: supervisor loop error; continuing", self.index)
            self.stop.wait(self.cfg.worker.poll_seconds)
        self._end_process()

    def _run(self, job: Job) -> None:
        assert self.proc is not None and self.conn is not None
        ctx = job_context(self.archive, job)
        log.info("job %s (study %s): attempt %d/%d, %d instances -> scoring worker %d (pid %s)",
                 job.id, job.study_uid, job.attempts, job.max_attempts, len(ctx.paths),
                 self.index, self.proc.pid)
        try:
            self.conn.send(("job", ctx))
        except (BrokenPipeError, OSError):
            pass  # it died: _watch finds out and names the cause
        done, error, permanent = self._watch()
        if permanent:  # the input can never succeed: this attempt is the last
            job = dataclasses.replace(job, max_attempts=job.attempts)
        if done is not None:
            # its results are queued in the same transaction (exactly-once results)
            mark_done(self.archive, job, note=done.note, outbox=done.outbox,
                      study_state=done.study_state, images=done.images or None)
            record_job("done" if done.study_state == "scored" else done.study_state)
            log.info("job %s (study %s): done%s", job.id, job.study_uid,
                     f" ({done.note})" if done.note else "")
            return
        retried = mark_failed(self.archive, job, error,
                              retry_base_seconds=self.cfg.worker.retry_base_seconds)
        record_job("retry" if retried else "failed")
        log.error("job %s (study %s): attempt %d/%d failed: %s; %s", job.id, job.study_uid,
                  job.attempts, job.max_attempts, error, "will retry" if retried else "giving up")

    def _watch(self) -> tuple[JobContext | None, str, bool]:
        """Wait for the job's outcome: (its finished context, "", False) or (None, the failure
        reason, whether it is permanent).

        Meanwhile enforce the limits: a process over one is killed and the limit is the reason.
        """
        assert self.proc is not None and self.conn is not None
        t0 = time.monotonic()
        gone = False  # the pipe reported end-of-file: the process has exited
        while True:
            if self.conn.poll(_WATCH_SECONDS):
                try:
                    tag, value, stages, permanent = self.conn.recv()
                    for stage, runs, seconds in stages:  # its metrics live in this process
                        for _ in range(runs):
                            record_stage(stage, seconds / runs)
                    return (value, "", False) if tag == "done" else (None, str(value), permanent)
                except (EOFError, OSError):
                    gone = True
            if gone or not self.proc.is_alive():
                if not gone and self.conn.poll(0):  # it answered just before it ended: read that
                    continue
                self.proc.join(5)
                cause = death_cause(self.proc.exitcode)
                log.error("scoring worker %d (pid %s): %s during a job", self.index,
                          self.proc.pid, cause)
                self._end_process()
                return None, cause, False
            cause = self._limit_exceeded(time.monotonic() - t0)
            if cause:
                log.error("scoring worker %d (pid %s): %s", self.index, self.proc.pid, cause)
                self._end_process(kill=True)
                return None, cause, False

    def _limit_exceeded(self, elapsed: float) -> str:
        assert self.proc is not None
        w = self.cfg.worker
        if w.job_timeout_seconds > 0 and elapsed > w.job_timeout_seconds:
            return f"killed: exceeded worker.job_timeout_seconds ({w.job_timeout_seconds:g} s)"
        if w.max_rss_mb > 0:
            rss = vm_mb(self.proc.pid or 0, "VmRSS")
            if rss is not None and rss > w.max_rss_mb:
                return f"killed: exceeded worker.max_rss_mb ({rss:.0f} MiB > {w.max_rss_mb} MiB)"
        if self.stop.is_set():
            self.stop_since = self.stop_since or time.monotonic()
            if time.monotonic() - self.stop_since > _STOP_GRACE_SECONDS:
                return "interrupted: the node stopped during the job"
        return ""


class Supervisor:
    """``worker.processes`` scoring processes fed from the job queue (``start``/``stop``)."""

    def __init__(self, archive: Archive, cfg: Config) -> None:
        self._stop = threading.Event()
        self._slots = [_Slot(i, archive, cfg, self._stop) for i in range(cfg.worker.processes)]

    def start(self) -> Supervisor:
        for slot in self._slots:
            slot.thread.start()
        return self

    def pids(self) -> list[int]:
        """Process ids of the scoring processes that have loaded the model (status, tests)."""
        procs = [s.proc for s in self._slots if s.ready]
        return [p.pid for p in procs if p is not None and p.pid is not None]

    def ready_check(self) -> tuple[bool, str]:
        """For ``/readyz``: ready once any scoring process has its model loaded."""
        if any(s.ready for s in self._slots):
            return True, "loaded"
        errors = [f"scoring worker {s.index}: {s.last_error}" for s in self._slots if s.last_error]
        return False, "; ".join(errors) or "loading"

    def stop(self, timeout: float = _STOP_GRACE_SECONDS + 15) -> None:
        """Let running jobs finish (up to the grace period), then end every scoring process."""
        self._stop.set()
        for slot in self._slots:
            slot.thread.join(timeout)
