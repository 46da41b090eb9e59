"""Named queries on studies: what completion reads and decides, what ``studies`` shows."""

from __future__ import annotations

import json
from typing import Any

from dicom_node.store.db import Index
from dicom_node.store.outbox import outbox_summary
from dicom_node.store.queue import enqueue


def receiving_studies(index: Index) -> list[dict[str, Any]]:
    """Studies still receiving instances."""
    return index.query("SELECT * FROM studies WHERE state = 'receiving'")


def completion_instances(index: Index, study_uid: str) -> list[dict[str, Any]]:
    """What completion needs of each instance: SOP UID and class, SEG references (JSON), and
    whether a SEG is automatic."""
    return index.query(
        "SELECT sop_uid, sop_class_uid, referenced_sop_uids, automatic_seg FROM instances "
        "WHERE study_uid = ?",
        (study_uid,),
    )


def apply_decision(index: Index, study_uid: str, *, state: str, reason: str, missing_seg: bool,
                   note: str, seen_last_received: float, now: float,
                   job_payload: dict[str, Any] | None,
                   max_attempts: int) -> tuple[bool, int | None]:
    """Move a receiving study to ``state`` and queue its job, in one transaction.

    Nothing happens if an instance arrived since ``seen_last_received`` (not quiet after all).

    Returns:
        (applied, job id or None)
    """
    with index.transaction() as conn:
        cur = conn.execute(
            "UPDATE studies SET state = ?, completed_at = ?, completion_reason = ?, "
            "missing_seg = ?, note = ? WHERE study_uid = ? AND state = 'receiving' "
            "AND last_received = ?",
            (state, now, reason, int(missing_seg), note, study_uid, seen_last_received),
        )
        if cur.rowcount != 1:
            return False, None
        job_id = None
        if job_payload is not None:
            job_id = enqueue(conn, study_uid, "score", job_payload, max_attempts=max_attempts,
                             now=now)
    return True, job_id


def study_table(index: Index) -> list[dict[str, Any]]:
    """One dict per study: state, counts, latest job and delivery counts.

    ``seg`` counts human (MANUAL/SEMIAUTOMATIC) SEGs, the ones that are ROIs; ``automatic_seg``
    the AUTOMATIC ones that came back (the node's own AI SEG routed back, another AI product).
    """
    studies = index.query(
        "SELECT s.*, "
        "(SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid) AS instances, "
        "(SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid "
        "AND i.modality = 'US') AS us, "
        "(SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid "
        "AND i.modality = 'SEG' AND coalesce(i.automatic_seg, 0) = 0) AS seg, "
        "(SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid "
        "AND i.modality = 'SEG' AND i.automatic_seg = 1) AS automatic_seg "
        "FROM studies s ORDER BY s.first_received"
    )
    jobs = index.query(
        "SELECT study_uid, id, state, attempts, last_error FROM jobs WHERE id IN "
        "(SELECT max(id) FROM jobs GROUP BY study_uid)"
    )
    by_study = {j["study_uid"]: j for j in jobs}
    outbox = outbox_summary(index)
    out = []
    for s in studies:
        j = by_study.get(s["study_uid"])
        out.append({
            "study_uid": s["study_uid"], "patient_id": s["patient_id"], "state": s["state"],
            "instances": s["instances"], "us": s["us"], "seg": s["seg"],
            "automatic_seg": s["automatic_seg"],
            "first_received": s["first_received"], "last_received": s["last_received"],
            "completion_reason": s["completion_reason"], "missing_seg": bool(s["missing_seg"]),
            "reopen_count": s["reopen_count"], "note": s["note"] or "",
            "images": _images(s.get("images")),
            "job": None if j is None else {
                "id": j["id"], "state": j["state"], "attempts": j["attempts"],
                "last_error": j["last_error"]},
            "delivery": outbox.get(s["study_uid"], {}),
        })
    return out


def _images(raw: str | None) -> list[dict[str, Any]]:
    """The per-image record of the study's last finished job (empty before one finished)."""
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def images_summary(images: list[dict[str, Any]]) -> str:
    """Short form for the table: ``2 scored; 1 not: colour-flow``."""
    if not images:
        return "-"
    scored = sum(bool(i.get("scored")) for i in images)
    codes: dict[str, int] = {}
    for i in images:
        if not i.get("scored"):
            code = short_reason(str(i.get("reason", "")))
            codes[code] = codes.get(code, 0) + 1
    parts = [f"{scored} scored"] if scored else []
    if codes:
        parts.append(f"{sum(codes.values())} not: " + ", ".join(
            c if n == 1 else f"{c} x{n}" for c, n in sorted(codes.items())))
    return "; ".join(parts)


def short_reason(reason: str) -> str:
    """The code of a reason: the gate's code, or the reason's first words."""
    prefix = "not scored by the input gate: "
    if reason.startswith(prefix):
        return reason[len(prefix):].split(":", 1)[0]
    return reason.split(":", 1)[0].split(";", 1)[0][:40]
