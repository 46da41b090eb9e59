"""Grad-CAM maths: same forward as the scores, no parameter gradients, torchcam equivalence.

Small random-weight models are fine here: these tests check identities that hold for any
weights (the pipeline tests use the real trained tiny model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from inference.cam import (
    cams_to_frame,
    gap_cam_forward,
    gradcam_forward,
    resolve_target_layer,
    supports_gap_cam,
)
from inference.model import ModelSpec, create_model, default_cam_layer

TINY = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}


def tiny_classifier(seed: int = 0, outputs: int = 1) -> nn.Module:
    """The node's ImageClassifier (timm ConvNeXt + Linear) at toy size, non-trivial head norm."""
    torch.manual_seed(seed)
    model = create_model(ModelSpec(backbone="convnext_atto", timm_kwargs=TINY, input_size=64))
    if outputs != 1:
        model.head = nn.Linear(model.head.in_features, outputs)
    with torch.no_grad():
        model.backbone.head.norm.weight.uniform_(0.5, 1.5)
        model.backbone.head.norm.bias.normal_(0, 0.2)
    return model.eval()


def torchcam_reference(
    model: nn.Module, x: torch.Tensor, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchcam used the textbook way: parameters trainable, a plain forward, then the CAM."""
    from torchcam.methods import GradCAM

    model.requires_grad_(True)
    try:
        with GradCAM(model, layer) as extractor:
            out = model(x)
            target = (lambda s: s[0]) if out.shape[1] == 1 else (lambda s: s[1] - s[0])
            cams = extractor(targets=target, scores=out)[0]
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return out.detach(), cams.detach()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_auto_layer_is_last_stage() -> None:
    model = tiny_classifier()
    assert resolve_target_layer(model, "auto") == "backbone.stages.3" == default_cam_layer(model)
    assert resolve_target_layer(model, "backbone.stages.2") == "backbone.stages.2"
    with pytest.raises(ValueError, match="not a module"):
        resolve_target_layer(model, "backbone.nope")


def test_auto_layer_other_backbone() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=1)
    assert resolve_target_layer(model, "auto") == "layer4"


@pytest.mark.parametrize("outputs", [1, 2])
def test_gradcam_scores_from_same_forward_match_torchcam(x: torch.Tensor, outputs: int) -> None:
    model = tiny_classifier(outputs=outputs).requires_grad_(False)
    layer = resolve_target_layer(model)
    out, cams = gradcam_forward(model, x, layer)
    with torch.inference_mode():
        plain = model(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)
    ref_out, ref_cams = torchcam_reference(model, x, layer)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    assert cams.shape == (4, 2, 2)
    torch.testing.assert_close(cams, ref_cams, rtol=0, atol=1e-5)
    assert float(cams.max()) > 0.99  # normalised maps, not all zero


def test_gradcam_never_populates_parameter_grads_and_stops_at_hooked_layer(x: torch.Tensor) -> None:
    model = tiny_classifier().requires_grad_(False)
    seen: dict[str, bool] = {}

    def record(name: str):  # noqa: ANN202
        return lambda _m, _i, out: seen.__setitem__(name, out.requires_grad)

    handles = [model.backbone.stages[i].register_forward_hook(record(f"s{i}")) for i in (1, 2)]
    try:
        gradcam_forward(model, x, "backbone.stages.3")
    finally:
        for h in handles:
            h.remove()
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    # nothing before the hooked stage recorded an autograd graph: the backward is head-only
    assert seen == {"s1": False, "s2": False}


def test_gradcam_refuses_trainable_parameters(x: torch.Tensor) -> None:
    model = tiny_classifier().requires_grad_(True)
    with pytest.raises(RuntimeError, match="gradients must be off"):
        gradcam_forward(model, x, "backbone.stages.3")


@pytest.mark.parametrize("outputs", [1, 2])
def test_closed_form_gap_cam_equals_torchcam(x: torch.Tensor, outputs: int) -> None:
    model = tiny_classifier(seed=5, outputs=outputs).requires_grad_(False)
    assert supports_gap_cam(model)
    with torch.inference_mode():  # no autograd at all
        out, cams = gap_cam_forward(model, x)
    ref_out, ref_cams = torchcam_reference(model, x, "backbone.stages.3")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(cams, ref_cams, rtol=0, atol=1e-5)


def test_closed_form_linear_head_equals_torchcam(x: torch.Tensor) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1).eval().requires_grad_(False)
    assert supports_gap_cam(model)
    with torch.inference_mode():
        out, cams = gap_cam_forward(model, x)
    ref_out, ref_cams = torchcam_reference(model, x, "layer4")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(cams, ref_cams, rtol=0, atol=1e-5)


def test_closed_form_rejects_heads_that_are_not_gap_linear() -> None:
    import timm

    # MobileNetV3 has a 1x1 conv + activation after pooling: not a GAP -> Linear head
    assert not supports_gap_cam(timm.create_model("mobilenetv3_small_050", num_classes=1))
    assert not supports_gap_cam(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


def test_cams_to_frame_fills_only_the_crop_box() -> None:
    cam = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    out = cams_to_frame(cam, (40, 50), (10, 20, 30, 40))
    assert out.shape == (40, 50) and out.dtype == np.float32
    assert np.all(out[:10] == 0) and np.all(out[30:] == 0)
    assert np.all(out[:, :20] == 0) and np.all(out[:, 40:] == 0)
    inside = out[10:30, 20:40]
    assert inside.max() <= 1.0 and inside.max() > 0.9
    assert inside[:5, -5:].mean() > inside[:5, :5].mean()  # top-right hot, top-left cold
    # a box reaching past the frame edge is cut off, not shifted
    edge = cams_to_frame(cam, (40, 50), (30, 40, 50, 60))
    assert edge[30:, 40:].shape == (10, 10) and edge[:30].max() == 0
