"""What the status page shows, read from the index without writing (``mode=ro``).

The page is for an operator checking that studies flow: state, probability, decision, ROI
source, heat map, outbox, failures with their reason. It shows no patient data: no name, no
Patient ID, no accession. A study is shown by the tail of its Study Instance UID, which is the
identifier the node's own log lines already carry, so a line on the page can be found in the log.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.store import monitoring

# the note the scoring processor stores on a scored study: "p=0.734 positive (threshold ..."
_NOTE_RE = re.compile(r"p=(?P<p>[0-9.]+) (?P<decision>positive|negative)")
_NO_SEG_RE = re.compile(r"(\d+) without SEG")
SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture (and its multi-frame kin)


@dataclass
class StudyRow:
    """One line of the page."""

    study_uid: str
    state: str
    last_received: float | None
    probability: float | None = None
    decision: str | None = None
    roi_source: str | None = None
    job_state: str | None = None
    job_attempts: int | None = None
    error: str = ""
    outbox: dict[str, int] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        """The UID's tail: enough to tell studies apart and to grep the log."""
        return self.study_uid if len(self.study_uid) <= 14 else "\u2026" + self.study_uid[-12:]


def recent_studies(db_path: Path, limit: int = 50) -> list[StudyRow]:
    """The ``limit`` most recently received studies with their job, score and outbox state."""
    if not Path(db_path).exists():
        return []
    with monitoring.read_only(db_path) as conn:
        studies = monitoring.recent_studies(conn, limit)
        uids = [s["study_uid"] for s in studies]
        jobs = monitoring.latest_jobs(conn, uids)
        outbox: dict[str, dict[str, int]] = {}
        errors: dict[str, str] = {}
        for r in monitoring.outbox_by_study(conn, uids):
            outbox.setdefault(r["study_uid"], {})[r["state"]] = int(r["n"])
            if r["state"] != "sent" and r["err"]:
                errors[r["study_uid"]] = f"delivery: {r['err']}"
    rows = []
    for s in studies:
        row = StudyRow(study_uid=s["study_uid"], state=s["state"], last_received=s["last_received"],
                       outbox=outbox.get(s["study_uid"], {}))
        note = s["note"] or ""
        m = _NOTE_RE.search(note)
        if m and s["state"] == "scored":
            row.probability = float(m.group("p"))
            row.decision = m.group("decision")
            n = _NO_SEG_RE.search(note)
            row.roi_source = f"whole region ({n.group(1)} image(s) without SEG)" if n else "SEG"
        j = jobs.get(s["study_uid"])
        if j is not None:
            row.job_state, row.job_attempts = j["state"], j["attempts"]
            if j["state"] == "failed" or (j["last_error"] and j["state"] != "done"):
                row.error = str(j["last_error"] or "")
        if s["state"] in ("failed", "rejected", "held", "not-applicable") and not row.error:
            row.error = note
        if not row.error:
            row.error = errors.get(s["study_uid"], "")
        rows.append(row)
    return rows


def heatmap_files(results_dir: Path, study_uid: str) -> list[Path]:
    """The study's heat-map Secondary Capture files (the SR is not an image)."""
    from pydicom import dcmread

    from dicom_node.store.resultsets import sets_of

    sets = sets_of(results_dir, study_uid)  # the latest result set is the study's current one
    out = []
    for path in sorted(p for _, p in sets[-1].files) if sets else []:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # noqa: BLE001, S112 - an unreadable file is simply not shown
            continue
        if str(getattr(ds, "SOPClassUID", "")).startswith(SC_CLASS_PREFIX):
            out.append(path)
    return out


def thumbnail_png(path: Path, size: int = 160) -> bytes:
    """A PNG thumbnail of a heat-map SC image (first frame), longest side ``size`` pixels."""
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    ds = dcmread(path)
    arr = np.asarray(ds.pixel_array)
    if arr.ndim == 4 or (arr.ndim == 3 and str(ds.get("SamplesPerPixel", 1)) == "1"):
        arr = arr[0]
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, str(ds.PhotometricInterpretation), "RGB")
    img = Image.fromarray(arr.astype(np.uint8))
    img.thumbnail((size, size))
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def iso(t: float | None) -> str:
    """UTC ISO 8601 time, or '-'."""
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def human_time(t: float | None) -> str:
    """Local ISO 8601 time with its UTC offset (for tables people read), or '-'.

    ``--json`` output keeps the epoch seconds instead: machines compare numbers.
    """
    if not t:
        return "-"
    from datetime import datetime

    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def as_dict(row: StudyRow) -> dict[str, Any]:
    """JSON form of a row (the page's ``?format=json``)."""
    return {
        "study": row.short_id, "state": row.state, "last_received": iso(row.last_received),
        "probability": row.probability, "decision": row.decision, "roi_source": row.roi_source,
        "job": row.job_state, "attempts": row.job_attempts, "outbox": row.outbox,
        "error": row.error,
    }
