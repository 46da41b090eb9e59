"""The served model's out-of-distribution score: Mahalanobis distance of pooled backbone features.

A probability says nothing about whether the image resembles the training images; the distance
of the image's pooled backbone features to theirs does. Each fold's features (D values, e.g. 512)
are projected to ``dims`` values by a Gaussian random projection drawn from a stored seed (so
model.json holds no D x dims matrix: a seed, a mean and a dims x dims precision per fold), the
Ledoit-Wolf Mahalanobis distance is taken per fold, and the folds' distances are averaged. The
threshold is fitted at training time (``training.ood``) so that >= 95 % of the training images
pass (``inference.gate.fit_ood_threshold``) and applied by the pipeline (``gate.apply_ood``).

model.json block (optional; a model without it is served without an OOD check)::

    "ood": {"method": "mahalanobis-rp", "threshold": 7.9, "keep": 0.95, "dims": 16,
            "n_train": 240, "folds": [{"seed": 0, "mean": [...], "precision": [[...]]}, ...]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from inference.errors import ModelArtifactError
from inference.gate import FeatureStats, mahalanobis_score

METHOD = "mahalanobis-rp"


def projection(n_features: int, dims: int, seed: int) -> np.ndarray:
    """The fold's fixed (n_features, dims) Gaussian random projection (Johnson-Lindenstrauss)."""
    rng = np.random.default_rng(seed)
    out: np.ndarray = rng.standard_normal((n_features, dims)) / np.sqrt(dims)
    return out


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """(N, D) pooled backbone features of an image classifier (what its head sees)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no image backbone")
    was_training = model.training
    model.eval()
    try:
        out = backbone(images.to(torch.float32))
    finally:
        model.train(was_training)
    feats: np.ndarray = out.reshape(out.shape[0], -1).double().cpu().numpy()
    return feats


@dataclass(frozen=True)
class OodModel:
    """The ``ood`` block of model.json, ready to score images."""

    threshold: float
    dims: int
    seeds: tuple[int, ...]
    stats: tuple[FeatureStats, ...]
    keep: float = 0.95
    n_train: int = 0

    def scores(self, models: Sequence[nn.Module], images: torch.Tensor) -> np.ndarray:
        """(N,) mean over folds of the Mahalanobis distance in each fold's projection."""
        if len(models) != len(self.stats):
            raise ValueError(f"{len(models)} fold model(s) but OOD statistics for "
                             f"{len(self.stats)}")
        out = np.zeros(images.shape[0], dtype=np.float64)
        for model, seed, st in zip(models, self.seeds, self.stats, strict=True):
            feats = pooled_features(model, images)
            out += mahalanobis_score(feats @ projection(feats.shape[1], self.dims, seed), st)
        return out / len(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "threshold": float(self.threshold), "keep": float(self.keep),
                "dims": int(self.dims), "n_train": int(self.n_train),
                "folds": [{"seed": int(s), "mean": [float(v) for v in st.mean],
                           "precision": [[float(v) for v in row] for row in st.precision]}
                          for s, st in zip(self.seeds, self.stats, strict=True)]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> OodModel | None:
        """Parse the block; None when the model has none.

        Raises:
            ModelArtifactError: the block is malformed (an OOD check that silently passes
                everything would be worse than none).
        """
        if raw is None:
            return None
        try:
            if raw.get("method") != METHOD:
                raise ValueError(f"method {raw.get('method')!r} is not {METHOD!r}")
            dims = int(raw["dims"])
            seeds, stats = [], []
            for f in raw["folds"]:
                mean = np.asarray(f["mean"], dtype=np.float64)
                prec = np.asarray(f["precision"], dtype=np.float64)
                if mean.shape != (dims,) or prec.shape != (dims, dims):
                    raise ValueError(f"fold statistics are not of dimension {dims}")
                seeds.append(int(f["seed"]))
                stats.append(FeatureStats(mean=mean, precision=prec))
            threshold = float(raw["threshold"])
            if not np.isfinite(threshold) or not stats:
                raise ValueError("no finite threshold or no fold statistics")
            return cls(threshold=threshold, dims=dims, seeds=tuple(seeds), stats=tuple(stats),
                       keep=float(raw.get("keep", 0.95)), n_train=int(raw.get("n_train", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelArtifactError(f"model.json 'ood' block is invalid: {exc}") from exc
