"""The listener: a pynetdicom AE serving C-ECHO and C-STORE for US, SEG and SC objects.

Handlers stay thin: :func:`handle_store` validates (:mod:`dicom_node.validate`), archives
(:mod:`dicom_node.store.archive`) and maps every failure to a DIMSE status; a handler that raised
would make pynetdicom answer a generic 0xC211. Unknown callers are rejected at association by
pynetdicom's ``require_calling_aet``; TLS wraps accepted sockets, with the handshake done in the
association's own thread so a silent or plain-TCP client cannot stall the accept loop.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, cast

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import NodeConfig, TLSConfig
from dicom_node.delivery.dimse import commitment_contexts, handle_commitment_report
from dicom_node.errors import OutOfResourcesError, ValidationError
from dicom_node.ops.metrics import record_instance
from dicom_node.scu import set_tcp_nodelay
from dicom_node.store.archive import Archive
from dicom_node.validate import (
    DECODABLE_ENCAPSULATED,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    SUPPORTED_STORAGE,
    check_encoding,
    validate,
)

log = logging.getLogger(__name__)

#: A request UID longer than this is not decoded at all (pynetdicom aborts the association).
_REQUEST_UID_LIMIT = 1024
#: Bytes of the body read to check its VR encoding.
_HEAD_BYTES = 65536


def _has_decoder(syntax: str) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def storage_transfer_syntaxes() -> tuple[str, ...]:
    """What modalities really send, limited to what the installed pydicom plugins decode.

    Uncompressed first so a peer offering both gets the cheap one. A syntax without a decoder
    (JPEG-XL, MPEG, JPEG 2000 Part 2, HTJ2K without openjpeg) is not accepted at association,
    so the modality sees the refusal per presentation context.
    """
    native = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
              ExplicitVRBigEndian)
    return native + tuple(sorted(t for t in DECODABLE_ENCAPSULATED if _has_decoder(t)))


def _lenient_uid(value: Any) -> tuple[bool, str]:
    """pynetdicom's UI validator for request UIDs, relaxed so a bad UID reaches the handler.

    pynetdicom's default refuses UIDs over 64 characters while decoding the command set and
    aborts the association with a traceback; the handler answers such a request with 0xC210.
    """
    if not isinstance(value, str) or not 0 < len(value) <= _REQUEST_UID_LIMIT:
        return False, f"must be 1-{_REQUEST_UID_LIMIT} characters"
    return True, ""


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context from ``node.tls`` (None when TLS is off)."""
    if not tls.enabled:
        return None
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


class _LazyHandshakeContext(ssl.SSLContext):
    """Wraps sockets without the handshake; :func:`_on_conn_open` does it in the assoc thread.

    pynetdicom wraps accepted sockets in the thread that runs ``accept()``; a handshake there
    would let one slow client block every other connection.
    """

    def wrap_socket(self, sock: Any, server_side: bool = False,  # type: ignore[override]
                    do_handshake_on_connect: bool = True, **kwargs: Any) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   **kwargs)


class _AssocStats:
    """Per-association counters for the one summary line logged when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, dict[str, int]] = {}

    def add(self, assoc: Any, key: str) -> None:
        with self._lock:
            c = self._counts.setdefault(id(assoc), {})
            c[key] = c.get(key, 0) + 1

    def pop(self, assoc: Any) -> dict[str, int]:
        with self._lock:
            return self._counts.pop(id(assoc), {})


class PeerLimiter:
    """At most ``per_peer`` connections per IP address; idle ones make room for new ones.

    A connection is idle until its A-ASSOCIATE-RQ arrives. When a peer is at its limit, its
    oldest idle connection is closed so a modality behind the same address still gets in; when
    none is idle the new connection is closed instead. Idle sockets also time out after
    ``node.pending_timeout_seconds`` (the ARTIM timer), so they cannot hold association slots.
    """

    def __init__(self, per_peer: int) -> None:
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []

    def admit(self, sock: Any, ip: str) -> bool:
        with self._lock:
            self._conns = [c for c in self._conns if c.alive()]
            mine = [c for c in self._conns if c.ip == ip and not c.evicted]
            if len(mine) >= self.per_peer:
                idle = [c for c in mine if not c.requested]
                if not idle:
                    log.warning("connection from %s refused: %d connections open "
                                "(node.max_connections_per_peer)", ip, len(mine))
                    return False
                idle[0].evict()
                log.warning("closed an idle connection from %s to admit a new one "
                            "(node.max_connections_per_peer = %d)", ip, self.per_peer)
            self._conns.append(_Conn(sock, ip))
            return True

    def _find(self, assoc: Any, sock: Any = None) -> _Conn | None:
        for c in self._conns:
            if c.assoc is assoc or (sock is not None and c.sock is sock):
                return c
        return None

    def opened(self, assoc: Any, sock: Any) -> None:
        with self._lock:
            c = self._find(assoc, sock)
            if c is not None:
                c.assoc = assoc

    def requested(self, assoc: Any) -> None:
        with self._lock:
            c = self._find(assoc)
            if c is not None:
                c.requested = True

    def closed(self, assoc: Any) -> None:
        with self._lock:
            self._conns = [c for c in self._conns if c.assoc is not assoc]


class _Conn:
    def __init__(self, sock: Any, ip: str) -> None:
        self.sock, self.ip = sock, ip
        self.assoc: Any = None
        self.requested = False
        self.evicted = False

    def alive(self) -> bool:
        try:
            open_ = self.sock.fileno() != -1
        except OSError:
            open_ = False
        return open_ and (self.assoc is None or self.assoc.is_alive())

    def evict(self) -> None:
        self.evicted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a per-peer connection limit checked at accept time."""

    limiter: PeerLimiter | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        ip = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        return self.limiter is None or self.limiter.admit(request, ip)


def _socket_of(event: Event) -> Any:
    return getattr(getattr(event.assoc.dul, "socket", None), "socket", None)


def _peer(event: Event) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title}@{r.address}:{r.port}"


def _on_conn_open(event: Event, node: NodeConfig, limiter: PeerLimiter) -> None:
    sock = _socket_of(event)
    limiter.opened(event.assoc, sock)
    # a connection that has not associated yet gets a short ARTIM timer (restored on A-ASSOCIATE-RQ)
    event.assoc.dul.artim_timer.timeout = node.pending_timeout_seconds
    if node.tcp_nodelay:
        set_tcp_nodelay(event)
    if isinstance(sock, ssl.SSLSocket):
        try:
            previous = sock.gettimeout()
            sock.settimeout(node.pending_timeout_seconds)
            sock.do_handshake()
            sock.settimeout(previous)
        except (ssl.SSLError, OSError) as exc:
            peer = getattr(event, "address", ("?",))[0]
            log.warning("TLS handshake from %s failed: %s", peer, exc)
            try:
                sock.close()
            except OSError:
                pass


def _on_requested(event: Event, node: NodeConfig, limiter: PeerLimiter) -> None:
    limiter.requested(event.assoc)
    event.assoc.dul.artim_timer.timeout = node.acse_timeout_seconds


def _on_conn_close(event: Event, limiter: PeerLimiter) -> None:
    limiter.closed(event.assoc)


def _on_accepted(event: Event) -> None:
    log.debug("association from %s accepted", _peer(event))


def _on_rejected(event: Event) -> None:
    log.warning("association from %s rejected (calling/called AE not allowed)", _peer(event))


def _on_end(event: Event, stats: _AssocStats) -> None:
    c = stats.pop(event.assoc)
    how = "released" if event.event is evt.EVT_RELEASED else "aborted"
    log.info("association from %s %s: %d stored, %d duplicate, %d refused, %d echo", _peer(event),
             how, c.get("stored", 0) + c.get("replaced", 0), c.get("duplicate", 0),
             c.get("refused", 0), c.get("echo", 0))


def _kind(exc: BaseException) -> str:
    """The exception's class (module-qualified unless builtin); its message may carry values."""
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def handle_echo(event: Event, stats: _AssocStats) -> int:
    stats.add(event.assoc, "echo")
    return 0x0000


def handle_store(event: Event, archive: Archive, stats: _AssocStats, node: NodeConfig) -> int:
    """Validate, archive durably, then answer; every failure has its own status, nothing raises."""
    try:
        return _store(event, archive, stats, node)
    except Exception as exc:  # a bug here must still answer the modality
        log.exception("C-STORE handler failed")
        stats.add(event.assoc, "refused")
        log.warning("C-STORE refused 0x%04X: internal error %s", STATUS_CANNOT_UNDERSTAND,
                    type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND


def _store(event: Event, archive: Archive, stats: _AssocStats, node: NodeConfig) -> int:
    calling = event.assoc.requestor.ae_title
    req = cast(C_STORE, event.request)
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    ts = str(event.context.transfer_syntax)
    try:
        raw: bytes | None = event.encoded_dataset(include_meta=True)
    except Exception:  # noqa: BLE001 - e.g. a meta element cannot be encoded from a bad request UID
        raw = event.encoded_dataset(include_meta=False)

    def refuse(status: int, reason: str, keep: bool = True) -> int:
        stats.add(event.assoc, "refused")
        where = ""
        if keep:
            try:
                q = archive.quarantine(raw, reason=reason, status=status, calling_aet=calling,
                                       sop_class_uid=sop_class, sop_uid=sop_uid, transfer_syntax=ts)
                where = f"; quarantined as {q.name}"
            except Exception as exc:  # noqa: BLE001 - disk full etc.: still answer the specific status
                where = f"; could not quarantine: {type(exc).__name__}"
        log.warning("C-STORE from %s refused 0x%04X: %s%s", calling, status, reason, where)
        record_instance(status, calling)
        return status

    try:
        archive.check_disk(len(raw or b""))
    except OutOfResourcesError as exc:
        return refuse(STATUS_OUT_OF_RESOURCES, str(exc), keep=False)
    try:
        body = req.DataSet
        check_encoding(body.getbuffer()[:_HEAD_BYTES].tobytes() if body is not None else b"", ts)
        info = validate(event.dataset, affected_sop_class=sop_class, affected_sop_instance=sop_uid,
                        transfer_syntax=ts, max_decoded_mb=node.max_decoded_mb)
    except ValidationError as exc:
        return refuse(exc.status, exc.reason)
    except Exception as exc:  # noqa: BLE001 - pydicom could not parse the body at all
        return refuse(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be decoded: {_kind(exc)}")
    try:
        outcome = archive.store(raw or b"", info, calling_aet=calling, transfer_syntax=ts)
    except OutOfResourcesError as exc:
        return refuse(STATUS_OUT_OF_RESOURCES, str(exc), keep=False)
    except Exception as exc:  # could not write or index: the sender retries later
        log.exception("study %s: storing %s failed", info.study_uid, info.sop_uid)
        return refuse(STATUS_OUT_OF_RESOURCES, f"archive write failed: {type(exc).__name__}",
                      keep=False)
    stats.add(event.assoc, outcome.kind)
    log.info("study %s: %s instance %s (%s, series %s) from %s", info.study_uid, outcome.kind,
             info.sop_uid, info.modality, info.series_uid, calling)
    record_instance(0x0000, calling, len(raw or b""))
    return 0x0000


def build_ae(node: NodeConfig) -> AE:
    """The AE with its contexts, AE-title checks, PDU size and timeouts from ``[node]``."""
    _config.VALIDATORS["UI"] = _lenient_uid
    ae = AE(ae_title=node.ae_title)
    ae.add_supported_context(Verification)
    syntaxes = list(storage_transfer_syntaxes())
    for sop_class in SUPPORTED_STORAGE:
        ae.add_supported_context(sop_class, syntaxes)
    for cx in commitment_contexts():  # a PACS's storage commitment report on a new association
        ae.add_supported_context(**cx)
    ae.require_calling_aet = [] if node.allow_any_calling_aet else list(node.allowed_calling_aets)
    ae.require_called_aet = node.require_called_aet
    ae.maximum_pdu_size = node.max_pdu
    # pynetdicom counts connections that have not associated yet; the per-peer limit bounds those
    ae.maximum_associations = node.max_associations + node.max_connections_per_peer
    ae.acse_timeout = node.acse_timeout_seconds
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds
    return ae


def start_scp(node: NodeConfig, archive: Archive) -> ThreadedAssociationServer:
    """Start listening on ``node.host:node.port`` in background threads; returns the server."""
    ae = build_ae(node)
    stats = _AssocStats()
    limiter = PeerLimiter(node.max_connections_per_peer)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, _on_conn_open, [node, limiter]),
        (evt.EVT_CONN_CLOSE, _on_conn_close, [limiter]),
        (evt.EVT_REQUESTED, _on_requested, [node, limiter]),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_RELEASED, _on_end, [stats]),
        (evt.EVT_ABORTED, _on_end, [stats]),
        (evt.EVT_C_ECHO, handle_echo, [stats]),
        (evt.EVT_C_STORE, handle_store, [archive, stats, node]),
        (evt.EVT_N_EVENT_REPORT, handle_commitment_report, [archive]),
    ]
    server = cast(_NodeServer, ae.make_server(
        (node.host, node.port), evt_handlers=handlers, ssl_context=server_ssl_context(node.tls),
        server_class=_NodeServer,
    ))
    server.limiter = limiter
    ae._servers.append(server)  # what ae.start_server does; server.shutdown() removes it
    thread = threading.Thread(target=server.serve_forever, name="dicom-node-listener", daemon=True)
    thread.start()
    log.info("listening as %s on %s:%d%s", node.ae_title, node.host, node.port,
             " (TLS)" if node.tls.enabled else "")
    return server
