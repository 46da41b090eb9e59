"""``dicom-node train``, ``evaluate``, ``compare``, ``synth``: the training library's commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from dicom_node.config import Config, TrainConfig


def train_config_from_args(args: argparse.Namespace, cfg: Config) -> TrainConfig:
    """``[train]`` with the command-line overrides (--epochs, --backbone, --modalities)."""
    from training.combination import parse_combination

    t = cfg.train
    repl: dict[str, Any] = {}
    if args.epochs:
        repl["epochs"] = int(args.epochs)
        repl["warmup_epochs"] = min(t.warmup_epochs, max(int(args.epochs) - 1, 0))
    if args.backbone:
        repl["backbone"] = args.backbone
    if args.modalities:
        repl["modalities"] = parse_combination("+".join(args.modalities))
    return dataclasses.replace(t, **repl) if repl else t


def train_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node train``: the fold ensemble on an archive or DICOM folder (paper's protocol)."""
    import torch

    if getattr(args, "task", "classification") == "segmentation":
        return train_segmentation_command(args, cfg)
    if args.labels is None:
        print("dicom-node train: --labels is required for the classifier")
        return 2

    from training.run import run_training
    from training.trainer import init_distributed

    tcfg = train_config_from_args(args, cfg)
    source = Path(args.archive) if args.archive else cfg.node.data_dir
    out = Path(args.out) if args.out else tcfg.output_dir
    torch.set_num_threads(max(1, tcfg.torch_threads))
    dist = init_distributed(tcfg.device)
    try:
        if getattr(args, "backbones", None):
            from training.backbones import run_backbones

            path = run_backbones(source, Path(args.labels), out, tcfg, args.backbones, dist=dist,
                                 resume=bool(args.resume), also=list(args.also or ()),
                                 keep_work=bool(args.keep_checkpoints))
        else:
            path = run_training(source, Path(args.labels), out, tcfg, dist=dist,
                                resume=bool(args.resume), also=list(args.also or ()),
                                keep_work=bool(args.keep_checkpoints))
    finally:
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if path is not None:
        print(f"{'comparison' if getattr(args, 'backbones', None) else 'model'} written to {path}")
    return 0


def train_segmentation_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node train --task segmentation``: the automatic ROI model from the SEGs."""
    from training.segmentation import run_segmentation_training

    scfg = cfg.segmentation
    if args.epochs:
        scfg = dataclasses.replace(scfg, epochs=int(args.epochs))
    source = Path(args.archive) if args.archive else cfg.node.data_dir
    out = Path(args.out) if args.out else (cfg.scoring.segmentation_model_dir
                                           or Path("runs/segmenter"))
    res = run_segmentation_training(source, Path(args.labels) if args.labels else None, out,
                                    scfg, progress=print)
    print(f"segmentation model written to {res.out_dir} (report: {res.out_dir / 'report.html'})")
    return 0


def evaluate_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node evaluate``: a trained model on another archive, same metrics and report."""
    from training.evaluate import evaluate_model

    out, line = evaluate_model(Path(args.model), Path(args.archive), Path(args.labels),
                               Path(args.out) if args.out else None,
                               regression_column=cfg.train.regression_column)
    print(f"{line} -> {out}")
    return 0


def compare_command(args: argparse.Namespace, cfg: Config) -> int:
    """Print both runs' AUCs with DeLong CIs and the DeLong test p-value; exit 0."""
    from training.compare import compare_runs, format_line
    from training.oof import read_oof

    oof_a, oof_b = read_oof(args.run_a), read_oof(args.run_b)
    level: Literal["participant", "study", "image"] = args.level or "participant"
    results = compare_runs(oof_a, oof_b, args.a_combination, args.b_combination, level)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(f"A: {args.run_a}\nB: {args.run_b}")
    for r in results:
        t = r.test
        kind = (f"paired DeLong on {r.n_matched} matched {level}s" if t.paired
                else f"unpaired DeLong (no shared {level}s)")
        print(f"\n{r.combination_a} vs {r.combination_b} ({level} level)")
        print(format_line("A", r.combination_a, r.auc_a))
        print(format_line("B", r.combination_b, r.auc_b))
        print(f"  difference A-B {t.difference:+.3f}, z = {t.z:.3f}, p = {t.p_value:.4g} ({kind})")
        if t.paired and (r.n_only_a or r.n_only_b):
            print(f"  not matched: {r.n_only_a} only in A, {r.n_only_b} only in B (left out)")
    return 0


def synth_command(args: argparse.Namespace, cfg: Config) -> int:
    """``dicom-node synth``: write a cohort and print its summary."""
    from training.synthetic import generate_cohort

    try:
        summary = generate_cohort(args.out, args.participants, args.seed, args.vendors,
                                  args.follow_up, image_scale=args.image_scale,
                                  workers=args.workers)
    except ValueError as exc:
        print(f"dicom-node synth: {exc}")
        return 2
    n_other = int(args.non_muscle or 0)
    if n_other > 0:  # the input gate's negatives (training.synth_nonmuscle)
        from training.synth_nonmuscle import write_nonmuscle

        write_nonmuscle(Path(args.out), n_other, args.seed, args.image_scale)
        print(f"{n_other} non-muscle US objects -> {Path(args.out) / 'nonmuscle'}")
    print(f"{summary.participants} participants, {summary.studies} studies, "
          f"{summary.us_objects} US objects, {summary.seg_objects} SEG -> {summary.out_dir} "
          f"({summary.seconds:.1f} s)")
    if args.oracle:
        auc = "n/a" if summary.oracle_auc is None else f"{summary.oracle_auc:.3f}"
        print(f"oracle image-only AUC (latent muscle score): {auc}")
    return 0
