"""The scoring process: loads the model once, then scores the jobs its supervisor hands it.

It runs in its own process (started with ``spawn`` by :mod:`dicom_node.flow.supervisor`) so a
decoder that aborts, an allocation that fails or a job that never ends takes down this process
only, never the listener. It does not touch the job queue: the supervisor claims each job, sends
it here over a pipe and records the outcome, which is how a death mid-job is still counted.

Messages (tuples over a ``multiprocessing`` pipe):
    child -> parent: ``("ready", pid, seconds)`` once the model is loaded, then one
        ``("done", context)`` (the :class:`JobContext` with the processor's note and outputs)
        or ``("failed", error)`` per job, each followed by the stage times it recorded and
        whether the failure is permanent (no retry).
    parent -> child: ``("job", context)``; closing the pipe asks the process to exit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from dicom_node.config import Config
from dicom_node.errors import NothingToScoreError, PermanentJobError
from dicom_node.ops.logs import setup_logging
from dicom_node.ops.metrics import STAGE_SECONDS
from dicom_node.worker import JobContext, finish_not_applicable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSettings:
    """What a scoring process needs besides the config: its slot and the parent's log set-up."""

    slot: int
    log_level: str
    log_format: str


def vm_mb(pid: int | str = "self", field: str = "VmSize") -> float | None:
    """A ``/proc/<pid>/status`` memory field in MiB (None where unavailable, e.g. not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the supervisor dies, so no orphan keeps scoring a stale job."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends the loop
        pass


def _limit_address_space(extra_mb: int, slot: int) -> None:
    """RLIMIT_AS = what the loaded model takes + ``worker.max_memory_mb``.

    Set after loading, because importing torch alone reserves gigabytes of address space that a
    fixed cap would have to guess; a job's allocation beyond the headroom then fails in this
    process (MemoryError, or an abort in native code) instead of exhausting the host.
    """
    if extra_mb <= 0:
        return
    base = vm_mb() or 0.0
    limit = int((base + extra_mb) * 2**20)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("scoring worker %d: address space limited to %.0f MiB (%.0f loaded + %d "
             "worker.max_memory_mb)", slot, limit / 2**20, base, extra_mb)


def child_main(conn: Connection, cfg: Config, settings: ChildSettings) -> None:
    """Entry point of a scoring process (picklable arguments only: it is started with spawn)."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the supervisor decides when this process stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(settings.log_level, settings.log_format)  # the same filters as the parent's
    t0 = time.monotonic()
    from dicom_node.processing import ScoringProcessor

    processor = ScoringProcessor(cfg)
    _ = processor.pipeline  # load the weights now: a job must not pay the start-up
    _limit_address_space(cfg.worker.max_memory_mb, settings.slot)
    conn.send(("ready", os.getpid(), time.monotonic() - t0))
    while True:
        try:
            msg: tuple[str, JobContext] = conn.recv()
        except (EOFError, OSError):  # the supervisor closed the pipe or died
            return
        ctx = msg[1]
        before = stage_totals()
        try:
            processor(ctx)
        except NothingToScoreError as exc:  # terminal, not a failure: the study is closed
            finish_not_applicable(ctx, exc)
        except Exception as exc:  # noqa: BLE001 - every failure is that job's, not the process's
            log.debug("job %s traceback:\n%s", ctx.job_id, traceback.format_exc())
            # a PermanentJobError says the input can never succeed: no retry
            conn.send(("failed", job_error(exc, cfg.worker.max_memory_mb),
                       stage_deltas(before, stage_totals()), isinstance(exc, PermanentJobError)))
            continue
        conn.send(("done", ctx, stage_deltas(before, stage_totals()), False))


StageTimes = list[tuple[str, int, float]]


def stage_totals() -> dict[str, tuple[int, float]]:
    """(count, seconds) per stage in this process's stage histogram."""
    totals: dict[str, tuple[int, float]] = {}
    for metric in STAGE_SECONDS.collect():
        for sample in metric.samples:
            stage = sample.labels.get("stage", "")
            n, total = totals.get(stage, (0, 0.0))
            if sample.name.endswith("_count"):
                totals[stage] = (int(sample.value), total)
            elif sample.name.endswith("_sum"):
                totals[stage] = (n, float(sample.value))
    return totals


def stage_deltas(before: dict[str, tuple[int, float]],
                 after: dict[str, tuple[int, float]]) -> StageTimes:
    """What one job timed: (stage, runs, seconds), for the supervisor to record in /metrics.

    The serving process's metrics registry is not this process's, so the times travel back
    with the job's outcome.
    """
    out: StageTimes = []
    for stage, (n, total) in after.items():
        n0, total0 = before.get(stage, (0, 0.0))
        if n > n0:
            out.append((stage, n - n0, total - total0))
    return out


_OUT_OF_MEMORY = ("MemoryError", "Unable to allocate", "bad_alloc", "Cannot allocate memory")


def job_error(exc: BaseException, max_memory_mb: int) -> str:
    """The failure text stored for a job; an allocation refused under the limit names it.

    Readers turn a failed decode into a per-image reason string, so the MemoryError is found in
    the exception chain or, once it became text, by the messages allocators give.
    """
    error = f"{type(exc).__name__}: {exc}"
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    oom = any(isinstance(e, MemoryError) for e in chain) or any(m in error for m in _OUT_OF_MEMORY)
    if oom and max_memory_mb > 0:
        error = (f"exceeded worker.max_memory_mb ({max_memory_mb} MiB above the loaded model): "
                 f"{error}")
    return error
