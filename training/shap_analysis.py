"""SHAP contribution of each modality (image / clinical / lab) to a fusion model (paper Fig. 4E).

Why on the fusion input: the fusion model concatenates the image feature vector (the backbone's
pooled output) with the raw clinical and lab vectors after their MLP branches. Explaining the
function ``[image features ⊕ clinical ⊕ lab] -> logit`` gives one SHAP value per image feature
and per clinical/lab input; summing |SHAP| over each block gives that modality's contribution,
while the clinical/lab values stay readable per feature. The backbone is run once, outside SHAP.

Explainers (the ``shap`` package, verified against shap 0.51): ``"deep"`` =
``shap.DeepExplainer`` (DeepLIFT-style, additive: sum of SHAP = f(x) - E[f(background)]),
``"gradient"`` = ``shap.GradientExplainer`` (expected gradients, sampled). Both take a torch module
of one tensor ``(N, D)`` and return values of shape ``(N, D, outputs)``.

API::

    modality_shap(head, background, explained, blocks={"image": slice(0, 768), ...},
                  method="deep", feature_names=None, nsamples=200, seed=0) -> ShapResult
    FusionInputHead(model)      # nn.Module: concat [img feats ⊕ clinical ⊕ lab] -> model's logit
    fusion_shap(model, image=None, clinical=None, lab=None, n_background=50, n_explain=200,
                clinical_names=None, lab_names=None, method="deep", seed=0) -> ShapResult
    ShapResult.to_dict() -> JSON-ready (contribution, share, per-feature mean |SHAP|)
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from inference.model import backbone_width

log = logging.getLogger(__name__)

Method = Literal["deep", "gradient"]


@dataclass
class ShapResult:
    """Per-modality and per-feature SHAP magnitudes over the explained cases.

    Attributes:
        contribution: modality -> mean over cases of sum_{features in block} |SHAP| (logit units).
        share: modality -> contribution / total contribution (sums to 1; Fig. 4E's proportions).
        feature_names: one name per input column of the head.
        feature_mean_abs: (D,) mean |SHAP| per input column.
        values: (N, D) SHAP values of the explained cases.
        expected_value: E[f(background)] (logit).
        method: "deep" or "gradient".
        blocks: modality -> (start, stop) column range.
    """

    contribution: dict[str, float]
    share: dict[str, float]
    feature_names: list[str]
    feature_mean_abs: np.ndarray
    values: np.ndarray
    expected_value: float
    method: str
    blocks: dict[str, tuple[int, int]]

    def top_features(self, modality: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` features of one block with the largest mean |SHAP|."""
        a, b = self.blocks[modality]
        idx = np.argsort(-self.feature_mean_abs[a:b])[:k] + a
        return [(self.feature_names[i], float(self.feature_mean_abs[i])) for i in idx]

    def to_dict(self, per_feature: bool = True) -> dict[str, Any]:
        """JSON-ready summary; image features are summarised by their block only."""
        d: dict[str, Any] = {"method": self.method, "expected_value": self.expected_value,
                             "contribution": self.contribution, "share": self.share,
                             "n_explained": int(self.values.shape[0])}
        if per_feature:
            d["features"] = {m: dict(self.top_features(m, 10 if m == "image" else b - a))
                             for m, (a, b) in self.blocks.items()}
        return d


def _as_slice(v: slice | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, slice):
        return int(v.start or 0), int(v.stop)
    a, b = v
    return int(a), int(b)


def modality_shap(head: nn.Module, background: torch.Tensor, explained: torch.Tensor,
                  blocks: Mapping[str, slice | tuple[int, int]], *, method: Method = "deep",
                  feature_names: Sequence[str] | None = None, nsamples: int = 200,
                  seed: int = 0) -> ShapResult:
    """SHAP values of ``head`` on ``explained`` against ``background``, summed per block.

    Args:
        head: torch module taking one float tensor (N, D) and returning (N,) or (N, 1) logits.
            It is deep-copied and put in eval mode (dropout off); the caller's module is untouched.
        background: (B, D) reference inputs (e.g. a sample of training cases).
        explained: (N, D) inputs to explain.
        blocks: modality -> column range; the ranges must tile 0..D without overlap.
        method: "deep" (DeepExplainer, additive) or "gradient" (GradientExplainer, sampled).
        feature_names: D names (default "<modality>_<i>").
        nsamples, seed: GradientExplainer sampling.
    """
    d = int(explained.shape[1])
    ranges = {m: _as_slice(s) for m, s in blocks.items()}
    cover = sorted(ranges.values())
    if cover[0][0] != 0 or cover[-1][1] != d or any(a[1] != b[0] for a, b in pairwise(cover)):
        raise ValueError(f"blocks {ranges} must tile columns 0..{d} without gaps or overlap")
    names = list(feature_names) if feature_names is not None else [
        f"{m}_{i - a}" for m, (a, b) in ranges.items() for i in range(a, b)]
    if len(names) != d:
        raise ValueError(f"{len(names)} feature names for {d} columns")
    model = _Logit(copy.deepcopy(head)).eval()
    bg = background.detach().float()
    x = explained.detach().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shap warns about unrecognised modules (GELU, Dropout)
        import shap

        if method == "deep":
            explainer = shap.DeepExplainer(model, bg)
            vals = explainer.shap_values(x, check_additivity=False)
        elif method == "gradient":
            explainer = shap.GradientExplainer(model, bg)
            vals = explainer.shap_values(x, nsamples=nsamples, rseed=seed)
        else:
            raise ValueError(f"unknown SHAP method {method!r}")
    v = np.asarray(vals, dtype=np.float64)
    if v.ndim == 3:
        v = v[..., 0]
    with torch.no_grad():
        expected = float(model(bg).mean())
    abs_v = np.abs(v)
    contribution = {m: float(abs_v[:, a:b].sum(axis=1).mean()) for m, (a, b) in ranges.items()}
    total = sum(contribution.values())
    share = {m: (c / total if total > 0 else 0.0) for m, c in contribution.items()}
    log.info("SHAP (%s) modality shares: %s", method,
             ", ".join(f"{m} {s:.2f}" for m, s in share.items()))
    return ShapResult(contribution, share, names, abs_v.mean(axis=0), v, expected, method, ranges)


class _Logit(nn.Module):
    """Make the output (N, 1) whatever the head returns ((N,) or (N, 1))."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out.reshape(out.shape[0], -1)[:, :1]


class FusionInputHead(nn.Module):
    """The fusion model from its concatenated input ``[image features ⊕ clinical ⊕ lab]``.

    Works with any model exposing ``modalities`` and the ``clinical`` / ``lab`` branches and
    ``head`` (inference.model.FusionNet); block widths come from the branch input layers.
    """

    def __init__(self, model: nn.Module, image_width: int = 0) -> None:
        super().__init__()
        self.modalities = tuple(getattr(model, "modalities", ("image",)))
        self.clinical = getattr(model, "clinical", None)
        self.lab = getattr(model, "lab", None)
        self.head = model.get_submodule("head")
        self.widths: dict[str, int] = {}
        if "image" in self.modalities:
            self.widths["image"] = image_width or backbone_width(model.get_submodule("backbone"))
        for name in ("clinical", "lab"):
            branch = getattr(self, name)
            if name in self.modalities and branch is not None:
                self.widths[name] = int(branch[0].in_features)

    def blocks(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        start = 0
        for m in ("image", "clinical", "lab"):
            if m in self.widths:
                out[m] = (start, start + self.widths[m])
                start += self.widths[m]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for m, (a, b) in self.blocks().items():
            block = x[:, a:b]
            parts.append(block if m == "image" else getattr(self, m)(block))
        return self.head(torch.cat(parts, dim=1))


def fusion_shap(model: nn.Module, image: torch.Tensor | None = None,
                clinical: torch.Tensor | None = None, lab: torch.Tensor | None = None, *,
                n_background: int = 50, n_explain: int = 200,
                clinical_names: Sequence[str] | None = None,
                lab_names: Sequence[str] | None = None, method: Method = "deep",
                seed: int = 0, batch_size: int = 32) -> ShapResult:
    """SHAP modality contributions of a trained fusion model on a set of cases.

    Image features are computed once with the backbone (eval, no grad); a seeded random subset of
    ``n_background`` cases is the reference and up to ``n_explain`` other cases are explained
    (all cases when there are too few to keep them apart).
    """
    wrapped = FusionInputHead(model)
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    try:
        if "image" in wrapped.widths:
            if image is None:
                raise ValueError("the model has an image branch: pass image")
            with torch.no_grad():
                backbone = model.get_submodule("backbone")
                feats = [backbone(image[i:i + batch_size])
                         for i in range(0, len(image), batch_size)]
            parts.append(torch.cat(feats).float())
        for name, x in (("clinical", clinical), ("lab", lab)):
            if name in wrapped.widths:
                if x is None:
                    raise ValueError(f"the model has a {name} branch: pass {name}")
                parts.append(torch.as_tensor(x).float())
    finally:
        model.train(was_training)
    full = torch.cat(parts, dim=1)
    n = full.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    nb = min(n_background, max(1, n // 2))
    bg_idx = order[:nb]
    ex_idx = order[nb:nb + n_explain] if n - nb >= 2 else order[:n_explain]
    names: list[str] = []
    for m, (a, b) in wrapped.blocks().items():
        given = {"clinical": clinical_names, "lab": lab_names}.get(m)
        names += list(given) if given is not None and len(given) == b - a else [
            f"{m}_{i}" for i in range(b - a)]
    return modality_shap(wrapped, full[bg_idx], full[ex_idx], wrapped.blocks(), method=method,
                         feature_names=names, seed=seed)
