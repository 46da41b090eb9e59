"""The demo's PACS: a private Orthanc on 127.0.0.1 when installed, else a pynetdicom storage SCP.

The demo must run on a user's machine with nothing but the repository, so it starts its own
"PACS" and reads back what the node delivered to it. Every peer exposes ``received()`` (local
copies of what it stored) and ``stop()``. :class:`OrthancPeer` is the project's one Orthanc
wrapper: the tests' loopback PACS (the ``testing`` package) builds on it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from dicom_node.demo.processes import (
    free_port,
    log_tail,
    start_process,
    stop_process,
    wait_for_port,
)

log = logging.getLogger(__name__)

ORTHANC_BIN = Path("/usr/sbin/Orthanc")


def orthanc_binary() -> Path | None:
    """The Orthanc executable (``ORTHANC_BIN``, PATH or the Debian location), or None."""
    found = os.environ.get("ORTHANC_BIN") or shutil.which("Orthanc")
    if found:
        return Path(found)
    return ORTHANC_BIN if ORTHANC_BIN.exists() else None


class Peer(Protocol):
    """A storage SCP the demo sends to and reads results back from."""

    ae_title: str
    port: int

    def received(self) -> list[Path]: ...

    def stop(self) -> None: ...


class PynetdicomPeer:
    """A pynetdicom storage SCP in a thread: the PACS of last resort (no Orthanc installed)."""

    def __init__(self, workdir: Path, ae_title: str = "DEMOPACS", port: int | None = None) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.ae_title = ae_title
        self.port = port or free_port()
        self.out_dir = workdir / "pacs-received"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_pdu_size = 131072
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, _nodelay)],
        )
        if server is None:  # only a blocking server returns None
            raise RuntimeError(f"pynetdicom SCP did not start on 127.0.0.1:{self.port}")
        self._server = server

    def _on_store(self, event: Any) -> int:
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


def _nodelay(event: Any) -> None:
    """Nagle + delayed ACK cost ~48 ms per C-STORE on loopback: switch Nagle off."""
    sock = getattr(event.assoc.dul, "socket", None)
    raw = getattr(sock, "socket", None)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Orthanc 1.10 has no listen-address option: this LD_PRELOAD shim turns its wildcard bind() into a
# loopback bind() (IPv4 and IPv6).
_BIND_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real_bind)(int, const struct sockaddr *, socklen_t);
  if (!real_bind)
    real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in a; memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a; memcpy(&a, addr, sizeof a);
    if (memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr) == 0) {
      a.sin6_addr = in6addr_loopback;
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  }
  return real_bind(fd, addr, len);
}
"""


class OrthancPeer:
    """A private Orthanc: its own ports, storage in ``workdir``, reachable from 127.0.0.1 only.

    When a C compiler exists the bind shim keeps both listeners on loopback; otherwise only the
    listed callers on 127.0.0.1 may store (DicomAlwaysAllowStore=false, DicomCheckModalityHost)
    and HTTP stays local-only (RemoteAccessAllowed=false). The REST API needs a random password.
    Starting again on the same ``workdir`` keeps what Orthanc stored (a PACS that was restarted).
    """

    def __init__(self, workdir: Path, callers: Sequence[str], ae_title: str = "ORTHANC",
                 port: int | None = None, http_port: int | None = None,
                 start_timeout: float = 60.0,
                 extra_config: Mapping[str, Any] | None = None) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.ae_title = ae_title
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.dir = workdir / "orthanc"
        self.out_dir = workdir / "pacs-received"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "storage").mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "orthanc.log"
        password = secrets.token_urlsafe(18)
        self.user, self.password = "demo", password  # REST and DICOMweb basic auth
        self._auth = "Basic " + base64.b64encode(f"demo:{password}".encode()).decode()
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
        for key, value in (extra_config or {}).items():  # tables (DicomModalities) are merged
            old = conf.get(key)
            conf[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) \
                else value
        conf_path = self.dir / "orthanc.json"
        conf_path.write_text(json.dumps(conf, indent=1))
        conf_path.chmod(0o600)
        env = {}
        shim = self._build_shim()
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        self.proc = start_process([binary, f"--logfile={self.log_path}", conf_path],
                                  self.dir / "orthanc.stdout", env=env)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited during start-up (exit {self.proc.returncode})"
                                   + log_tail(self.log_path))
            try:
                self.request("GET", "/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not answer within {start_timeout:.0f} s"
                                       + log_tail(self.log_path)) from None
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

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 30.0) -> bytes:
        """One authenticated REST call; raises OSError (URLError/HTTPError) when it fails."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                     method=method, headers={"Authorization": self._auth})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get_json(self, path: str) -> Any:
        """GET a REST resource and decode its JSON answer."""
        return json.loads(self.request("GET", path))

    def received(self) -> list[Path]:
        """Download every instance Orthanc holds that is not yet copied locally.

        Raises RuntimeError when Orthanc has exited; a transient HTTP error returns what is
        already local (the caller polls again).
        """
        if self.proc.poll() is not None:
            raise RuntimeError(f"the PACS (Orthanc, PID {self.proc.pid}) exited unexpectedly "
                               f"with code {self.proc.returncode}; see {self.log_path}")
        try:
            oids = self.get_json("/instances")
        except OSError as exc:
            log.warning("Orthanc REST API did not answer (%s); retrying", exc)
            return sorted(self.out_dir.glob("*.dcm"))
        for oid in oids:
            path = self.out_dir / f"{oid}.dcm"
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(self.request("GET", f"/instances/{oid}/file"))
                os.replace(tmp, path)
        return sorted(self.out_dir.glob("*.dcm"))

    def stop(self) -> None:
        stop_process(self.proc)


def start_pacs(workdir: Path, callers: Sequence[str], prefer_orthanc: bool = True) -> Peer:
    """Orthanc when installed (and ``prefer_orthanc``), otherwise a pynetdicom SCP."""
    if prefer_orthanc and orthanc_binary() is not None:
        try:
            return OrthancPeer(workdir, callers)
        except RuntimeError as exc:
            log.warning("Orthanc did not start (%s); using a pynetdicom storage SCP", exc)
    return PynetdicomPeer(workdir)
