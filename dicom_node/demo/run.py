"""``dicom-node demo``: the steps in order, with bounded waits and clean-up of what it started.

generate a cohort -> train a small real fold ensemble and an automatic RF segmenter (reports
written) -> start the demo PACS and ``dicom-node serve`` (automatic ROI on) -> push held-out
studies as a modality would, without their DICOM-SEGs -> wait for the SRs, heat maps and AI SEGs
at the PACS -> read them back, compare the AI SEGs with the generator's truth and print a table
-> stop everything it started. Any failure stops the demo with a message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.config import Config
from dicom_node.demo.cohort import generate, held_out_studies, read_labels, split, training_set
from dicom_node.demo.collect import (
    collect,
    dciodvfy_errors,
    dice_vs_truth,
    export,
    summarize_sr,
)
from dicom_node.demo.node import NODE_AET, NodeProcess, node_toml
from dicom_node.demo.pacs import Peer, start_pacs
from dicom_node.demo.push import DCMTK_STORESCU, push_study
from dicom_node.demo.study import DemoError, DemoStudy
from dicom_node.demo.table import print_table, report_path
from dicom_node.demo.train import DEMO_SEG_EPOCHS, demo_threads, train, train_segmenter

log = logging.getLogger(__name__)

# how often the wait for results asks the node for failed jobs (one short CLI process each time)
_STATE_POLL_SECONDS = 10.0


@dataclass(frozen=True)
class DemoOptions:
    """The demo's knobs. Defaults are sized so that generate + train + serve + score finishes
    well under 10 minutes on 2 CPU cores (measured figures in BENCHMARKS.md).

    resnet10t (BatchNorm) learns from random init within a demo budget; convnext_atto at the same
    budget stayed at chance (CV AUC 0.52 vs 0.65 measured on the same 45-participant cohort).
    ``seg_epochs``/``seg_folds`` size the automatic ROI segmenter (see ``demo.train``).
    """

    participants: int = 45
    held_out: int = 6
    epochs: int = 12
    image_size: int = 96
    backbone: str = "resnet10t"
    seg_epochs: int = DEMO_SEG_EPOCHS
    seg_folds: int = 2
    timeout: float = 300.0
    seed: int = 0
    prefer_orthanc: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        """Options from ``dicom-node demo``'s arguments (None keeps the default)."""
        d = cls()
        return cls(
            participants=d.participants if args.participants is None else args.participants,
            held_out=d.held_out if args.held_out is None else args.held_out,
            epochs=d.epochs if args.epochs is None else args.epochs,
            image_size=d.image_size if args.image_size is None else args.image_size,
            backbone=d.backbone if args.backbone is None else args.backbone,
            timeout=d.timeout if args.timeout is None else args.timeout,
            prefer_orthanc=not args.no_orthanc,
        )


def _failed_jobs(node: NodeProcess, studies: dict[str, DemoStudy]) -> list[tuple[str, str]]:
    """(study UID, last error) of the demo's studies whose scoring job failed for good."""
    return [(r["study_uid"], (r["job"] or {}).get("last_error") or "")
            for r in node.studies() if r["study_uid"] in studies
            and (r.get("job") or {}).get("state") == "failed"]


def _wait_for_results(pacs: Peer, node: NodeProcess, studies: dict[str, DemoStudy],
                      timeout: float, console: Any) -> None:
    """Poll the PACS until each study has its SR, heat maps and AI SEGs; fail early on a dead
    node."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    seen: dict[Path, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout
    next_state_poll = time.monotonic() + _STATE_POLL_SECONDS
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("studies with SR + heat maps + AI SEGs at the PACS",
                            total=len(studies))
        while True:
            collect(pacs, studies, seen)
            done = [s for s in studies.values() if s.sr is not None and _complete(s)]
            bar.update(task, completed=len(done))
            if len(done) == len(studies):
                break
            if not node.alive():
                raise DemoError(f"dicom-node serve exited (code {node.proc.returncode}); "
                                f"see {node.log_path}")
            if time.monotonic() > next_state_poll:
                next_state_poll = time.monotonic() + _STATE_POLL_SECONDS
                failed = _failed_jobs(node, studies)
                if failed:
                    raise DemoError("scoring failed for study " + "; ".join(
                        f"{u}: {e[-400:]}" for u, e in failed) + f" (node log {node.log_path})")
            if time.monotonic() > deadline:
                states = {r["study_uid"]: r["state"] for r in node.studies()}
                missing = ", ".join(
                    f"{s.patient_id} ({states.get(s.study_uid, 'not received')}, SR "
                    f"{'yes' if s.sr else 'no'}, heat maps {len(s.heatmaps)})"
                    for s in studies.values() if s not in done)
                raise DemoError(f"timed out after {timeout:.0f} s waiting for results of "
                                f"{missing}; node log {node.log_path}")
            time.sleep(1.0)


def _complete(st: DemoStudy) -> bool:
    """Every scored image has its heat map and every automatic ROI its AI SEG at the PACS
    (they may trail the SR by a moment; a study with no scored image has its SR only)."""
    roi = summarize_sr(st.sr).roi
    return (len(st.heatmaps) >= sum(r != "not scored" for r in roi)
            and len(st.segs) >= roi.count("auto"))


def run_demo(workdir: Path, opts: DemoOptions, console: Any = None) -> list[DemoStudy]:
    """Run every step; return the held-out studies with their results read back from the PACS."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=False)
    t_start = time.monotonic()

    def step(n: int, text: str) -> None:
        console.rule(f"[bold]{n}/5 {text}[/]  (+{time.monotonic() - t_start:.0f} s)")

    step(1, f"Generating a synthetic cohort: {opts.participants} participants, 3 vendors, SEG, "
            "labels")
    cohort = workdir / "cohort"
    with console.status("generating DICOM US images, SEGs and labels ..."):
        manifest = generate(cohort, opts.participants, opts.seed)
    labels = read_labels(cohort / "labels.csv")
    held, chosen = split(manifest, labels, opts.held_out)
    if not chosen:
        raise DemoError("no held-out study could be chosen from the cohort manifest")
    dicom, train_labels, pos, neg = training_set(cohort, manifest, labels, held,
                                                 workdir / "train")
    folds = max(2, min(5, pos, neg))
    console.print(f"cohort in {cohort}: {len(manifest.get('studies', []))} studies; training on "
                  f"{pos} sarcopenic + {neg} non-sarcopenic participants, {len(chosen)} held out")

    step(2, f"Training a {folds}-fold {opts.backbone} ensemble ({opts.epochs} epochs, "
            f"{opts.image_size} px) and a {opts.seg_folds}-fold RF segmenter "
            f"({opts.seg_epochs} epochs) with the real trainers")
    model_dir = workdir / "model"
    t_cls = time.monotonic()
    train(dicom, train_labels, model_dir, backbone=opts.backbone, image_size=opts.image_size,
          epochs=opts.epochs, folds=folds, console=console)
    t_cls = time.monotonic() - t_cls
    console.print(f"classifier written to {model_dir} ({t_cls:.0f} s)")
    seg_dir = workdir / "segmenter"
    seg = train_segmenter(dicom, train_labels, seg_dir, epochs=opts.seg_epochs,
                          folds=opts.seg_folds, console=console)
    console.print(f"segmenter written to {seg_dir} ({seg.seconds:.0f} s, "
                  f"{seg.seconds / max(t_cls, 1e-6):.2f}x the classifier's training time): "
                  f"held-out median Dice {seg.dice_median:.3f} on {seg.frames} frames, CSA ICC "
                  f"{'n/a' if seg.csa_icc is None else f'{seg.csa_icc:.3f}'}")

    step(3, "Starting the demo PACS and dicom-node serve")
    studies = held_out_studies(cohort, chosen, labels)
    pacs: Peer | None = None
    node: NodeProcess | None = None
    try:
        with console.status("starting the PACS ..."):
            pacs = start_pacs(workdir / "pacs", [NODE_AET], prefer_orthanc=opts.prefer_orthanc)
        console.print(f"PACS: {type(pacs).__name__} AE {pacs.ae_title} at 127.0.0.1:{pacs.port}")
        with console.status("starting dicom-node serve (loading torch and the model) ..."):
            node = NodeProcess(workdir / "node",
                               node_toml(workdir, model_dir, pacs, demo_threads(),
                                         seg_model_dir=seg_dir),
                               start_timeout=min(opts.timeout, 240))
        console.print(f"node: AE {node.ae_title} at 127.0.0.1:{node.port}, config "
                      f"{node.config_path}, log {node.log_path}")

        step(4, f"Pushing {len(studies)} held-out studies like a modality, without DICOM-SEGs "
                f"({'DCMTK storescu' if DCMTK_STORESCU.exists() else 'dicom-node push'})")
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("C-STORE studies", total=len(studies))
            for st in studies.values():
                push_study(st, node, cohort / "storescu.cfg")
                bar.advance(task)

        step(5, "Waiting for SRs, heat maps and AI SEGs (automatic ROI) at the PACS")
        _wait_for_results(pacs, node, studies, opts.timeout, console)
        results_dir = workdir / "results"
        for st in studies.values():
            st.summary = summarize_sr(st.sr)
            st.sr_errors = dciodvfy_errors(st.sr) if st.sr is not None else None
            seg_errors = [dciodvfy_errors(p) for p in st.segs]
            st.seg_errors = (None if not seg_errors or None in seg_errors
                             else sum(e or 0 for e in seg_errors))
            st.dice = [d for p in st.segs for d in dice_vs_truth(p, cohort / "truth")]
            st.folder = export(st, results_dir)
    finally:
        with console.status("stopping the node and the PACS ..."):
            if node is not None:
                node.stop()
            if pacs is not None:
                pacs.stop()
    console.print(f"done in {time.monotonic() - t_start:.0f} s")
    return list(studies.values())


def demo_command(args: argparse.Namespace, cfg: Config) -> int:
    """Entry point of ``dicom-node demo`` (cfg is unused: the demo writes its own config)."""
    from rich.console import Console

    # a pipe or CI log has no width: give the result table room instead of rich's 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not args.log_level:
        # the progress bars tell the story; library INFO lines (highdicom, reader) would drown it
        logging.getLogger().setLevel(logging.WARNING)
    opts = DemoOptions.from_args(args)
    workdir: Path = (args.workdir or Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]dicom-node demo[/] — working in {workdir}")
    t0 = time.monotonic()
    try:
        studies = run_demo(workdir, opts, console=console)
    except (DemoError, RuntimeError) as exc:  # our own checks and peers that did not start
        console.print(f"[bold red]demo failed:[/] {exc}")
        console.print(f"(outputs so far are in {workdir})")
        return 1
    except Exception as exc:
        log.exception("demo failed")
        console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
        return 1
    print_table(studies, workdir, console)
    console.print(f"metrics report: {report_path(workdir / 'model')}")
    console.print(f"segmenter report: {report_path(workdir / 'segmenter')}")
    console.print(f"total demo time {time.monotonic() - t0:.0f} s; everything is in {workdir}")
    return 0 if not any(s.sr_errors or s.seg_errors for s in studies) else 3
