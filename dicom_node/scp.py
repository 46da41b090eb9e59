"""The listener: a pynetdicom AE serving C-ECHO and C-STORE for US, SEG and SC objects.

Handlers stay thin: :func:`handle_store` validates (:mod:`dicom_node.validate`), archives
(:mod:`dicom_node.archive`) and maps every failure to a DIMSE status; a handler that raised
would make pynetdicom answer a generic 0xC211. Unknown callers are rejected at association by
pynetdicom's ``require_calling_aet``; TLS wraps accepted sockets, with the handshake done in the
association's own thread so a silent or plain-TCP client cannot stall the accept loop.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.archive import Archive
from dicom_node.config import NodeConfig, TLSConfig
from dicom_node.errors import OutOfResourcesError, ValidationError
from dicom_node.ops.metrics import record_instance
from dicom_node.scu import set_tcp_nodelay
from dicom_node.validate import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    SUPPORTED_STORAGE,
    validate,
)

log = logging.getLogger(__name__)

#: What modalities really send; uncompressed first so a peer offering both gets the cheap one.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


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

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    **kwargs: Any) -> ssl.SSLSocket:
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


def _peer(event: Event) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title}@{r.address}:{r.port}"


def _on_conn_open(event: Event, node: NodeConfig) -> None:
    if node.tcp_nodelay:
        set_tcp_nodelay(event)
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.settimeout(node.acse_timeout_seconds)
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake from %s failed: %s", event.address[0], exc)
            try:
                sock.close()
            except OSError:
                pass


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


def handle_echo(event: Event, stats: _AssocStats) -> int:
    stats.add(event.assoc, "echo")
    return 0x0000


def handle_store(event: Event, archive: Archive, stats: _AssocStats) -> int:
    """Validate, archive durably, then answer; every failure has its own status."""
    calling = event.assoc.requestor.ae_title
    req = event.request
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    ts = str(event.context.transfer_syntax)
    try:
        raw: bytes | None = event.encoded_dataset(include_meta=True)
    except Exception:  # e.g. a meta element cannot be encoded from a bad request UID
        raw = event.encoded_dataset(include_meta=False)

    def refuse(status: int, reason: str, keep: bool = True) -> int:
        stats.add(event.assoc, "refused")
        where = ""
        if keep:
            try:
                q = archive.quarantine(raw, reason=reason, status=status, calling_aet=calling,
                                       sop_class_uid=sop_class, sop_uid=sop_uid, transfer_syntax=ts)
                where = f"; quarantined as {q.name}"
            except Exception as exc:  # disk full etc.: still answer the specific status
                where = f"; could not quarantine: {exc}"
        log.warning("C-STORE from %s refused 0x%04X: %s%s", calling, status, reason, where)
        record_instance(status, calling)
        return status

    try:
        archive.check_disk(len(raw or b""))
    except OutOfResourcesError as exc:
        return refuse(STATUS_OUT_OF_RESOURCES, str(exc), keep=False)
    try:
        ds = event.dataset
        info = validate(ds, affected_sop_class=sop_class, affected_sop_instance=sop_uid,
                        transfer_syntax=ts)
    except ValidationError as exc:
        return refuse(exc.status, exc.reason)
    except Exception as exc:
        return refuse(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(exc).__name__}: {exc}")
    try:
        outcome = archive.store(raw or b"", info, calling_aet=calling, transfer_syntax=ts)
    except OutOfResourcesError as exc:
        return refuse(STATUS_OUT_OF_RESOURCES, str(exc), keep=False)
    except Exception as exc:  # could not write or index: the sender should retry later
        log.exception("study %s: storing %s failed", info.study_uid, info.sop_uid)
        return refuse(STATUS_OUT_OF_RESOURCES, f"archive write failed: {type(exc).__name__}: {exc}",
                      keep=False)
    stats.add(event.assoc, outcome.kind)
    log.info("study %s: %s instance %s (%s, series %s) from %s", info.study_uid, outcome.kind,
             info.sop_uid, info.modality, info.series_uid, calling)
    record_instance(0x0000, calling, len(raw or b""))
    return 0x0000


def build_ae(node: NodeConfig) -> AE:
    """The AE with its contexts, AE-title checks, PDU size and timeouts from ``[node]``."""
    ae = AE(ae_title=node.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in SUPPORTED_STORAGE:
        ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    ae.require_calling_aet = [] if node.allow_any_calling_aet else list(node.allowed_calling_aets)
    ae.require_called_aet = node.require_called_aet
    ae.maximum_pdu_size = node.max_pdu
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout_seconds
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds
    return ae


def start_scp(node: NodeConfig, archive: Archive) -> ThreadedAssociationServer:
    """Start listening on ``node.host:node.port`` in background threads; returns the server."""
    ae = build_ae(node)
    stats = _AssocStats()
    handlers = [
        (evt.EVT_CONN_OPEN, _on_conn_open, [node]),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_RELEASED, _on_end, [stats]),
        (evt.EVT_ABORTED, _on_end, [stats]),
        (evt.EVT_C_ECHO, handle_echo, [stats]),
        (evt.EVT_C_STORE, handle_store, [archive, stats]),
    ]
    server = ae.start_server(
        (node.host, node.port), block=False, evt_handlers=handlers,
        ssl_context=server_ssl_context(node.tls),
    )
    log.info("listening as %s on %s:%d%s", node.ae_title, node.host, node.port,
             " (TLS)" if node.tls.enabled else "")
    return server
