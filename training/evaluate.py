"""``dicom-node evaluate``: external validation of a trained model on another archive.

The cohort is read exactly as in training (same reader, same preprocessing from model.json),
each fold's probability is calibrated by its calibrator from model.json and the calibrated
probabilities are averaged over folds (exactly what the node serves), and the same metrics and
report as training are written, with the model's own threshold (no re-tuning on the external
data). :func:`promise_check` puts the served study-level sensitivity/specificity at the stored
threshold and the calibration error next to what cross-validation predicted (model.json's
``decision.expected``): on a fresh synthetic cohort (a new generator seed) that is the check that
the served number means what training measured.
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
    """Fold-ensemble mean of the calibrated probabilities (or values) per sample of ``cohort``."""
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
    stacked = np.asarray(preds)
    if spec.target != "regression":
        stacked = art.card.calibrator.apply(stacked)
    return stacked.mean(axis=0)


def promise_check(table: Any, card: Any) -> dict[str, Any]:
    """Served sens/spec at the stored threshold and calibration error vs the CV prediction.

    Pooled exactly as the decision was made (``decision.level`` and ``decision.rule``).
    """
    from training.calibration import brier, expected_calibration_error
    from training.metrics import aggregate, binary_metrics

    dec = card.decision
    agg = aggregate(table, dec.level if dec.level in ("study", "participant", "image")
                    else "study", dec.rule)
    m = binary_metrics(agg.labels, agg.scores, dec.threshold)
    observed = {"sensitivity": m.sensitivity, "specificity": m.specificity,
                "n": float(len(agg.labels)), "n_positive": float(agg.labels.sum()),
                "ece": expected_calibration_error(agg.labels, agg.scores),
                "brier": brier(agg.labels, agg.scores),
                "mean_probability": float(agg.scores.mean()) if len(agg.scores) else float("nan"),
                "prevalence": float(agg.labels.mean()) if len(agg.labels) else float("nan")}
    return {"threshold": dec.threshold, "level": dec.level, "rule": dec.rule,
            "calibration": card.calibrator.method, "predicted_by_cv": dict(dec.expected),
            "observed": observed}


def promise_markdown(check: dict[str, Any]) -> str:
    """The check as a small table (the external report's operating-point section)."""
    pred, obs = check["predicted_by_cv"], check["observed"]
    lines = ["# Operating point: CV prediction vs this cohort\n",
             f"Threshold {check['threshold']:.4f} on {check['level']}-level {check['rule']}-pooled "
             f"probabilities (calibration: {check['calibration']}).\n",
             "| | predicted by CV | observed here |", "|---|---|---|"]
    for k in ("sensitivity", "specificity", "ece", "brier", "n", "n_positive"):
        p = pred.get(k)
        lines.append(f"| {k} | {'n/a' if p is None else f'{p:.3f}'} | {obs[k]:.3f} |")
    return "\n".join(lines) + "\n"


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
                         regression_column=regression_column, fov_cm=spec.fov_cm)
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
    check = promise_check(table, art.card) if spec.target != "regression" else None
    if check is not None:
        (out / "operating_point.md").write_text(promise_markdown(check))
    summary = {"model_uid": art.info.model_uid, "model_dir": str(art.model_dir),
               "operating_point": check,
               "archive": str(archive), "threshold": spec.threshold,
               "metrics": metrics, "excluded_studies": [list(e) for e in cohort.excluded],
               "n_samples": len(cohort.samples), "n_studies": len(cohort.studies)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=str))
    _report_external(out, art, table, cohort, check)
    return out, (f"{name}: {format_metric(metrics[name]['participant'])} on "
                 f"{len(cohort.studies)} studies")


def _report_external(out: Path, art: Any, table: Any, cohort: Cohort,
                     check: dict[str, Any] | None = None) -> None:
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
            excluded=list(cohort.excluded), level="study" if check else "participant",
            operating_point=None, notes=[_promise_sentence(check)] if check else ()))
    except Exception:  # noqa: BLE001 - metrics are already written
        log.exception("external validation report failed (metrics are in %s)", out)


def _promise_sentence(check: dict[str, Any]) -> str:
    pred, obs = check["predicted_by_cv"], check["observed"]

    def f(d: dict[str, Any], k: str) -> str:
        v = d.get(k)
        return "n/a" if v is None or v != v else f"{v:.3f}"

    return (f"Operating point (threshold {check['threshold']:.4f}, {check['level']} level, "
            f"{check['calibration']} calibration): sensitivity {f(obs, 'sensitivity')} here vs "
            f"{f(pred, 'sensitivity')} predicted by CV; specificity {f(obs, 'specificity')} vs "
            f"{f(pred, 'specificity')}; ECE {f(obs, 'ece')} vs {f(pred, 'ece')}; Brier "
            f"{f(obs, 'brier')} vs {f(pred, 'brier')} (n = {int(obs['n'])}).")
