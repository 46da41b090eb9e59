"""C-ECHO / C-STORE service user: ``dicom-node echo``, ``dicom-node push`` and :func:`store_files`.

:func:`store_files` is shared by ``push`` (acting like a modality) and by the result sender. It
opens ONE association, proposes only the presentation contexts the files need and sets
TCP_NODELAY on the socket: pynetdicom never does, and Nagle + delayed ACK cost ~48 ms per C-STORE
on loopback (shared/tools/README.md).
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

from dicom_node.config import Config
from dicom_node.errors import DeliveryError
from dicom_node.ops.netcheck import association_failure

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_CONVERTIBLE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian}
# A-ASSOCIATE-RQ may carry at most 128 presentation contexts (PS3.8 9.3.2.2: odd ids 1..255).
_MAX_CONTEXTS = 128


def set_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on the association's socket (either side)."""
    try:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # never fail an association over a socket option
        log.debug("could not set TCP_NODELAY: %s", exc)


def _load(item: str | Path | Dataset) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return dcmread(str(item))
    except (InvalidDicomError, OSError) as exc:
        raise DeliveryError(f"{item}: not a readable DICOM file ({exc})") from exc


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None:
        # A Dataset built in memory: pydicom encodes it explicit VR little endian by default.
        return ExplicitVRLittleEndian
    return UID(ts)


def plan_contexts(datasets: Iterable[Dataset]) -> list[tuple[str, tuple[str, ...]]]:
    """The minimal (abstract syntax, transfer syntaxes) list for ``datasets``.

    Compressed objects need a context with exactly their syntax; uncompressed objects share one
    context per SOP class offering explicit and implicit little endian (plus their own syntax), so
    a peer that only speaks implicit VR still receives them (pynetdicom converts).
    """
    plan: dict[tuple[str, bool], list[str]] = {}
    for ds in datasets:
        sop = str(ds.SOPClassUID)
        ts = _transfer_syntax(ds)
        if ts in _CONVERTIBLE:
            key = (sop, False)
            syntaxes = plan.setdefault(key, [])
            for t in (str(ts), *_UNCOMPRESSED):
                if t not in syntaxes:
                    syntaxes.append(t)
        else:
            key = (sop, True)
            syntaxes = plan.setdefault(key, [])
            if str(ts) not in syntaxes:
                syntaxes.append(str(ts))
    out: list[tuple[str, tuple[str, ...]]] = []
    for (sop, compressed), syntaxes in plan.items():
        if compressed:  # one context per compressed syntax: the acceptor picks one per context
            out.extend((sop, (t,)) for t in syntaxes)
        else:
            out.append((sop, tuple(syntaxes)))
    if len(out) > _MAX_CONTEXTS:
        raise DeliveryError(f"{len(out)} presentation contexts needed; at most 128 fit in one association")
    return out


def _make_ae(calling_aet: str, timeout: float, max_pdu: int) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = max_pdu
    return ae


def store_files(
    host: str,
    port: int,
    paths_or_datasets: Sequence[str | Path | Dataset],
    *,
    calling_aet: str,
    called_aet: str,
    tls_context: ssl.SSLContext | None = None,
    max_pdu: int = 131072,
    timeout: float = 30.0,
) -> list[tuple[str, int]]:
    """Send objects over ONE association and return ``[(sop_instance_uid, status), ...]``.

    Statuses are the peer's DIMSE status per object (0x0000 success, 0xB000-0xB007 warnings,
    anything else a failure); the caller decides what to retry.

    Raises:
        DeliveryError: a file cannot be read, the association is rejected/aborted/not
            established, or no context was accepted for an object. When the association drops
            part-way, ``exc.partial`` holds the statuses received so far.
    """
    datasets = [_load(p) for p in paths_or_datasets]
    if not datasets:
        return []
    ae = _make_ae(calling_aet, timeout, max_pdu)
    for sop, syntaxes in plan_contexts(datasets):
        ae.add_requested_context(sop, list(syntaxes))
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(
        host, port, ae_title=called_aet, max_pdu=max_pdu, tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )
    if not assoc.is_established:
        why = association_failure(assoc, host, port, timeout)
        raise DeliveryError(f"association to {called_aet}@{host}:{port} {why}")
    results: list[tuple[str, int]] = []
    try:
        for ds in datasets:
            sop_uid = str(ds.SOPInstanceUID)
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted context / cannot encode
                err = DeliveryError(f"{sop_uid}: {exc}")
                err.partial = results  # type: ignore[attr-defined]
                raise err from exc
            if not status or "Status" not in status:
                err = DeliveryError(
                    f"association to {called_aet}@{host}:{port} dropped while sending {sop_uid}"
                )
                err.partial = results  # type: ignore[attr-defined]
                raise err
            results.append((sop_uid, int(status.Status)))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _collect(paths: Iterable[Path]) -> list[Path]:
    """Files under ``paths`` (folders walked recursively, hidden files skipped), sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(
                f for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.is_file():
            out.append(p)
        else:
            raise DeliveryError(f"{p}: no such file or folder")
    return out


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def echo(host: str, port: int, *, calling_aet: str, called_aet: str, timeout: float = 10.0,
         tls_context: ssl.SSLContext | None = None) -> int:
    """C-ECHO a peer; return its status (0x0000 on success)."""
    ae = _make_ae(calling_aet, timeout, 16384)
    ae.add_requested_context(Verification)
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    if not assoc.is_established:
        why = association_failure(assoc, host, port, timeout)
        raise DeliveryError(f"association to {called_aet}@{host}:{port} {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise DeliveryError(f"no C-ECHO response from {called_aet}@{host}:{port}")
    return int(status.Status)


def echo_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node echo HOST PORT``: 0 when the peer answers C-ECHO with success."""
    calling = args.aet or cfg.node.ae_title
    status = echo(args.host, args.port, calling_aet=calling, called_aet=args.aec,
                  timeout=cfg.node.acse_timeout_seconds)
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def push_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node push DIR --to HOST:PORT``: send a folder like a modality; 0 if all stored."""
    host, _, port_s = args.to.rpartition(":")
    if not host or not port_s.isdigit():
        raise DeliveryError(f"--to {args.to!r}: expected HOST:PORT")
    files = [f for f in _collect(args.paths) if _is_dicom(f)]
    if not files:
        print("push: no DICOM files found")
        return 1
    called = args.aec or cfg.node.ae_title
    results = store_files(host, int(port_s), files, calling_aet=args.aet, called_aet=called,
                          max_pdu=cfg.node.max_pdu or 131072,
                          timeout=cfg.node.dimse_timeout_seconds)
    failed = [(uid, s) for uid, s in results if s != 0 and not 0xB000 <= s <= 0xB007]
    for uid, s in failed:
        print(f"  {uid}: status 0x{s:04X}")
    print(f"push: {len(results) - len(failed)}/{len(results)} stored at {called}@{host}:{port_s}")
    return 0 if not failed else 1
