"""Make patient/study attributes copied from a source header valid before highdicom sees them.

Real headers carry over-precise times, empty or malformed dates and control characters in names.
highdicom validates what it copies and raises, which used to throw away a finished score. Type 2
and 3 attributes are repaired or emptied (their absence of value is legal); Type 1 attributes
(Study Instance UID, SOP Class/Instance UID of the source) are never invented: a bad one fails
clearly with :class:`ResultsInputError`.
"""

from __future__ import annotations

import copy
import logging
import re

from pydicom import Dataset

from dicom_node.errors import PermanentJobError

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1a\x1c-\x1f\x7f]")  # keep TAB and ESC (ISO 2022)

# Type 2 attributes of the Patient and General Study modules highdicom copies to its objects.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")
TYPE1 = ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID")


class ResultsInputError(PermanentJobError):
    """A Type 1 attribute of the source header is missing or invalid: no result can carry it."""


def _date(value: str) -> str | None:
    v = value.strip()
    if not _DA_RE.match(v):
        return None
    y, m, d = int(v[:4]), int(v[4:6]), int(v[6:])
    return v if 1 <= m <= 12 and 1 <= d <= 31 and y >= 1800 else None


def _time(value: str) -> str | None:
    """HHMMSS.FFFFFF at most; over-precise fractions are truncated, nonsense dropped."""
    v = value.strip().replace(":", "")
    m = _TM_RE.match(v)
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return None
    out = hh + (mm or "") + (ss or "")
    if frac and ss:
        out += frac[:7]  # "." + 6 digits
    return out


def _datetime(value: str) -> str | None:
    v = value.strip()
    m = re.match(r"^(\d{8})(\d{2,6}(?:\.\d+)?)?([+-]\d{4})?$", v)
    if not m or _date(m.group(1)) is None:
        return None
    t = _time(m.group(2)) if m.group(2) else ""
    return None if t is None else m.group(1) + t + (m.group(3) or "")


def sanitize_source(ds: Dataset) -> Dataset:
    """A copy of a source header whose copied attributes are valid; the source is untouched.

    Raises:
        ResultsInputError: a Type 1 UID is missing or not a UID.
    """
    out = copy.deepcopy(ds)  # elements are shared by a shallow copy
    for kw in TYPE1:
        value = str(out.get(kw, "") or "").strip().rstrip("\x00")
        if not value or len(value) > 64 or not _UID_RE.match(value):
            raise ResultsInputError(
                f"source {str(ds.get('SOPInstanceUID', '?'))[:64]}: Type 1 attribute {kw} is "
                "missing or not a valid UID; no result can reference it")
        setattr(out, kw, value)
    fixed: list[str] = []
    for elem in list(out.iterall()):
        if elem.VR not in ("DA", "TM", "DT", "PN") or elem.value in (None, ""):
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        clean = []
        for v in values:
            s = str(v)
            new = {"DA": _date, "TM": _time, "DT": _datetime}.get(elem.VR, _pn)(s)
            if new is not None and new != "":
                clean.append(new)
        if [str(v) for v in values] != clean:
            fixed.append(elem.keyword or str(elem.tag))
            elem.value = clean if len(clean) > 1 else (clean[0] if clean else "")
    for kw in TYPE2:
        if kw not in out:
            setattr(out, kw, "")
            fixed.append(kw)
    if fixed:
        log.info("source %s: repaired header attribute(s) %s",
                 str(ds.get("SOPInstanceUID", "?"))[:64], ", ".join(sorted(set(fixed))))
    return out


def _pn(value: str) -> str | None:
    """Person name without control characters; at most 5 components per group (PS3.5 6.2)."""
    clean = _CONTROL.sub("", value)
    groups = [("^".join(g.split("^")[:5])) for g in clean.split("=")[:3]]
    out = "=".join(groups).strip()
    return out or None
