"""Every object of the synthetic three-vendor cohort read back aligned with the generator's truth.

Covers each vendor profile and each photometric / transfer syntax / cine / region quirk the
generator produced (RGB JPEG baseline YBR_FULL_422 with fragmented cine frames, MONOCHROME2 RLE,
RGB and palette colour explicit LE, side-by-side elastography, M-mode strip, negative deltas).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from inference.reader import read_study


def _boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of the mask boundary."""
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def _studies(cohort) -> list[dict]:
    return json.loads(Path(cohort.manifest).read_text())["studies"]


def _check_frame(frame, truth_dir: Path) -> None:
    truth = np.load(truth_dir / f"{frame.sop_instance_uid}.npz")
    box = tuple(int(v) for v in truth["tissue_box"])
    assert np.abs(np.subtract(frame.crop_box, box)).max() <= 1, (frame.crop_box, box)
    assert frame.spacing_cm == pytest.approx(tuple(truth["spacing_cm"]), rel=1e-6)
    r0, c0, r1, c1 = frame.crop_box
    assert frame.image.shape == (r1 - r0, c1 - c0)
    if frame.mask is None:
        assert frame.frame_number not in set(truth["seg_frames"].tolist())
        return
    expected = truth["mask"][frame.frame_number - 1][r0:r1, c0:c1]
    assert frame.mask.shape == frame.image.shape
    iou = (frame.mask & expected).sum() / max(1, (frame.mask | expected).sum())
    assert iou >= 0.97, iou
    # Any disagreement lies on the outline, never more than a pixel away from it.
    assert not ((frame.mask ^ expected) & ~_boundary_band(expected)).any()


def test_every_synthetic_object_reads_back_aligned(synth_cohort) -> None:
    truth_dir = Path(synth_cohort.truth_dir)
    expected_combos, read_combos = set(), set()
    n_masked = 0
    for study in _studies(synth_cohort):
        files = study["files"]
        paths = [Path(synth_cohort.out_dir) / f["path"] for f in files]
        result = read_study(paths)
        us = {f["sop_instance_uid"]: f for f in files if f["kind"] == "us"}
        segs = {f["sop_instance_uid"] for f in files if f["kind"] == "seg"}
        for f in us.values():
            expected_combos.add((study["vendor"], f["photometric"], f["transfer_syntax"],
                                 f["frames"] > 1, f["quirk"]))
        # Only images without SEG are reported, and only in studies sent without SEG.
        for uid, reason in result.problems:
            assert uid in us and not segs, (uid, reason)
            assert reason == "no DICOM-SEG references this image"
        assert {fr.sop_instance_uid for fr in result.frames} == set(us)
        for frame in result.frames:
            f = us[frame.sop_instance_uid]
            assert frame.frame_number == f["frames"] // 2 + 1
            _check_frame(frame, truth_dir)
            assert (frame.mask is not None) == bool(segs)
            n_masked += frame.mask is not None
            read_combos.add((study["vendor"], f["photometric"], f["transfer_syntax"],
                             f["frames"] > 1, f["quirk"]))
    assert read_combos == expected_combos
    vendors = {c[0] for c in read_combos}
    assert vendors == {"supersonic", "mindray", "samsung"}
    assert {c[4] for c in read_combos} >= {"", "side-by-side", "m-mode", "palette"}
    assert any(c[3] for c in read_combos)  # a cine loop was read
    assert n_masked > 0


def test_synthetic_cine_all_frames_share_geometry(synth_cohort) -> None:
    truth_dir = Path(synth_cohort.truth_dir)
    cines = [(s, f) for s in _studies(synth_cohort) for f in s["files"]
             if f["kind"] == "us" and f["frames"] > 1]
    assert cines
    for study, f in cines:
        paths = [Path(synth_cohort.out_dir) / g["path"] for g in study["files"]
                 if g["sop_instance_uid"] == f["sop_instance_uid"]
                 or f["sop_instance_uid"] in g.get("references", [])]
        result = read_study(paths, frame_policy="all")
        frames = [fr for fr in result.frames if fr.sop_instance_uid == f["sop_instance_uid"]]
        assert [fr.frame_number for fr in frames] == list(range(1, f["frames"] + 1))
        for fr in frames:
            _check_frame(fr, truth_dir)
