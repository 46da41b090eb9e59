"""The HTTP status server inside ``serve``: /healthz, /readyz, /metrics and a status page.

stdlib ``ThreadingHTTPServer`` in a daemon thread: the node needs a handful of read-only GET
endpoints, not a web framework. ``/healthz`` says the process answers; ``/readyz`` says it can do
its job (listener accepting, index writable, model loaded, disk above the reserve) and reports
each destination's last result without failing on it, because an orchestrator restarting the
node does not bring a PACS back. With ``http.token`` set, the page, thumbnails and metrics need
``Authorization: Bearer <token>``; the probes stay open so that a container health check needs no
secret (they reveal no study data).
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import re
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dicom_node.config import Config
from dicom_node.ops import metrics, status
from dicom_node.store import monitoring

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class ListenerCheck:
    """Ready once the DICOM listener is bound.

    Probing with a TCP connection would take one of the listener's association slots for every
    ``/readyz`` poll (an orchestrator polls often), so the check looks at the server object that
    ``serve`` hands over once the listener is up: its socket is open (``shutdown`` closes it).
    """

    def __init__(self, host: str, port: int) -> None:
        self.address = f"{host}:{port}"
        self._target = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
        self._port = port
        self._server: Any = None
        self._probed: tuple[float, tuple[bool, str]] | None = None

    def _probe(self) -> tuple[bool, str]:
        try:
            with socket.create_connection((self._target, self._port), timeout=2.0):
                return True, f"accepting on {self.address}"
        except OSError as exc:
            return False, f"{self.address}: {(exc.strerror or str(exc)).lower()}"

    def attach(self, server: Any) -> None:
        """The listener (pynetdicom's ThreadingTCPServer) is up; judge it from now on."""
        self._server = server

    def __call__(self) -> tuple[bool, str]:
        server = self._server
        if server is None:  # not handed over (a listener run elsewhere): probe, at most every 2 s
            now = time.monotonic()
            if self._probed is None or now - self._probed[0] > 2.0:
                self._probed = (now, self._probe())
            return self._probed[1]
        try:
            bound = server.socket.fileno() >= 0
        except (AttributeError, OSError):
            bound = False
        if not bound:
            return False, f"{self.address}: socket closed"
        return True, f"accepting on {self.address}"


def index_check(db_path: Path) -> Check:
    """Ready when the index takes a write lock within 2 s (then rolls back: nothing written)."""
    def check() -> tuple[bool, str]:
        try:
            with closing(sqlite3.connect(str(db_path), timeout=2.0, isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            return True, "writable"
        except sqlite3.Error as exc:
            return False, f"not writable: {exc}"

    return check


def disk_check(data_dir: Path, reserve_mb: int) -> Check:
    """Ready while free space on the data dir's file system is above ``node.disk_reserve_mb``."""
    def check() -> tuple[bool, str]:
        free_mb = shutil.disk_usage(data_dir).free // (1024 * 1024)
        return free_mb > reserve_mb, f"{free_mb} MiB free, reserve {reserve_mb} MiB"

    return check


def destination_results(db_path: Path) -> dict[str, dict[str, Any]]:
    """Per destination: the last successful send time, pending items and the latest error."""
    out: dict[str, dict[str, Any]] = {}
    if not Path(db_path).exists():
        return out
    with monitoring.read_only(db_path) as conn:
        for r in monitoring.destination_health(conn):
            out[r["destination"]] = {
                "last_sent": status.iso(r["last_sent"]) if r["last_sent"] else None,
                "pending": int(r["pending"] or 0), "expired": int(r["expired"] or 0),
                "last_error": r["error"] or "",
            }
    return out


@dataclass
class StatusContext:
    """What the handler needs: paths, the readiness checks and the optional token."""

    db_path: Path
    results_dir: Path
    checks: Mapping[str, Check]
    token: str | None = None


def readiness(ctx: StatusContext) -> tuple[bool, dict[str, Any]]:
    """Run every check; ready only if all pass. Destinations are reported, never fatal."""
    body: dict[str, Any] = {"checks": {}}
    ok = True
    for name, check in ctx.checks.items():
        try:
            passed, detail = check()
        except Exception as exc:  # noqa: BLE001 - a broken check means not ready, not a 500
            passed, detail = False, f"check failed: {type(exc).__name__}: {exc}"
        body["checks"][name] = {"ok": passed, "detail": detail}
        ok = ok and passed
    try:
        body["destinations"] = destination_results(ctx.db_path)
    except sqlite3.Error as exc:
        body["destinations"] = {"error": str(exc)}
    body["status"] = "ready" if ok else "not ready"
    return ok, body


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.35em .5em;
text-align:left;vertical-align:middle;font-size:14px}th{background:#f3f3f3}
.positive{color:#b00020;font-weight:600}.negative{color:#1b5e20;font-weight:600}
.err{color:#b00020;max-width:28em}code{font-size:13px}img{border:1px solid #ccc}
.ok{color:#1b5e20}.bad{color:#b00020}"""


def render_page(ctx: StatusContext) -> str:
    """The read-only HTML status page (every value escaped: study data is hostile input)."""
    e = html.escape
    ready, rd = readiness(ctx)
    rows = status.recent_studies(ctx.db_path)
    checks = " &middot; ".join(
        f"<span class={'ok' if c['ok'] else 'bad'}>{e(n)}: {e(c['detail'])}</span>"
        for n, c in rd["checks"].items()
    )
    dests = "".join(
        f"<li>{e(name)}: last sent {e(str(d.get('last_sent') or 'never'))}, "
        f"{d.get('pending', 0)} pending, {d.get('expired', 0)} expired"
        + (f" &mdash; <span class=bad>{e(d['last_error'])}</span>" if d.get("last_error") else "")
        + "</li>"
        for name, d in rd.get("destinations", {}).items() if isinstance(d, dict)
    )
    body = []
    for r in rows:
        thumbs = ""
        if r.state == "scored" and _UID_RE.match(r.study_uid):
            for i, _ in enumerate(status.heatmap_files(ctx.results_dir, r.study_uid)[:2]):
                thumbs += (f"<img alt='heat map' width=120 "
                           f"src='/heatmap/{e(r.study_uid)}/{i}.png'>")
        prob = "-" if r.probability is None else f"{r.probability:.3f}"
        dec = f"<span class={e(r.decision)}>{e(r.decision)}</span>" if r.decision else "-"
        job = "-" if r.job_state is None else f"{e(r.job_state)} ({r.job_attempts})"
        outbox = ", ".join(f"{e(k)} {v}" for k, v in sorted(r.outbox.items())) or "-"
        body.append(
            f"<tr><td><code title='tail of the Study Instance UID'>{e(r.short_id)}</code></td>"
            f"<td>{e(r.state)}</td><td>{e(status.iso(r.last_received))}</td><td>{prob}</td>"
            f"<td>{dec}</td><td>{e(r.roi_source or '-')}</td><td>{thumbs or '-'}</td>"
            f"<td>{job}</td><td>{outbox}</td><td class=err>{e(r.error[:300])}</td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>dicom-node status</title>"
        f"<meta http-equiv=refresh content=30><style>{_STYLE}</style></head><body>"
        f"<h1>dicom-node <small>{'ready' if ready else 'NOT READY'}</small></h1>"
        f"<p>{checks}</p><h2>Destinations</h2><ul>{dests or '<li>none yet</li>'}</ul>"
        "<h2>Recent studies</h2><table><tr><th>study</th><th>state</th>"
        "<th>last received (UTC)</th>"
        f"<th>probability</th><th>decision</th><th>ROI source</th><th>heat map</th><th>job</th>"
        f"<th>outbox</th><th>failure / reason</th></tr>{''.join(body)}</table>"
        "<p><small>Research use only. No patient data is shown; studies are identified by the "
        "tail of their Study Instance UID, as in the node's log.</small></p></body></html>"
    )


class _Handler(BaseHTTPRequestHandler):
    server_version = "dicom-node"
    ctx: StatusContext  # set on the subclass made by start_status_server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, indent=1).encode(), "application/json")

    def _authorized(self) -> bool:
        token = self.ctx.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path == "/healthz":
                return self._json(200, {"status": "alive"})
            if path == "/readyz":
                ok, body = readiness(self.ctx)
                return self._json(200 if ok else 503, body)
            if not self._authorized():
                self.send_response(401)
                self.send_header("WWW-Authenticate", "Bearer")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                return self._send(200, metrics.exposition(self.ctx.db_path), CONTENT_TYPE_LATEST)
            if path in ("/", "/index.html"):
                return self._send(200, render_page(self.ctx).encode(), "text/html; charset=utf-8")
            if path == "/studies.json":
                rows = [status.as_dict(r) for r in status.recent_studies(self.ctx.db_path)]
                return self._json(200, rows)
            m = re.fullmatch(r"/heatmap/([0-9.]{1,64})/([0-9]{1,3})\.png", path)
            if m and _UID_RE.match(m.group(1)):
                files = status.heatmap_files(self.ctx.results_dir, m.group(1))
                if int(m.group(2)) < len(files):
                    png = status.thumbnail_png(files[int(m.group(2))])
                    return self._send(200, png, "image/png")
            return self._json(404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as exc:
            log.exception("http %s failed", path)
            return self._json(500, {"error": type(exc).__name__})


class StatusServer:
    """A running status server; :meth:`stop` shuts it down."""

    def __init__(self, httpd: ThreadingHTTPServer, listener: ListenerCheck | None = None) -> None:
        self.httpd = httpd
        self.listener = listener
        self.thread = threading.Thread(target=httpd.serve_forever, name="http-status", daemon=True)

    def listener_started(self, server: Any) -> None:
        """Hand over the DICOM listener so ``/readyz`` can judge it without connecting."""
        if self.listener is not None:
            self.listener.attach(server)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def model_identity(model_dir: Path | None) -> dict[str, Any] | None:
    """Name, version, UID and backbone from ``model.json`` (no weights read)."""
    if model_dir is None:
        return None
    from inference.artifact import read_model_json

    raw = read_model_json(Path(model_dir))
    spec_raw = raw.get("spec")
    spec: dict[str, Any] = spec_raw if isinstance(spec_raw, dict) else {}
    return {"name": raw.get("name"), "version": raw.get("version"),
            "model_uid": raw.get("model_uid"), "backbone": spec.get("backbone")}


def start_status_server(cfg: Config, model_ready: Check | None = None) -> StatusServer | None:
    """Start the server of ``[http]`` if enabled (``None`` otherwise).

    Args:
        cfg: the node config (``http``, ``node`` paths and listener address, ``scoring``).
        model_ready: returns (loaded, detail); omitted when scoring is disabled.

    Raises:
        OSError: the HTTP port cannot be bound (the CLI names the address).
    """
    http_cfg = getattr(cfg, "http", None)
    if http_cfg is None or not http_cfg.enabled:
        return None
    checks: dict[str, Check] = {
        "listener": ListenerCheck(cfg.node.host, cfg.node.port),
        "index": index_check(cfg.node.db_path),
        "disk": disk_check(cfg.node.data_dir, cfg.node.disk_reserve_mb),
    }
    if model_ready is not None:
        checks["model"] = model_ready
        identity = model_identity(cfg.scoring.model_dir)
        if identity:
            metrics.record_model(identity)
    ctx = StatusContext(db_path=cfg.node.db_path, results_dir=cfg.node.results_dir,
                        checks=checks, token=http_cfg.token or None)
    handler = type("StatusHandler", (_Handler,), {"ctx": ctx})
    try:
        httpd = ThreadingHTTPServer((http_cfg.host, http_cfg.port), handler)
    except OSError as exc:
        exc.address = f"{http_cfg.host}:{http_cfg.port} (http)"  # type: ignore[attr-defined]
        raise
    httpd.daemon_threads = True
    listener = checks["listener"]
    server = StatusServer(httpd, listener if isinstance(listener, ListenerCheck) else None)
    server.thread.start()
    log.info("status server on http://%s:%d/ (/healthz /readyz /metrics)", http_cfg.host,
             server.port)
    return server


def model_check(processor: Any) -> Check | None:
    """Load the scoring model now (in a thread) and report readiness once it is in memory.

    The processor loads its pipeline lazily on the first job; ``/readyz`` must only go green when
    a study could be scored, so the load starts with ``serve``. ``None`` when the processor has
    no model (archive-only).
    """
    if not hasattr(processor, "pipeline"):
        return None
    state: dict[str, str | None] = {"error": None}

    def load() -> None:
        try:
            _ = processor.pipeline
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log
            state["error"] = f"{type(exc).__name__}: {exc}"
            log.error("model could not be loaded: %s", state["error"])

    threading.Thread(target=load, name="model-load", daemon=True).start()

    def check() -> tuple[bool, str]:
        if getattr(processor, "_pipeline", None) is not None:
            return True, "loaded"
        return False, state["error"] or "loading"

    return check
