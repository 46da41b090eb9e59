"""Train the automatic rectus femoris segmenter on the archive's US images and their DICOM-SEGs.

Why: scanners do not send SEGs, and the paper outlined every RF by hand. The node's archive
already pairs images with the SEGs sonographers drew, so it can learn its own ROI. Frames and
masks come from ``inference.reader.read_study`` (the same pixels the scorer sees), are put on the
model's fixed physical grid by ``inference.segmenter`` (the same code that serves them) and a
MONAI UNet is trained per participant-level fold with Dice + cross-entropy. Each held-out fold is
then segmented through the serving path (resample back, largest component, QC) and compared with
the reference masks: Dice, HD95, and CSA/thickness agreement (``training.segmentation_stats``).
The fold networks become one artifact (ensemble), written atomically like the classifier's.
Finished folds are kept in ``<out>.work/`` so an interrupted run resumes at the next fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.uid import generate_uid

from inference.artifact import (
    data_fingerprint,
    package_versions,
    save_weights,
    write_artifact,
)
from inference.durable import write_durable
from inference.reader import AUTOMATIC_SEG_REASON, read_study
from inference.segmenter import (
    SCHEMA_VERSION,
    TASK,
    QcLimits,
    Segmenter,
    SegmenterSpec,
    create_network,
    grid_shape_for,
    normalise,
    placement,
    quality_control,
    to_grid,
)
from training.cv import participant_folds
from training.data import index_archive, read_labels
from training.errors import TrainingError
from training.segmentation_config import SegTrainConfig

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class SegSample:
    """One annotated frame and its place on the model grid.

    Attributes:
        image: float32 (H, W) 0..1, the reader's cropped frame.
        mask: bool (H, W), the reference ROI.
        spacing_cm: (row, col) cm per pixel.
        participant_id: CV grouping unit.
        study_uid / sop_uid / frame_number: where it came from.
        vendor: Manufacturer, for per-vendor agreement.
        grid_image: normalised float32 (rows, cols) network input.
        grid_mask: uint8 (rows, cols) network target.
    """

    image: np.ndarray
    mask: np.ndarray
    spacing_cm: tuple[float, float]
    participant_id: str
    study_uid: str
    sop_uid: str
    frame_number: int
    vendor: str
    grid_image: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    grid_mask: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


@dataclass
class SegRunResult:
    """What :func:`train_segmenter` produced.

    Attributes:
        out_dir: the artifact folder (model.json, fold weights, report.*).
        report: the report dict also written to ``report.json``.
        records: one dict per held-out image (fold, Dice, HD95, CSA/thickness pairs, QC).
    """

    out_dir: Path
    report: dict[str, Any]
    records: list[dict[str, Any]]


def make_spec(cfg: SegTrainConfig) -> SegmenterSpec:
    """The serving spec a config trains (grid from the physical field of view)."""
    return SegmenterSpec(architecture=cfg.architecture, arch_args=cfg.arch_args,
                         pixel_cm=cfg.pixel_cm,
                         fov_px=grid_shape_for(cfg.fov_cm[0], cfg.fov_cm[1], cfg.pixel_cm),
                         intensity=cfg.intensity, flip_average=cfg.flip_average)


def _participants(labels: Path | None) -> dict[str, str]:
    """patient id / study uid -> participant id from a labels file (empty without one)."""
    if labels is None:
        return {}
    out: dict[str, str] = {}
    for row in read_labels(Path(labels)):
        pid = row.get("participant_id") or row.get("patient_id") or ""
        for key in (row.get("study_instance_uid"), row.get("patient_id")):
            if key and pid:
                out[key] = pid
    return out


def load_seg_samples(source_dir: Path, spec: SegmenterSpec, labels: Path | None = None, *,
                     progress: Progress | None = None) -> tuple[list[SegSample], list[str]]:
    """Every calibrated frame with a SEG mask under ``source_dir`` (archive or folder).

    Returns:
        (samples, skipped): skipped holds one human-readable line per frame (or automatic SEG)
        not used.
    """
    index = index_archive(Path(source_dir))
    owner = _participants(labels)
    samples: list[SegSample] = []
    skipped: list[str] = []
    for n, (study, (patient, paths)) in enumerate(sorted(index.items()), 1):
        # read_study leaves all-AUTOMATIC SEGs out (the node's own outlines would teach the
        # network its own mistakes): only manual or semi-automatic SEGs are references
        read = read_study(paths)
        skipped.extend(f"{uid}: automatic DICOM-SEG, not a reference"
                       for uid, why in read.problems if why == AUTOMATIC_SEG_REASON)
        pid = owner.get(study) or owner.get(patient) or patient or study
        for fr in read.frames:
            if fr.mask is None:
                continue
            if fr.spacing_cm is None:
                skipped.append(f"{fr.sop_instance_uid}: no US-region calibration")
                continue
            if not fr.mask.any():
                skipped.append(f"{fr.sop_instance_uid}: empty SEG mask")
                continue
            where = placement(fr.image.shape, fr.spacing_cm, spec)
            samples.append(SegSample(
                image=fr.image, mask=fr.mask, spacing_cm=fr.spacing_cm, participant_id=pid,
                study_uid=study, sop_uid=fr.sop_instance_uid, frame_number=fr.frame_number,
                vendor=fr.manufacturer or "unknown",
                grid_image=normalise(to_grid(fr.image, where, spec), spec),
                grid_mask=(to_grid(fr.mask.astype(np.float32), where, spec) >= 0.5
                           ).astype(np.uint8)))
        if progress and (n % 10 == 0 or n == len(index)):
            progress(f"read {n}/{len(index)} studies, {len(samples)} annotated frames")
    return samples, skipped


def _augment() -> Any:
    """MONAI dictionary transforms for one (image, label) pair of shape (1, rows, cols)."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    # the grid has a fixed physical scale, so muscle size is what scaling changes: +-20 % in
    # each axis spans most of the RF size range between a small older woman and a large man
    # (a 26-participant cohort without it outlined the vastus instead of its largest RF)
    return Compose([
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=1),
        RandAffined(keys=("image", "label"), prob=0.5, translate_range=(6, 12),
                    scale_range=(0.2, 0.2), rotate_range=0.08,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.2, prob=0.5),
    ])


def train_fold(train: Sequence[SegSample], spec: SegmenterSpec, cfg: SegTrainConfig, seed: int,
               progress: Progress | None = None, tag: str = "") -> dict[str, torch.Tensor]:
    """Train one network on ``train``; returns its state dict (CPU tensors)."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = create_network(spec)
    net.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(train) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr * 0.05)
    aug = _augment() if cfg.augment else None
    if aug is not None:
        aug.set_random_state(seed=seed)
    images = torch.as_tensor(np.stack([s.grid_image for s in train]))[:, None]
    labels = torch.as_tensor(np.stack([s.grid_mask for s in train]))[:, None].float()
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train))
        total = 0.0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            x, y = images[idx], labels[idx]
            if aug is not None:
                pairs = [aug({"image": x[i], "label": y[i]}) for i in range(len(idx))]
                x = torch.stack([torch.as_tensor(p["image"]) for p in pairs])
                y = torch.stack([torch.as_tensor(p["label"]) for p in pairs])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y.round())
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if progress and (epoch + 1 == cfg.epochs or (epoch + 1) % 5 == 0):
            progress(f"{tag}epoch {epoch + 1}/{cfg.epochs} loss {total / len(train):.4f}")
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def evaluate_fold(segmenter: Segmenter, held_out: Sequence[SegSample], fold: int
                  ) -> list[dict[str, Any]]:
    """Segment each held-out frame through the serving path and compare with its reference."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    from inference.measurements import measure_roi

    out = []
    for s in held_out:
        t0 = time.perf_counter()
        prob = segmenter.probability(s.image, s.spacing_cm)
        res = quality_control(prob, s.spacing_cm, segmenter.spec.threshold, segmenter.qc)
        seconds = time.perf_counter() - t0
        ref = measure_roi(s.image, s.mask, s.spacing_cm)
        pred = res.candidate if res.candidate is not None else np.zeros_like(s.mask)
        y = torch.as_tensor(s.mask[None, None].astype(np.float32))
        p = torch.as_tensor(pred[None, None].astype(np.float32))
        dice = float(compute_dice(p, y, include_background=True)[0, 0])
        hd95 = None
        if pred.any():
            hd95 = float(compute_hausdorff_distance(
                p, y, include_background=True, percentile=95,
                spacing=[float(s.spacing_cm[0]), float(s.spacing_cm[1])])[0, 0])
        auto = measure_roi(s.image, pred, s.spacing_cm) if pred.any() else None
        out.append({
            "fold": fold, "participant_id": s.participant_id, "study_uid": s.study_uid,
            "sop_uid": s.sop_uid, "frame": s.frame_number, "vendor": s.vendor,
            "dice": dice, "hd95_cm": hd95, "qc_passed": res.passed, "qc_reason": res.qc_reason,
            "confidence": res.confidence, "csa_ref": ref.csa_cm2, "thickness_ref": ref.thickness_cm,
            "csa_auto": auto.csa_cm2 if auto else None,
            "thickness_auto": auto.thickness_cm if auto else None,
            "seconds": seconds,
        })
    return out


def _fingerprint(cfg: SegTrainConfig, samples: Sequence[SegSample], fold_of: np.ndarray) -> str:
    """Changes whenever the config, the data or the folds change (resume only on a match)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for s, f in zip(samples, fold_of, strict=True):
        h.update(f"{s.sop_uid}:{s.frame_number}:{f}\n".encode())
    return h.hexdigest()[:16]


def _load_done(work: Path, fold: int, fp: str) -> tuple[dict, list] | None:
    """A finished fold from an earlier run with the same fingerprint, else None."""
    from safetensors.torch import load_file

    meta, weights = work / f"fold_{fold}.json", work / f"fold_{fold}.safetensors"
    try:
        info = json.loads(meta.read_text())
        if info.get("fingerprint") != fp:
            return None
        return load_file(str(weights)), info["records"]
    except (OSError, ValueError, KeyError):
        return None


def _save_done(work: Path, fold: int, fp: str, state: Mapping[str, torch.Tensor],
               records: list[dict[str, Any]]) -> None:
    """Keep a finished fold (weights first, then the marker that says it is complete)."""
    save_weights(state, work / f"fold_{fold}.safetensors")
    write_durable(work / f"fold_{fold}.json",
                  json.dumps({"fingerprint": fp, "records": records}, default=str).encode())


def train_segmenter(samples: Sequence[SegSample], out_dir: Path, cfg: SegTrainConfig, *,
                    progress: Progress | None = None, qc: QcLimits | None = None,
                    resume: bool = True) -> SegRunResult:
    """Cross-validate and train the segmenter; writes the artifact and its report to ``out_dir``.

    Args:
        samples: annotated frames (:func:`load_seg_samples`), placed on ``make_spec(cfg)``'s grid.
        out_dir: artifact folder (replaced atomically).
        cfg: the run's settings.
        progress: called with one line per step worth telling a user.
        qc: QC limits written into the artifact (default :class:`QcLimits`).
        resume: reuse folds finished by an interrupted run with the same data and config.

    Raises:
        TrainingError: fewer participants than folds, or no annotated frames.
    """
    from training.segmentation_report import build_report, write_report

    say = progress or (lambda msg: log.info("%s", msg))
    if not samples:
        raise TrainingError("no calibrated US frame with a DICOM-SEG mask to train on")
    torch.set_num_threads(max(1, cfg.threads))
    spec = make_spec(cfg)
    qc = qc or QcLimits()
    pids = [s.participant_id for s in samples]
    fold_of = participant_folds(pids, [0] * len(samples), cfg.n_folds, cfg.seed)
    fp = _fingerprint(cfg, samples, fold_of)
    work = Path(out_dir).with_name(Path(out_dir).name + ".work")
    states, records, fold_meta = [], [], []
    t_start = time.perf_counter()
    for k in range(cfg.n_folds):
        val = [s for s, f in zip(samples, fold_of, strict=True) if f == k]
        train = [s for s, f in zip(samples, fold_of, strict=True) if f != k]
        done = _load_done(work, k, fp) if resume else None
        if done is not None:
            state, recs = done
            say(f"fold {k + 1}/{cfg.n_folds}: resumed from {work}")
        else:
            t0 = time.perf_counter()
            state = train_fold(train, spec, cfg, cfg.seed * 1000 + k, say,
                               tag=f"fold {k + 1}/{cfg.n_folds} ")
            net = create_network(spec)
            net.load_state_dict(state)
            seg = Segmenter(spec=spec, qc=qc, networks=[net.eval()])
            recs = evaluate_fold(seg, val, k)
            _save_done(work, k, fp, state, recs)
            dice = np.median([r["dice"] for r in recs])
            say(f"fold {k + 1}/{cfg.n_folds}: {len(train)} train / {len(val)} held-out frames, "
                f"median Dice {dice:.3f}, {time.perf_counter() - t0:.0f} s")
        states.append(state)
        records.extend(recs)
        fold_meta.append({"n_train": len(train), "n_val": len(val),
                          "median_dice": float(np.median([r["dice"] for r in recs]))})
    report = build_report(records, cfg=cfg, spec=spec,
                          train_seconds=time.perf_counter() - t_start)
    model_json = {
        "schema_version": SCHEMA_VERSION, "task": TASK, "name": cfg.name,
        "version": cfg.version, "model_uid": generate_uid(),
        "spec": spec.to_dict(), "qc": {k: v for k, v in vars(qc).items()},
        "folds": [{"fold": k, "file": f"fold_{k}.safetensors", **m}
                  for k, m in enumerate(fold_meta)],
        "preprocessing": {"pixel_cm": spec.pixel_cm, "fov_px": list(spec.fov_px),
                          "placement": "top-aligned, columns centred",
                          "intensity": spec.intensity},
        "cv_metrics": report["overall"],
        "data_fingerprint": data_fingerprint([s.sop_uid for s in samples]),
        "package_versions": package_versions(),
        "train_config": cfg.to_dict(),
    }
    out = write_artifact(Path(out_dir), fold_states=states, model_json=model_json,
                         populate=lambda tmp: write_report(tmp, report, records))
    _remove_work(work)
    say(f"segmenter written to {out}: median Dice {report['overall']['dice_median']:.3f}, "
        f"CSA ICC {_fmt(report['overall']['csa']['icc'])}, "
        f"bias {_fmt(report['overall']['csa']['bias_percent'])} %")
    return SegRunResult(out_dir=out, report=report, records=records)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _remove_work(work: Path) -> None:
    """Delete the resume folder once the artifact is in place."""
    import shutil

    shutil.rmtree(work, ignore_errors=True)


def run_segmentation_training(source_dir: Path, labels: Path | None, out_dir: Path,
                              cfg: SegTrainConfig, *, progress: Progress | None = None,
                              ) -> SegRunResult:
    """``dicom-node train --task segmentation``: read the SEG-annotated frames, train, write.

    Args:
        source_dir: a node data dir (index.sqlite) or any folder of DICOM files.
        labels: optional labels.csv giving participant ids (else Patient ID groups the folds).
        out_dir: artifact folder.
        cfg: run settings.
        progress: one-line progress messages (default: the log).
    """
    say = progress or (lambda msg: log.info("%s", msg))
    spec = make_spec(cfg)
    samples, skipped = load_seg_samples(Path(source_dir), spec, labels, progress=say)
    if skipped:
        say(f"{len(skipped)} annotated frame(s) skipped (first: {skipped[0]})")
    say(f"{len(samples)} annotated frames from "
        f"{len({s.participant_id for s in samples})} participants")
    return train_segmenter(samples, out_dir, cfg, progress=say)
