"""Score one study: read -> MONAI transforms -> fold ensemble (+ Grad-CAM) -> measurements.

:class:`ScoringPipeline` loads the model artifact once and is kept alive by the worker (a fresh
process needs ~17 s of imports before it can score, PERF_NOTES). ``dicom-node score`` uses the same
pipeline offline and writes what the node would send: the SR and heat-map secondary captures,
plus a summary (JSON + CSV) and PNG previews.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from dicom_node.config import Config, ReaderConfig, ScoringConfig
from dicom_node.errors import ModelArtifactError, NothingToScoreError, ScoringError
from inference.gate import GateConfig, GateVerdict
from inference.types import ImageScore, ModelInfo, StudyScore, USFrame

if TYPE_CHECKING:
    from inference.reader import StudyRead

log = logging.getLogger(__name__)

ROI_SEG = "seg"
ROI_WHOLE = "whole-region"


@dataclass
class _Usable:
    frame: USFrame
    roi_source: str


class ScoringPipeline:
    """The scorer: model loaded once, then :meth:`score_study` per complete study.

    Args:
        model_dir: the artifact written by ``dicom-node train`` (model.json + fold files).
        scoring: device, threads, backend, CAM and study-rule settings.
        reader: frame policy for cine loops.

    Raises:
        ModelArtifactError: the artifact is invalid or is not an image-only binary classifier
            (the node has nothing but images to feed it).
    """

    def __init__(self, model_dir: Path, scoring: ScoringConfig, reader: ReaderConfig,
                 gate: GateConfig | None = None) -> None:
        from inference.ensemble import FoldEnsemble
        from inference.model import load_artifact
        from inference.transforms import eval_transforms

        self.scoring = scoring
        self.reader = reader
        self.gate = gate if gate is not None else GateConfig()
        self.artifact = load_artifact(Path(model_dir), device="cpu")
        spec = self.artifact.spec
        if tuple(spec.modalities) != ("image",):
            raise ModelArtifactError(
                f"{model_dir}: model uses {'+'.join(spec.modalities)}; the node only has the "
                "images, so it can serve image-only models"
            )
        if spec.target != "binary":
            raise ModelArtifactError(f"{model_dir}: target {spec.target!r} is not a binary classifier")
        # the crop margin comes from model.json, never from the node's config: it must match training
        self.transforms = eval_transforms(spec.input_size, spec.in_chans, spec.roi_margin)
        try:
            self.ensemble = FoldEnsemble(
                self.artifact.models,
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

    def score_study(
        self, paths: Sequence[Path], *, allow_missing_seg: bool, calling_ae: str | None = None
    ) -> tuple[StudyScore, StudyRead]:
        """Score every usable frame of one study.

        Args:
            paths: the study's instances (US images and SEGs).
            allow_missing_seg: score frames without a SEG ROI on their whole tissue region
                (``roi_source`` "whole-region"); otherwise such frames are skipped with a reason.

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
        from inference.transforms import roi_box

        timings: dict[str, float] = {}
        # --- input gate (inference.gate): images it stops are never read or scored ---------
        t0 = time.perf_counter()
        paths, verdicts, stopped = _gate_paths(paths, self.gate, calling_ae)
        timings["gate"] = _ms(t0)
        # --------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        read = read_study(
            [Path(p) for p in paths], frame_policy=self.reader.frame_policy,
            max_frames=self.reader.max_frames, region_policy=self.reader.region_policy,
        )
        timings["decode"] = _ms(t0)
        study_uid = _study_uid(read, paths)
        usable: list[_Usable] = []
        unscored: list[USFrame] = []
        for frame in read.frames:
            if frame.mask is not None and bool(np.any(frame.mask)):
                usable.append(_Usable(frame, ROI_SEG))
            elif allow_missing_seg:
                usable.append(_Usable(frame, ROI_WHOLE))
            else:
                unscored.append(frame)
        # The reader's problems, minus notes about images that were scored after all (e.g. "no
        # DICOM-SEG references this image" when scoring the whole region), plus frames left out.
        scored = {u.frame.sop_instance_uid for u in usable}
        skipped = [(str(u), str(r)) for u, r in read.problems if str(u) not in scored]
        skipped += [(v.sop_instance_uid, f"not scored by the input gate: {v.summary}")
                    for v in verdicts.values() if not v.passed]
        explained = {u for u, _ in skipped}
        for frame in unscored:
            if frame.sop_instance_uid not in explained:
                skipped.append((frame.sop_instance_uid,
                                f"frame {frame.frame_number}: no ROI segmentation (DICOM-SEG)"))
        if not usable:
            reasons = "; ".join(f"{u}: {r}" for u, r in skipped) or "no ultrasound images found"
            if any(v.passed for v in verdicts.values()):  # images the model may score failed
                raise ScoringError(f"study {study_uid}: nothing to score ({reasons})")
            if study_uid.startswith("<unknown"):  # e.g. a SEG-only study: ask the headers
                study_uid = _header_study_uid(paths, stopped) or study_uid
            raise NothingToScoreError(study_uid, skipped, list(verdicts.values()), stopped)

        t0 = time.perf_counter()
        margin = self.artifact.spec.roi_margin
        batch = torch.stack([self._preprocess(u) for u in usable])
        timings["transforms"] = _ms(t0)

        t0 = time.perf_counter()
        out = self.ensemble.predict(batch, cam=self.scoring.cam_enabled)
        timings["ensemble"] = _ms(t0)  # includes the CAM backward when CAM is on (one pass)

        t0 = time.perf_counter()
        heatmaps: list[np.ndarray | None] = [None] * len(usable)
        if out.cams is not None:
            for i, u in enumerate(usable):
                mask = u.frame.mask if u.roi_source == ROI_SEG else None
                box = roi_box(mask, u.frame.image.shape, margin)
                heatmaps[i] = cams_to_frame(out.cams[i], u.frame.image.shape, box)
        timings["cam"] = _ms(t0)

        t0 = time.perf_counter()
        images: list[ImageScore] = []
        probs, spread = out.probability, out.spread
        for i, u in enumerate(usable):
            measurements = None
            if u.roi_source == ROI_SEG:
                measurements = measure_roi(u.frame.image, u.frame.mask, u.frame.spacing_cm)
            images.append(ImageScore(
                frame=u.frame,
                probability=float(probs[i]),
                fold_probabilities=[float(p) for p in out.fold_probabilities[:, i]],
                fold_spread=float(spread[i]),
                heatmap=heatmaps[i],
                measurements=measurements,
                roi_source=u.roi_source,
                gate=verdicts.get(u.frame.sop_instance_uid),
            ))
        timings["measurements"] = _ms(t0)

        probability = study_probability([im.probability for im in images], self.scoring.study_rule)
        score = StudyScore(
            study_instance_uid=study_uid,
            patient_id=usable[0].frame.patient_id,
            probability=probability,
            positive=probability >= self.info.threshold,
            rule=self.scoring.study_rule,
            images=images,
            model=self.info,
            skipped=skipped,
            timings_ms=timings,
            gate=list(verdicts.values()),
        )
        log.info(
            "study %s: p=%.3f (%s, threshold %.3f) from %d image(s), %d skipped; ms %s",
            study_uid, probability, "positive" if score.positive else "negative",
            self.info.threshold, len(images), len(skipped),
            " ".join(f"{k}={v:.0f}" for k, v in timings.items()),
        )
        return score, read

    def _preprocess(self, u: _Usable) -> Any:
        """The shared eval transforms on one frame -> (C, S, S) tensor."""
        data: dict[str, Any] = {"image": np.asarray(u.frame.image, dtype=np.float32)[None]}
        if u.roi_source == ROI_SEG:
            data["mask"] = np.asarray(u.frame.mask, dtype=bool)[None]
        return self.transforms(data)["image"]

    def close(self) -> None:
        self.ensemble.close()


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


# --------------------------------------------------------------------------------------------
# dicom-node score PATH... --out DIR
# --------------------------------------------------------------------------------------------


def group_by_study(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """DICOM files under ``paths`` (files or folders, recursively) by StudyInstanceUID.

    Files that are not DICOM or carry no StudyInstanceUID are logged and left out.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    files: dict[Path, Path] = {}  # resolved -> as given; a file named twice is read once
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            found = [p]
        else:
            raise ScoringError(f"{p} does not exist")
        for f in found:
            files.setdefault(f.resolve(), f)
    studies: dict[str, list[Path]] = defaultdict(list)
    for f in files.values():
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.debug("skipping %s: not DICOM (%s)", f, exc)
            continue
        uid = ds.get("StudyInstanceUID")
        if not uid:
            log.warning("skipping %s: no StudyInstanceUID", f)
            continue
        studies[str(uid)].append(f)
    return dict(studies)


def _image_row(score: StudyScore, im: ImageScore) -> dict[str, Any]:
    m = im.measurements
    return {
        "study_uid": score.study_instance_uid,
        "sop_instance_uid": im.frame.sop_instance_uid,
        "frame": im.frame.frame_number,
        "probability": round(im.probability, 6),
        "fold_spread": round(im.fold_spread, 6),
        "fold_probabilities": [round(p, 6) for p in im.fold_probabilities],
        "roi_source": im.roi_source,
        "csa_cm2": None if m is None or m.csa_cm2 is None else round(m.csa_cm2, 4),
        "thickness_cm": None if m is None or m.thickness_cm is None else round(m.thickness_cm, 4),
        "echo_intensity_mean": None if m is None else round(m.echo_intensity_mean, 3),
        "echo_intensity_sd": None if m is None else round(m.echo_intensity_sd, 3),
        "manufacturer": im.frame.manufacturer,
    }


def write_offline_outputs(
    score: StudyScore, read: StudyRead, out_dir: Path, cfg: Config
) -> dict[str, Any]:
    """SR + heat-map SCs (E2's builders, as the node sends them) and PNG previews for one study."""
    from PIL import Image

    from dicom_node.results import build_results, render_heatmap

    folder = out_dir / score.study_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    result = build_results(score, read.datasets, cfg.results)
    sr_path = folder / f"SR_{result.sr.SOPInstanceUID}.dcm"
    result.sr.save_as(sr_path, enforce_file_format=True)
    sc_paths = []
    for ds in result.heatmaps:
        p = folder / f"SC_{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        sc_paths.append(p)
    previews = []
    for i, im in enumerate(score.images, start=1):
        if im.heatmap is None:
            continue
        rgb = render_heatmap(im, cfg.results.burn_in_text, score.model.threshold)
        p = folder / f"heatmap_{i:02d}_{im.frame.sop_instance_uid}_f{im.frame.frame_number}.png"
        Image.fromarray(rgb).save(p)
        previews.append(p)
    return {
        "sr": str(sr_path), "heatmaps": [str(p) for p in sc_paths],
        "previews": [str(p) for p in previews],
    }


def score_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node score PATH... --out DIR``: score files/folders offline, grouped by study."""
    model_dir = args.model or cfg.scoring.model_dir
    if model_dir is None:
        raise ScoringError("no model: pass --model DIR or set scoring.model_dir in the config")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = group_by_study(args.paths)
    if not studies:
        raise ScoringError(f"no DICOM files with a StudyInstanceUID under {', '.join(map(str, args.paths))}")
    pipeline = ScoringPipeline(Path(model_dir), cfg.scoring, cfg.reader, cfg.gate)
    allow_missing = cfg.completion.on_missing_seg == "score-whole-region"
    summary: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    failures = 0
    try:
        for study_uid, files in sorted(studies.items()):
            try:
                score, read = pipeline.score_study(files, allow_missing_seg=allow_missing)
                outputs = write_offline_outputs(score, read, out_dir, cfg)
            except ScoringError as exc:
                failures += 1
                log.error("study %s: %s", study_uid, exc)
                summary.append({"study_uid": study_uid, "status": "failed", "error": str(exc)})
                continue
            images = [_image_row(score, im) for im in score.images]
            rows.extend(images)
            summary.append({
                "study_uid": study_uid, "status": "scored",
                "probability": round(score.probability, 6), "positive": score.positive,
                "threshold": score.model.threshold, "rule": score.rule,
                "model": {"name": score.model.name, "version": score.model.version,
                          "model_uid": score.model.model_uid, "n_folds": score.model.n_folds},
                "images": images,
                "skipped": [{"sop_instance_uid": u, "reason": r} for u, r in score.skipped],
                "timings_ms": {k: round(v, 1) for k, v in score.timings_ms.items()},
                "outputs": outputs,
            })
            print(f"{study_uid}: p={score.probability:.3f} "
                  f"{'POSITIVE' if score.positive else 'negative'} "
                  f"({len(score.images)} image(s)) -> {outputs['sr']}")
    finally:
        pipeline.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    _write_csv(out_dir / "summary.csv", summary, rows)
    print(f"{len(summary) - failures} scored, {failures} failed; summary in {out_dir / 'summary.json'}")
    return 1 if failures else 0


def _write_csv(path: Path, summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """One row per scored image, with its study's probability and decision."""
    by_study = {s["study_uid"]: s for s in summary}
    fields = ["study_uid", "study_probability", "positive", "sop_instance_uid", "frame",
              "probability", "fold_spread", "roi_source", "csa_cm2", "thickness_cm",
              "echo_intensity_mean", "echo_intensity_sd", "manufacturer"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            s = by_study[r["study_uid"]]
            w.writerow({**r, "study_probability": s["probability"], "positive": s["positive"]})
