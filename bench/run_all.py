"""``make bench``: every benchmark with modest defaults, the machine, every ratio, BENCHMARKS.md.

Each benchmark compares side by side within its own run (this kind of machine is shared and
noisy); the figures and the machine they ran on are written to BENCHMARKS.md between markers, so
the prose around them stays. Whole run: about 15-20 minutes on 2 CPU cores (the automatic ROI
benchmark adds 2-4 minutes).

    .venv/bin/python bench/run_all.py [--quick]
        [--skip ingest scoring throughput training segmentation]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: F401  (sets sys.path)
from common import REPO, save_result

from bench import ingest, scoring, segmentation, throughput, training
from bench.machine import describe

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _fmt(v: object, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render(machine: dict, res: dict, seconds: float) -> str:
    """Markdown for the figures of one run."""
    lines = [
        (f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min on: "
         f"{machine['cpu_model']}, {machine['cores']} cores, GPU: {machine['gpu']}, torch "
         f"{machine['torch']}; torch.matmul 4096² anchor {machine['matmul_gflops']:.1f} GFLOP/s. "
         "No GPU was lent to this task, so there are no GPU figures."),
        "",
        "| benchmark | this node | reference | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    if "ingest" in res and "error" not in res["ingest"]:
        r = res["ingest"]
        lines.append(f"| ingest, {r['n']} × 600×800 RGB US, storescu → | dicom-node serve "
                     f"{r['node_img_s']:.0f} img/s | DCMTK storescp (TCP_NODELAY, 128 KiB PDU) "
                     f"{r['dcmtk_img_s']:.0f} img/s | {r['ratio']:.2f} | ≥ 0.5 |")
    for bb, m in (res.get("scoring") or {}).get("models", {}).items():
        for variant, b in m.get("backends", {}).items():
            if "error" in b:
                lines.append(f"| scoring {bb} {variant} | not available: {b['error'][:80]} | | | |")
                continue
            lines.append(
                f"| scoring latency, 5-image study, {res['scoring']['folds']}-fold {bb}, {variant} "
                f"| {b['whole_study_ms']:.0f} ms (ensemble+CAM "
                f"{b['stages_ms'].get('ensemble', 0):.0f}"
                f" ms, forward alone {b['forward_only_ms']:.0f} ms; max abs Δp "
                f"{b['max_abs_dp_vs_first']:.1e}) | FLOP bound {m['flop_bound_ms']:.0f} ms "
                f"({m['ensemble_gflop']:.0f} GFLOP) | {b['whole_over_bound']:.2f} "
                f"(ensemble {b['ensemble_over_bound']:.2f}) | ≤ 1.5 |")
    if "throughput" in res and "error" not in res["throughput"]:
        r = res["throughput"]
        lines.append(
            f"| throughput, {r['modalities']} modalities, {r['folds']}-fold {r['backbone']} | "
            f"{r['studies_per_hour']:.0f} studies/h ({r['delivered']}/{r['studies']} delivered; "
            f"p50 {_fmt(r['latency_p50_s'], 1)} s, p95 {_fmt(r['latency_p95_s'], 1)} s after the "
            f"last instance incl. {r['completion_idle_s']:.0f} s quiet period; CPU "
            f"{100 * r['cpu_utilisation']:.0f} %) | | | ≥ 1000 studies/h |")
    if "training" in res and "error" not in res["training"]:
        r = res["training"]
        lines.append(
            f"| training {r['backbone']} {r['input_size']}², batch {r['batch']} | trainer "
            f"{r['trainer_img_s']:.2f} img/s | bare timm loop {r['bare_img_s']:.2f} img/s | "
            f"{r['overhead_ratio']:.2f} (trainer time ÷ bare time) | |")
    if "segmentation" in res and "error" not in res["segmentation"]:
        r = res["segmentation"]
        flips = r["forward_passes_per_image"] // r["folds"]
        lines.append(
            f"| automatic ROI: segmentation per image, {r['folds']}-fold UNet "
            f"{r['grid_px'][0]}×{r['grid_px'][1]} grid, flip_average "
            f"{'on' if r['flip_average'] else 'off'} ({r['forward_passes_per_image']} passes) | "
            f"{r['segment_ms_per_image']:.0f} ms (forward alone "
            f"{r['forward_ms_per_image']:.0f} ms) | FLOP bound "
            f"{r['flop_bound_ms_per_image']:.1f} ms ({r['gflop_per_image']:.2f} GFLOP = "
            f"{r['folds']}×{flips}×{r['gflop_per_pass']:.3f}) | {r['ratio_to_bound']:.0f} "
            f"(forward {r['forward_ratio_to_bound']:.0f}) | |")
        lines.append(
            f"| automatic ROI: study latency, {r['images']}-image study, {r['backbone']} | "
            f"automatic ROI {r['study_ms_auto_roi']:.0f} ms (segment stage "
            f"{r['segment_stage_ms']:.0f} ms) | with DICOM-SEG {r['study_ms_with_seg']:.0f} ms | "
            f"{r['auto_over_seg']:.2f} | |")
    stages = []
    for bb, m in (res.get("scoring") or {}).get("models", {}).items():
        first = next((b for b in m.get("backends", {}).values() if "error" not in b), None)
        if first:
            st = ", ".join(f"{k} {v:.0f}" for k, v in first["stages_ms"].items())
            stages.append(f"- {bb}: stages (ms) {st}; SR+SC build {m['sr_sc_build_ms']:.0f}; "
                          f"send {m['send_ms']:.0f}")
    if stages:
        lines += ["", ("Scoring stages of the first variant (fold weights untrained, random init: "
                       "timing does not depend on them):"), *stages]
    errors = [f"- {k}: {v['error']}" for k, v in res.items()
              if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["", "Benchmarks that failed in this run:", *errors]
    return "\n".join(lines)


def write_benchmarks_md(text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace the figures between the markers (create the file if needed)."""
    block = f"{BEGIN}\n{text}\n{END}"
    if path.exists() and BEGIN in path.read_text():
        old = path.read_text()
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = (path.read_text() if path.exists() else "# Benchmarks\n") + "\n" + block + "\n"
    path.write_text(new)


def _scoring(quick: bool) -> dict:
    """convnext_tiny (the default) without torch.compile (minutes to compile 5 folds on 2 cores),
    the demo's convnext_atto with every backend."""
    every = ["eager:torchcam", "eager:gap", "onnx:gap", "compile:gap"]
    if quick:
        return scoring.run(["convnext_atto"], every[:3], repeats=1)
    res = scoring.run(["convnext_tiny"], every[:3], repeats=3)
    res["models"].update(scoring.run(["convnext_atto"], every, repeats=3)["models"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, ~5 min)")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    q = args.quick
    t0 = time.time()
    machine = describe()
    print(f"machine: {machine.line()}", flush=True)
    jobs = {
        "ingest": lambda: ingest.run(n=100 if q else 500, repeats=1 if q else 3),
        "scoring": lambda: _scoring(q),
        "throughput": lambda: throughput.run(studies=8 if q else 40,
                                             backbone="convnext_atto" if q else "convnext_tiny",
                                             timeout=300 if q else 900),
        "training": lambda: training.run(n=16, epochs=2, batch=8,
                                         backbone="convnext_atto" if q else "convnext_tiny"),
        "segmentation": lambda: segmentation.run(repeats=1 if q else 3),
    }
    res: dict = {}
    for name, job in jobs.items():
        if name in args.skip:
            continue
        print(f"== {name}", flush=True)
        try:
            res[name] = job()
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide the others
            traceback.print_exc()
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    save_result("all", {"machine": machine.as_dict(), **res})
    text = render(machine.as_dict(), res, time.time() - t0)
    print(text)
    if not args.no_write:
        write_benchmarks_md(text)
    return 0 if not any(isinstance(v, dict) and "error" in v for v in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
