"""Small shared pieces of the benchmarks: import path, node configs, result printing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the repository must come before bench/ itself, or bench/training.py shadows the training package
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))

from testing.peers import free_port  # noqa: E402  (needs the sys.path line above)


def node_config(data_dir: Path, *, scoring: dict | None = None, destinations: list | None = None,
                completion: dict | None = None, **node: object) -> dict:
    """A TOML-ready node config for a benchmark run (loopback, any caller, no disk reserve)."""
    cfg: dict = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(),
                 "data_dir": str(data_dir), "allow_any_calling_aet": True,
                 "allowed_calling_aets": ["STORESCU"], "disk_reserve_mb": 0,
                 "log_level": "WARNING", **node},
        "completion": completion or {"idle_seconds": 2, "max_wait_seconds": 60,
                                     "require_seg": False, "poll_seconds": 0.5},
        "scoring": scoring or {"enabled": False},
        "worker": {"enabled": bool(scoring and scoring.get("enabled")), "poll_seconds": 0.2},
        "delivery": {"poll_seconds": 0.5, "retry_initial_seconds": 2},
    }
    if destinations:
        cfg["destinations"] = destinations
    return cfg


def save_result(name: str, result: dict, out_dir: Path | None = None) -> Path:
    """Write one benchmark's figures as JSON (bench/results/<name>.json) for run_all."""
    folder = out_dir or REPO / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path
