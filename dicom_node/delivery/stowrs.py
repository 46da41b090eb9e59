"""DICOMweb STOW-RS destination: one ``multipart/related`` POST per batch (PS3.18 10.5).

The HTTP client is the standard library's ``urllib.request``: a batch is one POST, retries and
backoff belong to the outbox, and ``ssl``/``http.client`` cover TLS, CA files and timeouts, so a
third-party client would add a dependency without adding anything the node uses. Redirects are
not followed (a POST body would be dropped or re-sent somewhere unconfigured); proxies come from
the usual ``https_proxy``/``no_proxy`` environment variables.

The response is mapped to DIMSE-like statuses per SOP Instance UID, so the sender treats both
kinds alike: an instance in ``ReferencedSOPSequence`` is stored (0x0000, or its
``WarningReason``), one in ``FailedSOPSequence`` failed with its ``FailureReason``. HTTP errors
without a per-instance answer fail the whole batch; 401/403 are logged as errors naming the
destination's auth keys, because a wrong password never heals by itself, yet the items stay
pending (with backoff, until the retry horizon) so fixing the config delivers them.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import ssl
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.config import Config, DestinationConfig
from dicom_node.delivery.base import SendOutcome, register

log = logging.getLogger(__name__)

#: A failure without a reason from the server (PS3.4 C.4.2.1.4 "Error: cannot understand").
STATUS_UNSPECIFIED_FAILURE = 0xC000
#: Processing failure: the server answered but did not mention the instance.
STATUS_NOT_REPORTED = 0x0110
#: HTTP statuses where sending the same body again cannot succeed without an operator.
_PERMANENT = {400, 401, 403, 404, 405, 406, 411, 413, 414, 415}
#: A response is a small dataset; anything past this is not read (a hostile or broken server).
_MAX_RESPONSE = 16 * 1024 * 1024

_REFERENCED_SOP_SEQ, _FAILED_SOP_SEQ = "00081199", "00081198"
_REFERENCED_SOP_UID, _FAILURE_REASON, _WARNING_REASON = "00081155", "00081197", "00081196"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turn any 3xx into an :class:`urllib.error.HTTPError` instead of following it."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def stow_url(url: str) -> str:
    """The STOW-RS endpoint: ``url`` is the DICOMweb root; ``/studies`` is added if missing."""
    url = url.rstrip("/")
    return url if url.endswith("/studies") else url + "/studies"


def ssl_context(dest: DestinationConfig) -> ssl.SSLContext:
    """Client TLS context: system CAs (or ``ca_file``); none checked if ``tls_verify = false``."""
    ctx = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
    if not dest.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """``multipart/related; type="application/dicom"`` body of whole DICOM files (PS3.18 8.6)."""
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part,
                   b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def _reason(item: dict[str, Any], tag: str, default: int) -> int:
    value = item.get(tag, {}).get("Value") or [default]
    try:
        return int(value[0])
    except (TypeError, ValueError):
        return default


def _items_json(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    seq = body.get(tag, {}) if isinstance(body, dict) else {}
    return [i for i in (seq.get("Value") or []) if isinstance(i, dict)]


def parse_response(content_type: str, data: bytes) -> tuple[dict[str, int], bool]:
    """Per-instance statuses from a STOW-RS response body (DICOM JSON or Native DICOM XML).

    Returns:
        ``({sop_uid: status}, parsed)``; ``parsed`` is False when the body was empty or not a
        response dataset (the caller then falls back on the HTTP status alone).
    """
    statuses: dict[str, int] = {}
    if not data.strip():
        return statuses, False
    if "xml" in content_type.lower() or data.lstrip().startswith(b"<"):
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            return statuses, False
        for seq_tag, reason_tag, default in ((_REFERENCED_SOP_SEQ, _WARNING_REASON, 0x0000),
                                             (_FAILED_SOP_SEQ, _FAILURE_REASON,
                                              STATUS_UNSPECIFIED_FAILURE)):
            for seq in root.iter("DicomAttribute"):
                if seq.get("tag", "").upper() != seq_tag:
                    continue
                for item in seq.findall("Item"):
                    uid = reason = None
                    for attr in item.findall("DicomAttribute"):
                        value = attr.findtext("Value")
                        if attr.get("tag", "").upper() == _REFERENCED_SOP_UID:
                            uid = (value or "").strip()
                        elif attr.get("tag", "").upper() == reason_tag and value:
                            try:
                                reason = int(value)
                            except ValueError:
                                reason = None
                    if uid:
                        statuses[uid] = default if reason is None else reason
        return statuses, True
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return statuses, False
    if isinstance(body, list):  # some servers wrap the dataset in an array
        body = body[0] if body and isinstance(body[0], dict) else {}
    if not isinstance(body, dict):
        return statuses, False
    for seq_tag, reason_tag, default in ((_REFERENCED_SOP_SEQ, _WARNING_REASON, 0x0000),
                                         (_FAILED_SOP_SEQ, _FAILURE_REASON,
                                          STATUS_UNSPECIFIED_FAILURE)):
        for entry in _items_json(body, seq_tag):
            uids = entry.get(_REFERENCED_SOP_UID, {}).get("Value") or []
            if uids and isinstance(uids[0], str):
                statuses[uids[0]] = _reason(entry, reason_tag, default)
    return statuses, True


def outcome_from_response(http_status: int, content_type: str, data: bytes,
                          sop_uids: Sequence[str], where: str) -> SendOutcome:
    """Map one STOW-RS answer onto a :class:`SendOutcome` for the instances sent.

    Per-instance answers win over the HTTP status. Without them, 200 means every instance was
    stored and any other status fails them all with a message naming ``where``. Instances the
    server lists as stored are also ``committed``: DICOMweb has no separate commitment, and the
    ``ReferencedSOPSequence`` is the origin server's per-instance statement that it kept them.
    """
    listed, parsed = parse_response(content_type, data)
    if http_status == 200 and not listed:
        return SendOutcome({u: 0x0000 for u in sop_uids})
    if listed:
        # 200: "all stored" even if a lax server lists only some; otherwise unlisted = not stored
        fill = 0x0000 if http_status == 200 else STATUS_NOT_REPORTED
        statuses = {u: listed.get(u, fill) for u in sop_uids}
        failed = [u for u, s in statuses.items() if not (s == 0 or 0xB000 <= s <= 0xB007)]
        error = (f"{where}: HTTP {http_status}, {len(failed)} of {len(sop_uids)} instance(s) "
                 f"failed") if failed else None
        confirmed = frozenset(u for u in sop_uids if u in listed and u not in failed)
        return SendOutcome(statuses, error=error, retryable=http_status not in _PERMANENT,
                           committed=confirmed)
    snippet = data[:200].decode("utf-8", "replace").strip().replace("\n", " ")
    hint = ""
    if http_status in (401, 403):
        hint = " (authentication rejected: check auth, username and password/token of this " \
               "destination)"
    elif 300 <= http_status < 400:
        hint = " (redirect not followed: set url to the final location)"
    error = f"{where}: HTTP {http_status}{hint}"
    if snippet and not parsed:
        error += f": {snippet}"
    return SendOutcome({u: STATUS_UNSPECIFIED_FAILURE for u in sop_uids}, error=error,
                       retryable=http_status not in _PERMANENT)


@register("stowrs")
class StowRsDestination:
    """A DICOMweb server reached with STOW-RS; one POST (one ``multipart/related``) per batch."""

    def __init__(self, dest: DestinationConfig, cfg: Config) -> None:
        self.name = dest.name
        self.dest = dest
        self.url = stow_url(dest.url)
        self.timeout = cfg.delivery.timeout_seconds
        handlers: list[Any] = [_NoRedirect()]
        if self.url.startswith("https:"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context(dest)))
            if not dest.tls_verify:
                log.warning("destination %s: TLS certificate verification is OFF (tls_verify = "
                            "false)", dest.name)
        self._opener = urllib.request.build_opener(*handlers)

    def _auth_header(self) -> str | None:
        if self.dest.auth == "basic":
            pair = f"{self.dest.username}:{self.dest.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        if self.dest.auth == "bearer":
            return f"Bearer {self.dest.token}"
        return None

    def send(self, paths: Sequence[Path]) -> SendOutcome:
        where = f"STOW-RS {self.url}"
        parts: list[bytes] = []
        uids: list[str] = []
        statuses: dict[str, int] = {}
        for p in paths:
            try:
                raw = Path(p).read_bytes()
                ds: Dataset = dcmread(io.BytesIO(raw), stop_before_pixels=True,
                                      specific_tags=["SOPInstanceUID"])
            except (OSError, InvalidDicomError) as exc:
                return SendOutcome(statuses, error=f"{p}: not a readable DICOM file ({exc})",
                                   retryable=False)
            parts.append(raw)
            uids.append(str(ds.SOPInstanceUID))
        if not parts:
            return SendOutcome({})
        boundary = f"dicom-node-{uuid.uuid4().hex}"
        req = urllib.request.Request(self.url, data=multipart_body(parts, boundary), method="POST")
        req.add_header("Content-Type",
                       f'multipart/related; type="application/dicom"; boundary={boundary}')
        req.add_header("Accept", "application/dicom+json, application/dicom+xml;q=0.5, */*;q=0.1")
        auth = self._auth_header()
        if auth:
            req.add_header("Authorization", auth)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                code, ctype = resp.status, resp.headers.get("Content-Type", "")
                data = resp.read(_MAX_RESPONSE)
        except urllib.error.HTTPError as exc:
            code, ctype = exc.code, exc.headers.get("Content-Type", "") if exc.headers else ""
            try:
                data = exc.read(_MAX_RESPONSE)
            except OSError:
                data = b""
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return SendOutcome({}, error=f"{where}: {type(reason).__name__}: {reason}")
        outcome = outcome_from_response(code, ctype, data, uids, where)
        if code in (401, 403):
            log.error("destination %s: %s", self.name, outcome.error)
        elif outcome.error:
            log.warning("destination %s: %s", self.name, outcome.error)
        return outcome
