"""Automatic ROI cost: segmentation time per image vs its FLOP bound, and study latency with the
automatic ROI vs with a DICOM-SEG, measured side by side on the same study and machine.

The segmenter is the production spec (``SegTrainConfig()`` defaults: MONAI UNet, 0.04 cm/px,
4.8 x 6.4 cm field of view, 5 folds, ``flip_average`` on: every fold also runs on the mirrored
frame, so 2 forward passes per fold) with random weights and a threshold of 0.001 so every
image yields a mask that reaches QC and scoring: timing, not accuracy (accuracy is in the
training report). The FLOP bound counts every forward pass serving runs. The classifier is the
untrained ``bench.model_fixture`` ensemble. The study comes from the synthetic generator (a
baseline study with a SEG per image, at full size).

    .venv/bin/python bench/segmentation.py [--repeats 3] [--backbone convnext_atto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
from common import save_result

from bench.machine import describe
from bench.model_fixture import untrained_artifact


def untrained_segmenter(out_dir: Path, threshold: float = 0.001) -> Path:
    """A production-spec segmentation artifact with random weights (written atomically)."""
    import torch

    from inference.artifact import write_artifact
    from inference.segmenter import SCHEMA_VERSION, TASK, create_network
    from training.segmentation import make_spec
    from training.segmentation_config import SegTrainConfig

    cfg = SegTrainConfig()
    spec = make_spec(cfg)
    spec_d = {**spec.to_dict(), "threshold": threshold}
    states = []
    for k in range(cfg.n_folds):
        torch.manual_seed(k)
        states.append({n: t.contiguous() for n, t in create_network(spec).state_dict().items()})
    permissive = {"min_confidence": 0.0, "min_csa_cm2": 0.0, "max_csa_cm2": 1e6,
                  "min_thickness_cm": 0.0, "max_thickness_cm": 1e6, "max_second_component": 1.0}
    raw = {"schema_version": SCHEMA_VERSION, "task": TASK, "name": "bench segmenter (untrained)",
           "version": "bench", "model_uid": f"2.25.{uuid.uuid4().int}", "spec": spec_d,
           "qc": permissive,
           "folds": [{"fold": k, "file": f"fold_{k}.safetensors"} for k in range(cfg.n_folds)]}
    return write_artifact(out_dir, fold_states=states, model_json=raw)


def _study(work: Path) -> tuple[list[Path], list[Path]]:
    """(US files, SEG files) of the first study whose every US image has a SEG sent with it."""
    from training.synthetic import generate_cohort

    cohort = generate_cohort(work / "cohort", participants=3, seed=1, image_scale=1.0, workers=1)
    manifest = json.loads(cohort.manifest.read_text())
    for st in manifest["studies"]:
        us = [f for f in st["files"] if f["kind"] == "us"]
        seg = [f for f in st["files"] if f["kind"] == "seg"]
        covered = {u for f in seg for u in f["references"]}
        if us and all(f["sop_instance_uid"] in covered for f in us):
            return ([cohort.out_dir / f["path"] for f in us],
                    [cohort.out_dir / f["path"] for f in seg])
    raise RuntimeError("no fully segmented study in the bench cohort")


def run(repeats: int = 3, backbone: str = "convnext_atto", threads: int = 2) -> dict:
    import torch

    from inference.config import ReaderConfig, ScoringConfig
    from inference.pipeline import ScoringPipeline
    from inference.reader import read_study
    from inference.segmenter import load_segmenter

    torch.set_num_threads(threads)
    machine = describe()
    with tempfile.TemporaryDirectory(prefix="bench-seg-") as tmp:
        work = Path(tmp)
        us, segs = _study(work)
        seg_dir = untrained_segmenter(work / "segmenter")
        model_dir = untrained_artifact(work / "model", backbone=backbone)
        segmenter = load_segmenter(seg_dir)
        frames = read_study(us).frames
        calibrated = [f for f in frames if f.spacing_cm is not None]
        # 1. segmentation of one image (all folds), against the FLOP bound of the folds' forward
        per_image, forward = [], []
        x = torch.zeros(1, 1, *segmenter.spec.fov_px)
        # serving runs each fold on the frame and, with flip_average, on its mirror too
        inputs = [x, x.flip(-1)] if segmenter.spec.flip_average else [x]
        for _ in range(repeats):
            for fr in calibrated:
                t0 = time.perf_counter()
                segmenter.segment_frame(fr)  # resample + folds + back to the frame + QC
                per_image.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for net in segmenter.networks:  # the folds' forward passes alone
                        for xi in inputs:
                            net(xi)
                forward.append((time.perf_counter() - t0) * 1000)
        rows, cols = segmenter.spec.fov_px
        gflop_fold = model_gflops_grid(segmenter.networks[0], rows, cols)
        passes = len(segmenter.networks) * len(inputs)
        gflop = gflop_fold * passes
        bound_ms = gflop / machine.matmul_gflops * 1000
        # 2. the same study: with its SEGs, and without them on the automatic ROI
        scoring = ScoringConfig(model_dir=model_dir, torch_threads=threads, device="cpu",
                                segmentation_model_dir=seg_dir)
        pipe = ScoringPipeline(model_dir, scoring, ReaderConfig())
        # warm-up of both paths (the pipeline's own segmenter copy included)
        pipe.score_study(us + segs, allow_missing_seg=False)
        pipe.score_study(us, allow_missing_seg=False, auto_roi=True)
        with_seg, auto, seg_stage = [], [], []
        stages: dict[str, dict[str, list[float]]] = {"seg": {}, "auto": {}}
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref, _ = pipe.score_study(us + segs, allow_missing_seg=False, auto_roi=True)
            with_seg.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            score, _ = pipe.score_study(us, allow_missing_seg=False, auto_roi=True)
            auto.append((time.perf_counter() - t0) * 1000)
            seg_stage.append(score.timings_ms.get("segment", 0.0))
            for kind, sc in (("seg", ref), ("auto", score)):
                for k, v in sc.timings_ms.items():
                    stages[kind].setdefault(k, []).append(v)
        pipe.close()
    med = statistics.median
    result = {
        "machine": machine.as_dict(), "threads": threads, "backbone": backbone,
        "images": len(us), "frames_segmented": len(calibrated),
        "grid_px": [rows, cols], "folds": len(segmenter.networks),
        "flip_average": bool(segmenter.spec.flip_average), "forward_passes_per_image": passes,
        "gflop_per_pass": gflop_fold,
        "segment_ms_per_image": med(per_image), "gflop_per_image": gflop,
        "flop_bound_ms_per_image": bound_ms,
        "ratio_to_bound": med(per_image) / bound_ms if bound_ms else None,
        "forward_ms_per_image": med(forward),
        "forward_ratio_to_bound": med(forward) / bound_ms if bound_ms else None,
        "study_ms_with_seg": med(with_seg), "study_ms_auto_roi": med(auto),
        "segment_stage_ms": med(seg_stage),
        "stages_ms_with_seg": {k: med(v) for k, v in stages["seg"].items()},
        "stages_ms_auto_roi": {k: med(v) for k, v in stages["auto"].items()},
        "auto_over_seg": med(auto) / med(with_seg),
    }
    return result


def model_gflops_grid(net: object, rows: int, cols: int) -> float:
    """GFLOP of one forward pass of a segmentation network on a (1, 1, rows, cols) grid."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, rows, cols)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)  # type: ignore[operator]
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbone", default="convnext_atto")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    res = run(args.repeats, args.backbone, args.threads)
    save_result("segmentation", res)
    m = res["machine"]
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, matmul {m['matmul_gflops']:.1f} GFLOP/s")
    print(f"segmentation: {res['segment_ms_per_image']:.0f} ms/image ({res['folds']} folds x "
          f"{res['forward_passes_per_image'] // res['folds']} (flip_average "
          f"{'on' if res['flip_average'] else 'off'}), grid "
          f"{res['grid_px'][0]}x{res['grid_px'][1]}, {res['gflop_per_image']:.2f} GFLOP) vs FLOP "
          f"bound {res['flop_bound_ms_per_image']:.0f} ms: {res['ratio_to_bound']:.1f}x; the "
          f"folds' forward alone {res['forward_ms_per_image']:.0f} ms "
          f"({res['forward_ratio_to_bound']:.1f}x)")
    print(f"study of {res['images']} images ({res['backbone']} classifier): with SEG "
          f"{res['study_ms_with_seg']:.0f} ms, automatic ROI {res['study_ms_auto_roi']:.0f} ms "
          f"(segment stage {res['segment_stage_ms']:.0f} ms): {res['auto_over_seg']:.2f}x")
    for kind in ("with_seg", "auto_roi"):
        st = ", ".join(f"{k} {v:.0f}" for k, v in res[f"stages_ms_{kind}"].items())
        print(f"  stages {kind} (ms): {st}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
