"""C-ECHO / C-STORE service user: ``dicom-node echo``, ``dicom-node push`` and :func:`store_files`.

:func:`store_files` is shared by ``push`` (acting like a modality) and by the result sender. It
opens ONE association, proposes only the presentation contexts the files need and sets
TCP_NODELAY on the socket: pynetdicom never does, and Nagle + delayed ACK cost ~48 ms per C-STORE
on loopback (measured on a 2-core machine).
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Config, validate_ae_title
from dicom_node.errors import ConfigError, DeliveryError
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
        raise DeliveryError(f"{item}: not a readable DICOM file ({exc})", retryable=False) from exc


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
        raise DeliveryError(
            f"{len(out)} presentation contexts needed; at most 128 fit in one association",
            retryable=False)
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
    extra_contexts: Sequence[str] = (),
    evt_handlers: Sequence[tuple[Any, ...]] = (),
    before_release: Callable[[Association, list[tuple[str, int]]], None] | None = None,
) -> list[tuple[str, int]]:
    """Send objects over ONE association and return ``[(sop_instance_uid, status), ...]``.

    Statuses are the peer's DIMSE status per object (0x0000 success, 0xB000-0xB007 warnings,
    anything else a failure); the caller decides what to retry. ``extra_contexts`` (e.g. Storage
    Commitment), ``evt_handlers`` and ``before_release(assoc, results)`` let a caller use the same
    association after the C-STOREs.

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
    for sop in extra_contexts:
        ae.add_requested_context(sop)
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(
        host, port, ae_title=called_aet, max_pdu=max_pdu, tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), *evt_handlers],
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
                raise DeliveryError(f"{sop_uid}: {exc}", retryable=False, partial=results) from exc
            if not status or "Status" not in status:
                raise DeliveryError(
                    f"association to {called_aet}@{host}:{port} dropped while sending {sop_uid}",
                    partial=results,
                )
            results.append((sop_uid, int(status.Status)))
        if before_release is not None:
            before_release(assoc, results)
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


@dataclass(frozen=True)
class PushOutcome:
    """What happened to one file of a push: the peer's status, or why it was never sent."""

    path: str
    sop_uid: str
    status: int | None
    reason: str = ""

    @property
    def stored(self) -> bool:
        return self.status is not None and (self.status == 0 or 0xB000 <= self.status <= 0xB007)


def _header(path: Path) -> Dataset | None:
    try:
        return dcmread(str(path), stop_before_pixels=True,
                       specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - any unreadable file is reported, not fatal
        return None


def push_files(
    host: str,
    port: int,
    paths: Sequence[Path],
    *,
    calling_aet: str,
    called_aet: str,
    tls_context: ssl.SSLContext | None = None,
    max_pdu: int = 131072,
    timeout: float = 30.0,
) -> list[PushOutcome]:
    """Send every file the peer accepts and report the rest; never stop at the first refusal.

    Files are grouped so each association needs at most 128 presentation contexts; a file whose
    SOP class / transfer syntax the peer did not accept is reported with that reason, and an
    association the peer drops is re-opened for the remaining files.

    Raises:
        DeliveryError: the peer refuses the association itself (nothing can be sent).
    """
    outcomes: list[PushOutcome] = []
    pending: list[tuple[Path, Dataset]] = []
    for path in paths:
        head = _header(path)
        if head is None or "SOPClassUID" not in head or "SOPInstanceUID" not in head:
            outcomes.append(PushOutcome(str(path), "", None, "not a readable DICOM file"))
        else:
            pending.append((path, head))
    while pending:
        batch: list[tuple[Path, Dataset]] = []
        keys: set[tuple[str, str]] = set()  # one context per (class, compressed syntax or "native")
        for item in pending:
            ts = _transfer_syntax(item[1])
            key = (str(item[1].SOPClassUID), "native" if ts in _CONVERTIBLE else str(ts))
            if key not in keys and len(keys) == _MAX_CONTEXTS:
                break
            keys.add(key)
            batch.append(item)
        pending = pending[len(batch):]
        rest = _push_batch(host, port, batch, outcomes, calling_aet=calling_aet,
                           called_aet=called_aet, tls_context=tls_context, max_pdu=max_pdu,
                           timeout=timeout)
        pending = rest + pending
    return outcomes


def _push_batch(host: str, port: int, batch: list[tuple[Path, Dataset]],
                outcomes: list[PushOutcome], *, calling_aet: str, called_aet: str,
                tls_context: ssl.SSLContext | None, max_pdu: int, timeout: float,
                ) -> list[tuple[Path, Dataset]]:
    """Send ``batch`` over one association; returns what is left if the peer dropped it."""
    ae = _make_ae(calling_aet, timeout, max_pdu)
    for sop, syntaxes in plan_contexts([h for _, h in batch]):
        ae.add_requested_context(sop, list(syntaxes))
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, max_pdu=max_pdu, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    if not assoc.is_established:
        why = association_failure(assoc, host, port, timeout)
        raise DeliveryError(f"association to {called_aet}@{host}:{port} {why}")
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts}
    try:
        for i, (path, head) in enumerate(batch):
            sop_class, sop_uid = str(head.SOPClassUID), str(head.SOPInstanceUID)
            ts = _transfer_syntax(head)
            if not any(a == sop_class and (t == ts or ts in _CONVERTIBLE and t in _UNCOMPRESSED)
                       for a, t in accepted):
                outcomes.append(PushOutcome(str(path), sop_uid, None, (
                    f"peer accepted no presentation context for {UID(sop_class).name or sop_class}"
                    f" in {UID(ts).name or ts}")))
                continue
            try:
                status = assoc.send_c_store(dcmread(str(path)))
            except Exception as exc:  # noqa: BLE001 - unreadable/unencodable: report, go on
                outcomes.append(PushOutcome(str(path), sop_uid, None,
                                            f"cannot be sent: {type(exc).__name__}: {exc}"))
                continue
            if not status or "Status" not in status:
                outcomes.append(PushOutcome(str(path), sop_uid, None,
                                            "the peer dropped the association while receiving it"))
                return batch[i + 1:]
            outcomes.append(PushOutcome(str(path), sop_uid, int(status.Status)))
    finally:
        if assoc.is_established:
            assoc.release()
    return []


def _usage_error(command: str, message: str) -> int:
    """A user mistake: one line on stderr and exit status 2, no traceback."""
    print(f"dicom-node {command}: {message}", file=sys.stderr)
    return 2


def _ae_problem(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    try:
        validate_ae_title(value, option)
    except ConfigError:
        return (f"{option} {value!r} is not a valid AE title "
                "(1-16 printable ASCII characters, no backslash)")
    return None


def _port_problem(value: int | str, what: str) -> str | None:
    if not str(value).isdigit() or not 1 <= int(value) <= 65535:
        return f"{what} {value!r} is not a TCP port (1-65535)"
    return None


def echo_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node echo HOST PORT``: 0 when the peer answers C-ECHO with success."""
    problem = (_port_problem(args.port, "port") or _ae_problem(args.aet, "--aet")
               or _ae_problem(args.aec, "--aec"))
    if problem:
        return _usage_error("echo", problem)
    calling = args.aet or cfg.node.ae_title
    status = echo(args.host, args.port, calling_aet=calling, called_aet=args.aec,
                  timeout=cfg.node.acse_timeout_seconds)
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def push_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node push DIR --to HOST:PORT``: send a folder like a modality; 0 if all stored.

    Every file is tried; the ones the peer refused or never accepted are listed with the reason.
    """
    host, _, port_s = args.to.rpartition(":")
    problem = ("--to expects HOST:PORT" if not host else _port_problem(port_s, "--to port")) \
        or _ae_problem(args.aet, "--aet") or _ae_problem(args.aec, "--aec")
    if problem:
        return _usage_error("push", problem)
    files = [f for f in _collect(args.paths) if _is_dicom(f)]
    if not files:
        print("push: no DICOM files found")
        return 1
    called = args.aec or cfg.node.ae_title
    outcomes = push_files(host, int(port_s), files, calling_aet=args.aet, called_aet=called,
                          max_pdu=cfg.node.max_pdu or 131072,
                          timeout=cfg.node.dimse_timeout_seconds)
    failed = [o for o in outcomes if not o.stored]
    for o in failed:
        what = f"status 0x{o.status:04X}" if o.status is not None else o.reason
        print(f"  {o.path}: {what}")
    print(f"push: {len(outcomes) - len(failed)}/{len(outcomes)} stored at {called}@{host}:{port_s}")
    return 0 if not failed else 1
