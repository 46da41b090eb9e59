"""``dicom-node demo``: the whole pipeline on synthetic data, end to end, in minutes.

generate a cohort -> train a small real fold ensemble (report written) -> start an embedded PACS and
``dicom-node serve`` -> push held-out studies as a modality would -> wait for the SRs and heat maps
at the PACS -> read them back and print a table -> stop everything it started.

Why a separate process for the node: the demo exercises exactly what a hospital runs (the same
``serve`` command and config file), and a crash in the node cannot take the demo's clean-up with
it. Every wait is bounded; any failure stops the demo with a message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config import Config, config_from_dict
from dicom_node.demo_pacs import (
    DCMTK_STORESCU,
    NodeProcess,
    Peer,
    free_port,
    start_pacs,
    storescu,
)
from dicom_node.errors import DicomNodeError

log = logging.getLogger(__name__)

NODE_AET = "DICOMNODE"
MODALITY_AET = "STORESCU"
SR_MODALITY = "SR"
# Demo defaults: sized so that generate + train + serve + score finishes well under 10 minutes on
# 2 CPU cores (measured figures in BENCHMARKS.md).
# resnet10t (BatchNorm) learns from random init within a demo budget; convnext_atto at the same
# budget stayed at chance (CV AUC 0.52 vs 0.65 measured on the same 45-participant cohort).
DEFAULTS = {"participants": 45, "held_out": 6, "epochs": 12, "image_size": 96,
            "backbone": "resnet10t", "timeout": 300.0}

# SR codes (dicom_node/results.py writes them; TID 1500)
_PROBABILITY = "122157"
_AREA = "42798000"
_THICKNESS = "59089-3"
_SD = "386136009"
_PRESENT = "52101004"
_ABSENT = "272519000"
_SARCOPENIA = "M62.84"


class DemoError(DicomNodeError):
    """A demo step failed; the message says which step and what to look at."""


@dataclass
class DemoStudy:
    """One held-out study pushed to the node."""

    study_uid: str
    patient_id: str
    participant: str
    vendor: str
    truth: str
    files: list[Path]
    sr: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def _generate(out: Path, participants: int, seed: int) -> dict:
    from training.synthetic import generate_cohort

    generate_cohort(out, participants, seed)
    manifest = json.loads((out / "manifest.json").read_text())
    if not (out / "labels.csv").exists():
        raise DemoError(f"cohort generator wrote no labels.csv in {out}")
    return manifest


def _read_labels(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _participant_of(row: dict[str, str]) -> str:
    return row.get("participant_id") or row.get("patient_id") or ""


def _split(manifest: dict, labels: list[dict[str, str]], held_out: int
           ) -> tuple[set[str], list[dict]]:
    """Pick held-out participants: round-robin over vendors, alternating the label."""
    by_study = {r.get("study_instance_uid", ""): r for r in labels}
    by_patient = {r.get("patient_id", ""): r for r in labels}
    studies = manifest.get("studies", [])
    buckets: dict[tuple[str, str], list[dict]] = {}
    for st in studies:
        row = by_study.get(st["study_uid"]) or by_patient.get(st.get("patient_id", ""), {})
        if str(st.get("followup", row.get("followup", "0"))) not in ("", "0"):
            continue
        label = str(st.get("label", row.get("label", "")))
        buckets.setdefault((st.get("vendor", "?"), label), []).append(st)
    vendors = sorted({v for v, _ in buckets})
    chosen: list[dict] = []
    picks = [(v, lab) for i in range(held_out) for v in vendors for lab in ("1", "0")]
    for key in picks:
        if len(chosen) >= held_out:
            break
        if buckets.get(key):
            chosen.append(buckets[key].pop(0))
    held = {st.get("participant_id") or _participant_of(by_patient.get(st.get("patient_id", ""),
                                                                      {})) for st in chosen}
    return held, chosen


def _training_set(cohort: Path, manifest: dict, labels: list[dict[str, str]], held: set[str],
                  out: Path) -> tuple[Path, Path, int, int]:
    """Hard-link the non-held-out studies into ``out`` and write their labels.csv."""
    train_rows = [r for r in labels if _participant_of(r) not in held]
    keep_patients = {r.get("patient_id", "") for r in train_rows}
    dicom = out / "dicom"
    for st in manifest.get("studies", []):
        if st.get("patient_id", "") not in keep_patients:
            continue
        for f in st["files"]:
            src = cohort / f["path"]
            dst = dicom / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    labels_path = out / "labels.csv"
    with labels_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(labels[0].keys()))
        w.writeheader()
        w.writerows(train_rows)
    pos = sum(1 for r in train_rows if r.get("label") == "1" and r.get("followup", "0") in ("", "0"))
    neg = sum(1 for r in train_rows if r.get("label") == "0" and r.get("followup", "0") in ("", "0"))
    return dicom, labels_path, pos, neg


def _train(dicom: Path, labels: Path, model_dir: Path, *, backbone: str, image_size: int,
           epochs: int, folds: int, console: Any) -> None:
    """Run the real trainer (what ``dicom-node train`` runs) with a demo-sized TrainConfig."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from training.run import run_training

    cfg = config_from_dict({
        "node": {"allow_any_calling_aet": True},
        "scoring": {"enabled": False},
        "train": {"backbone": backbone, "input_size": image_size, "folds": folds,
                  "epochs": epochs, "warmup_epochs": min(1, max(epochs - 1, 0)),
                  "batch_size": 16, "lr": 1e-3, "output_dir": str(model_dir),
                  "torch_threads": max(1, min(os.cpu_count() or 1, 4)), "device": "cpu"},
    }, base_dir=model_dir.parent).train
    torch.set_num_threads(cfg.torch_threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} epochs"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"training {folds} folds", total=folds * epochs)

        def on_epoch_end(fold: int, epoch: int) -> None:
            bar.advance(task)
            if not console.is_terminal and epoch + 1 == epochs:  # logs have no live bar
                console.print(f"fold {fold + 1}/{folds} trained")

        path = run_training(dicom, labels, model_dir, cfg, on_epoch_end=on_epoch_end)
    if path is None or not (model_dir / "model.json").exists():
        raise DemoError(f"the trainer wrote no model.json in {model_dir}")


def node_toml(workdir: Path, model_dir: Path, pacs: Peer, threads: int) -> dict:
    """The demo node's config: loopback, scoring on, the embedded PACS as the only destination."""
    return {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port(),
                 "data_dir": str(workdir / "node-data"),
                 "allowed_calling_aets": [MODALITY_AET, "PYNETDICOM"],
                 "disk_reserve_mb": 0, "log_level": "INFO"},
        "completion": {"idle_seconds": 3, "max_wait_seconds": 60, "require_seg": True,
                       "on_missing_seg": "score-whole-region", "poll_seconds": 0.5},
        "worker": {"enabled": True, "poll_seconds": 0.3, "retry_base_seconds": 2,
                   "max_attempts": 2},
        "scoring": {"enabled": True, "model_dir": str(model_dir), "cam_enabled": True,
                    "torch_threads": threads, "device": "cpu"},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.port}],
        "delivery": {"poll_seconds": 0.5, "retry_initial_seconds": 2, "retry_max_seconds": 10,
                     "timeout_seconds": 30},
    }


# storescu proposes uncompressed syntaxes plus at most one compressed family (-x option): files
# are sent in runs of the same transfer syntax, each run with the option that proposes it.
_STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


def _ts_runs(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Consecutive runs of files that one storescu -x option can send (order kept)."""
    import pydicom

    runs: list[tuple[str, list[Path]]] = []
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        opt = _STORESCU_TS_OPTION.get(ts, "-x=")
        if runs and runs[-1][0] == opt:
            runs[-1][1].append(f)
        else:
            runs.append((opt, [f]))
    return runs


def _push(study: DemoStudy, node: NodeProcess, profile: Path | None = None) -> None:
    """Send one study as a modality: DCMTK storescu when installed, else the node's own SCU.

    With the cohort's storescu profile (every SOP class/transfer syntax it wrote) the study goes
    in one association, as a modality sends it; without it, one association per syntax run.
    """
    if DCMTK_STORESCU.exists():
        if profile is not None and profile.exists():
            storescu(study.files, node.port, node.ae_title, aet=MODALITY_AET, timeout=120,
                     extra=("-xf", str(profile), "Synth", "-pdu", "131072"))
            return
        for opt, files in _ts_runs(study.files):
            storescu(files, node.port, node.ae_title, aet=MODALITY_AET, timeout=120,
                     extra=("-R", opt, "-pdu", "131072"))
        return
    from dicom_node.scu import store_files

    results = store_files("127.0.0.1", node.port, study.files, calling_aet="PYNETDICOM",
                          called_aet=node.ae_title, timeout=60)
    bad = [(uid, s) for uid, s in results if s not in (0,) and not 0xB000 <= s <= 0xB007]
    if bad:
        raise DemoError(f"study {study.study_uid}: the node refused {bad}")


# --------------------------------------------------------------------------------------------
# reading results back
# --------------------------------------------------------------------------------------------


def _code(item: Any, attr: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(attr)
    return str(seq[0].CodeValue) if seq else ""


def _walk(items: Any) -> Iterator[Any]:
    for it in items or []:
        yield it
        yield from _walk(it.get("ContentSequence"))


def summarize_sr(ds: Any) -> dict[str, Any]:
    """Study probability, decision, mean per-image fold SD, CSA and thickness from a TID 1500 SR."""
    out: dict[str, Any] = {"probability": None, "positive": None, "spread": [], "csa": [],
                           "thickness": [], "images": 0}
    for group in _walk(ds.get("ContentSequence")):
        if group.get("ValueType") != "CONTAINER" or _code(group) != "125007":
            continue
        children = list(group.get("ContentSequence") or [])
        finding = next((_code(c, "ConceptCodeSequence") for c in children
                        if _code(c) == "121071"), "")
        study_level = finding == _SARCOPENIA
        out["images"] += 0 if study_level else 1
        for c in children:
            if c.get("ValueType") == "CODE" and _code(c) == _SARCOPENIA:
                value = _code(c, "ConceptCodeSequence")
                out["positive"] = True if value == _PRESENT else False if value == _ABSENT else None
            if c.get("ValueType") != "NUM" or not c.get("MeasuredValueSequence"):
                continue
            value = float(c.MeasuredValueSequence[0].NumericValue)
            derivation = {_code(m, "ConceptCodeSequence") for m in c.get("ContentSequence") or []
                          if _code(m) == "121401"}
            name = _code(c)
            if name == _PROBABILITY and study_level and not derivation:
                out["probability"] = value
            elif name == _PROBABILITY and _SD in derivation:
                out["spread"].append(value)
            elif name == _AREA:
                out["csa"].append(value)
            elif name == _THICKNESS:
                out["thickness"].append(value)
    return out


def _dciodvfy_errors(path: Path) -> int | None:
    exe = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists()
                                       else None)
    if exe is None:
        return None
    r = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=60)
    return sum(1 for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error"))


def _collect_results(pacs: Peer, studies: dict[str, DemoStudy], out: Path,
                     seen: dict[Path, tuple[str, str]]) -> None:
    """Sort what the PACS holds into the studies' SR and heat maps (headers read once)."""
    import pydicom

    for path in pacs.received():
        if path not in seen:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            seen[path] = (str(ds.get("StudyInstanceUID", "")), str(ds.get("Modality", "")))
        study_uid, modality = seen[path]
        st = studies.get(study_uid)
        if st is None:
            continue
        if modality == SR_MODALITY and st.sr is None:
            st.sr = path
        elif modality != SR_MODALITY and path not in st.heatmaps:
            st.heatmaps.append(path)


def _failed_jobs(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as con:
            return [(r[0], r[1] or "") for r in con.execute(
                "select study_uid, last_error from jobs where state = 'failed'")]
    except sqlite3.Error:
        return []


def _study_states(db: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as con:
            return dict(con.execute("select study_uid, state from studies").fetchall())
    except sqlite3.Error:
        return {}


def _export(st: DemoStudy, out: Path) -> Path:
    """Copy the SR and write PNG previews of the heat maps into ``out/<patient>``."""
    import numpy as np
    import pydicom
    from PIL import Image

    folder = out / re.sub(r"[^A-Za-z0-9_.-]", "_", st.patient_id or st.study_uid[-12:])
    folder.mkdir(parents=True, exist_ok=True)
    if st.sr is not None:
        shutil.copy2(st.sr, folder / "sr.dcm")
    for i, path in enumerate(sorted(st.heatmaps), start=1):
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        if arr.ndim == 4:
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-6)).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"heatmap_{i}.png")
    return folder


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def _fmt(values: list[float], digits: int = 2) -> str:
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


def run_demo(workdir: Path, *, participants: int, held_out: int, epochs: int, image_size: int,
             backbone: str, timeout: float, seed: int = 0, prefer_orthanc: bool = True,
             console: Any = None) -> list[DemoStudy]:
    """Run every step; return the held-out studies with their results read back from the PACS."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=False)
    t_start = time.monotonic()

    def step(n: int, text: str) -> None:
        console.rule(f"[bold]{n}/5 {text}[/]  (+{time.monotonic() - t_start:.0f} s)")

    step(1, f"Generating a synthetic cohort: {participants} participants, 3 vendors, SEG, labels")
    cohort = workdir / "cohort"
    with console.status("generating DICOM US images, SEGs and labels ..."):
        manifest = _generate(cohort, participants, seed)
    labels = _read_labels(cohort / "labels.csv")
    held, chosen = _split(manifest, labels, held_out)
    if not chosen:
        raise DemoError("no held-out study could be chosen from the cohort manifest")
    dicom, train_labels, pos, neg = _training_set(cohort, manifest, labels, held,
                                                  workdir / "train")
    folds = max(2, min(5, pos, neg))
    console.print(f"cohort in {cohort}: {len(manifest.get('studies', []))} studies; training on "
                  f"{pos} sarcopenic + {neg} non-sarcopenic participants, {len(chosen)} held out")

    step(2, f"Training a {folds}-fold {backbone} ensemble ({epochs} epochs, {image_size} px) "
            "with the real trainer")
    model_dir = workdir / "model"
    _train(dicom, train_labels, model_dir, backbone=backbone, image_size=image_size,
           epochs=epochs, folds=folds, console=console)
    console.print(f"model written to {model_dir}")

    step(3, "Starting the embedded PACS and dicom-node serve")
    pacs: Peer | None = None
    node: NodeProcess | None = None
    studies: dict[str, DemoStudy] = {}
    by_patient = {r.get("patient_id", ""): r for r in labels}
    for st in chosen:
        row = by_patient.get(st.get("patient_id", ""), {})
        files = sorted(st["files"], key=lambda f: bool(f.get("send_late")))
        studies[st["study_uid"]] = DemoStudy(
            study_uid=st["study_uid"], patient_id=st.get("patient_id", ""),
            participant=_participant_of(row), vendor=st.get("vendor", "?"),
            truth={"1": "sarcopenia", "0": "no sarcopenia"}.get(row.get("label", ""), "?"),
            files=[cohort / f["path"] for f in files])
    try:
        with console.status("starting the PACS ..."):
            pacs = start_pacs(workdir / "pacs", [NODE_AET], prefer_orthanc=prefer_orthanc)
        console.print(f"PACS: {type(pacs).__name__} AE {pacs.ae_title} at 127.0.0.1:{pacs.port}")
        threads = max(1, min(os.cpu_count() or 1, 4))
        with console.status("starting dicom-node serve (loading torch and the model) ..."):
            node = NodeProcess(workdir / "node", node_toml(workdir, model_dir, pacs, threads),
                               start_timeout=min(timeout, 240))
        console.print(f"node: AE {node.ae_title} at 127.0.0.1:{node.port}, config "
                      f"{node.config_path}, log {node.log_path}")

        step(4, f"Pushing {len(studies)} held-out studies like a modality "
                f"({'DCMTK storescu' if DCMTK_STORESCU.exists() else 'dicom-node push'})")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                      "/{task.total}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("C-STORE studies", total=len(studies))
            for st in studies.values():
                _push(st, node, cohort / "storescu.cfg")
                bar.advance(task)

        step(5, "Waiting for SRs and heat maps at the PACS")
        results_dir = workdir / "results"
        seen: dict[Path, tuple[str, str]] = {}
        db = Path(node.data_dir) / "index.sqlite"
        deadline = time.monotonic() + timeout
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                      "/{task.total}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("studies with SR + heat maps at the PACS", total=len(studies))
            while True:
                _collect_results(pacs, studies, results_dir, seen)
                done = [s for s in studies.values() if s.sr is not None and s.heatmaps]
                bar.update(task, completed=len(done))
                if len(done) == len(studies):
                    break
                if not node.alive():
                    raise DemoError(f"dicom-node serve exited (code {node.proc.returncode}); "
                                    f"see {node.log_path}")
                failed = [(u, e) for u, e in _failed_jobs(db) if u in studies]
                if failed:
                    raise DemoError("scoring failed for study " + "; ".join(
                        f"{u}: {e[-400:]}" for u, e in failed) + f" (node log {node.log_path})")
                if time.monotonic() > deadline:
                    states = _study_states(db)
                    missing = ", ".join(f"{s.patient_id} ({states.get(s.study_uid, 'not received')}"
                                        f", SR {'yes' if s.sr else 'no'}, heat maps "
                                        f"{len(s.heatmaps)})" for s in studies.values()
                                        if s not in done)
                    raise DemoError(f"timed out after {timeout:.0f} s waiting for results of "
                                    f"{missing}; node log {node.log_path}")
                time.sleep(1.0)
            # heat maps may trail the SR by a moment: wait until each study has one per image
            settle = time.monotonic() + 20
            while time.monotonic() < settle:
                _collect_results(pacs, studies, results_dir, seen)
                if all(len(s.heatmaps) >= summarize_sr(_read(s.sr))["images"]
                       for s in studies.values()):
                    break
                time.sleep(1.0)
        for st in studies.values():
            st.summary = summarize_sr(_read(st.sr))
            st.summary["sr_errors"] = _dciodvfy_errors(st.sr)
            st.summary["folder"] = _export(st, results_dir)
    finally:
        with console.status("stopping the node and the PACS ..."):
            if node is not None:
                node.stop()
            if pacs is not None:
                pacs.stop()
    console.print(f"done in {time.monotonic() - t_start:.0f} s")
    return list(studies.values())


def _read(path: Path | None) -> Any:
    import pydicom

    if path is None:
        raise DemoError("internal: SR path missing")
    return pydicom.dcmread(path)


def print_table(studies: list[DemoStudy], workdir: Path, console: Any) -> None:
    """The result table: one row per held-out study."""
    from rich.table import Table

    table = Table(title="Held-out studies scored by dicom-node (research use only)")
    for col in ("patient", "vendor", "P(sarcopenia) ± fold SD", "decision", "truth",
                "RF CSA cm²", "RF thickness cm", "SR check", "SR + heat-map PNGs"):
        table.add_column(col, no_wrap=col in ("patient", "decision", "truth"))
    correct = 0
    for st in studies:
        s = st.summary
        prob = "-" if s.get("probability") is None else f"{s['probability']:.2f}"
        decision = {True: "sarcopenia", False: "no sarcopenia"}.get(s.get("positive"), "?")
        correct += decision == st.truth
        errs = s.get("sr_errors")
        check = "n/a" if errs is None else ("dciodvfy ok" if errs == 0 else f"{errs} errors")
        folder = Path(s.get("folder", workdir))
        table.add_row(st.patient_id, st.vendor, f"{prob} ± {_fmt(s.get('spread', []))}",
                      decision, st.truth, _fmt(s.get("csa", [])), _fmt(s.get("thickness", [])),
                      check, f"{os.path.relpath(folder, workdir)}/ (sr.dcm + {len(st.heatmaps)} PNG)")
    console.print(table)
    console.print(f"{correct}/{len(studies)} decisions match the synthetic truth. Paths are under "
                  f"{workdir}; RF CSA/thickness are '-' where no DICOM-SEG ROI came with the study "
                  "(scored on the whole tissue region).")


def _report_path(model_dir: Path) -> Path:
    for pattern in ("report.html", "report.md", "report*", "*.html", "*.md"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found[0]
    return model_dir


def demo_command(args: argparse.Namespace, cfg: Config) -> int:
    """Entry point of ``dicom-node demo`` (cfg is unused: the demo writes its own config)."""
    from rich.console import Console

    # a pipe or CI log has no width: give the result table room instead of rich's 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not getattr(args, "log_level", None):
        # the progress bars tell the story; library INFO lines (highdicom, reader) would drown it
        logging.getLogger().setLevel(logging.WARNING)
    opts = {k: getattr(args, k, None) for k in DEFAULTS}
    opts = {k: (v if v is not None else DEFAULTS[k]) for k, v in opts.items()}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]dicom-node demo[/] — working in {workdir}")
    t0 = time.monotonic()
    try:
        studies = run_demo(workdir, participants=int(opts["participants"]),
                           held_out=int(opts["held_out"]), epochs=int(opts["epochs"]),
                           image_size=int(opts["image_size"]), backbone=str(opts["backbone"]),
                           timeout=float(opts["timeout"]),
                           prefer_orthanc=not getattr(args, "no_orthanc", False),
                           console=console)
    except (DemoError, RuntimeError) as exc:  # our own checks and peers that did not start
        console.print(f"[bold red]demo failed:[/] {exc}")
        console.print(f"(outputs so far are in {workdir})")
        return 1
    except Exception as exc:
        log.exception("demo failed")
        console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
        return 1
    print_table(studies, workdir, console)
    console.print(f"metrics report: {_report_path(workdir / 'model')}")
    console.print(f"total demo time {time.monotonic() - t0:.0f} s; everything is in {workdir}")
    sr_bad = [s for s in studies if s.summary.get("sr_errors")]
    return 0 if not sr_bad else 3
