"""Run the node's parts in-process (or as a real `serve` subprocess) for network tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from dicom_node.completion import CompletionMonitor
from dicom_node.config import Config
from dicom_node.errors import DeliveryError
from dicom_node.scp import start_scp
from dicom_node.scu import echo
from dicom_node.store.archive import Archive
from dicom_node.worker import Processor, Worker, archive_only_processor

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def running_node(cfg: Config, *, processor: Processor | None = archive_only_processor,
                 completion: bool = True) -> Iterator[Archive]:
    """Listener (+ completion monitor + worker) on cfg.node.port; yields the Archive."""
    archive = Archive(cfg.node.data_dir, disk_reserve_mb=cfg.node.disk_reserve_mb).init()
    server = start_scp(cfg.node, archive)
    monitor = CompletionMonitor(archive, cfg.completion, max_attempts=cfg.worker.max_attempts)
    worker = Worker(archive, processor, cfg.worker) if processor is not None else None
    if completion:
        monitor.start()
    if worker is not None:
        worker.start()
    try:
        yield archive
    finally:
        server.shutdown()
        if completion:
            monitor.stop()
        if worker is not None:
            worker.stop()
        archive.close()


def wait_for(predicate: Callable[[], object], timeout: float = 20.0,
             interval: float = 0.1) -> object:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def write_toml(cfg_dict: dict[str, Any], path: Path) -> Path:
    """Write a node config mapping as TOML (what ``dicom-node serve --config`` reads)."""
    path.write_text(tomli_w.dumps(cfg_dict))
    return path


class ServeProcess:
    """``python -m dicom_node.cli serve --config X`` as a child process (for crash tests)."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServeProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config",
                 str(self.config_path)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
            try:
                return echo("127.0.0.1", self.port, calling_aet="ECHOSCU",
                            called_aet="DICOMNODE", timeout=2) == 0
            except DeliveryError:
                return False

        wait_for(up, timeout=timeout, interval=0.2)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
