"""The report of a finished training run: D2's ``training.report`` fed with SHAP and Grad-CAM.

Kept apart from ``training.run`` because none of it may lose a trained model: every optional
analysis (SHAP on the fusion model, Grad-CAM samples) and the report itself only log on failure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.combination import ComboResult, scaled_features, subset_data
from training.config import TrainConfig
from training.data import Cohort

log = logging.getLogger(__name__)


def write_run_report(out_dir: Path, table: Any, cohort: Cohort, fold_of: np.ndarray,
            results: Sequence[ComboResult], cfg: TrainConfig, thresholds: dict[str, float],
            n_boot: int, operating_point: dict[str, Any] | None = None,
            calibration: dict[str, Any] | None = None) -> None:
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
                "tabular_epochs": cfg.tabular_epochs or cfg.epochs,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                "downsample_negatives": cfg.downsample_negatives, "target": cfg.target,
                "complete_cases": cfg.complete_cases, "served": combination_name(main.modalities),
                "selection": cfg.selection if cfg.selection == "nested"
                else "optimistic (epoch selected on the reported folds)",
                "calibration": (calibration or {}).get("method", "none"),
                "samples": len(cohort.samples), "studies": len(cohort.studies),
                "participants": len({s.participant_id for s in cohort.samples})}
    fold_info = [{"combination": combination_name(c.modalities), "fold": r.fold,
                  "best_epoch": r.best_epoch + 1, "selection_score": round(r.best_score, 4),
                  "outer_fold_images": int((fold_of == r.fold).sum())}
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
            fold_info=fold_info, selection=cfg.selection,
            histories={combination_name(c.modalities): [r.history for r in c.folds]
                       for c in results},
            operating_point=operating_point, calibration=calibration))
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
    feats, params = scaled_features(cohort.samples, tr, combo.modalities)
    y = np.asarray([s.label for s in cohort.samples], dtype=np.float64)
    data = subset_data(cohort.samples, va, feats, combo.modalities, y)
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
