"""``dicom-node score PATH... --out DIR``: score files/folders offline, grouped by study.

Uses the same :class:`inference.pipeline.ScoringPipeline` as the node and writes what the node
would send (the SR and heat-map secondary captures, built by :mod:`dicom_node.results`), plus a
summary (JSON + CSV) and PNG previews. The missing-SEG policy is the node's
(``completion.on_missing_seg``), so offline scores match what ``serve`` would return.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.completion import missing_seg_flags
from dicom_node.config import Config
from dicom_node.errors import ScoringError

if TYPE_CHECKING:
    from inference.reader import StudyRead
    from inference.types import ImageScore, StudyScore

log = logging.getLogger(__name__)


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
    """SR + heat-map SCs (the node's own builders) and PNG previews for one study."""
    from PIL import Image

    from dicom_node.results import build_results, render_heatmap

    folder = out_dir / score.study_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    result = build_results(score, read.datasets, cfg.results)
    sr_path: Path | None = None
    if result.sr is not None:  # None when only the SR failed to build (see result.errors)
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
        rgb = render_heatmap(im, cfg.results.burn_in_text, score.model.image_threshold)
        p = folder / f"heatmap_{i:02d}_{im.frame.sop_instance_uid}_f{im.frame.frame_number}.png"
        Image.fromarray(rgb).save(p)
        previews.append(p)
    return {
        "sr": None if sr_path is None else str(sr_path), "heatmaps": [str(p) for p in sc_paths],
        "previews": [str(p) for p in previews],
    }


def score_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node score PATH... --out DIR``: score files/folders offline, grouped by study."""
    model_dir: Path | None = args.model or cfg.scoring.model_dir
    if model_dir is None:
        raise ScoringError("no model: pass --model DIR or set scoring.model_dir in the config")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = group_by_study(args.paths)
    if not studies:
        where = ", ".join(map(str, args.paths))
        raise ScoringError(f"no DICOM files with a StudyInstanceUID under {where}")
    from inference.pipeline import ScoringPipeline

    pipeline = ScoringPipeline(Path(model_dir), cfg.scoring, cfg.reader, cfg.gate)
    allow_missing, _auto = missing_seg_flags(cfg.completion)  # the node's policy, offline
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
    print(f"{len(summary) - failures} scored, {failures} failed; "
          f"summary in {out_dir / 'summary.json'}")
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
