"""``dicom-node evaluate``: external validation of a trained model on another archive.

The cohort is read exactly as in training (same reader, same preprocessing from model.json),
the fold ensemble's mean probability is taken per image, and the same metrics and report as
training are written, with the model's own threshold (no re-tuning on the external data).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training.combination import format_metric, subset_data
from training.data import Cohort, load_cohort
from training.errors import TrainingError

log = logging.getLogger(__name__)


def predict_artifact(art: Any, cohort: Cohort, batch_size: int = 32) -> np.ndarray:
    """Fold-ensemble mean probability (or value) per sample of ``cohort``."""
    from training.features import FeaturePreprocessor
    from training.trainer import predict

    spec = art.spec
    device = next(art.models[0].parameters()).device
    y = np.asarray([s.label for s in cohort.samples], dtype=np.float64)
    preds = []
    for k, model in enumerate(art.models):
        meta = art.raw["folds"][k]
        feats = {}
        for name in ("clinical", "lab"):
            if name in spec.modalities:
                params = (meta.get("feature_scaling") or {}).get(name)
                if params is None:
                    raise TrainingError(f"model.json folds[{k}] lacks {name} feature scaling")
                pre = FeaturePreprocessor.from_dict(params)
                feats[name] = pre.transform([s.row for s in cohort.samples])
        data = subset_data(cohort.samples, np.arange(len(y)), feats, tuple(spec.modalities),
                           y)
        raw = predict(model, data, spec.in_chans, batch_size, device)
        if spec.target == "regression":
            ts = meta.get("target_scaling") or {"mean": 0.0, "std": 1.0}
            preds.append(raw * ts["std"] + ts["mean"])
        else:
            preds.append(1.0 / (1.0 + np.exp(-raw)))
    return np.mean(preds, axis=0)


def evaluate_model(model_dir: Path, archive: Path, labels: Path, out: Path | None = None, *,
                   regression_column: str = "asmi") -> tuple[Path, str]:
    """A trained model on another archive: same metrics and report as training.

    Returns:
        (the output folder, a one-line summary of the participant-level result).
    """
    from inference.artifact import load_artifact
    from training.oof import OOFTable, combination_name, write_oof

    art = load_artifact(Path(model_dir))
    spec = art.spec
    model_dir = Path(model_dir)  # never write into the served model dir by default
    out = Path(out) if out is not None else model_dir.parent / f"{model_dir.name}-evaluation"
    cohort = load_cohort(Path(archive), Path(labels), input_size=spec.input_size,
                         roi_margin=spec.roi_margin, modalities=spec.modalities,
                         frame_policy=spec.frame_policy, target=spec.target,
                         regression_column=regression_column)
    prob = predict_artifact(art, cohort)
    name = combination_name(spec.modalities)
    table = OOFTable.from_records(
        {"participant_id": s.participant_id, "study_instance_uid": s.study_uid,
         "sop_instance_uid": s.sop_uid, "frame_number": s.frame_number, "fold": -1,
         "label": s.label, "probability": float(p), "vendor": s.vendor, "modalities": name}
        for s, p in zip(cohort.samples, prob, strict=True))
    out.mkdir(parents=True, exist_ok=True)
    write_oof(out / "oof.csv", table)
    from training.metrics import aggregate, evaluate_oof, regression_metrics

    if spec.target == "regression":
        agg = aggregate(table, "participant", "mean")
        metrics: dict[str, Any] = {name: {"participant": regression_metrics(agg.labels,
                                                                             agg.scores)}}
    else:
        metrics = {name: {lvl: evaluate_oof(table, lvl, "mean", spec.threshold)[name].to_dict()
                          for lvl in ("participant", "image")}}
    summary = {"model_uid": art.info.model_uid, "model_dir": str(art.model_dir),
               "archive": str(archive), "threshold": spec.threshold,
               "metrics": metrics, "excluded_studies": [list(e) for e in cohort.excluded],
               "n_samples": len(cohort.samples), "n_studies": len(cohort.studies)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=str))
    _report_external(out, art, table, cohort)
    return out, (f"{name}: {format_metric(metrics[name]['participant'])} on "
                 f"{len(cohort.studies)} studies")


def _report_external(out: Path, art: Any, table: Any, cohort: Cohort) -> None:
    """The same report as training, on the external predictions (threshold from the model)."""
    try:
        from training.report import ReportData, write_report
    except ImportError:
        log.warning("training/report.py not available: no report written")
        return
    from training.oof import combination_name

    name = combination_name(art.spec.modalities)
    try:
        write_report(out, ReportData(
            oof=table, title="dicom-node SARCO external validation",
            run_info={"model_uid": art.info.model_uid, "model_version": art.info.version,
                      "backbone": art.spec.backbone, "threshold": art.spec.threshold,
                      "studies": len(cohort.studies), "samples": len(cohort.samples)},
            thresholds={name: art.spec.threshold}, primary=name, target=art.spec.target,
            excluded=list(cohort.excluded)))
    except Exception:  # noqa: BLE001 - metrics are already written
        log.exception("external validation report failed (metrics are in %s)", out)
