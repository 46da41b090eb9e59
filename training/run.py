"""The training protocol: cohort -> folds -> trainer -> artifact + report.

``run_training`` is the whole protocol as one function (the application's ``train`` command and
the demo call it): load and cache the cohort, split participants into stratified folds, train each
fold (features scaled on the training folds only), pool the out-of-fold predictions, choose the
threshold by Youden's J on them, compute the CV metrics, and write the model directory atomically
(weights, model.json, oof.csv). Additional modality combinations (``also``) are trained on the
same folds for the report only; the first combination is the one the node serves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from inference.model import ModelSpec
from training.combination import (
    VALID_MODALITIES,
    ComboResult,
    format_metric,
    parse_combination,
    scaled_features,
    subset_data,
)
from training.config import TrainConfig
from training.cv import inner_validation_mask, participant_folds, stratification_labels
from training.data import Cohort, load_cohort
from training.errors import TrainingError
from training.pretrained import resolve_pretrained
from training.trainer import (
    DistInfo,
    barrier,
    load_done,
    save_done,
    train_fold,
)

log = logging.getLogger(__name__)

# How the decision threshold is chosen (cv_summary) and how the cohort is read (load_cohort);
# both are written into model.json so the node serves exactly this.
THRESHOLD_LEVEL: Final = "study"  # the unit the node serves
POOLING_RULE: Final = "mean"
TRAIN_REGION_POLICY: Final = "largest"



def _spec(cfg: TrainConfig, mods: tuple[str, ...], n_clin: int, n_lab: int) -> ModelSpec:
    return ModelSpec(
        backbone=cfg.backbone, timm_kwargs=dict(cfg.timm_kwargs), input_size=cfg.input_size,
        in_chans=cfg.in_chans, roi_margin=cfg.roi_margin, modalities=mods, target=cfg.target,
        n_clinical=n_clin, n_lab=n_lab, mlp_hidden=cfg.mlp_hidden, mlp_dropout=cfg.mlp_dropout,
        frame_policy=cfg.frame_policy, pretrained=str(cfg.pretrained) if cfg.pretrained else None,
        fov_cm=float(cfg.fov_cm),
    )


def train_combination(
    cohort: Cohort, fold_of: np.ndarray, cfg: TrainConfig, mods: tuple[str, ...], *,
    work_dir: Path, dist: DistInfo, resume: bool,
    on_epoch_end: Callable[[int, int], None] | None = None,
    pretrained: Path | None = None,
) -> ComboResult:
    """Train every fold of one modality combination; returns per-sample OOF predictions.

    Nested selection (``cfg.selection == "nested"``, the default): inside each outer training
    fold a stratified participant-level inner split selects the epoch; the outer fold is only
    predicted, once, by the selected model. "optimistic" selects on the outer fold itself.
    """
    samples = cohort.samples
    y = np.asarray([s.label for s in samples], dtype=np.float64)
    oof = np.full(len(samples), np.nan)
    results, scalers = [], []
    if "image" not in mods and cfg.tabular_epochs > 0:  # MLP-only: cheap, give it its own budget
        cfg = dataclasses.replace(cfg, epochs=cfg.tabular_epochs,
                                  warmup_epochs=min(cfg.warmup_epochs, cfg.tabular_epochs - 1))
    # tabular-only models learn one row per study (not one per image of it); their prediction
    # is then given to every image of the study so all combinations share the OOF layout
    units = np.arange(len(samples))
    if "image" not in mods:
        first: dict[str, int] = {}
        for i, s in enumerate(samples):
            first.setdefault(s.study_uid, i)
        units = np.asarray(sorted(first.values()))
    unit_of_study = {samples[i].study_uid: j for j, i in enumerate(units)}
    pids = np.asarray([s.participant_id for s in samples])
    strata = stratification_labels(y, cfg.target)
    spec = None
    selection_sets = []
    for k in range(cfg.folds):
        tr = units[fold_of[units] != k]
        va = units[fold_of[units] == k]
        feats, params = scaled_features(samples, tr, mods)
        n_clin = feats["clinical"].shape[1] if "clinical" in feats else 0
        n_lab = feats["lab"].shape[1] if "lab" in feats else 0
        spec = _spec(cfg, mods, n_clin, n_lab)
        if cfg.selection == "nested":  # select (and calibrate) on participants the fold never sees
            inner = inner_validation_mask(pids[tr], strata[tr], cfg.folds,
                                          cfg.seed + 7919 * (k + 1))
            fit_idx, sel_idx = tr[~inner], tr[inner]
        else:  # optimistic: the outer fold selects its own epoch
            fit_idx, sel_idx = tr, va
        res = load_done(work_dir, k) if resume else None
        if res is not None and len(res.val_pred) == len(sel_idx) and (
                cfg.selection != "nested" or (res.test_pred is not None
                                              and len(res.test_pred) == len(va))):
            log.info("fold %d (%s): already done, loaded from %s", k, "+".join(mods), work_dir)
        else:
            res = train_fold(k, subset_data(samples, fit_idx, feats, mods, y),
                             subset_data(samples, sel_idx, feats, mods, y), spec, cfg,
                             work_dir=work_dir, dist=dist, resume=resume,
                             pretrained=pretrained, on_epoch_end=on_epoch_end,
                             test=subset_data(samples, va, feats, mods, y)
                             if cfg.selection == "nested" else None)
            if dist.is_main:
                save_done(work_dir, res)
            barrier(dist)
        outer = res.test_pred if cfg.selection == "nested" else res.val_pred
        assert outer is not None
        pred_of_unit = dict(zip(va.tolist(), outer.tolist(), strict=True))
        for i in np.flatnonzero(fold_of == k).tolist():
            oof[i] = pred_of_unit[units[unit_of_study[samples[i].study_uid]]] \
                if "image" not in mods else pred_of_unit[i]
        results.append(res)
        scalers.append(params)
        selection_sets.append((sel_idx, np.asarray(res.val_pred, dtype=np.float64), y[sel_idx]))
    assert spec is not None
    return ComboResult(mods, spec, results, oof, scalers, selection_sets, cfg.selection)


def _oof_table(cohort: Cohort, fold_of: np.ndarray, combos: Sequence[ComboResult],
               calibrated: Sequence[np.ndarray] | None = None) -> Any:
    """OOF rows; ``probability`` is on the served (calibrated) scale, ``probability_raw`` not."""
    from training.oof import OOFTable, combination_name

    rows = []
    for j, c in enumerate(combos):
        name = combination_name(c.modalities)
        cal = calibrated[j] if calibrated is not None else c.oof
        for s, k, p, q in zip(cohort.samples, fold_of, cal, c.oof, strict=True):
            rows.append({"participant_id": s.participant_id, "study_instance_uid": s.study_uid,
                         "sop_instance_uid": s.sop_uid, "frame_number": s.frame_number,
                         "fold": int(k), "label": s.label, "probability": float(p),
                         "vendor": s.vendor, "modalities": name, "probability_raw": repr(float(q))})
    return OOFTable.from_records(rows)


def calibrate_combination(combo: ComboResult, cohort: Cohort, fold_of: np.ndarray, method: str
                          ) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Fit each fold's calibrator on its selection set: (calibrated OOF, model.json's table).

    "auto" fits Platt and isotonic and keeps the one with the lower study-level Brier score of
    the calibrated out-of-fold predictions (both scores are recorded).
    """
    from training.calibration import brier, expected_calibration_error, fit_calibrator

    if method == "none":
        return combo.oof.copy(), None
    studies = np.asarray([s.study_uid for s in cohort.samples])
    y = np.asarray([s.label for s in cohort.samples], dtype=np.float64)
    candidates = ("platt", "isotonic") if method == "auto" else (method,)
    fits: dict[str, tuple[np.ndarray, list[dict[str, Any]]]] = {}
    scores: dict[str, dict[str, float]] = {}
    for m in candidates:
        cal = np.full(len(combo.oof), np.nan)
        params = []
        for k, (_, p_sel, y_sel) in enumerate(combo.selection_sets):
            par = fit_calibrator(m, p_sel, y_sel)
            params.append(par)
            in_k = fold_of == k
            from training.calibration import calibrate

            cal[in_k] = calibrate(m, par, combo.oof[in_k])
        ys, ps = _pool_by(studies, y, cal)
        fits[m] = (cal, params)
        scores[m] = {"brier_study": brier(ys, ps), "ece_study": expected_calibration_error(ys, ps)}
    chosen = min(candidates, key=lambda m: scores[m]["brier_study"])
    where = ("inner-validation participants of each outer training fold" if
             combo.selection == "nested" else "the outer validation fold itself (optimistic)")
    return fits[chosen][0], {"method": chosen, "level": "image", "fitted_on": where,
                             "requested": method, "candidates": scores,
                             "folds": fits[chosen][1]}


def _pool_by(keys: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pool labels and probabilities per key (the serving rule "mean")."""
    uniq, inv = np.unique(keys, return_inverse=True)
    n = np.bincount(inv)
    return np.bincount(inv, y) / n, np.bincount(inv, p) / n


def cv_summary(table: Any, target: str, n_boot: int = 1000, seed: int = 0
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """(threshold per combination, metrics per combination and level) from an OOF table.

    The threshold is Youden's J on study-level (mean-pooled) calibrated out-of-fold probabilities
    (the unit, rule and scale the node serves), so ``training.metrics.evaluate_oof`` recomputes
    the same values from ``oof.csv``. Sensitivity/specificity at a threshold tuned on the same
    predictions are mildly optimistic; the fresh-cohort check (``training.evaluate``) measures it.
    """
    from training.metrics import (
        aggregate,
        evaluate_oof,
        regression_metrics,
        youden_threshold,
    )

    thresholds: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    for combo in table.combinations():
        sub = table.select(modalities=combo)
        per_level = {}
        if target != "regression":
            agg = aggregate(sub, THRESHOLD_LEVEL, POOLING_RULE)
            thresholds[combo] = float(youden_threshold(agg.labels, agg.scores))
        for level in ("participant", "study", "image"):
            agg = aggregate(sub, level, POOLING_RULE)
            if target == "regression":
                per_level[level] = regression_metrics(agg.labels, agg.scores)
                continue
            summ = evaluate_oof(sub, level, POOLING_RULE, thresholds[combo], n_boot, seed)[combo]
            per_level[level] = summ.to_dict()
        metrics[combo] = per_level
    return thresholds, metrics


def operating_point(table: Any, threshold: float) -> dict[str, float]:
    """What CV measured at ``threshold`` on the served unit and scale (the SR quotes it)."""
    from training.calibration import brier, expected_calibration_error
    from training.metrics import aggregate, binary_metrics

    agg = aggregate(table, THRESHOLD_LEVEL, POOLING_RULE)
    m = binary_metrics(agg.labels, agg.scores, threshold)
    return {"sensitivity": m.sensitivity, "specificity": m.specificity, "n": float(len(agg.labels)),
            "n_positive": float(agg.labels.sum()),
            "ece": expected_calibration_error(agg.labels, agg.scores),
            "brier": brier(agg.labels, agg.scores)}


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
                         complete_cases=cfg.complete_cases, fov_cm=cfg.fov_cm)
    y = np.asarray([s.label for s in cohort.samples])
    if cfg.target == "binary" and len(set(y.tolist())) < 2:
        raise TrainingError("the labelled cohort holds one class only; cannot train a classifier")
    fold_of = participant_folds([s.participant_id for s in cohort.samples],
                                stratification_labels(y, cfg.target), cfg.folds, cfg.seed)
    work_root = out_dir.parent / f"{out_dir.name}.work"
    pretrained = resolve_pretrained(cfg.pretrained, cfg.backbone)
    results = []
    for mods in combos_req:
        wd = work_root / "+".join(mods)
        results.append(train_combination(cohort, fold_of, cfg, mods, work_dir=wd, dist=dist,
                                         resume=resume, on_epoch_end=on_epoch_end,
                                         pretrained=pretrained))
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

    from inference.artifact import (
        Decision,
        ServingPolicy,
        build_model_json,
        write_artifact,
    )
    from training.ood import ood_block
    from training.oof import combination_name, write_oof

    binary = cfg.target == "binary"
    calibs = [calibrate_combination(c, cohort, fold_of, cfg.calibration if binary else "none")
              for c in results]
    table = _oof_table(cohort, fold_of, results, [c[0] for c in calibs])
    thresholds, metrics = cv_summary(table, cfg.target, n_boot=n_boot, seed=cfg.seed)
    main = results[0]
    main_name = combination_name(main.modalities)
    threshold = thresholds.get(main_name, 0.5)
    expected = operating_point(table.select(modalities=main_name), threshold) if binary else {}
    spec = dataclasses.replace(main.spec, threshold=threshold)
    pids = np.asarray([s.participant_id for s in cohort.samples])
    fold_meta = []
    for k, (res, scal) in enumerate(zip(main.folds, main.scalers, strict=True)):
        fold_meta.append({
            "best_epoch": res.best_epoch + 1, "val_score": res.best_score,
            "val_metric": "neg_mae" if cfg.target == "regression" else "auc",
            "val_participants": sorted(set(pids[fold_of == k].tolist())),
            "selection_participants": sorted(set(pids[main.selection_sets[k][0]].tolist())),
            "feature_scaling": scal, "target_scaling": res.target_scaling,
            "history": res.history,
        })
    model_json = build_model_json(
        spec=spec, fold_files=[f"fold_{k}.safetensors" for k in range(len(main.folds))],
        fold_meta=fold_meta, threshold=threshold, model_uid=generate_uid(),
        decision=Decision(threshold=threshold,
                          method="youden_j" if cfg.target == "binary" else "none",
                          level=THRESHOLD_LEVEL, rule=POOLING_RULE,
                          predictions=("out-of-fold-calibrated" if calibs[0][1] else "out-of-fold")
                          + ("" if cfg.selection == "nested" else " (optimistic selection)"),
                          expected=expected),
        calibration=calibs[0][1],
        policy=ServingPolicy(frame_policy=cfg.frame_policy, region_policy=TRAIN_REGION_POLICY,
                             study_rule=POOLING_RULE),
        version=_dt_version(), cv_metrics=metrics,
        feature_scaling={"per_fold": True, "modalities": [m for m in main.modalities
                                                          if m != "image"]},
        sop_uids=cohort.sop_uids,
        train_config=_jsonable(dataclasses.asdict(cfg)),
        extra={"thresholds": thresholds, "served_combination": main_name,
               "selection": {"mode": cfg.selection,
                             "inner_split": f"1/{cfg.folds} of each outer training fold's "
                                            "participants, stratified, seeded"
                             if cfg.selection == "nested" else None},
               "calibration_by_combination": {combination_name(c.modalities): cal[1]
                                              for c, cal in zip(results, calibs, strict=True)},
               "excluded_studies": [list(e) for e in cohort.excluded],
               "reader_problems": [list(p) for p in cohort.problems],
               "n_samples": len(cohort.samples), "n_studies": len(cohort.studies),
               "n_participants": len(set(pids.tolist())), "oof_file": "oof.csv",
               "distributed": {"world_size": world_size, "device": device},
               "ood": ood_block(spec, [r.best_state for r in main.folds],
                                [s.image for s in cohort.samples], seed=cfg.seed)},
    )
    def populate(tmp: Path) -> None:
        write_oof(tmp / "oof.csv", table)
        _write_participant_oof(tmp, table)
        from training.run_report import write_run_report

        write_run_report(tmp, table, cohort, fold_of, results, cfg, thresholds, n_boot,
                         operating_point={**model_json["decision"]},
                         calibration=model_json["calibration"])

    path = write_artifact(out_dir, fold_states=[r.best_state for r in main.folds],
                          model_json=model_json, populate=populate)
    auc = metrics.get(main_name, {}).get("participant", {})
    log.info("training done: %s -> %s (threshold %.3f; participant-level %s)", main_name, out_dir,
             threshold, format_metric(auc))
    return path


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


def _dt_version() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d.%H%M%S")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
