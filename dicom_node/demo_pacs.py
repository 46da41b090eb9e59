"""Throw-away DICOM peers on 127.0.0.1 for the demo and the benchmarks, and process hygiene.

The demo must run on a user's machine with nothing but the repository, so it starts its own
"PACS": Orthanc when installed (the real thing, bound to loopback), otherwise a pynetdicom storage
SCP in a thread. The benchmarks also use DCMTK ``storescp`` as the tuned reference receiver.
Every peer exposes ``received()`` — local copies of what it stored — and ``stop()``; every child
process runs in its own process group so that stopping it never leaves grandchildren behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

DCMTK_STORESCP = Path("/usr/bin/storescp")
DCMTK_STORESCU = Path("/usr/bin/storescu")
ORTHANC_BIN = Path("/usr/sbin/Orthanc")


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


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
                  what: str = "peer", log_path: Path | None = None) -> None:
    """Block until ``port`` accepts connections; raise RuntimeError on timeout or early exit.

    Why: every wait in the demo is bounded, and a child that dies during start-up is reported at
    once (with the tail of its log) instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up (exit {proc.returncode})"
                               + _tail(log_path))
        if port_open(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s"
                       + _tail(log_path))


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {path}:\n" + "\n".join(text)


def start_process(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (process group), stdout+stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = log_path.open("ab")
    full_env = {**os.environ, **(env or {})}
    try:
        return subprocess.Popen(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                start_new_session=True)
    finally:
        fh.close()


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
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


class Peer(Protocol):
    """A storage SCP the demo or a benchmark sends to."""

    ae_title: str
    port: int

    def received(self) -> list[Path]: ...

    def stop(self) -> None: ...


class StorescpPeer:
    """DCMTK ``storescp`` with TCP_NODELAY and a 128 KiB PDU: the tuned reference receiver."""

    def __init__(self, workdir: Path, ae_title: str = "STORESCP", port: int | None = None,
                 ignore: bool = False) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.out_dir = workdir / "storescp"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "storescp.log"
        cmd = [str(DCMTK_STORESCP), "-aet", ae_title, "-pdu", "131072", "-od", str(self.out_dir)]
        if ignore:
            cmd.append("--ignore")
        cmd.append(str(self.port))
        self.proc = start_process(cmd, self.log_path, env={"TCP_NODELAY": "1"})
        wait_for_port(self.port, 15, self.proc, "storescp", self.log_path)

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_process(self.proc)


class PynetdicomPeer:
    """A pynetdicom storage SCP in a thread: the PACS of last resort (no Orthanc installed)."""

    def __init__(self, workdir: Path, ae_title: str = "DEMOPACS", port: int | None = None) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.ae_title = ae_title
        self.port = port or free_port()
        self.out_dir = workdir / "pacs-received"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_pdu_size = 131072
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, _nodelay)],
        )

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.out_dir / f"{ds.SOPInstanceUID}.dcm"
        tmp = path.with_suffix(".part")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        return 0x0000

    def received(self) -> list[Path]:
        return sorted(self.out_dir.glob("*.dcm"))

    def stop(self) -> None:
        self._server.shutdown()


def _nodelay(event) -> None:
    sock = getattr(event.assoc.dul, "socket", None)
    raw = getattr(sock, "socket", None)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_BIND_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real_bind)(int, const struct sockaddr *, socklen_t);
  if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in a; memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  }
  return real_bind(fd, addr, len);
}
"""


class OrthancPeer:
    """A private Orthanc: free ports, storage in ``workdir``, reachable from 127.0.0.1 only.

    Orthanc 1.10 has no listen-address option. When a C compiler exists an LD_PRELOAD shim turns
    its wildcard bind() into a loopback bind(); otherwise only the listed callers on 127.0.0.1 may
    store (DicomAlwaysAllowStore=false, DicomCheckModalityHost=true) and HTTP stays local-only.
    """

    def __init__(self, workdir: Path, callers: Sequence[str], ae_title: str = "ORTHANC",
                 start_timeout: float = 60.0) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.dir = workdir / "orthanc"
        self.out_dir = workdir / "pacs-received"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "storage").mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "orthanc.log"
        password = secrets.token_urlsafe(18)
        self._auth = "Basic " + __import__("base64").b64encode(
            f"demo:{password}".encode()).decode()
        conf = {
            "Name": "dicom-node-demo", "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "storage"), "StorageCompression": False,
            "Plugins": [], "ConcurrentJobs": 1, "HttpServerEnabled": True,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {"demo": password},
            "DicomServerEnabled": True, "DicomAet": ae_title, "DicomPort": self.port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
            "DicomModalities": {f"m{i}": [aet, "127.0.0.1", 104] for i, aet in enumerate(callers)},
            "DicomModalitiesInDatabase": False, "OverwriteInstances": True, "SaveJobs": False,
            "UnknownSopClassAccepted": False,
        }
        conf_path = self.dir / "orthanc.json"
        conf_path.write_text(json.dumps(conf, indent=1))
        conf_path.chmod(0o600)
        env = {}
        shim = self._build_shim()
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        self.proc = start_process([str(ORTHANC_BIN), f"--logfile={self.log_path}", str(conf_path)],
                                  self.dir / "orthanc.stdout", env=env)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited during start-up (exit {self.proc.returncode})"
                                   + _tail(self.log_path))
            try:
                self._get("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not answer within {start_timeout:.0f} s"
                                       + _tail(self.log_path)) from None
                time.sleep(0.25)
        wait_for_port(self.port, 15, self.proc, "Orthanc DICOM", self.log_path)

    def _build_shim(self) -> Path | None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log.warning("no C compiler: Orthanc listens on all interfaces (stores limited to "
                        "127.0.0.1 callers)")
            return None
        src, lib = self.dir / "bind_loopback.c", self.dir / "bind_loopback.so"
        src.write_text(_BIND_SHIM)
        r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                           check=False, capture_output=True, timeout=60)
        return lib if r.returncode == 0 else None

    def _get(self, path: str, timeout: float = 10.0) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                     headers={"Authorization": self._auth})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def received(self) -> list[Path]:
        """Download every instance Orthanc holds that is not yet copied locally.

        Raises RuntimeError when Orthanc has exited; a transient HTTP error returns what is
        already local (the caller polls again).
        """
        if self.proc.poll() is not None:
            raise RuntimeError(f"the PACS (Orthanc, PID {self.proc.pid}) exited unexpectedly "
                               f"with code {self.proc.returncode}; see {self.log_path}")
        try:
            oids = json.loads(self._get("/instances"))
        except OSError as exc:
            log.warning("Orthanc REST API did not answer (%s); retrying", exc)
            return sorted(self.out_dir.glob("*.dcm"))
        for oid in oids:
            path = self.out_dir / f"{oid}.dcm"
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(self._get(f"/instances/{oid}/file"))
                os.replace(tmp, path)
        return sorted(self.out_dir.glob("*.dcm"))

    def stop(self) -> None:
        stop_process(self.proc)


def start_pacs(workdir: Path, callers: Sequence[str], prefer_orthanc: bool = True) -> Peer:
    """Orthanc when installed (and ``prefer_orthanc``), otherwise a pynetdicom SCP."""
    if prefer_orthanc and ORTHANC_BIN.exists():
        try:
            return OrthancPeer(workdir, callers)
        except RuntimeError as exc:
            log.warning("Orthanc did not start (%s); using a pynetdicom storage SCP", exc)
    return PynetdicomPeer(workdir)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def dump_toml(data: dict, prefix: str = "") -> str:
    """Write a config mapping as TOML (tables, arrays of tables, scalars, lists; no tomli_w)."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)
               and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    out = [f"{k} = {_toml_value(v)}" for k, v in scalars]
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out += ["", f"[{name}]", dump_toml(v, name)]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out += ["", f"[[{name}]]", dump_toml(item, name)]
    return "\n".join(line for line in out if line is not None).strip() + "\n"


class NodeProcess:
    """``dicom-node serve`` as a child process with a config written to ``workdir``."""

    def __init__(self, workdir: Path, config: dict, start_timeout: float = 120.0,
                 python: str | None = None) -> None:
        import sys

        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(dump_toml(config))
        self.port = int(config["node"]["port"])
        self.ae_title = str(config["node"].get("ae_title", "DICOMNODE"))
        self.data_dir = Path(config["node"]["data_dir"])
        self.log_path = workdir / "node.log"
        self.proc = start_process(
            [python or sys.executable, "-m", "dicom_node.cli", "serve", "--config",
             str(self.config_path)], self.log_path, cwd=workdir)
        try:
            wait_for_port(self.port, start_timeout, self.proc, "dicom-node serve", self.log_path)
        except RuntimeError:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, timeout=20.0)


def storescu(files: Sequence[Path], port: int, aec: str, aet: str = "STORESCU",
             timeout: float = 600.0, extra: Sequence[str] = ("-pdu", "131072")) -> float:
    """Send ``files`` in one association with DCMTK storescu (TCP_NODELAY=1); return seconds.

    Raises RuntimeError with storescu's last output when it fails or times out.
    """
    cmd = [str(DCMTK_STORESCU), "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "TCP_NODELAY": "1"})
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"storescu to port {port} timed out after {timeout:.0f} s") from None
    elapsed = time.perf_counter() - t0
    if r.returncode != 0 or "E:" in r.stderr:
        raise RuntimeError(f"storescu to port {port} failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout)[-800:]}")
    return elapsed
