"""Logging set-up shared by every ``dicom-node`` process: one line per record, no patient data.

Why this exists: libraries put attribute values into their messages (highdicom's warning about a
single-component person name prints the name; pydicom's VR checks print the value) and a
modality controls those values, so a Patient Name with a newline can forge log lines. Every
record therefore goes through :class:`SafeRecordFilter` on the handler (so propagated records
from library loggers are covered too): library and ``warnings`` messages are rewritten to drop
quoted values, and control characters in every message are escaped. The text format keeps one
record per line; ``json`` writes one object per line with the study/job/instance ids a caller
passed in ``extra`` (or that the node's message names: "study UID", "job N") and nothing else
from the record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")

# Loggers of libraries that see DICOM attribute values; "py.warnings" is where captured Python
# warnings go (highdicom and pydicom warn with values in the text).
LIBRARY_LOGGERS = ("pydicom", "highdicom", "PIL", "pynetdicom", "py.warnings")
# Chatty at INFO (pynetdicom: several lines per DIMSE message; highdicom: ~7 lines per SR).
QUIET_BELOW_WARNING = ("highdicom", "pynetdicom", "PIL", "pydicom")

# ``extra`` keys copied into JSON records: identifiers an operator searches by, never demographics.
ID_FIELDS = ("study_uid", "job_id", "instance_uid", "series_uid", "outbox_id", "destination",
             "calling_aet")

_IDS_IN_MESSAGE = (("study_uid", re.compile(r"\bstudy ([0-9][0-9.]{0,63})\b")),
                   ("job_id", re.compile(r"\bjob (\d{1,18})\b")))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# From the first quote to the last one: a value containing quotes cannot end the redaction early.
_QUOTED = re.compile(r"(\"|').*(\"|')", re.DOTALL)
_UNBALANCED = re.compile(r"(\"|').*", re.DOTALL)
# Lines of a dataset dump or a message naming a demographic attribute.
_DEMOGRAPHIC = re.compile(r"(?i)patient|person|name|birth|\bPN\b|\(0010,")
# pynetdicom's own lines for an outgoing connection that failed: the caller reports the failure
# once, with the socket error (dicom_node.ops.netcheck), so below DEBUG these are dropped.
_PYNETDICOM_CONNECT = ("Association request failed: unable to connect", "TCP Initialisation Error")
_HIGHDICOM_PN = "is unlikely to represent the intended person name"
REDACTED = "<redacted>"


def escape_control(text: str) -> str:
    r"""Make control characters visible (``\n``, ``\x00``...) so one record stays one line."""
    def repl(m: re.Match[str]) -> str:
        c = m.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}")

    return _CONTROL.sub(repl, text)


def redact_library_message(text: str) -> str:
    """Drop anything in a library message that can be an attribute value.

    Known messages get a fixed text; otherwise quoted parts are removed (first quote to last) and
    a line that names a demographic attribute keeps only its first word.
    """
    if _HIGHDICOM_PN in text:
        return f"a person name has a single component ({REDACTED}); add '^' between components"
    text = _QUOTED.sub(REDACTED, text)
    text = _UNBALANCED.sub(REDACTED, text)
    lines = []
    for line in text.splitlines() or [""]:
        if _DEMOGRAPHIC.search(line):
            head = line.split(":", 1)[0] if ":" in line else ""
            line = f"{head}: {REDACTED}" if head and not _DEMOGRAPHIC.search(head) else REDACTED
        lines.append(line)
    return "\n".join(lines)


def _is_library(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in LIBRARY_LOGGERS)


class SafeRecordFilter(logging.Filter):
    """Rewrite a record in place: library values redacted, control characters escaped.

    The formatted message replaces ``msg`` (and ``args`` is cleared) so that no formatter can
    reintroduce raw arguments; the traceback text is escaped the same way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_dicom_node_safe", False):
            return True
        if (record.name.startswith("pynetdicom") and isinstance(record.msg, str)
                and record.msg.startswith(_PYNETDICOM_CONNECT)
                and logging.getLogger().getEffectiveLevel() > logging.DEBUG):
            return False
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not hide the record
            message = f"{record.msg!s} (unformattable arguments dropped)"
        if _is_library(record.name):
            message = redact_library_message(message)
        record.msg = escape_control(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text = record.exc_text
            if _is_library(record.name):
                text = redact_library_message(text)
            record.exc_text = escape_control(text)
        if record.stack_info:
            record.stack_info = escape_control(record.stack_info)
        record._dicom_node_safe = True  # type: ignore[attr-defined]
        return True


class OneLineFormatter(logging.Formatter):
    """``time level logger: message`` with the (already escaped) traceback on the same line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        if record.exc_text:
            line += " | " + record.exc_text
        return escape_control(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, ids from ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ID_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                obj[key] = escape_control(str(value)) if not isinstance(value, int) else value
        # the node's messages name their study and job ("study 1.2.3: ...", "job 7 (study ...)")
        for key, pattern in _IDS_IN_MESSAGE:
            if key not in obj and (m := pattern.search(obj["msg"])):
                obj[key] = int(m.group(1)) if key == "job_id" else m.group(1)
        if record.exc_text:
            obj["exc"] = record.exc_text
        return json.dumps(obj, ensure_ascii=True)


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the safety filter and the chosen format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(SafeRecordFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else OneLineFormatter())
    return handler


def setup_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger for this process (idempotent: replaces its own earlier handler).

    Args:
        level: DEBUG, INFO, WARNING or ERROR (case-insensitive; validated by the caller).
        fmt: ``text`` or ``json``.
        stream: where records go (default stderr).
    """
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for h in list(root.handlers):  # ours from an earlier call; others (a test harness) stay
        if getattr(h, "_dicom_node", False):
            root.removeHandler(h)
    handler = make_handler(fmt, stream)
    handler._dicom_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    logging.captureWarnings(True)
    quiet = logging.NOTSET if level == "DEBUG" else logging.WARNING
    for name in QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(quiet)
