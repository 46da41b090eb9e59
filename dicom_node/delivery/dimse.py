"""DIMSE C-STORE destination: one association per batch, minimal contexts, optional TLS, and
optional Storage Commitment (PS3.4 Annex J, Push Model SOP Class 1.2.840.10008.1.20.1).

With ``storage_commitment = true`` the stored instances of a batch are named in an N-ACTION
(Referenced SOP Sequence plus a new Transaction UID) on the same association. The PACS answers
with an N-EVENT-REPORT either on that association, if it is still open (the node keeps it open
for ``storage_commitment_wait_seconds``), or later on a new association to the node's listener,
which :func:`handle_commitment_report` keeps in the index for the delivery loop to apply. An
outbox row is ``committed`` only when such a report names its instance.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicom_node.config import Config, DestinationConfig, TLSConfig
from dicom_node.delivery.base import SendOutcome, is_success, register
from dicom_node.errors import DeliveryError
from dicom_node.scu import store_files
from dicom_node.store.db import Index
from dicom_node.store.outbox import save_commitment_report

log = logging.getLogger(__name__)

#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION failed or was refused: the batch counts as not delivered (retried with backoff).
STATUS_PROCESSING_FAILURE = 0x0110


def tls_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Client TLS context for a destination, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def commitment_request(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    """N-ACTION Action Information: the transaction and ``(SOP Class, SOP Instance)`` pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_commitment_report(info: Dataset) -> tuple[str, list[str], dict[str, int]]:
    """``(transaction UID, committed SOP Instance UIDs, {failed SOP Instance UID: reason})``.

    Raises:
        ValueError: the Event Information has no Transaction UID.
    """
    transaction_uid = str(info.get("TransactionUID", "") or "")
    if not transaction_uid:
        raise ValueError("N-EVENT-REPORT without Transaction UID")
    committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
                 if i.get("ReferencedSOPInstanceUID")]
    failed = {str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0x0110) or 0x0110)
              for i in info.get("FailedSOPSequence", []) if i.get("ReferencedSOPInstanceUID")}
    return transaction_uid, committed, failed


def _report_from_event(event: Event) -> tuple[str, list[str], dict[str, int]] | None:
    """The Storage Commitment result carried by an N-EVENT-REPORT, or None if it is not one."""
    req = event.request
    if str(req.AffectedSOPClassUID) != StorageCommitmentPushModel:
        return None
    return parse_commitment_report(event.event_information)


def handle_commitment_report(event: Event, index: Index) -> tuple[int, None]:
    """Listener EVT_N_EVENT_REPORT handler: keep the PACS's answer durably, then answer 0x0000.

    The delivery loop applies it (:func:`dicom_node.store.outbox.apply_commitment_reports`),
    so the report is safe even if it arrives before the sender recorded the transaction.
    """
    calling = event.assoc.requestor.ae_title
    try:
        report = _report_from_event(event)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # malformed: say so
        log.warning("N-EVENT-REPORT from %s could not be read: %s", calling, exc)
        return 0x0110, None
    if report is None:
        log.warning("N-EVENT-REPORT from %s for SOP class %s ignored (not storage commitment)",
                    calling, event.request.AffectedSOPClassUID)
        return 0x0118, None  # no such SOP class
    transaction_uid, committed, failed = report
    save_commitment_report(index, transaction_uid, committed, failed, calling_aet=calling)
    log.info("storage commitment %s from %s: %d committed, %d failed", transaction_uid, calling,
             len(committed), len(failed))
    return 0x0000, None


def _refs(paths: Sequence[Path]) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of the files (what the N-ACTION must name)."""
    out: dict[str, str] = {}
    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "SOPInstanceUID"])
            out[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
        except (OSError, InvalidDicomError, AttributeError):
            continue  # store_files reports the unreadable file
    return out


@register("dimse")
class DimseDestination:
    """A PACS reached with C-STORE (``scu.store_files``: TCP_NODELAY, one association)."""

    def __init__(self, dest: DestinationConfig, cfg: Config) -> None:
        self.name = dest.name
        self.dest = dest
        self.calling_aet = cfg.node.ae_title
        self.max_pdu = cfg.node.max_pdu or 131072
        self.timeout = cfg.delivery.timeout_seconds
        self._tls = tls_context(dest.tls)

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        commit = _Commitment(self.dest, _refs(paths)) if self.dest.storage_commitment else None
        try:
            results = store_files(
                self.dest.host, self.dest.port, list(paths), calling_aet=self.calling_aet,
                called_aet=self.dest.ae_title, tls_context=self._tls, max_pdu=self.max_pdu,
                timeout=self.timeout,
                extra_contexts=(StorageCommitmentPushModel,) if commit else (),
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, commit.on_report)] if commit else (),
                before_release=commit.request if commit else None,
            )
        except DeliveryError as exc:
            return SendOutcome(dict(exc.partial), error=str(exc), retryable=exc.retryable)
        except OSError as exc:
            return SendOutcome({}, error=f"{type(exc).__name__}: {exc}")
        if commit is None:
            return SendOutcome(dict(results))
        return commit.outcome(dict(results))


class _Commitment:
    """One batch's storage commitment: the N-ACTION and a report on the same association."""

    def __init__(self, dest: DestinationConfig, refs: dict[str, str]) -> None:
        self.dest = dest
        self.refs = refs
        self.transaction_uid = generate_uid()
        self.error: str | None = None
        self.requested: list[str] = []
        self.committed: list[str] = []
        self.failed: dict[str, int] = {}
        self._reported = threading.Event()

    def request(self, assoc: Association, results: list[tuple[str, int]]) -> None:
        """``before_release``: ask the PACS to commit what it stored, then wait a little for
        its answer on this association."""
        stored = [(self.refs[u], u) for u, s in results if is_success(s) and u in self.refs]
        if not stored:
            return
        where = f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port}"
        if not any(cx.abstract_syntax == StorageCommitmentPushModel
                   for cx in assoc.accepted_contexts):
            self.error = f"{where} did not accept Storage Commitment (storage_commitment = true)"
            return
        try:
            status, _ = assoc.send_n_action(
                commitment_request(self.transaction_uid, stored), 1, StorageCommitmentPushModel,
                STORAGE_COMMITMENT_INSTANCE)
        except (ValueError, RuntimeError) as exc:
            self.error = f"storage commitment N-ACTION to {where} failed: {exc}"
            return
        code = int(status.Status) if status and "Status" in status else None
        if code != 0x0000:
            self.error = (f"storage commitment N-ACTION to {where}: "
                          + ("no response" if code is None else f"status 0x{code:04X}"))
            return
        self.requested = [u for _, u in stored]
        log.info("storage commitment %s requested from %s for %d instance(s)",
                 self.transaction_uid, where, len(stored))
        if self.dest.storage_commitment_wait_seconds > 0:
            self._reported.wait(self.dest.storage_commitment_wait_seconds)

    def on_report(self, event: Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT on the sending association (the PACS answered at once)."""
        try:
            report = _report_from_event(event)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            log.warning("N-EVENT-REPORT on the sending association could not be read: %s", exc)
            return 0x0110, None
        if report is None or report[0] != self.transaction_uid:
            return (0x0118 if report is None else 0x0110), None
        _, self.committed, self.failed = report
        self._reported.set()
        return 0x0000, None

    def outcome(self, statuses: dict[str, int]) -> SendOutcome:
        """The batch result: a refused N-ACTION un-delivers the batch (retried with backoff);
        a same-association report commits or fails instances at once; otherwise the stored
        rows wait on :attr:`transaction_uid`."""
        if self.error:
            failed = {u: STATUS_PROCESSING_FAILURE for u, s in statuses.items() if is_success(s)}
            return SendOutcome({**statuses, **failed}, error=self.error)
        for uid, reason in self.failed.items():
            if uid in statuses:
                statuses[uid] = reason or STATUS_PROCESSING_FAILURE
        error = None
        if self.failed:
            error = (f"storage commitment refused for {len(self.failed)} instance(s): "
                     + ", ".join(f"0x{r:04X}" for r in sorted(set(self.failed.values()))))
        return SendOutcome(statuses, error=error,
                           transaction_uid=self.transaction_uid if self.requested else None,
                           committed=frozenset(self.committed))


def commitment_contexts() -> list[dict[str, Any]]:
    """What a listener supports so that a PACS can send its N-EVENT-REPORT on a new
    association: the Push Model with the PACS in the SCP role (PS3.4 J.3.3, role selection)."""
    return [{"abstract_syntax": StorageCommitmentPushModel, "scu_role": False, "scp_role": True}]
