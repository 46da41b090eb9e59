"""Every Prometheus metric of the node, and the small functions that record them.

Counters and histograms are updated where things happen (listener, scoring, sender) through the
``record_*`` functions, so those modules need one line each and no knowledge of Prometheus. The
gauges that describe the archive (studies by state, queue depth and age of the oldest item) are
read from the index at scrape time by :class:`IndexCollector`, so they are always what the
database says, also after a restart.

The metrics live in :data:`REGISTRY` (not prometheus-client's process-wide default) so that the
``/metrics`` page shows the node's metrics and the process collectors, nothing a library added.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dicom_node.store import monitoring

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

INSTANCES = Counter(
    "dicom_node_instances_received", "C-STORE requests answered, by DIMSE status and calling AE",
    ["status", "calling_aet"], registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "dicom_node_received_bytes", "Bytes of instances archived, by calling AE", ["calling_aet"],
    registry=REGISTRY,
)
# Stages: whatever the scoring pipeline times (decode, transforms = ROI crop + resize, ensemble,
# cam, measurements; a new stage appears without a change here), sr_build (results), send (one
# association to a destination).
STAGE_SECONDS = Histogram(
    "dicom_node_stage_seconds", "Latency of each processing stage", ["stage"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
DELIVERIES = Counter(
    "dicom_node_deliveries", "Result objects sent, by destination and outcome (delivered|failed)",
    ["destination", "outcome"], registry=REGISTRY,
)
RETRIES = Counter(
    "dicom_node_delivery_retries", "Send attempts that were retries, by destination",
    ["destination"], registry=REGISTRY,
)
JOBS = Counter(
    "dicom_node_jobs", "Scoring jobs finished, by outcome (done|not-applicable|failed|retry)",
    ["outcome"],
    registry=REGISTRY,
)
MODEL = Info("dicom_node_model", "Identity of the loaded scoring model", registry=REGISTRY)


def record_instance(status: int, calling_aet: str, size: int = 0) -> None:
    """One C-STORE answered with ``status``; ``size`` bytes archived if it was stored."""
    INSTANCES.labels(status=f"0x{status:04X}", calling_aet=calling_aet or "?").inc()
    if size:
        RECEIVED_BYTES.labels(calling_aet=calling_aet or "?").inc(size)


def record_stage(stage: str, seconds: float) -> None:
    """One run of a processing stage took ``seconds``."""
    STAGE_SECONDS.labels(stage=stage).observe(max(0.0, seconds))


def record_pipeline_timings(timings_ms: Mapping[str, float]) -> None:
    """The pipeline's per-stage timings (milliseconds, as ``StudyScore.timings_ms`` holds them)."""
    for stage, ms in timings_ms.items():
        record_stage(stage, ms / 1000.0)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Time the ``with`` block as ``stage`` (recorded also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record_stage(stage, time.perf_counter() - t0)


def record_delivery(destination: str, delivered: int, failed: int = 0, retry: bool = False) -> None:
    """One send to ``destination``: how many objects arrived, how many did not, was it a retry."""
    if delivered:
        DELIVERIES.labels(destination=destination, outcome="delivered").inc(delivered)
    if failed:
        DELIVERIES.labels(destination=destination, outcome="failed").inc(failed)
    if retry:
        RETRIES.labels(destination=destination).inc()


def record_send(destination: str, rows: list[dict[str, Any]], sent: list[dict[str, Any]],
                started: float) -> None:
    """One association to ``destination`` that tried ``rows`` (outbox rows) and stored ``sent``.

    ``started`` is the ``time.perf_counter()`` before the send; a row with earlier attempts makes
    the send a retry.
    """
    record_stage("send", time.perf_counter() - started)
    record_delivery(destination, len(sent), len(rows) - len(sent),
                    retry=any(r.get("attempts") for r in rows))


def record_job(outcome: str) -> None:
    """A scoring job ended: ``done``, ``not-applicable``, ``failed`` (no attempts left) or
    ``retry``."""
    JOBS.labels(outcome=outcome).inc()


def record_model(info: Mapping[str, object]) -> None:
    """The served model's identity (uid, name, version, backbone...) as an info metric."""
    MODEL.info({str(k): str(v) for k, v in info.items() if v is not None})


def read_index_gauges(db_path: Path, now: float | None = None) -> dict[str, dict[str, float]]:
    """Read-only snapshot of the index for the gauges: studies by state, queue depth and age.

    Returns ``{"studies": {state: n}, "depth": {queue: n}, "oldest_age": {queue: seconds},
    "outbox": {"destination\tstate": n}}``;
    empty dicts when the index (or a table) does not exist yet.
    """
    now = time.time() if now is None else now
    out: dict[str, dict[str, float]] = {"studies": {}, "depth": {}, "oldest_age": {},
                                        "outbox": {}}
    if not Path(db_path).exists():
        return out
    with monitoring.read_only(db_path) as conn:
        for state, n in monitoring.study_state_counts(conn).items():
            out["studies"][state] = float(n)
        for (dest, state), n in monitoring.outbox_state_counts(conn).items():
            out["outbox"][f"{dest}\t{state}"] = float(n)  # keyed "destination\tstate"
        for name, (n, oldest) in monitoring.queue_backlog(conn).items():
            out["depth"][name] = float(n)
            out["oldest_age"][name] = max(0.0, now - oldest) if oldest is not None else 0.0
    return out


class IndexCollector(Collector):
    """Gauges computed from the index when Prometheus scrapes."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = read_index_gauges(self.db_path)
        studies = GaugeMetricFamily("dicom_node_studies", "Studies in the index by state",
                                    labels=["state"])
        for state, n in sorted(snap["studies"].items()):
            studies.add_metric([state], n)
        depth = GaugeMetricFamily("dicom_node_queue_depth",
                                  "Items waiting or running (jobs) / waiting (outbox)",
                                  labels=["queue"])
        age = GaugeMetricFamily("dicom_node_queue_oldest_age_seconds",
                                "Age of the oldest waiting item (0 when empty)", labels=["queue"])
        for queue in ("jobs", "outbox"):
            depth.add_metric([queue], snap["depth"].get(queue, 0.0))
            age.add_metric([queue], snap["oldest_age"].get(queue, 0.0))
        items = GaugeMetricFamily("dicom_node_outbox_items",
                                  "Outbox rows by destination and state (pending, sent, "
                                  "committed, expired)", labels=["destination", "state"])
        for key, n in sorted(snap["outbox"].items()):
            items.add_metric(key.split("\t", 1), n)
        yield studies
        yield depth
        yield age
        yield items

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def exposition(db_path: Path | None = None) -> bytes:
    """The ``/metrics`` body: the node's registry plus, with ``db_path``, the index gauges."""
    if db_path is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    registry.register(IndexCollector(db_path))
    return generate_latest(REGISTRY) + generate_latest(registry)
