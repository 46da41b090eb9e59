"""Fold ensemble: batching, fold statistics, study rules, CAM paths and alternative backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import inference.ensemble as ensemble_mod
from inference.ensemble import EnsembleOutput, FoldEnsemble, study_probability
from tests.inference.test_cam import tiny_classifier


@pytest.fixture(scope="module")
def folds() -> list[torch.nn.Module]:
    return [tiny_classifier(seed=k) for k in range(3)]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(11))


def _ensemble(models, **kw) -> FoldEnsemble:  # noqa: ANN001
    return FoldEnsemble(models, device="cpu", threads=2, input_shape=(3, 64, 64), **kw)


def test_fold_probabilities_mean_and_spread(folds, images) -> None:  # noqa: ANN001
    ens = _ensemble(folds)
    assert torch.get_num_threads() == 2
    out = ens.predict(images, cam=False)
    assert out.fold_probabilities.shape == (3, 5) and out.cams is None
    with torch.inference_mode():
        expected = np.stack([torch.sigmoid(m(images))[:, 0].numpy() for m in folds])
    np.testing.assert_allclose(out.fold_probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(out.probability, expected.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(out.spread, expected.std(axis=0), atol=1e-6)
    assert all(not p.requires_grad for m in folds for p in m.parameters())


@pytest.mark.parametrize("method", ["torchcam", "gap"])
def test_batched_equals_per_image(folds, images, method) -> None:  # noqa: ANN001
    ens = _ensemble(folds, cam_method=method)
    assert ens.cam_method == method
    batched = ens.predict(images, cam=True)
    singles = [ens.predict(images[i : i + 1], cam=True) for i in range(len(images))]
    np.testing.assert_allclose(
        batched.fold_probabilities, np.concatenate([s.fold_probabilities for s in singles], 1),
        atol=1e-5)
    np.testing.assert_allclose(batched.cams, np.concatenate([s.cams for s in singles]), atol=1e-5)
    # the probabilities with CAM are the same as without (one forward feeds both)
    np.testing.assert_allclose(batched.fold_probabilities,
                               ens.predict(images, cam=False).fold_probabilities, atol=1e-6)
    assert batched.cams.shape == (5, 2, 2)
    assert batched.cams.min() >= 0 and batched.cams.max() == pytest.approx(1.0, abs=1e-6)
    assert all(p.grad is None for m in folds for p in m.parameters())


def test_chunking_beyond_max_batch(folds, images, monkeypatch) -> None:  # noqa: ANN001
    ens = _ensemble(folds)
    whole = ens.predict(images, cam=True)
    monkeypatch.setattr(ensemble_mod, "MAX_BATCH", 2)
    chunked = ens.predict(images, cam=True)
    np.testing.assert_allclose(whole.fold_probabilities, chunked.fold_probabilities, atol=1e-5)
    np.testing.assert_allclose(whole.cams, chunked.cams, atol=1e-5)


def test_torchcam_and_gap_give_the_same_maps(folds, images) -> None:  # noqa: ANN001
    a = _ensemble(folds, cam_method="torchcam").predict(images, cam=True)
    b = _ensemble(folds, cam_method="gap").predict(images, cam=True)
    np.testing.assert_allclose(a.fold_probabilities, b.fold_probabilities, atol=1e-6)
    np.testing.assert_allclose(a.cams, b.cams, atol=1e-5)


def test_fold_mean_cam_is_mean_of_fold_cams(folds, images) -> None:  # noqa: ANN001
    from inference.cam import gradcam_forward, normalize_cams

    ens = _ensemble(folds)
    per_fold = torch.stack([gradcam_forward(m, images, "backbone.stages.3")[1] for m in folds])
    expected = normalize_cams(per_fold.mean(0)).numpy()
    np.testing.assert_allclose(ens.predict(images, cam=True).cams, expected, atol=1e-5)


def test_study_rules() -> None:
    p = [0.1, 0.2, 0.9]
    assert study_probability(p, "mean") == pytest.approx(0.4)
    assert study_probability(p, "max") == pytest.approx(0.9)
    assert study_probability(p, "median") == pytest.approx(0.2)
    with pytest.raises(ValueError):
        study_probability(p, "mode")
    with pytest.raises(ValueError):
        study_probability([], "mean")


def test_output_properties() -> None:
    out = EnsembleOutput(fold_probabilities=np.array([[0.2, 0.6], [0.4, 0.6]]))
    np.testing.assert_allclose(out.probability, [0.3, 0.6])
    np.testing.assert_allclose(out.spread, [0.1, 0.0])


def test_onnx_backend_is_equivalent(folds, images) -> None:  # noqa: ANN001
    eager = _ensemble(folds).predict(images, cam=True)
    ens = _ensemble(folds, backend="onnx")
    try:
        assert ens.backend == "onnx"
        out = ens.predict(images, cam=True)
        assert np.abs(out.fold_probabilities - eager.fold_probabilities).max() < 1e-4
        np.testing.assert_allclose(out.cams, eager.cams, atol=1e-4)
        np.testing.assert_allclose(ens.predict(images[:1]).fold_probabilities,
                                   eager.fold_probabilities[:, :1], atol=1e-4)
    finally:
        ens.close()


def test_backend_falls_back_to_eager_without_closed_form_head(images) -> None:  # noqa: ANN001
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=1)
    ens = FoldEnsemble([model], device="cpu", threads=2, backend="onnx",
                       input_shape=(3, 64, 64), cam_method="gap")
    assert ens.backend == "eager" and ens.cam_method == "torchcam"
    assert ens.predict(images, cam=True).cams.shape[0] == 5


@pytest.mark.slow
def test_compile_backend_is_equivalent(images) -> None:  # noqa: ANN001
    model = tiny_classifier(seed=9)
    eager = _ensemble([model]).predict(images, cam=True)
    ens = _ensemble([model], backend="compile")
    assert ens.backend == "compile"
    out = ens.predict(images, cam=True)
    assert np.abs(out.fold_probabilities - eager.fold_probabilities).max() < 1e-4
    np.testing.assert_allclose(out.cams, eager.cams, atol=1e-4)
