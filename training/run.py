"""``dicom-node train`` and ``dicom-node evaluate``: cohort -> folds -> trainer -> artifact + report.

``run_training`` is the whole protocol as one function (the CLI and the demo call it): load and
cache the cohort, split participants into stratified folds, train each fold (features scaled on the
training folds only), pool the out-of-fold predictions, choose the threshold by Youden's J on them,
compute the CV metrics, and write the model directory atomically (weights, model.json, oof.csv).
Additional modality combinations (``also``) are trained on the same folds for the report only;
the first combination is the one the node serves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.config import Config, TrainConfig
from dicom_node.errors import TrainingError
from inference.model import ModelSpec, modality_inputs
from training.cv import participant_folds, stratification_labels
from training.data import Cohort, Sample, load_cohort
from training.trainer import (ArrayData, DistInfo, FoldResult, barrier, init_distributed,
                              load_done, save_done, train_fold)

log = logging.getLogger(__name__)

VALID_MODALITIES = ("image", "clinical", "lab")


@dataclass
class ComboResult:
    """One modality combination trained on every fold."""

    modalities: tuple[str, ...]
    spec: ModelSpec
    folds: list[FoldResult]
    oof: np.ndarray  # per-sample out-of-fold prediction
    scalers: list[dict[str, Any]] = field(default_factory=list)  # per fold


def parse_combination(text: str | Sequence[str]) -> tuple[str, ...]:
    """"image+clinical" or ["image", "clinical"] -> ("image", "clinical") in canonical order."""
    parts = text.replace(",", "+").split("+") if isinstance(text, str) else list(text)
    mods = {p.strip() for p in parts if p.strip()}
    bad = mods - set(VALID_MODALITIES)
    if bad or not mods:
        raise TrainingError(f"modality combination {text!r}: use image, clinical, lab joined by +")
    return tuple(m for m in VALID_MODALITIES if m in mods)


def _spec(cfg: TrainConfig, mods: tuple[str, ...], n_clin: int, n_lab: int) -> ModelSpec:
    return ModelSpec(
        backbone=cfg.backbone, timm_kwargs=dict(cfg.timm_kwargs), input_size=cfg.input_size,
        in_chans=cfg.in_chans, roi_margin=cfg.roi_margin, modalities=mods, target=cfg.target,
        n_clinical=n_clin, n_lab=n_lab, mlp_hidden=cfg.mlp_hidden, mlp_dropout=cfg.mlp_dropout,
        frame_policy=cfg.frame_policy, pretrained=str(cfg.pretrained) if cfg.pretrained else None,
    )


def _features(samples: Sequence[Sample], train_idx: np.ndarray, mods: tuple[str, ...]
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Scale clinical/lab features with parameters fitted on the training studies only."""
    from training.features import CLINICAL_FEATURES, LAB_FEATURES, FeaturePreprocessor

    arrays: dict[str, np.ndarray] = {}
    params: dict[str, Any] = {}
    seen: dict[str, dict[str, Any]] = {}
    for i in train_idx:  # one row per study, not per image, so multi-image studies don't weigh more
        seen.setdefault(samples[i].study_uid, samples[i].row)
    for name, cols in (("clinical", CLINICAL_FEATURES), ("lab", LAB_FEATURES)):
        if name in mods:
            pre = FeaturePreprocessor(cols).fit(list(seen.values()))
            arrays[name] = pre.transform([s.row for s in samples])
            params[name] = pre.to_dict()
    return arrays, params


def _subset(samples: Sequence[Sample], idx: np.ndarray, feats: dict[str, np.ndarray],
            mods: tuple[str, ...], y: np.ndarray) -> ArrayData:
    return ArrayData(
        y=y[idx],
        images=[samples[i].image for i in idx] if "image" in mods else None,  # type: ignore[misc]
        clinical=feats["clinical"][idx] if "clinical" in mods else None,
        lab=feats["lab"][idx] if "lab" in mods else None,
    )


def train_combination(
    cohort: Cohort, fold_of: np.ndarray, cfg: TrainConfig, mods: tuple[str, ...], *,
    work_dir: Path, dist: DistInfo, resume: bool,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> ComboResult:
    """Train every fold of one modality combination; returns per-sample OOF predictions."""
    samples = cohort.samples
    y = np.asarray([s.label for s in samples], dtype=np.float64)
    oof = np.full(len(samples), np.nan)
    results, scalers = [], []
    spec = None
    for k in range(cfg.folds):
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        feats, params = _features(samples, tr, mods)
        n_clin = feats["clinical"].shape[1] if "clinical" in feats else 0
        n_lab = feats["lab"].shape[1] if "lab" in feats else 0
        spec = _spec(cfg, mods, n_clin, n_lab)
        res = load_done(work_dir, k) if resume else None
        if res is not None and len(res.val_pred) == len(va):
            log.info("fold %d (%s): already done, loaded from %s", k, "+".join(mods), work_dir)
        else:
            res = train_fold(k, _subset(samples, tr, feats, mods, y),
                             _subset(samples, va, feats, mods, y), spec, cfg, work_dir=work_dir,
                             dist=dist, resume=resume, pretrained=cfg.pretrained,
                             on_epoch_end=on_epoch_end)
            if dist.is_main:
                save_done(work_dir, res)
            barrier(dist)
        oof[va] = res.val_pred
        results.append(res)
        scalers.append(params)
    assert spec is not None
    return ComboResult(mods, spec, results, oof, scalers)


def _oof_table(cohort: Cohort, fold_of: np.ndarray, combos: Sequence[ComboResult]) -> Any:
    from training.oof import OOFTable, combination_name

    rows = []
    for c in combos:
        name = combination_name(c.modalities)
        for s, k, p in zip(cohort.samples, fold_of, c.oof, strict=True):
            rows.append({"participant_id": s.participant_id, "study_instance_uid": s.study_uid,
                         "sop_instance_uid": s.sop_uid, "frame_number": s.frame_number,
                         "fold": int(k), "label": s.label, "probability": float(p),
                         "vendor": s.vendor, "modalities": name})
    return OOFTable.from_records(rows)


def cv_summary(table: Any, target: str, n_boot: int = 1000, seed: int = 0
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """(threshold per combination, metrics per combination and level) from an OOF table.

    The threshold is Youden's J on participant-level (mean-pooled) out-of-fold probabilities, so
    ``training.metrics.evaluate_oof`` recomputes the same values from ``oof.csv``.
    """
    from training.metrics import aggregate, evaluate_oof, regression_metrics, youden_threshold

    thresholds: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    for combo in table.combinations():
        sub = table.select(modalities=combo)
        per_level = {}
        for level in ("participant", "image"):
            agg = aggregate(sub, level, "mean")
            if target == "regression":
                per_level[level] = regression_metrics(agg.labels, agg.scores)
                continue
            if level == "participant":
                thresholds[combo] = float(youden_threshold(agg.labels, agg.scores))
            summ = evaluate_oof(sub, level, "mean", thresholds[combo], n_boot, seed)[combo]
            per_level[level] = summ.to_dict()
        metrics[combo] = per_level
    return thresholds, metrics


def run_training(
    source: Path, labels: Path, out_dir: Path, cfg: TrainConfig, *,
    dist: DistInfo | None = None, resume: bool = False, also: Sequence[Sequence[str] | str] = (),
    on_epoch_end: Callable[[int, int], None] | None = None, keep_work: bool = False,
    n_boot: int = 1000,
) -> Path | None:
    """The paper's protocol end to end; returns the model dir (None on non-zero DDP ranks)."""
    dist = dist or DistInfo()
    out_dir = Path(out_dir)
    combos_req = [parse_combination(cfg.modalities)] + [parse_combination(a) for a in also]
    combos_req = list(dict.fromkeys(combos_req))
    need = sorted({m for c in combos_req for m in c}, key=VALID_MODALITIES.index)
    cohort = load_cohort(source, labels, input_size=cfg.input_size, roi_margin=cfg.roi_margin,
                         modalities=need, frame_policy=cfg.frame_policy, target=cfg.target,
                         regression_column=cfg.regression_column,
                         complete_cases=cfg.complete_cases)
    y = np.asarray([s.label for s in cohort.samples])
    if cfg.target == "binary" and len(set(y.tolist())) < 2:
        raise TrainingError("the labelled cohort holds one class only; cannot train a classifier")
    fold_of = participant_folds([s.participant_id for s in cohort.samples],
                                stratification_labels(y, cfg.target), cfg.folds, cfg.seed)
    work_root = out_dir.parent / f"{out_dir.name}.work"
    results = []
    for mods in combos_req:
        wd = work_root / "+".join(mods)
        results.append(train_combination(cohort, fold_of, cfg, mods, work_dir=wd, dist=dist,
                                         resume=resume, on_epoch_end=on_epoch_end))
    if not dist.is_main:
        return None
    path = write_run(out_dir, cohort, fold_of, results, cfg, n_boot=n_boot,
                     world_size=dist.world_size, device=str(dist.device))
    if not keep_work:
        shutil.rmtree(work_root, ignore_errors=True)
    return path


def write_run(out_dir: Path, cohort: Cohort, fold_of: np.ndarray,
              results: Sequence[ComboResult], cfg: TrainConfig, n_boot: int = 1000,
              world_size: int = 1, device: str = "cpu") -> Path:
    """Metrics, threshold, model.json, fold weights, oof.csv and the report, atomically."""
    from pydicom.uid import generate_uid

    from training.artifact import build_model_json, write_artifact
    from training.oof import combination_name, write_oof

    table = _oof_table(cohort, fold_of, results)
    thresholds, metrics = cv_summary(table, cfg.target, n_boot=n_boot, seed=cfg.seed)
    main = results[0]
    main_name = combination_name(main.modalities)
    threshold = thresholds.get(main_name, 0.5)
    spec = dataclasses.replace(main.spec, threshold=threshold)
    pids = np.asarray([s.participant_id for s in cohort.samples])
    fold_meta = []
    for k, (res, scal) in enumerate(zip(main.folds, main.scalers, strict=True)):
        fold_meta.append({
            "best_epoch": res.best_epoch + 1, "val_score": res.best_score,
            "val_metric": "neg_mae" if cfg.target == "regression" else "auc",
            "val_participants": sorted(set(pids[fold_of == k].tolist())),
            "feature_scaling": scal, "target_scaling": res.target_scaling,
            "history": res.history,
        })
    model_json = build_model_json(
        spec=spec, fold_files=[f"fold_{k}.safetensors" for k in range(len(main.folds))],
        fold_meta=fold_meta, threshold=threshold, model_uid=generate_uid(),
        version=_dt_version(), cv_metrics=metrics,
        feature_scaling={"per_fold": True, "modalities": [m for m in main.modalities
                                                          if m != "image"]},
        sop_uids=cohort.sop_uids,
        train_config=_jsonable(dataclasses.asdict(cfg)),
        extra={"thresholds": thresholds, "served_combination": main_name,
               "excluded_studies": [list(e) for e in cohort.excluded],
               "reader_problems": [list(p) for p in cohort.problems],
               "n_samples": len(cohort.samples), "n_studies": len(cohort.studies),
               "n_participants": len(set(pids.tolist())), "oof_file": "oof.csv",
               "distributed": {"world_size": world_size, "device": device}},
    )
    def populate(tmp: Path) -> None:
        write_oof(tmp / "oof.csv", table)
        _write_participant_oof(tmp, table)
        _report(tmp, table, cohort, fold_of, results, cfg, thresholds, n_boot)

    path = write_artifact(out_dir, fold_states=[r.best_state for r in main.folds],
                          model_json=model_json, populate=populate)
    auc = metrics.get(main_name, {}).get("participant", {})
    log.info("training done: %s -> %s (threshold %.3f; participant-level %s)", main_name, out_dir,
             threshold, _fmt_auc(auc))
    return path


def _fmt_auc(m: dict[str, Any]) -> str:
    a = m.get("auc")
    if isinstance(a, dict):
        return f"AUC {a.get('auc', float('nan')):.3f} ({a.get('ci_low', 0):.3f}-{a.get('ci_high', 0):.3f})"
    if "ccc" in m:
        return f"MAPE {m['mape']:.1f}% CCC {m['ccc']:.3f}"
    return "n/a"


def _write_participant_oof(out_dir: Path, table: Any) -> None:
    """oof_participant.csv: mean-pooled participant-level predictions per combination."""
    import csv

    from training.metrics import aggregate

    with (out_dir / "oof_participant.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "fold", "label", "probability", "vendor", "modalities"])
        for combo in table.combinations():
            agg = aggregate(table.select(modalities=combo), "participant", "mean")
            for pid, k, lab, p, v in zip(agg.participant_ids, agg.folds, agg.labels, agg.scores,
                                         agg.vendors, strict=True):
                w.writerow([pid, int(k), repr(float(lab)), repr(float(p)), v, combo])


def _report(out_dir: Path, table: Any, cohort: Cohort, fold_of: np.ndarray,
            results: Sequence[ComboResult], cfg: TrainConfig, thresholds: dict[str, float],
            n_boot: int) -> None:
    """D2's report (training/report.py) with SHAP and Grad-CAM samples; never loses the model."""
    try:
        from training.report import ReportData, write_report
    except ImportError:
        log.warning("training/report.py not available: no report written")
        return
    from training.oof import combination_name

    main = results[0]
    run_info = {"backbone": cfg.backbone, "input_size": cfg.input_size, "in_chans": cfg.in_chans,
                "folds": cfg.folds, "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                "downsample_negatives": cfg.downsample_negatives, "target": cfg.target,
                "complete_cases": cfg.complete_cases, "served": combination_name(main.modalities),
                "samples": len(cohort.samples), "studies": len(cohort.studies),
                "participants": len({s.participant_id for s in cohort.samples})}
    fold_info = [{"combination": combination_name(c.modalities), "fold": r.fold,
                  "best_epoch": r.best_epoch + 1, "val_score": round(r.best_score, 4),
                  "val_images": int((fold_of == r.fold).sum())}
                 for c in results for r in c.folds]
    shap = cams = None
    try:
        shap = _shap(cohort, fold_of, results)
    except Exception:  # noqa: BLE001 - optional analysis
        log.exception("SHAP analysis failed; the report goes without it")
    try:
        cams = _cam_samples(cohort, fold_of, main)
    except Exception:  # noqa: BLE001 - optional figure
        log.exception("Grad-CAM samples failed; the report goes without them")
    try:
        write_report(out_dir, ReportData(
            oof=table, run_info=run_info, thresholds=thresholds or None,
            primary=combination_name(main.modalities), target=cfg.target, n_boot=n_boot,
            seed=cfg.seed, excluded=list(cohort.excluded), shap=shap, cam_images=cams or (),
            fold_info=fold_info))
    except Exception:  # noqa: BLE001 - the model itself is fine
        log.exception("report generation failed (the model in %s is complete)", out_dir)


def _fold_model(combo: ComboResult, k: int) -> torch.nn.Module:
    from inference.model import create_model

    model = create_model(combo.spec)
    model.load_state_dict(combo.folds[k].best_state)
    return model.eval()


def _shap(cohort: Cohort, fold_of: np.ndarray, results: Sequence[ComboResult]) -> Any:
    """Modality SHAP (paper Fig. 4E) for the richest multimodal combination, fold 0's val set."""
    combos = [c for c in results if len(c.modalities) > 1]
    if not combos:
        return None
    from training.shap_analysis import fusion_shap

    combo = max(combos, key=lambda c: len(c.modalities))
    va = np.flatnonzero(fold_of == 0)
    tr = np.flatnonzero(fold_of != 0)
    feats, params = _features(cohort.samples, tr, combo.modalities)
    y = np.asarray([s.label for s in cohort.samples], dtype=np.float64)
    data = _subset(cohort.samples, va, feats, combo.modalities, y)
    from training.trainer import FoldDataset

    ds = FoldDataset(data, combo.spec.in_chans)
    items = [ds[i] for i in range(len(ds))]
    stack = {k: torch.stack([it[k] for it in items]) for k in ("image", "clinical", "lab")
             if k in items[0]}
    names = {k: params[k]["output_names"] for k in ("clinical", "lab") if k in params}
    res = fusion_shap(_fold_model(combo, 0), **stack, clinical_names=names.get("clinical"),
                      lab_names=names.get("lab"), seed=0)
    log.info("SHAP modality shares (%s): %s", "+".join(combo.modalities), res.share)
    return res


def _cam_samples(cohort: Cohort, fold_of: np.ndarray, main: ComboResult, n: int = 4
                 ) -> list[tuple[str, np.ndarray]]:
    """Grad-CAM overlays of a few fold-0 validation images (fold-0 model), for the report."""
    if "image" not in main.modalities or main.spec.arch != "image":
        return []
    import matplotlib

    from inference.cam import gradcam_forward
    from inference.model import default_cam_layer
    from inference.transforms import finish_transforms

    model = _fold_model(main, 0).requires_grad_(False)
    layer = default_cam_layer(model)
    va = np.flatnonzero(fold_of == 0)
    pos = [i for i in va if cohort.samples[i].label == 1][: n // 2]
    neg = [i for i in va if cohort.samples[i].label == 0][: n - len(pos)]
    finish = finish_transforms(main.spec.in_chans)
    out = []
    cmap = matplotlib.colormaps["jet"]
    for i in [*pos, *neg]:
        s = cohort.samples[i]
        x = finish({"image": s.image})["image"][None]
        logit, cam = gradcam_forward(model, x, layer)
        cam_up = torch.nn.functional.interpolate(cam[None], size=s.image.shape[1:],
                                                 mode="bilinear")[0, 0].numpy()
        grey = np.repeat(s.image[0][..., None], 3, axis=2)
        rgb = 0.6 * grey + 0.4 * cmap(cam_up)[..., :3]
        p = float(torch.sigmoid(logit.reshape(-1)[0]))
        out.append((f"{s.participant_id} label {int(s.label)} p={p:.2f} (fold 0)",
                    (np.clip(rgb, 0, 1) * 255).astype(np.uint8)))
    return out


def _dt_version() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d.%H%M%S")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _train_cfg(args: argparse.Namespace, cfg: Config) -> TrainConfig:
    t = cfg.train
    repl: dict[str, Any] = {}
    if getattr(args, "epochs", None):
        repl["epochs"] = int(args.epochs)
        repl["warmup_epochs"] = min(t.warmup_epochs, max(int(args.epochs) - 1, 0))
    if getattr(args, "backbone", None):
        repl["backbone"] = args.backbone
    if getattr(args, "modalities", None):
        repl["modalities"] = parse_combination("+".join(args.modalities))
    return dataclasses.replace(t, **repl) if repl else t


def train_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node train``: the fold ensemble on an archive or DICOM folder (paper's protocol)."""
    tcfg = _train_cfg(args, cfg)
    source = Path(args.archive) if getattr(args, "archive", None) else cfg.node.data_dir
    out = Path(args.out) if getattr(args, "out", None) else tcfg.output_dir
    torch.set_num_threads(max(1, tcfg.torch_threads))
    dist = init_distributed(tcfg.device)
    try:
        path = run_training(source, Path(args.labels), out, tcfg, dist=dist,
                            resume=bool(getattr(args, "resume", False)),
                            also=list(getattr(args, "also", None) or ()),
                            keep_work=bool(getattr(args, "keep_checkpoints", False)))
    finally:
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if path is not None:
        print(f"model written to {path}")
    return 0


# --------------------------------------------------------------------------------------------
# External validation
# --------------------------------------------------------------------------------------------


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
        data = _subset(cohort.samples, np.arange(len(y)), feats, tuple(spec.modalities), y)
        raw = predict(model, data, spec.in_chans, batch_size, device)
        if spec.target == "regression":
            ts = meta.get("target_scaling") or {"mean": 0.0, "std": 1.0}
            preds.append(raw * ts["std"] + ts["mean"])
        else:
            preds.append(1.0 / (1.0 + np.exp(-raw)))
    return np.mean(preds, axis=0)


def evaluate_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node evaluate``: a trained model on another archive, same metrics and report."""
    from inference.model import load_artifact
    from training.oof import OOFTable, combination_name, write_oof

    art = load_artifact(Path(args.model))
    spec = art.spec
    out = Path(args.out) if getattr(args, "out", None) else Path(args.model) / "external"
    cohort = load_cohort(Path(args.archive), Path(args.labels), input_size=spec.input_size,
                         roi_margin=spec.roi_margin, modalities=spec.modalities,
                         frame_policy=spec.frame_policy, target=spec.target,
                         regression_column=cfg.train.regression_column)
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
               "archive": str(args.archive), "threshold": spec.threshold,
               "metrics": metrics, "excluded_studies": [list(e) for e in cohort.excluded],
               "n_samples": len(cohort.samples), "n_studies": len(cohort.studies)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=str))
    _report_external(out, art, table, cohort)
    print(f"{name}: {_fmt_auc(metrics[name]['participant'])} on {len(cohort.studies)} studies "
          f"-> {out}")
    return 0


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
