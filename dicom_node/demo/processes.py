"""Child processes and ports for the demo: own process groups, bounded waits, no leftovers.

Every child the demo starts (Orthanc, ``dicom-node serve``) runs in its own session, so stopping
it never leaves grandchildren behind, and every wait for a port has a deadline and reports a child
that died during start-up at once, with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The last lines of a child's log, formatted to append to an error message."""
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {path}:\n" + "\n".join(text)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                  what: str = "peer", log_path: Path | None = None) -> None:
    """Block until ``port`` accepts connections; raise RuntimeError on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up (exit {proc.returncode})"
                               + log_tail(log_path))
        if port_open(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s"
                       + log_tail(log_path))


def start_process(cmd: Sequence[str | Path], log_path: Path,
                  env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (process group), stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log_path.open("ab") as fh:
        return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it is still alive."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
