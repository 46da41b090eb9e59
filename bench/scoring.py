"""Scoring latency: one 5-image study through every stage, against the FLOP lower bound.

Stages come from ``ScoringPipeline.score_study`` (its ``timings_ms``: decode, transforms, ensemble
forward + Grad-CAM, measurements ...) plus SR+SC build (``dicom_node.results.build_results``) and
the C-STORE of the results to a DCMTK storescp. The lower bound is the ensemble's FLOPs (5 folds ×
5 images, FlopCounterMode) ÷ the torch.matmul FLOP/s measured in the same run. Each backend the
scorer offers (eager / compile / onnx) is timed on the same study and compared with eager by
max |Δp|. Fold weights are random (untrained): timing does not depend on the weights.

    .venv/bin/python bench/scoring.py [--backbones convnext_tiny convnext_atto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
from common import save_result

from bench.flops import timm_gflops
from bench.machine import describe
from bench.model_fixture import untrained_artifact
from bench.usdata import us_instances
from dicom_node.config import ReaderConfig, ResultsConfig, ScoringConfig


def _time_backend(model_dir: Path, files: list[Path], backend: str, cam_method: str,
                  repeats: int, threads: int) -> dict:
    import torch

    from inference.pipeline import ScoringPipeline

    scoring = ScoringConfig(enabled=True, model_dir=model_dir, backend=backend,
                            cam_method=cam_method, torch_threads=threads, device="cpu")
    t0 = time.perf_counter()
    pipe = ScoringPipeline(model_dir, scoring, ReaderConfig())
    score, read = pipe.score_study(files, allow_missing_seg=True)  # warm-up (and compile)
    setup_s = time.perf_counter() - t0
    runs, totals = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score, read = pipe.score_study(files, allow_missing_seg=True)
        totals.append((time.perf_counter() - t0) * 1000)
        runs.append(dict(score.timings_ms))
    stages = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
    # the forward alone (no CAM) on a batch of the same shape: what the CAM costs on top
    spec = pipe.artifact.spec
    x = torch.rand(len(score.images), spec.in_chans, spec.input_size, spec.input_size)
    fwd = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.ensemble.predict(x, cam=False)
        fwd.append((time.perf_counter() - t0) * 1000)
    probs = [img.probability for img in score.images]
    return {"backend": backend, "setup_s": setup_s, "score_ms": statistics.median(totals),
            "stages_ms": stages, "forward_only_ms": statistics.median(fwd), "probs": probs,
            "score": score, "read": read}


def _results_and_send(score, read, workdir: Path, repeats: int) -> dict:
    from dicom_node.results import build_results
    from dicom_node.scu import store_files
    from testing.peers import StorescpPeer

    build = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rs = build_results(score, read.datasets, ResultsConfig())
        build.append((time.perf_counter() - t0) * 1000)
    objs = [rs.sr, *rs.heatmaps]
    peer = StorescpPeer(workdir / "pacs")
    try:
        send = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            store_files("127.0.0.1", peer.port, objs, calling_aet="DICOMNODE",
                        called_aet=peer.ae_title)
            send.append((time.perf_counter() - t0) * 1000)
    finally:
        peer.stop()
    return {"sr_sc_build_ms": statistics.median(build), "send_ms": statistics.median(send),
            "objects": len(objs)}


def run(backbones: list[str], variants: list[str], repeats: int = 3, folds: int = 5,
        threads: int = 2) -> dict:
    """Time each backbone × backend; return per-stage ms and ratios to the FLOP bound."""
    import torch

    torch.set_num_threads(threads)
    machine = describe()
    files = sorted(us_instances(5).glob("*.dcm"))
    out: dict = {"machine": machine.as_dict(), "weights": "untrained (random init)",
                 "images": len(files), "folds": folds, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        for bb in backbones:
            model_dir = untrained_artifact(Path(tmp) / bb, bb, folds)
            gflop = timm_gflops(bb) * folds * len(files)
            bound_ms = gflop / machine.matmul_gflops * 1000
            entry: dict = {"ensemble_gflop": gflop, "flop_bound_ms": bound_ms, "backends": {}}
            eager = None
            for variant in variants:
                be, cam_method = variant.split(":") if ":" in variant else (variant, "torchcam")
                try:
                    r = _time_backend(model_dir, files, be, cam_method, repeats, threads)
                except Exception as exc:  # noqa: BLE001 - report an unsupported backend, go on
                    entry["backends"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    print(f"  {bb} {variant}: not available ({exc})", flush=True)
                    continue
                if eager is None:
                    eager = r
                    entry.update(_results_and_send(r["score"], r["read"], Path(tmp), repeats))
                dp = max(abs(a - b) for a, b in zip(r["probs"], eager["probs"], strict=True))
                whole = r["score_ms"] + entry["sr_sc_build_ms"] + entry["send_ms"]
                ens = r["stages_ms"].get("ensemble", float("nan"))
                entry["backends"][variant] = {
                    "setup_s": r["setup_s"], "score_ms": r["score_ms"], "stages_ms": r["stages_ms"],
                    "forward_only_ms": r["forward_only_ms"],
                    "cam_overhead": ens / r["forward_only_ms"],
                    "ensemble_over_bound": ens / bound_ms,
                    "max_abs_dp_vs_first": dp, "whole_study_ms": whole,
                    "whole_over_bound": whole / bound_ms,
                }
                print(f"  {bb} {variant}: study {whole:.0f} ms = {whole / bound_ms:.2f}× "
                      "FLOP bound "
                      f"({bound_ms:.0f} ms); ensemble+CAM {ens:.0f} ms = {ens / bound_ms:.2f}× "
                      f"bound, forward alone {r['forward_only_ms']:.0f} ms; stages "
                      f"{_fmt(r['stages_ms'])}; SR+SC build {entry['sr_sc_build_ms']:.0f} ms, send "
                      f"{entry['send_ms']:.0f} ms; max|Δp| vs {variants[0]} {dp:.1e}; setup "
                      f"{r['setup_s']:.0f} s", flush=True)
            out["models"][bb] = entry
    return out


def _fmt(stages: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in stages.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["convnext_tiny", "convnext_atto"])
    ap.add_argument("--variants", nargs="+",
                    default=["eager:torchcam", "eager:gap", "onnx:gap", "compile:gap"],
                    help="backend:cam_method (eager|compile|onnx : torchcam|gap)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    res = run(args.backbones, args.variants, args.repeats, threads=args.threads)
    print(f"machine: {res['machine']}")
    save_result("scoring", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
