"""The AI DICOM-SEG: highdicom round trip, references, coding, and dciodvfy with zero errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.results.seg import (
    SEGMENT_LABEL,
    SegmentationModelId,
    build_ai_seg,
    full_frame_mask,
)
from inference.reader import read_study
from tests.builders import build, rf_mask, save
from tests.conftest import require_tool

MODEL = SegmentationModelId(name="dicom-node RF segmenter", version="3",
                            model_uid="1.2.826.0.1.3680043.8.498.12345")


def _dciodvfy_errors(path: Path) -> list[str]:
    require_tool(Path("/usr/bin/dciodvfy").exists(), "dciodvfy")
    out = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                         check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("frames", [1, 3])
def test_ai_seg_is_valid_and_reads_back_as_the_roi(tmp_path: Path, frames: int) -> None:
    src, _ = build(frames=frames)
    src.Laterality = "R"
    us_path = save(src, tmp_path / "us.dcm")
    mask = rf_mask()
    frame = 2 if frames > 1 else 1
    # the node builds it from the archived header (the reader drops Pixel Data)
    header = pydicom.dcmread(us_path, stop_before_pixels=True)
    seg = build_ai_seg(header, mask, frame, MODEL)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)

    assert _dciodvfy_errors(seg_path) == []
    back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    desc = back.get_segment_description(1)
    assert desc.segment_label == SEGMENT_LABEL
    assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert desc.segmented_property_type.value == codes.SCT.SkeletalMuscle.value
    alg = desc.algorithm_identification[0]
    assert alg.AlgorithmName == MODEL.name and alg.AlgorithmVersion == MODEL.version
    assert MODEL.model_uid in str(alg.AlgorithmParameters)
    assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == \
        codes.cid7162.ArtificialIntelligence.value
    modifier = desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
    assert modifier.CodeValue == codes.SCT.Right.value

    # the node's own reader matches it to the right frame, pixel for pixel (when asked to: an
    # automatic SEG is never a scoring ROI)
    read = read_study([us_path, seg_path], automatic_segs=True)
    masked = [f for f in read.frames if f.mask is not None]
    assert len(masked) == 1 and masked[0].frame_number == frame
    r0, c0, r1, c1 = masked[0].crop_box
    assert np.array_equal(masked[0].mask, mask[r0:r1, c0:c1])


def test_full_frame_mask_round_trip_and_bad_input() -> None:
    crop = np.zeros((4, 5), bool)
    crop[1:3, 2:4] = True
    full = full_frame_mask(crop, (10, 20, 14, 25), 30, 40)
    assert full.sum() == crop.sum() and full[11:13, 22:24].all()
    with pytest.raises(ValueError):
        full_frame_mask(crop, (10, 20, 15, 25), 30, 40)
    src, _ = build()
    with pytest.raises(ValueError, match="empty"):
        build_ai_seg(src, np.zeros((src.Rows, src.Columns), bool), 1, MODEL)
    with pytest.raises(ValueError, match="frame"):
        build_ai_seg(src, rf_mask(), 2, MODEL)
