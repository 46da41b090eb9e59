"""Throughput: 4 concurrent modalities stream studies to a scoring node that delivers to a PACS.

Each "modality" is a thread that sends its share of the studies one association per study with
DCMTK storescu; the node (``dicom-node serve``, scoring on, 5-fold ensemble) delivers SR + heat
maps to a DCMTK storescp. Figures: studies/hour end to end (first push → last SR stored at the
PACS), latency per study from its last instance sent to its SR stored (p50/p95; this includes the
node's completion quiet period, reported separately), and machine CPU utilisation (/proc/stat).
Fold weights are random (untrained): timing does not depend on them.

    .venv/bin/python bench/throughput.py --studies 40 --timeout 900
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
from common import node_config, save_result

from bench.model_fixture import untrained_artifact
from bench.usdata import us_instances
from testing.peers import NodeProcess, StorescpPeer, storescu

IDLE_SECONDS = 2.0


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat (all CPUs)."""
    parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts) - idle, sum(parts)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run(studies: int = 40, modalities: int = 4, backbone: str = "convnext_tiny", folds: int = 5,
        timeout: float = 900.0, threads: int = 2) -> dict:
    import pydicom

    files = sorted(us_instances(studies * 5).glob("*.dcm"))
    by_study: dict[str, list[Path]] = {}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        by_study.setdefault(uid, []).append(f)
    uids = list(by_study)[:studies]
    sent_at: dict[str, float] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        model_dir = untrained_artifact(work / "model", backbone, folds)
        pacs = StorescpPeer(work / "pacs")
        cfg = node_config(
            work / "node" / "data",
            scoring={"enabled": True, "model_dir": str(model_dir), "torch_threads": threads,
                     "device": "cpu"},
            completion={"idle_seconds": IDLE_SECONDS, "max_wait_seconds": 120,
                        "require_seg": False, "poll_seconds": 0.5},
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                           "port": pacs.port}])
        node = None
        try:
            node = NodeProcess(work / "node", cfg, start_timeout=240)

            def modality(k: int) -> None:
                for uid in uids[k::modalities]:
                    try:
                        storescu(by_study[uid], node.port, node.ae_title, timeout=120)
                        sent_at[uid] = time.time()
                    except RuntimeError as exc:
                        errors.append(str(exc)[:300])

            busy0, total0 = _cpu_times()
            t0 = time.time()
            pushers = [threading.Thread(target=modality, args=(k,)) for k in range(modalities)]
            for t in pushers:
                t.start()
            arrived: dict[str, float] = {}
            seen: set[Path] = set()
            deadline = time.monotonic() + timeout
            while len(arrived) < len(uids) and time.monotonic() < deadline and node.alive():
                for p in pacs.received():
                    if p in seen or not p.name.startswith("SR"):
                        continue
                    try:  # storescp may still be writing it: read again on the next poll
                        ds = pydicom.dcmread(p, stop_before_pixels=True)
                        uid = str(ds.StudyInstanceUID)
                    except Exception:  # noqa: BLE001, S112
                        continue
                    seen.add(p)
                    arrived.setdefault(uid, p.stat().st_mtime)
                time.sleep(0.5)
            for t in pushers:
                t.join(timeout=10)
            t_end = max(arrived.values()) if arrived else time.time()
            busy1, total1 = _cpu_times()
        finally:
            if node is not None:
                node.stop()
            pacs.stop()
    lat = [arrived[u] - sent_at[u] for u in arrived if u in sent_at]
    elapsed = t_end - t0
    return {
        "studies": len(uids), "delivered": len(arrived), "modalities": modalities,
        "backbone": backbone, "folds": folds, "weights": "untrained (random init)",
        "elapsed_s": elapsed, "studies_per_hour": len(arrived) / elapsed * 3600 if arrived else 0,
        "latency_p50_s": _pct(lat, 0.5) if lat else None,
        "latency_p95_s": _pct(lat, 0.95) if lat else None,
        "completion_idle_s": IDLE_SECONDS,
        "cpu_utilisation": (busy1 - busy0) / max(total1 - total0, 1),
        "errors": errors[:5],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--modalities", type=int, default=4)
    ap.add_argument("--backbone", default="convnext_tiny")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    r = run(args.studies, args.modalities, args.backbone, timeout=args.timeout)
    print(f"throughput: {r['delivered']}/{r['studies']} studies from {r['modalities']} modalities "
          f"in {r['elapsed_s']:.0f} s = {r['studies_per_hour']:.0f} studies/hour "
          f"({r['folds']}-fold {r['backbone']}); latency after last instance p50 "
          f"{r['latency_p50_s']} s, p95 {r['latency_p95_s']} s (includes "
          f"{r['completion_idle_s']} s "
          f"completion quiet period); CPU {100 * r['cpu_utilisation']:.0f} %; errors {r['errors']}")
    save_result("throughput", r)
    return 0 if r["delivered"] == r["studies"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
