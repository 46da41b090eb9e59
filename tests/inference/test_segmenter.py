"""The serving segmenter: artifact validation, physical-grid round trip, quality control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from inference.segmenter import (
    QcLimits,
    SegmenterArtifactError,
    SegmenterSpec,
    create_network,
    from_grid,
    load_segmenter,
    placement,
    quality_control,
    to_grid,
)

SPEC = SegmenterSpec(architecture="unet", arch_args={"channels": [4, 8], "strides": [2],
                                                     "num_res_units": 0},
                     pixel_cm=0.05, fov_px=(96, 128))


def _ellipse(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]
             ) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1


def _write_artifact(folder: Path, net_spec: SegmenterSpec = SPEC, **overrides: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_network(net_spec).state_dict().items()},
              str(folder / "fold_0.safetensors"))
    raw = {"schema_version": 1, "task": "segmentation", "name": "rf", "version": "1",
           "model_uid": "1.2.3.4", "spec": net_spec.to_dict(), "qc": {},
           "folds": [{"fold": 0, "file": "fold_0.safetensors"}]}
    raw.update(overrides)
    (folder / "model.json").write_text(json.dumps(raw))
    return folder


def test_grid_round_trip_keeps_the_muscle_at_its_physical_size() -> None:
    # a 2 x 4 cm ellipse imaged at 0.0137 cm/px (Samsung-like) and at 0.019 cm/px (Mindray-like)
    for spacing in (0.0137, 0.019):
        shape = (int(4.0 / spacing), int(5.0 / spacing))
        mask = _ellipse(shape, (1.6 / spacing, 2.5 / spacing), (1.0 / spacing, 2.0 / spacing))
        where = placement(shape, (spacing, spacing), SPEC)
        grid = to_grid(mask.astype(np.float32), where, SPEC)
        area_grid = (grid >= 0.5).sum() * SPEC.pixel_cm ** 2
        assert area_grid == pytest.approx(np.pi * 2.0, rel=0.03)
        back = from_grid(grid[None], where)[0] >= 0.5
        assert back.shape == shape
        dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
        assert dice > 0.98


def test_a_frame_wider_than_the_field_of_view_is_cropped_and_restored_as_background() -> None:
    spacing = 0.02
    shape = (200, 500)  # 4 x 10 cm: wider than the 6.4 cm grid
    where = placement(shape, (spacing, spacing), SPEC)
    assert where.offset[1] < 0
    back = from_grid(np.ones((1, *SPEC.fov_px), np.float32), where)[0]
    assert back[:, 250].min() > 0.99 and back[:, 0].max() < 0.01


def _prob_of(mask: np.ndarray, p: float = 0.95) -> np.ndarray:
    return np.where(mask, p, 1 - p).astype(np.float32)


def test_quality_control_accepts_a_plausible_muscle() -> None:
    spacing = (0.02, 0.02)
    mask = _ellipse((250, 320), (80, 160), (40, 90))  # 1.6 cm thick, ~4.5 cm2
    res = quality_control(_prob_of(mask), spacing, 0.5, QcLimits())
    assert res.passed and res.mask is not None and np.array_equal(res.mask, mask)
    assert res.csa_cm2 == pytest.approx(np.pi * 0.8 * 1.8, rel=0.03)
    assert res.confidence == pytest.approx(0.95)


def test_quality_control_fills_holes_inside_the_muscle() -> None:
    # a dark fibro-fatty patch inside the fascia is muscle too: the outline, not the pixels
    spacing = (0.02, 0.02)
    mask = _ellipse((250, 320), (80, 160), (40, 90))
    holed = mask & ~_ellipse((250, 320), (80, 160), (10, 20))
    res = quality_control(_prob_of(holed), spacing, 0.5, QcLimits())
    assert res.passed and res.mask is not None and np.array_equal(res.mask, mask)


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty"), ("unsure", "confidence"), ("two", "two muscle-like"),
    ("tiny", "area"), ("thin", "thickness"), ("uncalibrated", "calibration"),
])
def test_quality_control_rejects_with_a_reason(case: str, reason: str) -> None:
    shape, spacing = (250, 320), (0.02, 0.02)
    mask = _ellipse(shape, (80, 160), (40, 90))
    p, sp = 0.95, spacing
    if case == "empty":
        mask = np.zeros(shape, bool)
    elif case == "unsure":
        p = 0.6
    elif case == "two":
        mask = _ellipse(shape, (60, 80), (30, 60)) | _ellipse(shape, (60, 250), (25, 50))
    elif case == "tiny":
        mask = _ellipse(shape, (80, 160), (20, 20))  # 0.5 cm2
    elif case == "thin":
        mask = _ellipse(shape, (80, 160), (10, 140))  # 0.4 cm thick, 1.8 cm2
    elif case == "uncalibrated":
        sp = None
    res = quality_control(_prob_of(mask, p), sp, 0.5, QcLimits())
    assert not res.passed and res.mask is None
    assert reason in res.qc_reason


def test_load_segmenter_predicts_on_the_frame_grid(tmp_path: Path) -> None:
    seg = load_segmenter(_write_artifact(tmp_path / "m"))
    assert seg.spec == SPEC and seg.name == "rf" and len(seg.networks) == 1
    image = np.random.default_rng(0).random((210, 300)).astype(np.float32)
    prob = seg.probability(image, (0.019, 0.019))
    assert prob.shape == image.shape and 0.0 <= prob.min() <= prob.max() <= 1.0
    res = seg.segment(image, None)
    assert not res.passed and "calibration" in res.qc_reason


def test_flip_average_is_stored_and_makes_the_map_mirror_consistent(tmp_path: Path) -> None:
    flipped = SegmenterSpec(**{**SPEC.to_dict(), "flip_average": True})
    seg = load_segmenter(_write_artifact(tmp_path / "m", net_spec=flipped))
    assert seg.spec.flip_average
    image = np.random.default_rng(1).random((200, 320)).astype(np.float32)
    prob = seg.probability(image, (0.02, 0.02))
    mirror = seg.probability(image[:, ::-1].copy(), (0.02, 0.02))[:, ::-1]
    np.testing.assert_allclose(prob, mirror, atol=1e-5)
    # without the option the same random network is not mirror-consistent
    plain = load_segmenter(_write_artifact(tmp_path / "p"))
    assert not plain.spec.flip_average
    p2 = plain.probability(image, (0.02, 0.02))
    assert np.abs(p2 - plain.probability(image[:, ::-1].copy(), (0.02, 0.02))[:, ::-1]).max() > 1e-4


@pytest.mark.parametrize("override,match", [
    ({"task": "classification"}, "task"),
    ({"schema_version": 9}, "schema_version"),
    ({"folds": []}, "folds"),
    ({"spec": {**SPEC.to_dict(), "fov_px": [100, 128]}}, "multiples of 16"),
    ({"spec": {**SPEC.to_dict(), "architecture": "nope"}}, "unknown segmentation architecture"),
    ({"spec": {**SPEC.to_dict(), "surprise": 1}}, "unknown segmentation spec keys"),
    ({"qc": {"min_csa": 1}}, "unknown qc keys"),
    ({"spec": {**SPEC.to_dict(), "flip_average": "yes"}}, "flip_average"),
])
def test_invalid_model_json_is_refused(tmp_path: Path, override: dict, match: str) -> None:
    with pytest.raises(SegmenterArtifactError, match=match):
        load_segmenter(_write_artifact(tmp_path / "m", **override))


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path: Path) -> None:
    folder = _write_artifact(tmp_path / "m")
    other = SegmenterSpec(architecture="unet", arch_args={"channels": [8, 16], "strides": [2]},
                          pixel_cm=0.05, fov_px=(96, 128))
    save_file({k: v.contiguous() for k, v in create_network(other).state_dict().items()},
              str(folder / "fold_0.safetensors"))
    with pytest.raises(SegmenterArtifactError, match="weights do not load"):
        load_segmenter(folder)
    (folder / "fold_0.safetensors").unlink()
    with pytest.raises(SegmenterArtifactError, match="fold file.* missing"):
        load_segmenter(folder)


def test_segmentation_artifact_is_a_model_artifact_error_and_not_a_classifier(
        tmp_path: Path) -> None:
    from inference.artifact import read_card
    from inference.errors import ModelArtifactError

    folder = _write_artifact(tmp_path / "m")
    with pytest.raises(ModelArtifactError, match="segmentation_model_dir"):
        read_card(folder)
    (folder / "fold_0.safetensors").unlink()
    with pytest.raises(ModelArtifactError):
        load_segmenter(folder)


def test_fill_missing_rois_leaves_human_masks_and_keeps_failed_frames_unmasked(
        tmp_path: Path) -> None:
    from inference.segmenter import fill_missing_rois
    from inference.types import USFrame

    seg = load_segmenter(_write_artifact(tmp_path / "m"))
    image = np.random.default_rng(1).random((120, 160)).astype(np.float32)
    human = _ellipse(image.shape, (40, 80), (20, 50))

    def frame(uid: str, mask: np.ndarray | None, spacing: tuple[float, float] | None) -> USFrame:
        return USFrame(sop_instance_uid=uid, series_instance_uid="s", study_instance_uid="st",
                       sop_class_uid="c", frame_number=1, image=image, crop_box=(0, 0, 120, 160),
                       spacing_cm=spacing, mask=mask)

    frames = [frame("a", human, (0.03, 0.03)), frame("b", None, None),
              frame("c", None, (0.03, 0.03))]
    results = fill_missing_rois(seg, frames)
    assert set(results) == {("b", 1), ("c", 1)}
    assert frames[0].mask is human
    assert frames[1].mask is None and "calibration" in results[("b", 1)].qc_reason
    # an untrained network: whatever it outputs, a frame gets a mask exactly when QC passed
    assert (frames[2].mask is not None) == results[("c", 1)].passed
