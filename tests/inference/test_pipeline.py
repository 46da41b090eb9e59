"""ScoringPipeline on the synthetic cohort with the real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.config import ReaderConfig, ScoringConfig
from dicom_node.errors import ScoringError
from inference.pipeline import ScoringPipeline
from inference.transforms import roi_box


def _studies(cohort) -> list[dict]:  # noqa: ANN001
    return json.loads(Path(cohort.manifest).read_text())["studies"]


def study_files(cohort, seg: str, *, vendor: str | None = None) -> tuple[dict, list[Path]]:  # noqa: ANN001
    """First study of the cohort with this SEG mode ("normal" / "late" / "none")."""
    for s in _studies(cohort):
        if s["seg"] == seg and (vendor is None or s["vendor"] == vendor):
            return s, [Path(cohort.out_dir) / f["path"] for f in s["files"]]
    raise LookupError(seg)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> ScoringPipeline:
    scoring = ScoringConfig(model_dir=tiny_model_dir, torch_threads=2, device="cpu")
    pipe = ScoringPipeline(tiny_model_dir, scoring, ReaderConfig())
    yield pipe
    pipe.close()


def test_scores_a_segmented_study(pipeline: ScoringPipeline, synth_cohort) -> None:  # noqa: ANN001
    study, files = study_files(synth_cohort, "normal")
    score, read = pipeline.score_study(files, allow_missing_seg=False)
    n_us = sum(f["kind"] == "us" for f in study["files"])
    assert score.study_instance_uid == study["study_uid"]
    assert score.patient_id == study["patient_id"]
    assert len(score.images) == n_us and not score.skipped
    assert set(read.datasets) == {im.frame.sop_instance_uid for im in score.images}
    info = pipeline.info
    assert score.model == info and info.n_folds == 2
    for im in score.images:
        assert im.roi_source == "seg"
        assert len(im.fold_probabilities) == 2
        assert im.probability == pytest.approx(np.mean(im.fold_probabilities), abs=1e-9)
        assert im.fold_spread == pytest.approx(np.std(im.fold_probabilities), abs=1e-9)
        # heat map on the cropped source, non-zero only inside the ROI crop box
        assert im.heatmap is not None and im.heatmap.shape == im.frame.image.shape
        r0, c0, r1, c1 = roi_box(im.frame.mask, im.frame.image.shape, pipeline.artifact.spec.roi_margin)
        outside = im.heatmap.copy()
        outside[r0:r1, c0:c1] = 0
        assert outside.max() == 0 and im.heatmap.max() > 0.5
    probs = [im.probability for im in score.images]
    assert score.probability == pytest.approx(np.mean(probs))
    assert score.positive == (score.probability >= info.threshold)
    assert set(score.timings_ms) == {"gate", "decode", "transforms", "ensemble", "cam", "measurements"}
    assert score.gate and all(v.passed for v in score.gate)
    assert all(im.gate is not None and im.gate.passed for im in score.images)


def test_probabilities_equal_the_fold_models_applied_by_hand(pipeline, synth_cohort) -> None:  # noqa: ANN001
    from inference.transforms import eval_transforms

    _, files = study_files(synth_cohort, "normal", vendor="samsung")
    score, _ = pipeline.score_study(files, allow_missing_seg=False)
    art = pipeline.artifact
    tf = eval_transforms(art.spec.input_size, art.spec.in_chans, art.spec.roi_margin)
    im = score.images[0]
    x = tf({"image": im.frame.image[None], "mask": im.frame.mask[None]})["image"][None]
    with torch.inference_mode():
        by_hand = [float(torch.sigmoid(m(x))[0, 0]) for m in art.models]
    calibrated = art.card.calibrator.apply(np.asarray(by_hand)[:, None])[:, 0]
    np.testing.assert_allclose(im.fold_probabilities, calibrated, atol=1e-5)


def test_batched_study_equals_scoring_each_image_alone(pipeline, synth_cohort) -> None:  # noqa: ANN001
    study, files = study_files(synth_cohort, "normal", vendor="mindray")
    score, _ = pipeline.score_study(files, allow_missing_seg=False)
    by_sop = {im.frame.sop_instance_uid: im for im in score.images}
    base = Path(synth_cohort.out_dir)
    for f in [f for f in study["files"] if f["kind"] == "us"][:2]:  # a cine loop and a single frame
        segs = [base / g["path"] for g in study["files"]
                if g["kind"] == "seg" and f["sop_instance_uid"] in g["references"]]
        alone, _ = pipeline.score_study([base / f["path"], *segs], allow_missing_seg=False)
        assert len(alone.images) == 1
        np.testing.assert_allclose(alone.images[0].fold_probabilities,
                                   by_sop[f["sop_instance_uid"]].fold_probabilities, atol=1e-5)
        np.testing.assert_allclose(alone.images[0].heatmap, by_sop[f["sop_instance_uid"]].heatmap,
                                   atol=1e-4)


def test_measurements_match_the_generator_truth(pipeline, synth_cohort) -> None:  # noqa: ANN001
    _, files = study_files(synth_cohort, "normal")
    score, _ = pipeline.score_study(files, allow_missing_seg=False)
    checked = 0
    for im in score.images:
        truth = np.load(Path(synth_cohort.truth_dir) / f"{im.frame.sop_instance_uid}.npz")
        r0, c0, r1, c1 = im.frame.crop_box
        mask = truth["mask"][im.frame.frame_number - 1][r0:r1, c0:c1]
        if im.frame.spacing_cm is None:
            assert im.measurements.csa_cm2 is None
            continue
        row_cm, col_cm = im.frame.spacing_cm
        assert im.measurements.csa_cm2 == pytest.approx(mask.sum() * row_cm * col_cm, rel=0.05)
        rows = np.flatnonzero(mask.any(axis=1))
        assert im.measurements.thickness_cm <= (rows[-1] - rows[0] + 1) * row_cm * 1.05
        assert 0 < im.measurements.echo_intensity_mean < 255
        assert im.measurements.echo_intensity_sd > 0
        checked += 1
    assert checked > 0


def test_study_without_seg(pipeline, synth_cohort) -> None:  # noqa: ANN001
    study, files = study_files(synth_cohort, "none")
    with pytest.raises(ScoringError, match="DICOM-SEG") as err:
        pipeline.score_study(files, allow_missing_seg=False)
    assert study["study_uid"] in str(err.value)
    score, _ = pipeline.score_study(files, allow_missing_seg=True)
    assert score.images and all(im.roi_source == "whole-region" for im in score.images)
    assert all(im.measurements is None for im in score.images)
    assert not score.skipped  # the "no SEG" notes are not skips once the image is scored
    im = score.images[0]
    assert im.heatmap.shape == im.frame.image.shape and im.heatmap.max() > 0.5


def test_nothing_readable_raises(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(ScoringError, match="nothing to score"):
        pipeline.score_study([junk], allow_missing_seg=True)


def test_gap_cam_and_onnx_backend_match_eager_torchcam(pipeline, tiny_model_dir, synth_cohort) -> None:  # noqa: ANN001,E501
    _, files = study_files(synth_cohort, "normal")
    ref, _ = pipeline.score_study(files, allow_missing_seg=False)
    for kw in ({"cam_method": "gap"}, {"backend": "onnx"}):
        cfg = ScoringConfig(model_dir=tiny_model_dir, device="cpu", **kw)
        other = ScoringPipeline(tiny_model_dir, cfg, ReaderConfig())
        try:
            assert other.ensemble.cam_method == "gap"
            assert other.ensemble.backend == kw.get("backend", "eager")
            got, _ = other.score_study(files, allow_missing_seg=False)
        finally:
            other.close()
        for a, b in zip(ref.images, got.images):
            assert abs(a.probability - b.probability) < 1e-4
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-3)


def test_bad_cam_layer_or_model_dir_is_a_clear_error(tiny_model_dir, tmp_path) -> None:  # noqa: ANN001
    from dicom_node.errors import ModelArtifactError

    cfg = ScoringConfig(model_dir=tiny_model_dir, device="cpu", cam_target_layer="backbone.nope")
    with pytest.raises(ModelArtifactError, match="backbone.nope"):
        ScoringPipeline(tiny_model_dir, cfg, ReaderConfig())
    with pytest.raises(ModelArtifactError, match="does not exist"):
        ScoringPipeline(tmp_path / "none", ScoringConfig(model_dir=tmp_path), ReaderConfig())


def test_seg_only_study_is_nothing_to_score(pipeline, synth_cohort) -> None:  # noqa: ANN001
    from dicom_node.errors import NothingToScoreError

    study, files = study_files(synth_cohort, "normal")
    segs = [f for f in files if "SEG_" in Path(f).name]
    assert segs
    with pytest.raises(NothingToScoreError) as err:
        pipeline.score_study(segs, allow_missing_seg=True)
    assert err.value.study_instance_uid == study["study_uid"]
    assert err.value.state.startswith("not-applicable: ")


def test_gate_stops_non_muscle_images_and_records_why(pipeline, synth_cohort, tmp_path) -> None:  # noqa: ANN001,E501
    import numpy as np

    from dicom_node.errors import NothingToScoreError
    from training.synth_nonmuscle import nonmuscle_object

    study, files = study_files(synth_cohort, "normal")
    doppler = nonmuscle_object("colour-doppler", np.random.default_rng(5), regions=True).dataset
    doppler.StudyInstanceUID = study["study_uid"]
    path = tmp_path / "doppler.dcm"
    doppler.save_as(path, enforce_file_format=True)
    score, _ = pipeline.score_study([*files, path], allow_missing_seg=False)
    assert doppler.SOPInstanceUID not in {im.frame.sop_instance_uid for im in score.images}
    why = dict(score.skipped)[doppler.SOPInstanceUID]
    assert "colour-flow" in why
    with pytest.raises(NothingToScoreError) as err:
        pipeline.score_study([path], allow_missing_seg=True)
    assert "colour-flow" in err.value.state and err.value.sources
