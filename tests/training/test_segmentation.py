"""Segmenter training on the synthetic cohort: folds, artifact, report, resume, serving parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.segmenter import load_segmenter, quality_control
from training.segmentation import (
    load_seg_samples,
    make_spec,
    run_segmentation_training,
    train_segmenter,
)
from training.segmentation_config import SegTrainConfig

# seconds, not accuracy: a 2-level UNet on a 0.1 cm/px grid, one epoch per fold
TINY = SegTrainConfig(arch_args={"channels": [4, 8], "strides": [2], "num_res_units": 0},
                      pixel_cm=0.1, n_folds=2, epochs=1, batch_size=8, threads=1,
                      augment=True, seed=3)


class _Stop(Exception):
    pass


def test_train_writes_a_servable_artifact_and_report(synth_cohort, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    lines: list[str] = []
    res = run_segmentation_training(synth_cohort.dicom_dir, synth_cohort.labels_csv, out, TINY,
                                    progress=lines.append)
    for name in ("model.json", "fold_0.safetensors", "fold_1.safetensors", "report.json",
                 "report.html", "bland_altman.png", "segmentation_oof.csv"):
        assert (out / name).is_file(), name
    assert not out.with_name("seg.work").exists()
    raw = json.loads((out / "model.json").read_text())
    assert raw["task"] == "segmentation" and raw["spec"]["pixel_cm"] == 0.1
    assert raw["spec"]["fov_px"] == [48, 64]

    # every annotated frame is held out exactly once, each participant in one fold only
    n_seg = sum(1 for s in json.loads(synth_cohort.manifest.read_text())["studies"]
                for f in s["files"] if f["kind"] == "seg")
    assert res.report["overall"]["n_images"] == len(res.records) == n_seg
    folds_of: dict[str, set[int]] = {}
    for r in res.records:
        folds_of.setdefault(r["participant_id"], set()).add(r["fold"])
        assert 0.0 <= r["dice"] <= 1.0
    assert all(len(f) == 1 for f in folds_of.values())
    assert set(res.report["per_vendor"]) == {r["vendor"] for r in res.records}
    assert res.report["overall"]["qc_passed"] + res.report["overall"]["qc_failed"] == n_seg
    assert any("fold 2/2" in line for line in lines)

    # the served fold model reproduces the evaluation of its held-out images
    seg = load_segmenter(out, folds=[0])
    samples, _ = load_seg_samples(synth_cohort.dicom_dir, make_spec(TINY),
                                  synth_cohort.labels_csv)
    rec = next(r for r in res.records if r["fold"] == 0)
    sample = next(s for s in samples if s.sop_uid == rec["sop_uid"])
    check = quality_control(seg.probability(sample.image, sample.spacing_cm),
                            sample.spacing_cm, seg.spec.threshold, seg.qc)
    cand = check.candidate if check.candidate is not None else np.zeros_like(sample.mask)
    dice = 2 * (cand & sample.mask).sum() / (cand.sum() + sample.mask.sum())
    assert dice == pytest.approx(rec["dice"], abs=1e-4)
    assert check.passed == rec["qc_passed"]


def test_an_interrupted_run_resumes_at_the_next_fold(synth_cohort, tmp_path: Path) -> None:
    samples, _ = load_seg_samples(synth_cohort.dicom_dir, make_spec(TINY),
                                  synth_cohort.labels_csv)
    out = tmp_path / "seg"

    def stop_in_second_fold(msg: str) -> None:
        if msg.startswith("fold 2/2 epoch"):
            raise _Stop

    with pytest.raises(_Stop):
        train_segmenter(samples, out, TINY, progress=stop_in_second_fold)
    assert not out.exists() and (tmp_path / "seg.work" / "fold_0.json").is_file()
    lines: list[str] = []
    first = train_segmenter(samples, out, TINY, progress=lines.append)
    assert any(line.startswith("fold 1/2: resumed") for line in lines)
    assert not any(line.startswith("fold 1/2 epoch") for line in lines)
    # the resume folder goes once the artifact is in place
    assert not (tmp_path / "seg.work").exists()
    assert (out / "model.json").is_file() and first.report["overall"]["n_images"] == len(samples)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SegTrainConfig(n_folds=1)
    with pytest.raises(ValueError):
        SegTrainConfig(pixel_cm=0.0)


def test_the_nodes_own_automatic_segs_are_never_training_references(tmp_path: Path) -> None:
    from dicom_node.results.seg import SegmentationModelId, build_ai_seg
    from tests.builders import build, make_seg, rf_mask, save

    src, _ = build()
    src.PatientID = "P1"
    save(src, tmp_path / "us.dcm")
    auto = build_ai_seg(src, rf_mask(), 1, SegmentationModelId("rf", "1", "1.2.3"))
    auto.save_as(tmp_path / "auto_seg.dcm", enforce_file_format=True)
    samples, skipped = load_seg_samples(tmp_path, make_spec(TINY))
    assert samples == [] and any("automatic DICOM-SEG" in s for s in skipped)
    make_seg([src], rf_mask()[None]).save_as(tmp_path / "manual_seg.dcm",
                                             enforce_file_format=True)
    samples, _ = load_seg_samples(tmp_path, make_spec(TINY))
    assert len(samples) == 1 and samples[0].participant_id == "P1"
