"""SHAP modality contributions: additivity, zeroed branch -> ~0, works on the real FusionNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.shap_analysis import FusionInputHead, fusion_shap, modality_shap

BLOCKS = {"image": slice(0, 6), "clinical": slice(6, 9), "lab": slice(9, 13)}


def _head(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 1))


def test_deep_shap_additive_and_zeroed_block_gets_nothing():
    head = _head()
    with torch.no_grad():
        head[0].weight[:, 9:13] = 0.0  # the lab block cannot influence the output
    g = torch.Generator().manual_seed(1)
    bg, x = torch.randn(40, 13, generator=g), torch.randn(25, 13, generator=g)
    r = modality_shap(head, bg, x, BLOCKS, method="deep")
    assert r.values.shape == (25, 13)
    head.eval()
    with torch.no_grad():
        f_x = head(x)[:, 0].numpy()
        f_bg = head(bg)[:, 0].numpy().mean()
    # DeepExplainer is additive: sum of SHAP = f(x) - E[f(background)]
    assert np.allclose(r.values.sum(axis=1), f_x - f_bg, atol=1e-4)
    assert r.expected_value == pytest.approx(float(f_bg), abs=1e-5)
    assert r.contribution["lab"] < 1e-6
    assert r.contribution["image"] > 0.01 and r.contribution["clinical"] > 0.01
    assert sum(r.share.values()) == pytest.approx(1.0)
    assert r.feature_names[9] == "lab_0" and head.training is False  # copy was used
    d = r.to_dict()
    assert set(d["contribution"]) == {"image", "clinical", "lab"}


def test_gradient_explainer_on_linear_head_matches_closed_form():
    torch.manual_seed(0)
    lin = nn.Linear(13, 1)
    g = torch.Generator().manual_seed(2)
    bg, x = torch.randn(60, 13, generator=g), torch.randn(10, 13, generator=g)
    r = modality_shap(lin, bg, x, BLOCKS, method="gradient", nsamples=300, seed=0)
    exact = lin.weight.detach().numpy()[0] * (x - bg.mean(0)).numpy()  # linear SHAP
    assert np.abs(r.values - exact).mean() < 0.25 * np.abs(exact).mean()
    # a block with twice the weight magnitude gets the larger share
    with torch.no_grad():
        lin.weight[:, 6:9] *= 10
    r2 = modality_shap(lin, bg, x, BLOCKS, method="gradient", nsamples=100)
    assert r2.share["clinical"] > r.share["clinical"]


def test_blocks_must_tile():
    with pytest.raises(ValueError, match="tile"):
        modality_shap(_head(), torch.zeros(2, 13), torch.zeros(2, 13),
                      {"image": slice(0, 6), "lab": slice(7, 13)})


def test_fusion_net_from_inference_package():
    from inference.model import ModelSpec, create_model

    spec = ModelSpec(backbone="test_convnext", input_size=32, in_chans=1,
                     modalities=("image", "clinical", "lab"), n_clinical=9, n_lab=14,
                     mlp_hidden=8, mlp_dropout=0.1)
    torch.manual_seed(0)
    model = create_model(spec)
    with torch.no_grad():
        model.lab[0].weight.zero_()  # lab branch input weights zeroed -> no lab contribution
    g = torch.Generator().manual_seed(0)
    n = 24
    img = torch.rand(n, 1, 32, 32, generator=g)
    clin, lab = torch.rand(n, 9, generator=g), torch.rand(n, 14, generator=g)
    wrapped = FusionInputHead(model)
    assert list(wrapped.blocks()) == ["image", "clinical", "lab"]
    r = fusion_shap(model, img, clin, lab, n_background=10,
                    clinical_names=[f"c{i}" for i in range(9)])
    assert r.values.shape[0] == n - 10
    assert r.contribution["lab"] < 1e-6 and r.contribution["clinical"] > 0
    assert r.feature_names[wrapped.blocks()["clinical"][0]] == "c0"
    # the wrapped head reproduces the model's own logits
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.backbone(img), clin, lab], dim=1)
        assert torch.allclose(wrapped(feats), model(image=img, clinical=clin, lab=lab), atol=1e-5)
