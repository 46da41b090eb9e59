"""Score one study: read -> ROI -> MONAI transforms -> fold ensemble (+ Grad-CAM) -> measurements.

The ROI of a frame is the DICOM-SEG's when one covers it (``RoiSource.SEG``); else, when the
pipeline has a segmenter and the caller asks for it, the automatic mask that passed quality
control (``RoiSource.AUTO``; a frame whose mask fails QC is neither measured nor scored, and the
reason is in ``StudyScore.skipped``); else the whole tissue region when allowed.

:class:`ScoringPipeline` loads the model artifact once and is kept alive by the worker (a fresh
process needs ~17 s of imports before it can score). The node's worker and the offline ``score``
command (both in the application layer) call the same :meth:`ScoringPipeline.score_study`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.config import ReaderConfig, ScoringConfig
from inference.errors import ModelArtifactError, NothingToScoreError, ScoringError
from inference.gate import GateConfig, GateVerdict
from inference.roi import RoiSource
from inference.types import ImageScore, ModelInfo, StudyScore, USFrame

if TYPE_CHECKING:
    from inference.artifact import ModelCard
    from inference.reader import StudyRead
    from inference.segmenter import Segmenter

log = logging.getLogger(__name__)

# ROI sources that give a mask: crop, CAM box and measurements use it
_MASKED = (RoiSource.SEG, RoiSource.AUTO)


@dataclass
class _Usable:
    frame: USFrame
    roi_source: RoiSource


class ScoringPipeline:
    """The scorer: model loaded once, then :meth:`score_study` per complete study.

    Args:
        model_dir: the artifact written by ``dicom-node train`` (model.json + fold files).
        scoring: device, threads, backend, CAM and study-rule settings.
        reader: frame cap for cine loops; its frame/region policy, if set, must match the model.

    Frame policy, region policy, study rule and threshold are the model's (model.json), so the
    node scores exactly as training evaluated.

    Raises:
        ModelArtifactError: the artifact is invalid, is not an image-only binary classifier
            (the node has nothing but images to feed it), or the config contradicts it.
    """

    def __init__(self, model_dir: Path, scoring: ScoringConfig, reader: ReaderConfig,
                 gate: GateConfig | None = None, segmenter: Segmenter | None = None) -> None:
        from inference.artifact import load_artifact
        from inference.ensemble import FoldEnsemble
        from inference.transforms import eval_transforms

        self.scoring = scoring
        self.reader = reader
        self.segmenter = segmenter
        if segmenter is None and scoring.segmentation_model_dir is not None:
            from inference.segmenter import load_segmenter

            self.segmenter = load_segmenter(Path(scoring.segmentation_model_dir))
        card = read_servable_card(Path(model_dir), scoring, reader)
        self.policy = card.policy
        self.gate = gate if gate is not None else GateConfig()
        self.artifact = load_artifact(Path(model_dir), device="cpu")
        self.ood = self.artifact.ood  # None: the model has no OOD check (older artifacts)
        spec = self.artifact.spec
        # the crop margin comes from model.json, never from the node's config: it must match
        # training
        self.transforms = eval_transforms(spec.input_size, spec.in_chans, spec.roi_margin,
                                          spec.fov_cm)
        try:
            self.ensemble = FoldEnsemble(
                list(self.artifact.models),
                device=scoring.device,
                threads=scoring.torch_threads,
                backend=scoring.backend,
                cam_layer=scoring.cam_target_layer,
                cam_method=scoring.cam_method,
                input_shape=(spec.in_chans, spec.input_size, spec.input_size),
            )
        except ValueError as exc:  # e.g. a cam_target_layer that is not a module of the model
            raise ModelArtifactError(f"{model_dir}: cannot serve this model: {exc}") from exc

    @property
    def info(self) -> ModelInfo:
        """Identity of the loaded model (for results and logs)."""
        return self.artifact.info

    @property
    def roi_model(self) -> ModelInfo | None:
        """Identity of the segmenter (for the AI DICOM-SEG), None without one."""
        seg = self.segmenter
        if seg is None:
            return None
        return ModelInfo(name=seg.name, version=seg.version, model_uid=seg.model_uid,
                         backbone=seg.spec.architecture, threshold=seg.spec.threshold,
                         n_folds=len(seg.networks))

    def score_study(
        self, paths: Sequence[Path], *, allow_missing_seg: bool, calling_ae: str | None = None,
        auto_roi: bool = False,
    ) -> tuple[StudyScore, StudyRead]:
        """Score every usable frame of one study.

        Args:
            paths: the study's instances (US images and SEGs).
            allow_missing_seg: score frames without a SEG ROI on their whole tissue region
                (``roi_source`` "whole-region"); otherwise such frames are skipped with a reason.
            auto_roi: segment frames without a SEG ROI with the pipeline's segmenter first; a
                frame whose automatic mask passes QC is scored on it (``RoiSource.AUTO``), one
                that fails is skipped with the reason (never scored on the whole region).

        Returns:
            (StudyScore, StudyRead): the verdict and what the reader found (source headers are
            needed to build the SR).

            calling_ae: the sender, for per-AE gate rules.

        Raises:
            NothingToScoreError: no image may be scored (SEG-only study, every image stopped by
                the input gate): terminal, the job ends as ``not-applicable``.
            ScoringError: images the gate passed could not be scored (no SEG, undecodable).
        """
        import torch

        from inference.cam import cams_to_frame
        from inference.ensemble import study_probability
        from inference.measurements import measure_roi
        from inference.reader import read_study
        from inference.transforms import fov_box, roi_box

        timings: dict[str, float] = {}
        # --- input gate (inference.gate): images it stops are never read or scored ---------
        t0 = time.perf_counter()
        paths, verdicts, stopped = _gate_paths(paths, self.gate, calling_ae)
        timings["gate"] = _ms(t0)
        # --------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        read = read_study(
            [Path(p) for p in paths], frame_policy=self.policy.frame_policy,
            max_frames=self.reader.max_frames, region_policy=self.policy.region_policy,
        )
        timings["decode"] = _ms(t0)
        study_uid = _study_uid(read, paths)
        auto: dict[tuple[str, int], Any] = {}
        if auto_roi and self.segmenter is not None:
            from inference.segmenter import fill_missing_rois

            t0 = time.perf_counter()
            # a human SEG always wins: only frames without a usable SEG mask are segmented
            for frame in read.frames:
                if frame.mask is not None and not bool(np.any(frame.mask)):
                    frame.mask = None
            auto = fill_missing_rois(self.segmenter, read.frames)
            timings["segment"] = _ms(t0)
        usable: list[_Usable] = []
        unscored: list[USFrame] = []
        failed_qc: list[tuple[str, str]] = []
        physical = self.artifact.spec.fov_cm > 0
        for frame in read.frames:
            if physical and not frame.spacing_cm:  # the model's input is sized in cm
                read.problems.append((frame.sop_instance_uid,
                                      f"frame {frame.frame_number}: no pixel spacing (US region "
                                      "calibration) for the model's physically scaled input"))
                continue
            res = auto.get((frame.sop_instance_uid, frame.frame_number))
            if res is not None and not res.passed:
                failed_qc.append((frame.sop_instance_uid,
                                  f"frame {frame.frame_number}: automatic ROI failed quality "
                                  f"control ({res.qc_reason}); not measured, not scored"))
            elif res is not None:
                usable.append(_Usable(frame, RoiSource.AUTO))
            elif frame.mask is not None and bool(np.any(frame.mask)):
                usable.append(_Usable(frame, RoiSource.SEG))
            elif allow_missing_seg:
                usable.append(_Usable(frame, RoiSource.WHOLE_REGION))
            else:
                unscored.append(frame)
        t0 = time.perf_counter()
        tensors = [self._preprocess(u) for u in usable]
        timings["transforms"] = _ms(t0)
        if self.ood is not None and usable:
            t0 = time.perf_counter()
            usable, tensors = self._ood_filter(usable, tensors, verdicts, stopped, read)
            timings["gate"] += _ms(t0)  # the OOD check is the gate's last step
        # The reader's problems, minus notes about images that were scored after all (e.g. "no
        # DICOM-SEG references this image" when scoring the whole region), plus frames left out.
        scored = {u.frame.sop_instance_uid for u in usable}
        skipped = [(str(u), str(r)) for u, r in read.problems if str(u) not in scored]
        skipped += failed_qc
        skipped += [(v.sop_instance_uid, f"not scored by the input gate: {v.summary}")
                    for v in verdicts.values() if not v.passed]
        explained = {u for u, _ in skipped}
        for frame in unscored:
            if frame.sop_instance_uid not in explained:
                skipped.append((frame.sop_instance_uid,
                                f"frame {frame.frame_number}: no ROI segmentation (DICOM-SEG)"))
        if not usable:
            reasons = "; ".join(f"{u}: {r}" for u, r in skipped) or "no ultrasound images found"
            if failed_qc and not unscored:  # terminal: a retry would segment the same way
                stopped.update(_headers(read, {u for u, _ in failed_qc}))
                raise NothingToScoreError(study_uid, failed_qc + [
                    x for x in skipped if x not in failed_qc], list(verdicts.values()), stopped)
            if any(v.passed for v in verdicts.values()):  # images the model may score failed
                raise ScoringError(f"study {study_uid}: nothing to score ({reasons})")
            if study_uid.startswith("<unknown"):  # e.g. a SEG-only study: ask the headers
                study_uid = _header_study_uid(paths, stopped) or study_uid
            raise NothingToScoreError(study_uid, skipped, list(verdicts.values()), stopped)

        margin = self.artifact.spec.roi_margin
        batch = torch.stack(tensors)

        t0 = time.perf_counter()
        out = self.ensemble.predict(batch, cam=self.scoring.cam_enabled)
        timings["ensemble"] = _ms(t0)  # includes the CAM backward when CAM is on (one pass)

        t0 = time.perf_counter()
        heatmaps: list[np.ndarray | None] = [None] * len(usable)
        if out.cams is not None:
            for i, u in enumerate(usable):
                mask = u.frame.mask if u.roi_source in _MASKED else None
                box = (fov_box(mask, u.frame.image.shape, u.frame.spacing_cm,
                               self.artifact.spec.fov_cm) if physical
                       else roi_box(mask, u.frame.image.shape, margin))
                heatmaps[i] = cams_to_frame(out.cams[i], u.frame.image.shape, box)
        timings["cam"] = _ms(t0)

        t0 = time.perf_counter()
        images: list[ImageScore] = []
        # each fold's calibrator on its own output, then the mean over folds: the scale on which
        # model.json's threshold was chosen
        fold_cal = self.artifact.card.calibrator.apply(out.fold_probabilities)
        probs, spread = fold_cal.mean(axis=0), fold_cal.std(axis=0)
        for i, u in enumerate(usable):
            measurements = None
            if u.roi_source in _MASKED and u.frame.mask is not None:
                measurements = measure_roi(u.frame.image, u.frame.mask, u.frame.spacing_cm)
            images.append(ImageScore(
                frame=u.frame,
                probability=float(probs[i]),
                fold_probabilities=[float(p) for p in fold_cal[:, i]],
                fold_spread=float(spread[i]),
                heatmap=heatmaps[i],
                measurements=measurements,
                roi_source=u.roi_source,
                gate=verdicts.get(u.frame.sop_instance_uid),
            ))
        timings["measurements"] = _ms(t0)

        rule = self.policy.study_rule
        probability = study_probability([im.probability for im in images], rule)
        per_fold = [study_probability(row, rule) for row in fold_cal]
        score = StudyScore(
            study_instance_uid=study_uid,
            patient_id=usable[0].frame.patient_id,
            probability=probability,
            positive=probability >= self.info.threshold,
            rule=self.policy.study_rule,
            images=images,
            model=self.info,
            skipped=skipped,
            timings_ms=timings,
            gate=list(verdicts.values()),
            fold_spread=float(np.std(per_fold)),
            roi_model=self.roi_model if any(u.roi_source == RoiSource.AUTO for u in usable)
            else None,
        )
        log.info(
            "study %s: p=%.3f (%s, threshold %.3f) from %d image(s), %d skipped; ms %s",
            study_uid, probability, "positive" if score.positive else "negative",
            self.info.threshold, len(images), len(skipped),
            " ".join(f"{k}={v:.0f}" for k, v in timings.items()),
        )
        return score, read

    def _ood_filter(self, usable: list[_Usable], tensors: list[Any],
                    verdicts: dict[str, GateVerdict], stopped: dict[str, Any], read: StudyRead
                    ) -> tuple[list[_Usable], list[Any]]:
        """Drop frames whose OOD score exceeds the model's threshold (their verdict says so).

        A multi-frame object is stopped when any of its read frames is out of distribution.
        Only SEG-ROI crops are checked: the statistics describe the training inputs, which are
        ROI crops; a whole-region crop (``on_missing_seg = "score-whole-region"``) is a departure
        the site chose, and would always be far from them.
        """
        import torch

        from inference.gate import GateVerdict, apply_ood

        assert self.ood is not None
        roi = [i for i, u in enumerate(usable) if u.roi_source == RoiSource.SEG]
        scores = np.full(len(usable), -np.inf)
        if roi:
            scores[roi] = self.ood.scores(list(self.artifact.models),
                                          torch.stack([tensors[i] for i in roi]))
        keep_u, keep_t = [], []
        for u, t, score in zip(usable, tensors, scores, strict=True):
            if not np.isfinite(score):
                keep_u.append(u)
                keep_t.append(t)
                continue
            sop = u.frame.sop_instance_uid
            base = verdicts.get(sop) or GateVerdict(sop, True, "passed", "not gated",
                                                    sop_class_uid=u.frame.sop_class_uid)
            v = apply_ood(base, float(score), self.ood.threshold, self.gate)
            if base.passed or sop not in verdicts:
                verdicts[sop] = v
            if v.passed:
                keep_u.append(u)
                keep_t.append(t)
            else:
                log.info("image %s not scored: %s", sop, v.summary)
                if sop in read.datasets:
                    stopped[sop] = read.datasets[sop]
        stopped_sops = {s for s, v in verdicts.items() if not v.passed}
        kept = [(u, t) for u, t in zip(keep_u, keep_t, strict=True)
                if u.frame.sop_instance_uid not in stopped_sops]
        return [u for u, _ in kept], [t for _, t in kept]

    def _preprocess(self, u: _Usable) -> Any:
        """The shared eval transforms on one frame -> (C, S, S) tensor."""
        data: dict[str, Any] = {"image": np.asarray(u.frame.image, dtype=np.float32)[None],
                                "spacing_cm": u.frame.spacing_cm}
        if u.roi_source in _MASKED:
            data["mask"] = np.asarray(u.frame.mask, dtype=bool)[None]
        return self.transforms(data)["image"]

    def close(self) -> None:
        self.ensemble.close()


def policy_conflicts(card: ModelCard, scoring: ScoringConfig, reader: ReaderConfig) -> list[str]:
    """Config values that are set and disagree with the model, one phrase each (empty: none)."""
    pairs = (("reader.frame_policy", reader.frame_policy, card.policy.frame_policy),
             ("reader.region_policy", reader.region_policy, card.policy.region_policy),
             ("scoring.study_rule", scoring.study_rule, card.policy.study_rule))
    return [f"{key} = {ours!r} but the model was trained and thresholded with {theirs!r}"
            for key, ours, theirs in pairs if ours is not None and ours != theirs]


def read_servable_card(model_dir: Path, scoring: ScoringConfig, reader: ReaderConfig) -> ModelCard:
    """model.json + fold files checked, the model servable, and the config consistent with it.

    Raises:
        ModelArtifactError: naming both values when the config contradicts the model (remove the
            key to use the model's value).
    """
    from inference.artifact import check_servable, read_card

    card = read_card(model_dir)
    check_servable(card, model_dir)
    bad = policy_conflicts(card, scoring, reader)
    if bad:
        raise ModelArtifactError(
            f"{model_dir}: the config contradicts the model: {'; '.join(bad)} "
            "(remove the key from config.toml to use the model's value)")
    return card


def _gate_paths(paths: Sequence[Path], cfg: GateConfig, calling_ae: str | None
                ) -> tuple[list[Path], dict[str, GateVerdict], dict[str, Any]]:
    """(paths to read, verdict per US image, headers of the images the gate stopped).

    SEGs and objects that are not images pass through untouched (the reader reports them).
    """
    from pydicom import dcmread

    from inference.gate import gate_dataset
    from inference.roi import is_segmentation

    keep: list[Path] = []
    verdicts: dict[str, GateVerdict] = {}
    stopped: dict[str, Any] = {}
    for p in paths:
        try:
            ds = dcmread(p)
        except Exception:  # noqa: BLE001 - the reader reports unreadable files
            keep.append(Path(p))
            continue
        if is_segmentation(ds) or "PixelData" not in ds:
            keep.append(Path(p))
            continue
        v = gate_dataset(ds, cfg, calling_ae)
        verdicts[v.sop_instance_uid] = v
        if v.passed:
            keep.append(Path(p))
        else:
            del ds.PixelData
            stopped[v.sop_instance_uid] = ds
            log.info("image %s not scored: %s", v.sop_instance_uid, v.summary)
    return keep, verdicts, stopped


def _header_study_uid(paths: Sequence[Path], stopped: dict[str, Any]) -> str | None:
    from pydicom import dcmread

    for ds in stopped.values():
        if ds.get("StudyInstanceUID"):
            return str(ds.StudyInstanceUID)
    for p in paths:
        try:
            uid = dcmread(p, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).get(
                "StudyInstanceUID")
        except Exception:  # noqa: BLE001 - unreadable files are reported by the reader
            continue
        if uid:
            return str(uid)
    return None


def _headers(read: StudyRead, uids: set[str]) -> dict[str, Any]:
    """Pixel-free copies of the read headers of ``uids`` (for a not-assessable SR)."""
    out = {}
    for uid in uids:
        ds = read.datasets.get(uid)
        if ds is None:
            continue
        head = ds.copy()
        if "PixelData" in head:
            del head.PixelData
        out[uid] = head
    return out


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _study_uid(read: StudyRead, paths: Sequence[Path]) -> str:
    if read.frames:
        return str(read.frames[0].study_instance_uid)
    for ds in read.datasets.values():
        uid = ds.get("StudyInstanceUID")
        if uid:
            return str(uid)
    return f"<unknown study of {len(paths)} file(s)>"
