"""The automatic ROI in the scoring pipeline: SEG wins, AUTO is measured, failed QC is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.config import ReaderConfig, ScoringConfig
from inference.errors import NothingToScoreError
from inference.pipeline import ScoringPipeline
from inference.roi import RoiSource
from inference.segmenter import QcLimits, load_segmenter
from tests.inference.test_pipeline import study_files

# the tiny test segmenter is weak: let any single outline through so the AUTO path is exercised
PERMISSIVE = QcLimits(min_confidence=0.0, min_csa_cm2=0.0, max_csa_cm2=1e6,
                      min_thickness_cm=0.0, max_thickness_cm=1e6, max_second_component=1.0)


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir: Path, tiny_segmenter_dir: Path):  # noqa: ANN201
    scoring = ScoringConfig(model_dir=tiny_model_dir, torch_threads=1, device="cpu",
                            segmentation_model_dir=tiny_segmenter_dir)
    strict = ScoringPipeline(tiny_model_dir, scoring, ReaderConfig())
    loose = ScoringPipeline(tiny_model_dir, scoring, ReaderConfig(),
                            segmenter=load_segmenter(tiny_segmenter_dir, qc=PERMISSIVE))
    yield strict, loose
    strict.close()
    loose.close()


def test_study_without_seg_is_scored_and_measured_on_the_automatic_roi(pipelines, synth_cohort
                                                                        ) -> None:  # noqa: ANN001
    _, loose = pipelines
    _, files = study_files(synth_cohort, "none")
    score, _ = loose.score_study(files, allow_missing_seg=False, auto_roi=True)
    assert score.images and all(im.roi_source == RoiSource.AUTO for im in score.images)
    for im in score.images:
        assert im.frame.mask is not None and im.frame.mask.any()
        assert im.measurements is not None and im.measurements.csa_cm2 is not None
    assert score.roi_model is not None and score.roi_model.model_uid == loose.segmenter.model_uid
    assert "segment" in score.timings_ms
    # without auto_roi the same study is not scored at all (no SEG, whole region not allowed)
    with pytest.raises(Exception):  # noqa: B017 - ScoringError or NothingToScoreError
        loose.score_study(files, allow_missing_seg=False)


def test_a_human_seg_wins_over_the_segmenter(pipelines, synth_cohort) -> None:  # noqa: ANN001
    _, loose = pipelines
    _, files = study_files(synth_cohort, "normal")
    score, _ = loose.score_study(files, allow_missing_seg=False, auto_roi=True)
    assert score.images and all(im.roi_source == RoiSource.SEG for im in score.images)
    assert score.roi_model is None


def test_failed_qc_is_not_scored_and_says_why(pipelines, synth_cohort) -> None:  # noqa: ANN001
    strict, _ = pipelines
    _, files = study_files(synth_cohort, "none")
    # production limits: the weak test model's outlines fail them -> nothing scored, with reasons
    try:
        score, _ = strict.score_study(files, allow_missing_seg=True, auto_roi=True)
    except NothingToScoreError as exc:
        assert exc.reasons and all("quality control" in r for _, r in exc.reasons[:1])
        return
    # any image that did pass is on the automatic ROI, every other one is listed with its reason
    assert all(im.roi_source == RoiSource.AUTO for im in score.images)
    assert any("quality control" in r for _, r in score.skipped)


def test_results_carry_the_ai_seg_and_the_sr_references_it(pipelines, synth_cohort,
                                                           tmp_path: Path) -> None:  # noqa: ANN001
    import subprocess

    import highdicom as hd
    from pydicom import dcmread

    from dicom_node.config import ResultsConfig
    from dicom_node.results import build_results
    from tests.conftest import require_tool

    _, loose = pipelines
    _, files = study_files(synth_cohort, "none")
    score, read = loose.score_study(files, allow_missing_seg=False, auto_roi=True)
    results = build_results(score, dict(read.datasets), ResultsConfig())
    assert not results.errors
    assert len(results.segmentations) == len(score.images)
    seg_uids = {str(s.SOPInstanceUID) for s in results.segmentations}
    for s in results.segmentations:
        seg = hd.seg.Segmentation.from_dataset(s)
        desc = seg.get_segment_description(1)
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert desc.algorithm_identification[0].AlgorithmName == score.roi_model.name
    text = str(results.sr)
    assert all(uid in text for uid in seg_uids)  # each AI SEG is referenced by the SR
    assert "ROI-AUTO" in text and "8359006" in text  # automatic ROI flagged (SCT Automated)
    require_tool(Path("/usr/bin/dciodvfy").exists(), "dciodvfy")
    for ds in results.datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        dcmread(path)
        out = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                             check=False)
        errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
        assert not errors, (ds.Modality, errors)
