"""An all-AUTOMATIC DICOM-SEG (the node's own AI SEG back from PACS, another AI product's) is
archived but never a human ROI: the reader leaves it out, so a study reads exactly as without it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.results.seg import SegmentationModelId, build_ai_seg
from inference.reader import AUTOMATIC_SEG_REASON, NO_SEG_REASON, read_study
from inference.roi import is_automatic_seg, seg_algorithms
from tests.builders import build, make_seg, rf_mask, save

MODEL = SegmentationModelId(name="dicom-node RF segmenter", version="3",
                            model_uid="1.2.826.0.1.3680043.8.498.12345")


def _ai_seg(src: pydicom.Dataset, frame: int = 1, mask: np.ndarray | None = None
            ) -> pydicom.Dataset:
    """This node's own AI SEG, built from the archived header as the node builds it."""
    header = copy.deepcopy(src)
    del header.PixelData
    return build_ai_seg(header, rf_mask() if mask is None else mask, frame, MODEL)


def test_which_segs_are_automatic(tmp_path: Path) -> None:
    src, _ = build()
    own = _ai_seg(src)
    other_ai = make_seg([src], algorithm_type="AUTOMATIC")
    assert is_automatic_seg(own) and is_automatic_seg(other_ai)
    assert is_automatic_seg(save(own, tmp_path / "own.dcm"))  # a path is read header-only
    assert "dicom-node RF segmenter 3" in seg_algorithms(own)
    assert "OtherVendor RF AI 2.1" in seg_algorithms(other_ai)
    # a human drew or checked these: not automatic
    assert not is_automatic_seg(make_seg([src]))
    assert not is_automatic_seg(make_seg([src], algorithm_type="SEMIAUTOMATIC"))
    mixed = make_seg([src], algorithm_type="AUTOMATIC", extra_segment=True)  # one MANUAL segment
    assert not is_automatic_seg(mixed)
    # not a SEG, or a SEG whose header says nothing: liberal, not automatic
    assert not is_automatic_seg(src)
    bare = make_seg([src], algorithm_type="AUTOMATIC")
    del bare.SegmentSequence
    assert not is_automatic_seg(bare) and seg_algorithms(bare) == "unnamed"
    assert not is_automatic_seg(tmp_path / "missing.dcm")


def _frames(read):  # noqa: ANN001, ANN202
    return [(f.sop_instance_uid, f.frame_number, f.crop_box, f.mask is None, f.image.tobytes())
            for f in read.frames]


@pytest.mark.parametrize("frames", [1, 5])
def test_a_study_with_its_own_ai_seg_reads_exactly_as_without_it(tmp_path: Path,
                                                                 frames: int) -> None:
    src, _ = build(frames=frames, seed=4)
    us = save(src, tmp_path / "us.dcm")
    # on a cine the AI SEG names a frame other than the policy's (middle = 3): still ignored
    ai = _ai_seg(src, frame=frames)
    ai_path = save(ai, tmp_path / "ai.dcm")
    alone = read_study([us])
    with_ai = read_study([us, ai_path])
    assert _frames(with_ai) == _frames(alone) and all(f.mask is None for f in with_ai.frames)
    assert (ai.SOPInstanceUID, AUTOMATIC_SEG_REASON) in with_ai.problems
    assert (src.SOPInstanceUID, NO_SEG_REASON) in with_ai.problems  # still "no SEG" for it
    assert [p for p in with_ai.problems if p[0] != ai.SOPInstanceUID] == alone.problems
    # asked for explicitly (checking the AI SEG itself), it is matched like any SEG
    checked = read_study([us, ai_path], automatic_segs=True)
    assert [f.frame_number for f in checked.frames if f.mask is not None] == [frames]


def test_a_human_seg_wins_over_a_later_automatic_one(tmp_path: Path) -> None:
    src, _ = build(seed=2)
    human_mask = rf_mask(center=(50, 60))
    human = make_seg([src], human_mask[None])
    human.ContentDate, human.ContentTime = "20240101", "080000"
    ai = _ai_seg(src, mask=rf_mask(center=(60, 70), radii=(10, 20)))
    ai.ContentDate, ai.ContentTime = "20250101", "080000"  # newer: would supersede a human SEG
    other = make_seg([src], rf_mask(center=(40, 50))[None], algorithm_type="AUTOMATIC")
    paths = [save(src, tmp_path / "us.dcm"), save(human, tmp_path / "human.dcm"),
             save(ai, tmp_path / "ai.dcm"), save(other, tmp_path / "other.dcm")]
    read = read_study(paths)
    (frame,) = read.frames
    assert frame.seg_sop_instance_uid == human.SOPInstanceUID
    r0, c0, r1, c1 = frame.crop_box
    np.testing.assert_array_equal(frame.mask, human_mask[r0:r1, c0:c1])
    skipped = {u for u, r in read.problems if r == AUTOMATIC_SEG_REASON}
    assert skipped == {ai.SOPInstanceUID, other.SOPInstanceUID}
    assert not any("superseded" in r for _, r in read.problems)
