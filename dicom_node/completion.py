"""Study completion: decide when a ``receiving`` study is complete, held or rejected.

DICOM has no "study finished" message, so (like mercure) the node waits for a quiet period
(``completion.idle_seconds``) and forces a decision at a ceiling (``completion.max_wait_seconds``,
counted from the start of the current receiving episode). With ``require_seg`` a study whose US
images are not all referenced by a DICOM-SEG keeps waiting until the ceiling, then follows
``on_missing_seg``: ``score-whole-region`` completes it with ``missing_seg`` set, ``hold`` parks
it (a late SEG re-opens it), ``reject`` refuses it. ``auto`` waits only
``completion.seg_wait_seconds`` (and for quiet) before completing it with ``auto_roi`` set: the
scorer segments the images no SEG covers. A SEG that arrives later re-opens the study (as any
new instance does) and the rescore uses it. A complete study gets exactly one ``score`` job in
the same transaction that changes its state.

A SEG whose segments are all AUTOMATIC (the node's own AI SEG routed back by PACS, or another AI
product's) is archived but is no human ROI: it never covers an image here, and it never re-opens
a study (:meth:`dicom_node.store.archive.Archive.store`), so it cannot start a rescore loop.

Job payload (what the worker/scoring step receives)::

    {"completion_reason": "idle" | "max-wait" | "max-wait-missing-seg" | "seg-wait-auto",
     "missing_seg": bool,            # some US image has no SEG referencing it
     "allow_missing_seg": bool,      # score those images on the whole tissue region
     "auto_roi": bool,               # segment those images (automatic ROI) instead
     "missing_seg_sop_uids": [...],  # the US images without a SEG (at most 100 listed)
     "instance_count": int, "us_count": int, "seg_count": int, "reopen_count": int,
     "automatic_seg_count": int}     # all-AUTOMATIC SEGs: archived, not counted in seg_count
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from dicom_node.config import CompletionConfig
from dicom_node.loop import PollingLoop
from dicom_node.store.db import Index
from dicom_node.store.studies import (
    apply_decision,
    completion_instances,
    receiving_studies,
)
from dicom_node.validate import SEG_SOP_CLASSES, US_SOP_CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """The new state of one study and why."""

    state: str  # complete | held | rejected
    reason: str
    missing_seg: bool
    payload: dict[str, Any]
    note: str = ""


def seg_coverage(instances: list[dict[str, Any]]) -> tuple[list[str], int, int]:
    """US images without a human SEG referencing them, and the US/human-SEG counts.

    An automatic SEG (``automatic_seg`` set) covers nothing: only a human outline is the ROI.
    """
    us = [r["sop_uid"] for r in instances if r["sop_class_uid"] in US_SOP_CLASSES]
    referenced: set[str] = set()
    seg_count = 0
    for r in instances:
        if r["sop_class_uid"] in SEG_SOP_CLASSES and not r.get("automatic_seg"):
            seg_count += 1
            referenced.update(json.loads(r["referenced_sop_uids"] or "[]"))
    return [u for u in us if u not in referenced], len(us), seg_count


def automatic_seg_count(instances: list[dict[str, Any]]) -> int:
    """How many of a study's instances are all-AUTOMATIC SEGs (archived, not a human ROI)."""
    return sum(1 for r in instances
               if r["sop_class_uid"] in SEG_SOP_CLASSES and r.get("automatic_seg"))


def missing_seg_flags(cfg: CompletionConfig) -> tuple[bool, bool]:
    """``(allow_missing_seg, auto_roi)``: how images without a human SEG are scored.

    The one mapping from ``completion.on_missing_seg`` / ``require_seg`` to the pipeline's flags
    for a study completed with images still lacking a SEG. :func:`decide` writes them into the job
    payload; a job queued without them (by an older version) and the offline ``score`` command,
    which has no completion step, take them from here, so all three follow the same policy.
    """
    auto = cfg.on_missing_seg == "auto"
    allow = not auto and (cfg.on_missing_seg == "score-whole-region" or not cfg.require_seg)
    return allow, auto


def decide(study: dict[str, Any], instances: list[dict[str, Any]], cfg: CompletionConfig,
           now: float) -> Decision | None:
    """What should happen to a ``receiving`` study now; None means keep waiting."""
    idle = now - study["last_received"] >= cfg.idle_seconds
    ceiling = now - (study["receiving_since"] or study["first_received"]) >= cfg.max_wait_seconds
    if not (idle or ceiling):
        return None
    missing, us_count, seg_count = seg_coverage(instances)
    payload: dict[str, Any] = {
        "missing_seg": bool(missing),
        "missing_seg_sop_uids": missing[:100],
        "instance_count": len(instances),
        "us_count": us_count,
        "seg_count": seg_count,
        "reopen_count": int(study["reopen_count"] or 0),
        "automatic_seg_count": automatic_seg_count(instances),
    }
    auto = cfg.on_missing_seg == "auto"
    if cfg.require_seg and missing and auto:
        start = study["receiving_since"] or study["first_received"]
        if not (ceiling or (idle and now - start >= cfg.seg_wait_seconds)):
            return None  # a human SEG may still come
        reason = "seg-wait-auto" if not ceiling else "max-wait-missing-seg"
        payload.update(completion_reason=reason, allow_missing_seg=False, auto_roi=True)
        note = (f"{len(missing)} of {us_count} US images have no SEG after the SEG wait; "
                "segmenting them (automatic ROI)")
        return Decision("complete", reason, True, payload, note)
    if cfg.require_seg and missing:
        if not ceiling:
            return None  # the SEG may still come
        reason = "max-wait-missing-seg"
        payload.update(completion_reason=reason, allow_missing_seg=True)
        note = f"{len(missing)} of {us_count} US images have no SEG after max wait"
        if cfg.on_missing_seg == "hold":
            return Decision("held", reason, True, payload, note + "; held (a SEG re-opens it)")
        if cfg.on_missing_seg == "reject":
            return Decision("rejected", reason, True, payload, note + "; rejected")
        return Decision("complete", reason, True, payload, note + "; scoring the whole region")
    reason = "idle" if idle else "max-wait"
    payload.update(completion_reason=reason, auto_roi=auto and bool(missing),
                   allow_missing_seg=(bool(missing) or not cfg.require_seg) and not auto)
    return Decision("complete", reason, bool(missing), payload)


def check_studies(index: Index, cfg: CompletionConfig, *, max_attempts: int,
                  now: float | None = None) -> list[tuple[str, Decision]]:
    """One pass over ``receiving`` studies; applies and returns the decisions taken."""
    now = time.time() if now is None else now
    taken: list[tuple[str, Decision]] = []
    for study in receiving_studies(index):
        uid = study["study_uid"]
        instances = completion_instances(index, uid)
        decision = decide(study, instances, cfg, now)
        if decision is None:
            continue
        applied, job_id = apply_decision(
            index, uid, state=decision.state, reason=decision.reason,
            missing_seg=decision.missing_seg, note=decision.note,
            seen_last_received=study["last_received"], now=now,
            job_payload=decision.payload if decision.state == "complete" else None,
            max_attempts=max_attempts,
        )
        if not applied:
            continue
        if decision.payload.get("automatic_seg_count"):
            log.info("study %s: %d automatic DICOM-SEG(s) archived, not counted as a human ROI",
                     uid, decision.payload["automatic_seg_count"])
        log.info("study %s: %s (%s, missing_seg=%s, %d instances)%s", uid, decision.state,
                 decision.reason, decision.missing_seg, len(instances),
                 f", job {job_id} queued" if job_id else "")
        taken.append((uid, decision))
    return taken


class CompletionMonitor(PollingLoop):
    """Background thread running :func:`check_studies` every ``cfg.poll_seconds``."""

    name = "completion"

    def __init__(self, index: Index, cfg: CompletionConfig, *, max_attempts: int) -> None:
        super().__init__(cfg.poll_seconds)
        self.index = index
        self.cfg = cfg
        self.max_attempts = max_attempts

    def poll(self) -> bool:
        check_studies(self.index, self.cfg, max_attempts=self.max_attempts)
        return False
