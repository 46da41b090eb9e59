"""``dicom-node synth``: a synthetic multi-vendor rectus femoris ultrasound cohort.

Writes what three kinds of scanner would send for each participant (US images, cine loops and a
DICOM-SEG per image), the generator's truth per image (mask, tissue box, spacing) so the reader
can be checked to the pixel, ``labels.csv`` and ``manifest.json`` (layout: docs/contracts.md).
Participants are independent random streams, so they are generated in parallel worker processes
and the output is byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.uid import generate_uid

from training.synth_cohort import LABEL_COLUMNS, Participant, draw_participant
from training.synth_dicom import (
    FOLLOWUP_DATE,
    PROFILES,
    STUDY_DATE,
    build_us,
    compose_frame,
    make_layout,
    mmode_strip,
    ui_template,
)
from training.synth_image import anatomy_for, render
from training.synth_seg import build_seg

log = logging.getLogger(__name__)

# A DCMTK storescu profile proposing every (SOP class, transfer syntax) this generator writes, so
# a whole cohort goes in one association: storescu's -x options offer only one compressed syntax
# per run and its default profile lacks the Segmentation SOP class.
STORESCU_CFG = """\
# /usr/bin/storescu -xf storescu.cfg Synth +sd +r HOST PORT dicom
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[JPEGBaseline]
TransferSyntax1 = JPEGBaseline
[RLE]
TransferSyntax1 = RLELossless

[[PresentationContexts]]
[SynthContexts]
PresentationContext1 = UltrasoundImageStorage\\JPEGBaseline
PresentationContext2 = UltrasoundImageStorage\\RLE
PresentationContext3 = UltrasoundImageStorage\\Uncompressed
PresentationContext4 = UltrasoundMultiframeImageStorage\\JPEGBaseline
PresentationContext5 = UltrasoundMultiframeImageStorage\\RLE
PresentationContext6 = UltrasoundMultiframeImageStorage\\Uncompressed
PresentationContext7 = SegmentationStorage\\Uncompressed

[[Profiles]]
[Synth]
PresentationContexts = SynthContexts
"""
CINE_FRAMES = 9  # odd: the middle frame is unambiguous
QUIRK_OF = {"supersonic": "side-by-side", "mindray": "m-mode", "samsung": "palette"}


@dataclass
class CohortSummary:
    """What :func:`generate_cohort` wrote.

    Attributes:
        out_dir: the cohort folder.
        labels_csv: ``out_dir/labels.csv``.
        manifest: ``out_dir/manifest.json``.
        dicom_dir: ``out_dir/dicom``.
        truth_dir: ``out_dir/truth``.
        participants: number of participants.
        studies: number of studies (baseline + follow-up).
        us_objects: number of US objects (single- and multi-frame).
        seg_objects: number of DICOM-SEG objects.
        positives: participants with sarcopenia.
        oracle_auc: AUC of the latent muscle score the images were rendered from (the best an
            image-only model could reach); None when only one class was drawn.
        vendors: studies per vendor profile.
        seconds: wall time of the generation.
    """

    out_dir: Path
    labels_csv: Path
    manifest: Path
    dicom_dir: Path
    truth_dir: Path
    participants: int
    studies: int
    us_objects: int
    seg_objects: int
    positives: int
    oracle_auc: float | None
    vendors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _uid(seed: int, *parts: Any) -> str:
    """Deterministic UID from the seed and a path of names (no clock, no host entropy)."""
    return generate_uid(entropy_srcs=["dicom-node-synth", str(seed), *map(str, parts)])


def _patient_header(p: Participant, patient_id: str) -> dict[str, Any]:
    """Patient module values (the follow-up is 6 months later: same age on the form)."""
    v = p.values
    age = v["age"]
    header: dict[str, Any] = {
        "PatientName": f"SYNTH^{p.participant_id}",
        "PatientID": patient_id,
        "PatientBirthDate": "",
        "PatientSex": v["sex"],
        "PatientAge": f"{age:03d}Y",
        "PatientSize": f"{v['height_cm'] / 100:.2f}",
        "PatientWeight": f"{v['weight_kg']:.1f}",
    }
    return header


@dataclass(frozen=True)
class _Job:
    seed: int
    index: int
    vendors: tuple[str, ...]
    follow_up: bool
    image_scale: float
    out_dir: str


def _study_plan(job: _Job, rng: np.random.Generator) -> dict[str, Any]:
    """Per-participant choices: vendor, laterality, SEG delivery; guarantees coverage.

    Participants are dealt to vendors round-robin; the first of each vendor always has a cine
    loop and the vendor's quirk, the second sends its SEGs late and the third sends no SEG, so
    even a 12-participant cohort exercises every path of the reader and the node.
    """
    vendor = job.vendors[job.index % len(job.vendors)]
    rank = job.index // len(job.vendors)
    seg_mode = "normal"
    if rank == 1 or (rank > 2 and rng.random() < 0.10):
        seg_mode = "late"
    elif rank == 2 or (rank > 2 and rng.random() < 0.08):
        seg_mode = "none"
    return {"vendor": vendor, "rank": rank, "seg_mode": seg_mode,
            "laterality": "R" if rng.random() < 0.8 else "L"}


def _make_object(rng: np.random.Generator, p: Participant, latent: float, profile_name: str,
                 model: tuple[str, str], quirk: str, n_frames: int,
                 scale: float) -> tuple[list[np.ndarray], np.ndarray, Any]:
    """Render one object's frames (full screen, RGB) and its per-frame RF mask."""
    profile = PROFILES[profile_name]
    layout = make_layout(profile, scale, quirk)
    r0, c0, r1, c1 = layout.tissue_box
    h, w = r1 - r0, c1 - c0
    anatomy = anatomy_for(latent, p.values["sex"], p.values.get("bmi"), rng)
    margin = 6 if n_frames > 1 else 0
    big, big_mask = render(anatomy, h + 2 * margin, w + 2 * margin, layout.spacing_cm[0], rng)
    ui = ui_template(profile_name, model[0], model[1], layout)
    focus_row = r0 + int(anatomy.focus_cm / layout.spacing_cm[0])
    mmode = None
    if quirk == "m-mode":
        reg = layout.regions[1]
        mmode = mmode_strip(big, reg["RegionLocationMaxY1"] - reg["RegionLocationMinY0"] + 1,
                            reg["RegionLocationMaxX1"] - reg["RegionLocationMinX0"] + 1, rng)
    frames, masks = [], np.zeros((n_frames, layout.rows, layout.cols), bool)
    phase = rng.uniform(0, 2 * np.pi)
    for f in range(n_frames):
        # probe/breathing motion between cine frames: a few pixels, different per frame
        dy = int(round(margin + (margin - 1) * np.sin(phase + f * 0.8))) if margin else 0
        dx = int(round(margin + (margin - 2) * np.cos(phase + f * 0.6))) if margin else 0
        tissue = big[dy:dy + h, dx:dx + w]
        masks[f, r0:r1, c0:c1] = big_mask[dy:dy + h, dx:dx + w]
        frames.append(compose_frame(tissue, layout, ui, mmode, focus_row))
    return frames, masks, layout


def _object_kind(plan: dict[str, Any], vendor: str, k: int, followup: bool,
                 rng: np.random.Generator) -> tuple[str, int]:
    """(quirk, number of frames) of the k-th object of a study (see :func:`_study_plan`)."""
    profile = PROFILES[vendor]
    quirk, n_frames = "", 1
    if plan["rank"] == 0 and not followup:
        if k == 0 and profile.cine_prob > 0:
            n_frames = CINE_FRAMES
        if k == 1:
            quirk = QUIRK_OF[vendor]
        if k == 2 and vendor == "samsung":
            quirk = "planar"
    else:
        if rng.random() < profile.quirk_prob:
            quirk = QUIRK_OF[vendor]
        elif vendor == "samsung" and rng.random() < 0.15:
            quirk = "planar"
        if rng.random() < profile.cine_prob:
            n_frames = CINE_FRAMES
    if quirk == "palette" and n_frames > 1:
        quirk = ""  # palette colour cine loops do not occur in practice
    return quirk, n_frames


def _write_object(job: _Job, p: Participant, study: dict[str, Any], k: int, quirk: str,
                  n_frames: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Render and write one US object, its truth and (unless the study has none) its SEG.

    Returns:
        The manifest file entries (the US object, then its SEG if written).
    """
    out, vendor = Path(job.out_dir), study["vendor"]
    profile, model = PROFILES[vendor], study["_model"]
    frames, masks, layout = _make_object(rng, p, study["latent"], vendor, model, quirk,
                                         n_frames, job.image_scale)
    tag = (p.participant_id, study["followup"])
    sop = _uid(job.seed, *tag, "us", k)
    ds = build_us(frames, profile=profile, layout=layout, model=model, patient=study["_header"],
                  uids={"study": study["study_uid"], "series": study["_us_series"], "sop": sop,
                        "accession": study["_accession"]},
                  instance_number=k + 1, series_number=1, laterality=study["laterality"],
                  study_date=study["_date"])
    path = f"{study['_dir']}/US_{k + 1:03d}.dcm"
    ds.save_as(out / path, enforce_file_format=True)
    seg_frames = [n_frames // 2 + 1]  # the annotator outlines the middle frame
    has_seg = study["seg"] != "none"
    np.savez_compressed(
        out / "truth" / f"{sop}.npz", mask=masks,
        tissue_box=np.asarray(layout.tissue_box, np.int32),
        spacing_cm=np.asarray(layout.spacing_cm, np.float64),
        seg_frames=np.asarray(seg_frames if has_seg else [], np.int32))
    entries = [{
        "path": path, "sop_instance_uid": sop, "kind": "us",
        "series_instance_uid": study["_us_series"], "frames": n_frames, "references": [],
        "send_late": False, "quirk": quirk,
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "photometric": ds.PhotometricInterpretation, "model": model[0],
    }]
    if has_seg:
        seg_sop = _uid(job.seed, *tag, "seg", k)
        seg_series = _uid(job.seed, *tag, "seg-series", k)
        seg = build_seg(ds, masks, seg_frames,
                        uids={"series": seg_series, "sop": seg_sop,
                              "dimension": _uid(job.seed, seg_sop, "dimension")},
                        laterality=study["laterality"], series_number=100 + k + 1,
                        content_date=study["_date"])
        seg_path = f"{study['_dir']}/SEG_{k + 1:03d}.dcm"
        seg.save_as(out / seg_path, enforce_file_format=True)
        entries.append({
            "path": seg_path, "sop_instance_uid": seg_sop, "kind": "seg",
            "series_instance_uid": seg_series, "frames": len(seg_frames),
            "references": [sop], "referenced_frames": seg_frames,
            "send_late": study["seg"] == "late",
        })
    return entries


def _participant(job: _Job) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate and write every object of one participant; returns (label rows, studies)."""
    p = draw_participant(job.seed, job.index)
    rng = np.random.default_rng([job.seed, job.index, 2])
    plan = _study_plan(job, rng)
    vendor = plan["vendor"]
    profile = PROFILES[vendor]
    model = profile.models[int(rng.integers(len(profile.models)))]
    patient_id = f"SYN{job.seed}-{job.index + 1:04d}"
    rows, studies = [], []
    for study_n in range(2 if job.follow_up else 1):
        followup = study_n == 1
        rel_dir = f"dicom/{p.participant_id}/study-{study_n + 1}"
        (Path(job.out_dir) / rel_dir).mkdir(parents=True, exist_ok=True)
        study: dict[str, Any] = {
            "study_uid": _uid(job.seed, p.participant_id, study_n, "study"),
            "patient_id": patient_id, "participant_id": p.participant_id, "vendor": vendor,
            "model": model[0], "followup": int(followup), "label": p.label,
            # the follow-up 6 months later: the muscle has deteriorated a little
            "latent": round(p.latent + (rng.normal(0.15, 0.1) if followup else 0.0), 4),
            "laterality": plan["laterality"], "seg": plan["seg_mode"], "files": [],
            "_model": model, "_dir": rel_dir, "_header": _patient_header(p, patient_id),
            "_us_series": _uid(job.seed, p.participant_id, study_n, "us-series"),
            "_date": FOLLOWUP_DATE if followup else STUDY_DATE,
            "_accession": f"A{job.seed % 1000:03d}{job.index:05d}{study_n}",
        }
        for k in range(int(rng.integers(3, 6))):
            quirk, n_frames = _object_kind(plan, vendor, k, followup, rng)
            study["files"].extend(_write_object(job, p, study, k, quirk, n_frames, rng))
        studies.append({key: v for key, v in study.items() if not key.startswith("_")})
        rows.append({"participant_id": p.participant_id, "patient_id": patient_id,
                     "study_instance_uid": study["study_uid"], "label": p.label, **p.values,
                     "vendor": vendor, "followup": int(followup)})
    log.debug("participant %s: %d studies written (%s)", p.participant_id, len(studies), vendor)
    return rows, studies


def _worker_init() -> None:
    """One BLAS thread per worker (processes give the parallelism) and warm DICOM tables."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    _warm_up()


def _warm_up() -> None:
    """Build one tiny object of each kind so the DICOM standard tables are loaded once."""
    p = draw_participant(0, 0)
    rng = np.random.default_rng(0)
    profile = PROFILES["samsung"]
    frames, masks, layout = _make_object(rng, p, 0.0, "samsung", profile.models[0], "", 1, 0.1)
    ds = build_us(frames, profile=profile, layout=layout, model=profile.models[0],
                  patient=_patient_header(p, "WARM"),
                  uids={"study": "1.2.3", "series": "1.2.3.1", "sop": "1.2.3.1.1",
                        "accession": "W"},
                  instance_number=1, series_number=1, laterality="R", study_date=STUDY_DATE)
    build_seg(ds, masks, [1], uids={"series": "1.2.3.2", "sop": "1.2.3.2.1",
                                    "dimension": "1.2.3.3"},
              laterality="R", series_number=2, content_date=STUDY_DATE)


def _oracle_auc(participants: Sequence[Participant]) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = [p.label for p in participants]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, [p.latent for p in participants]))


def generate_cohort(out_dir: Path, participants: int, seed: int,
                    vendors: Sequence[str] | None = None, follow_up: bool = False, *,
                    image_scale: float = 1.0, workers: int | None = None) -> CohortSummary:
    """Generate a cohort folder (docs/contracts.md "Synthetic cohort folder").

    Args:
        out_dir: destination; created if needed (existing files with the same names are
            overwritten).
        participants: number of participants.
        seed: random seed; the same seed gives byte-identical files.
        vendors: profile names (``supersonic``, ``mindray``, ``samsung``); default all three.
        follow_up: add a follow-up study (6 months later) per participant.
        image_scale: scale of every frame size (0.5 for fast tests); physical depth is kept, so
            the pixel spacing grows accordingly.
        workers: worker processes (default: number of CPUs); 1 runs in this process.

    Returns:
        A :class:`CohortSummary`.
    """
    t0 = time.perf_counter()
    vendors = tuple(vendors or PROFILES)
    unknown = [v for v in vendors if v not in PROFILES]
    if unknown:
        raise ValueError(f"unknown vendor profile(s) {unknown}; choose from {list(PROFILES)}")
    if participants < 1:
        raise ValueError("participants must be >= 1")
    out_dir = Path(out_dir)
    (out_dir / "truth").mkdir(parents=True, exist_ok=True)
    (out_dir / "dicom").mkdir(parents=True, exist_ok=True)
    jobs = [_Job(seed, i, vendors, follow_up, image_scale, str(out_dir))
            for i in range(participants)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and participants > 2:
        # forkserver: workers fork from a clean single-threaded server (safe inside a node or
        # a test session that runs threads), which has imported this module once already
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
        else:  # pragma: no cover - Windows/macOS
            ctx = mp.get_context("spawn")
        with ctx.Pool(min(workers, participants), initializer=_worker_init) as pool:
            results = pool.map(_participant, jobs, chunksize=4)
    else:
        results = [_participant(j) for j in jobs]
    rows = [r for rs, _ in results for r in rs]
    studies = [s for _, ss in results for s in ss]
    people = [draw_participant(seed, i) for i in range(participants)]
    oracle = _oracle_auc(people)

    labels_csv = out_dir / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LABEL_COLUMNS})
    n_us = sum(1 for s in studies for f in s["files"] if f["kind"] == "us")
    n_seg = sum(1 for s in studies for f in s["files"] if f["kind"] == "seg")
    manifest = {
        "generator": "dicom-node synth", "seed": seed, "participants": participants,
        "vendors": list(vendors), "follow_up": follow_up, "image_scale": image_scale,
        "counts": {"studies": len(studies), "us": n_us, "seg": n_seg,
                   "positives": sum(p.label for p in people)},
        "oracle_auc": oracle,
        "push": "/usr/bin/storescu -xf storescu.cfg Synth +sd +r HOST PORT dicom",
        "studies": studies,
    }
    (out_dir / "storescu.cfg").write_text(STORESCU_CFG)
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=1))
    summary = CohortSummary(
        out_dir=out_dir, labels_csv=labels_csv, manifest=manifest_path,
        dicom_dir=out_dir / "dicom", truth_dir=out_dir / "truth", participants=participants,
        studies=len(studies), us_objects=n_us, seg_objects=n_seg,
        positives=sum(p.label for p in people), oracle_auc=oracle,
        vendors=dict(Counter(s["vendor"] for s in studies)),
        seconds=time.perf_counter() - t0,
    )
    log.info("synthetic cohort: %d participants, %d studies, %d US, %d SEG in %.1f s (seed %d)",
             participants, len(studies), n_us, n_seg, summary.seconds, seed)
    return summary
