"""``dicom-node demo``: a reduced run end to end, plus its config and SR-reading helpers."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tomli_w
import tomllib

from dicom_node.config import config_from_dict
from dicom_node.demo.collect import dciodvfy_errors, dice_vs_truth, summarize_sr
from dicom_node.demo.node import node_toml
from testing.peers import PynetdicomPeer


def test_demo_node_config_is_valid_toml_and_config(tmp_path: Path) -> None:
    pacs = PynetdicomPeer(tmp_path / "pacs")
    try:
        data = node_toml(tmp_path, tmp_path / "model", pacs, threads=2)
        text = tomli_w.dumps(data)
        assert tomllib.loads(text) == data
        cfg = config_from_dict(tomllib.loads(text), base_dir=tmp_path)
    finally:
        pacs.stop()
    assert cfg.scoring.enabled and cfg.scoring.model_dir == tmp_path / "model"
    assert cfg.destinations[0].port == pacs.port
    assert cfg.node.host == "127.0.0.1" and not cfg.node.allow_any_calling_aet
    assert cfg.scoring.segmentation_model_dir is None
    assert cfg.completion.on_missing_seg == "score-whole-region"


def test_demo_node_config_with_segmenter_uses_the_automatic_roi(tmp_path: Path) -> None:
    pacs = PynetdicomPeer(tmp_path / "pacs")
    try:
        data = node_toml(tmp_path, tmp_path / "model", pacs, threads=2,
                         seg_model_dir=tmp_path / "segmenter")
        cfg = config_from_dict(tomllib.loads(tomli_w.dumps(data)), base_dir=tmp_path)
    finally:
        pacs.stop()
    assert cfg.scoring.segmentation_model_dir == tmp_path / "segmenter"
    assert cfg.completion.on_missing_seg == "auto"
    assert cfg.completion.seg_wait_seconds < cfg.completion.max_wait_seconds


def test_summarize_sr_reads_what_the_node_writes(tmp_path: Path) -> None:
    """The demo's table values come from the node's TID 1500 SR, read back with highdicom."""
    from dicom_node import results as R
    from tests.builders import us_series
    from tests.conftest import make_config
    from tests.dicom_node.test_results import make_score

    sources = us_series(2, rows=96, cols=128)
    score = make_score(sources, probs=(0.3, 0.2))
    cfg = make_config(tmp_path / "node")
    paths = R.write_results(R.build_results(score, {s.SOPInstanceUID: s for s in sources},
                                            cfg.results), cfg)
    summary = summarize_sr(paths[0])
    assert summary.probability == pytest.approx(score.probability)
    assert summary.positive is False and summary.images == 2
    assert summary.spread == pytest.approx([im.fold_spread for im in score.images])
    assert summary.csa == pytest.approx([3.21, 3.21])
    assert summary.thickness == pytest.approx([1.23, 1.23])
    assert summary.echo == pytest.approx([87.5, 87.5])
    assert summary.roi == ["seg", "seg"]


def test_summarize_sr_tells_automatic_and_whole_region_rois_apart(tmp_path: Path) -> None:
    """ROI source per image as the node codes it: ROI-AUTO + "Automated", ROI-WHOLE, SEG."""
    from dicom_node import results as R
    from tests.builders import us_series
    from tests.conftest import make_config
    from tests.dicom_node.test_results import make_score

    sources = us_series(2, rows=96, cols=128)
    by_uid = {s.SOPInstanceUID: s for s in sources}
    cfg = make_config(tmp_path / "node")
    score = make_score(sources, probs=(0.7, 0.6), seg=False)
    whole = summarize_sr(R.write_results(R.build_results(score, by_uid, cfg.results), cfg)[0])
    assert whole.roi == ["whole", "whole"]
    auto = dataclasses.replace(
        score, images=[dataclasses.replace(im, roi_source="auto") for im in score.images],
        roi_model=dataclasses.replace(score.model, name="seg-test"))
    results = R.build_results(auto, by_uid, cfg.results)
    assert len(results.segmentations) == 2
    summary = summarize_sr(R.write_results(results, cfg)[0])
    assert summary.roi == ["auto", "auto"]
    assert summary.csa == pytest.approx([3.21, 3.21])


def test_dice_vs_truth_reads_the_ai_seg_on_the_source_frame(tmp_path: Path) -> None:
    """The AI SEG of frame 2 of a cine loop is compared with that frame's truth, pixel for pixel."""
    from dicom_node.results.seg import SegmentationModelId, build_ai_seg
    from tests.builders import build, rf_mask

    src, _ = build(frames=3)
    mask = rf_mask()
    seg = build_ai_seg(src, mask, 2, SegmentationModelId("m", "1", "1.2.3.4"))
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    truth = np.zeros((3, *mask.shape), bool)
    truth[1] = mask
    np.savez_compressed(tmp_path / f"{src.SOPInstanceUID}.npz", mask=truth)
    assert dice_vs_truth(seg_path, tmp_path) == [pytest.approx(1.0)]
    # half the outline missing from the truth: Dice = 2 * half / (whole + half) = 2/3
    rows = np.flatnonzero(mask.any(axis=1))
    truth[1, rows[0]:rows[0] + len(rows) // 2] = False
    np.savez_compressed(tmp_path / f"{src.SOPInstanceUID}.npz", mask=truth)
    overlap = int((mask & truth[1]).sum())
    expected = 2 * overlap / (int(mask.sum()) + overlap)
    assert dice_vs_truth(seg_path, tmp_path) == [pytest.approx(expected)]
    assert expected < 0.9


def _our_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (the demo's work dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker in cmdline.decode(errors="replace"):
                pids.append(int(p.name))
    return pids


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reduced_demo_end_to_end(tmp_path: Path) -> None:
    """Generate -> train classifier + segmenter -> serve + PACS -> push without SEGs -> SR,
    heat maps and AI SEGs read back (automatic ROI, CSA, valid SEG near the truth) -> stopped."""
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dicom_node.cli", "demo", "--workdir", str(work),
           "--participants", "20", "--held-out", "2", "--epochs", "1", "--image-size", "64",
           "--timeout", "180"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1150,
                       cwd=tmp_path,
                       env={**os.environ, "COLUMNS": "200"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Held-out studies scored by dicom-node" in out
    assert "metrics report:" in out and "segmenter report:" in out
    assert (work / "segmenter" / "model.json").exists()
    # the held-out studies went to the node without their DICOM-SEGs
    srs = sorted((work / "results").glob("*/sr.dcm"))
    assert len(srs) == 2, out[-2000:]
    for sr in srs:
        assert pydicom.dcmread(sr).Modality == "SR"
        summary = summarize_sr(sr)
        assert summary.probability is not None and 0.0 <= summary.probability <= 1.0
        assert summary.positive in (True, False)
        assert summary.images >= 1
        assert list(sr.parent.glob("heatmap_*.png")), f"no heat-map preview beside {sr}"
        # no SEG was pushed: every scored image is on the node's automatic ROI, none on a SEG
        # or the whole region, and the ROI gave cm values
        assert "auto" in summary.roi and not {"seg", "whole"} & set(summary.roi), summary.roi
        n_auto = summary.roi.count("auto")
        assert len(summary.csa) == n_auto and len(summary.thickness) == n_auto
        assert len(summary.echo) >= n_auto
        # one AI SEG per automatic ROI came back from the PACS: valid, automatic, near the truth
        segs = sorted(sr.parent.glob("ai_seg_*.dcm"))
        assert len(segs) == n_auto, f"{len(segs)} AI SEGs for {n_auto} automatic ROIs"
        for seg in segs:
            ds = pydicom.dcmread(seg)
            assert ds.Modality == "SEG" and ds.SeriesNumber == 9003
            assert ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
            assert ds.StudyInstanceUID == pydicom.dcmread(sr).StudyInstanceUID
            errors = dciodvfy_errors(seg)
            assert errors in (None, 0), f"dciodvfy: {errors} errors in {seg}"
            dice = dice_vs_truth(seg, work / "cohort" / "truth")
            assert dice and min(dice) > 0.5, f"AI SEG {seg} far from the truth: Dice {dice}"
    assert (work / "model" / "model.json").exists()
    assert not _our_processes(str(work)), "the demo left a node or PACS process running"
