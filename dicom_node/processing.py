"""The scoring job: complete study -> score -> SR + heat maps (published once) -> outbox -> note.

Results are keyed by (study, input instances, model) (:mod:`dicom_node.store.resultsets`): a
job whose key already has a published set hands those files to delivery again instead of
scoring, so a crash anywhere between scoring and delivery never yields a second result set.

``dicom-node serve`` installs :func:`build_processor`'s result as the worker's processor when
scoring is enabled. The model artifact is loaded and checked when the processor is built (so
``serve`` refuses to start with a broken model or a config that contradicts it) and kept for the
life of the process (a fresh process needs ~17 s before it can score).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.completion import missing_seg_flags
from dicom_node.config import Config
from dicom_node.errors import ModelArtifactError, NothingToScoreError
from dicom_node.ops.metrics import record_pipeline_timings, timed
from dicom_node.worker import JobContext, Processor, finish_not_applicable
from inference.roi import RoiSource

if TYPE_CHECKING:
    from pydicom import Dataset

    from dicom_node.store.resultsets import ResultSet as ResultSetFolder
    from inference.pipeline import ScoringPipeline
    from inference.types import StudyScore

log = logging.getLogger(__name__)

_NOTE_LIMIT = 2000


def find_predecessor(results_dir: Path, study_uid: str, *, exclude_key: str = "") -> Dataset | None:
    """The latest SR this node wrote for ``study_uid`` earlier (a rescore references it).

    Looks at the study's published result sets (:mod:`dicom_node.store.resultsets`) and, for
    archives written before them, ``results_dir/<StudyUID>/*.dcm``; the latest by
    ContentDate/ContentTime wins. Headers only.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_node.store.resultsets import sets_of
    from dicom_node.validate import is_valid_uid

    candidates = [p for rs in sets_of(results_dir, study_uid) if rs.key != exclude_key
                  for _, p in rs.files]
    legacy = Path(results_dir) / study_uid
    if is_valid_uid(study_uid) and legacy.is_dir():
        candidates += sorted(legacy.glob("*.dcm"))
    best: tuple[tuple[str, str, float], Dataset] | None = None
    for path in candidates:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            log.warning("study %s: unreadable earlier result %s (%s)", study_uid, path.name, exc)
            continue
        if ds.get("Modality") != "SR":
            continue
        key = (str(ds.get("ContentDate", "")), str(ds.get("ContentTime", "")), path.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, ds)
    return best[1] if best else None


def study_note(score: StudyScore) -> str:
    """One line for ``studies.note``: the verdict and every object that could not be used."""
    whole = sum(im.roi_source == RoiSource.WHOLE_REGION for im in score.images)
    auto = sum(im.roi_source == RoiSource.AUTO for im in score.images)
    note = (
        f"p={score.probability:.3f} {'positive' if score.positive else 'negative'} "
        f"(threshold {score.model.threshold:.3f}, {score.rule} of {len(score.images)} image(s)"
        f"{f', {whole} without SEG scored on the whole region' if whole else ''}"
        f"{f', {auto} on the automatic ROI' if auto else ''})"
    )
    if score.skipped:
        note += "; not used: " + "; ".join(f"{uid}: {reason}" for uid, reason in score.skipped)
    return note[:_NOTE_LIMIT]


def image_reasons(score: StudyScore) -> list[dict[str, Any]]:
    """Per image: scored or not, and why (the gate's verdict, or what stopped it)."""
    out: dict[str, dict[str, Any]] = {}
    for im in score.images:
        uid = im.frame.sop_instance_uid
        why = im.gate.detail if im.gate is not None else "passed"
        if im.frame.spacing_cm is None and "no cm" not in why:
            why += " (no cm values)"
        out.setdefault(uid, {"sop_uid": uid, "scored": True,
                             "reason": f"scored ({im.roi_source}): {why}"})
    for uid, reason in score.skipped:
        out.setdefault(uid, {"sop_uid": uid, "scored": False, "reason": reason})
    return list(out.values())


class ScoringProcessor:
    """Callable ``JobContext -> None`` holding the pipeline loaded when ``serve`` starts."""

    def __init__(self, cfg: Config) -> None:
        if cfg.scoring.model_dir is None:
            raise ModelArtifactError("scoring.model_dir is not set")
        from inference.pipeline import ScoringPipeline

        # Fail at start-up, not at the first study: the whole artifact check (model.json, image-only
        # binary model, config consistent with it, fold files, weights loadable, CAM layer) runs
        # here, and the loaded pipeline is kept for every job.
        self.cfg = cfg
        self._pipeline: ScoringPipeline = ScoringPipeline(
            cfg.scoring.model_dir, cfg.scoring, cfg.reader, cfg.gate
        )
        info = self._pipeline.info
        # the model's identity in the exactly-once key of every result set
        self.model_uid = str(info.model_uid or "") or hashlib.sha256(
            f"{info.name}\0{info.version}".encode()).hexdigest()
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> ScoringPipeline:
        """The scoring pipeline, loaded when the processor was built."""
        with self._lock:
            return self._pipeline

    def __call__(self, ctx: JobContext) -> None:
        from dicom_node.store import resultsets

        cfg = self.cfg
        ids = f"study {ctx.study_uid} job {ctx.job_id}"
        # an automatic SEG (e.g. this node's own, routed back by PACS) is no input: the reader
        # leaves it out, so it must not make a new study version either
        auto_segs = set(ctx.automatic_seg_uids)
        if auto_segs:
            log.info("%s: %d automatic DICOM-SEG(s) in the study are not a human ROI; not used",
                     ids, len(auto_segs))
        key = resultsets.result_key(
            ctx.study_uid, [u for u in ctx.sop_uids if u not in auto_segs], self.model_uid)
        done = resultsets.find(cfg.node.results_dir, ctx.study_uid, key)
        if done is not None:
            # an earlier attempt published this study version's results: deliver those, never
            # a second set with new UIDs
            log.info("%s: results of this study version exist (set %s); re-queued, not rescored",
                     ids, key[:12])
        else:
            done = self._score(ctx, key, ids)
            if done is None:  # not applicable, and no SR says so: nothing to deliver
                return
        ctx.note = done.note
        if done.note.startswith("not-applicable"):  # a published "not assessable" SR
            ctx.study_state = "not-applicable"
        self._queue(ctx, done, ids)

    def _score(self, ctx: JobContext, key: str, ids: str) -> ResultSetFolder | None:
        from dicom_node.results import build_results
        from dicom_node.store import resultsets

        cfg = self.cfg
        # completion decided the policy and wrote it into the payload; the defaults are the same
        # policy for a job queued without the keys
        default_allow, default_auto = missing_seg_flags(cfg.completion)
        allow = bool(ctx.payload.get("allow_missing_seg", default_allow))
        auto = bool(ctx.payload.get("auto_roi", default_auto))
        log.info("%s: scoring %d instance(s) (attempt %d, allow_missing_seg=%s, auto_roi=%s, "
                 "reason %s)", ids, len(ctx.paths), ctx.attempt, allow, auto,
                 ctx.payload.get("completion_reason", "?"))
        try:
            score, read = self.pipeline.score_study(list(ctx.paths), allow_missing_seg=allow,
                                                    auto_roi=auto)
        except NothingToScoreError as exc:  # terminal: no retries, no sarcopenia verdict
            return self._not_applicable(ctx, exc, ids, key)
        record_pipeline_timings(score.timings_ms)
        ctx.images = image_reasons(score)
        log.info("%s: p=%.3f %s from %d image(s); %d object(s) not used", ids, score.probability,
                 "positive" if score.positive else "negative", len(score.images),
                 len(score.skipped))
        for uid, reason in score.skipped:
            log.info("%s: not used %s: %s", ids, uid, reason)

        predecessor = find_predecessor(cfg.node.results_dir, ctx.study_uid, exclude_key=key)
        if predecessor is not None:
            log.info("%s: rescore; predecessor SR %s", ids, predecessor.SOPInstanceUID)
        with timed("sr_build"):
            results = build_results(score, _sources(read), cfg.results, predecessor,
                                    uid=lambda role: resultsets.uid_for(key, role))
        done = resultsets.publish(cfg.node.results_dir, ctx.study_uid, key, results.datasets,
                                  note=study_note(score),
                                  extra={"model_uid": self.model_uid, "job_id": ctx.job_id})
        log.info("%s: results archived (SR %s + %d heat map(s))", ids,
                 results.sr.SOPInstanceUID if results.sr is not None else "not built",
                 len(results.heatmaps))
        return done

    def _not_applicable(self, ctx: JobContext, exc: NothingToScoreError, ids: str,
                        key: str) -> ResultSetFolder | None:
        """Record ``not-applicable: <reason>``; by ``results.not_assessable`` publish an SR
        saying so."""
        from dicom_node.results import build_not_assessable_sr
        from dicom_node.store import resultsets

        log.info("%s: %s", ids, exc.state)
        finish_not_applicable(ctx, exc)
        if self.cfg.results.not_assessable != "sr" or not exc.sources:
            return None
        sr = build_not_assessable_sr(ctx.study_uid, exc.state, exc.verdicts, exc.sources,
                                     self.pipeline.info, self.cfg.results,
                                     uid=lambda role: resultsets.uid_for(key, role))
        return resultsets.publish(self.cfg.node.results_dir, ctx.study_uid, key, [sr],
                                  note=ctx.note,
                                  extra={"model_uid": self.model_uid, "job_id": ctx.job_id})

    def _queue(self, ctx: JobContext, done: ResultSetFolder, ids: str) -> None:
        """Hand the files to the worker, which queues them as it marks the job done."""
        from dicom_node.store.outbox import OutboxItem

        cfg = self.cfg
        if not cfg.destinations:
            log.warning("%s: no [[destinations]] configured; results stay in %s", ids, done.folder)
            return
        data_dir = cfg.node.data_dir.resolve()
        for d in cfg.destinations:
            for sop_uid, path in done.files:
                ctx.outbox.append(OutboxItem(ctx.study_uid, d.name,
                                             str(path.resolve().relative_to(data_dir)), sop_uid,
                                             done.key))
        log.info("%s: %d file(s) to queue for %s", ids, len(done.files),
                 ", ".join(d.name for d in cfg.destinations))


def _sources(read: Any) -> dict[str, Any]:
    """Source headers for the SR: the US images (the reader keeps their headers)."""
    return dict(read.datasets)


def build_processor(cfg: Config) -> Processor:
    """The worker's processor when scoring is enabled.

    Raises:
        ModelArtifactError: ``scoring.model_dir`` is missing or not a complete artifact.
    """
    return ScoringProcessor(cfg)
