"""``dicom-node serve`` as a child process, its demo config, and its studies as the node sees them.

Why a separate process: the demo exercises exactly what a hospital runs (the same ``serve``
command and config file), and a crash in the node cannot take the demo's clean-up with it. The
demo asks the node about its studies the way an operator does: ``dicom-node studies --json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from dicom_node.demo.pacs import Peer
from dicom_node.demo.processes import free_port, start_process, stop_process, wait_for_port

NODE_AET = "DICOMNODE"
MODALITY_AET = "STORESCU"


# a quiet demo study waits this long for a human SEG before the node segments it itself
SEG_WAIT_SECONDS = 2.0


def node_toml(workdir: Path, model_dir: Path, pacs: Peer, threads: int,
              seg_model_dir: Path | None = None) -> dict[str, Any]:
    """The demo node's config: loopback, scoring on, the demo PACS as the only destination.

    With ``seg_model_dir`` (the demo's segmenter) a study without SEG gets the automatic ROI
    after ``SEG_WAIT_SECONDS`` (``on_missing_seg = "auto"``); without it, the whole tissue region.
    """
    completion: dict[str, Any] = {
        "idle_seconds": 3, "max_wait_seconds": 60, "require_seg": True,
        "on_missing_seg": "score-whole-region", "poll_seconds": 0.5}
    scoring: dict[str, Any] = {"enabled": True, "model_dir": str(model_dir), "cam_enabled": True,
                               "torch_threads": threads, "device": "cpu"}
    if seg_model_dir is not None:
        completion.update(on_missing_seg="auto", seg_wait_seconds=SEG_WAIT_SECONDS)
        scoring["segmentation_model_dir"] = str(seg_model_dir)
    return {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port(),
                 "data_dir": str(workdir / "node-data"),
                 "allowed_calling_aets": [MODALITY_AET, "PYNETDICOM"],
                 "disk_reserve_mb": 0, "log_level": "INFO"},
        "completion": completion,
        "worker": {"enabled": True, "poll_seconds": 0.3, "retry_base_seconds": 2,
                   "max_attempts": 2},
        "scoring": scoring,
        # a study whose every automatic ROI fails QC still gets an SR ("not assessable")
        "results": {"not_assessable": "sr"},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.port}],
        "delivery": {"poll_seconds": 0.5, "retry_initial_seconds": 2, "retry_max_seconds": 10,
                     "timeout_seconds": 30},
    }


class NodeProcess:
    """``dicom-node serve`` as a child process with its config written to ``workdir/node.toml``."""

    def __init__(self, workdir: Path, config: dict[str, Any], start_timeout: float = 120.0,
                 python: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(tomli_w.dumps(config))
        self.python = python or sys.executable
        self.port = int(config["node"]["port"])
        self.ae_title = str(config["node"].get("ae_title", NODE_AET))
        self.data_dir = Path(config["node"]["data_dir"])
        self.log_path = workdir / "node.log"
        self.proc = start_process(
            [self.python, "-m", "dicom_node.cli", "serve", "--config", self.config_path],
            self.log_path, cwd=workdir)
        try:
            wait_for_port(self.port, start_timeout, self.proc, "dicom-node serve", self.log_path)
        except RuntimeError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def studies(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The node's studies table (``dicom-node studies --json``); [] before the first one.

        Raises RuntimeError when the command fails for another reason than an empty archive.
        """
        if not (self.data_dir / "index.sqlite").exists():
            return []
        r = subprocess.run([self.python, "-m", "dicom_node.cli", "--log-level", "WARNING",
                            "studies", "--json", "--config", str(self.config_path)],
                           check=False, capture_output=True, text=True, timeout=timeout,
                           cwd=self.config_path.parent)
        if r.returncode != 0:
            raise RuntimeError(f"dicom-node studies failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout)[-800:]}")
        rows: list[dict[str, Any]] = json.loads(r.stdout)
        return rows

    def stop(self) -> None:
        stop_process(self.proc, timeout=20.0)
