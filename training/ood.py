"""Fit the served model's OOD check on the training images (``dicom-node train``).

The statistics and the threshold are the model's, so they are written into its model.json (the
``ood`` block, see :mod:`inference.ood`) and never into the node's config. The threshold lets at
least ``keep`` (95 %) of the training images pass, scored exactly as serving scores them: every
fold's pooled features, projected, Mahalanobis distance, mean over folds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from inference.gate import fit_feature_stats, fit_ood_threshold, mahalanobis_score
from inference.model import ModelSpec, create_model
from inference.ood import OodModel, pooled_features, projection

log = logging.getLogger(__name__)

DIMS = 16
# The floor is 95 % of the training images; the gate as a whole must let >= 98 % of
# muscle images through, so the OOD check alone keeps 99 % of them.
KEEP = 0.99
MIN_IMAGES = 8


def _features(model: nn.Module, images: np.ndarray, in_chans: int, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch], dtype=np.float32))
        if in_chans > 1 and x.shape[1] == 1:
            x = x.repeat(1, in_chans, 1, 1)  # as inference.transforms.finish_transforms
        out.append(pooled_features(model, x))
    return np.concatenate(out)


def fit_ood(models: Sequence[nn.Module], images: np.ndarray, in_chans: int, *,
            keep: float = KEEP, dims: int = DIMS, seed: int = 0, batch: int = 32) -> OodModel:
    """Statistics per fold and the threshold, from (N, 1, S, S) preprocessed training images."""
    if len(images) < MIN_IMAGES:
        raise ValueError(f"{len(images)} training image(s); at least {MIN_IMAGES} are needed")
    seeds, stats, feats = [], [], []
    for k, model in enumerate(models):
        f = _features(model, images, in_chans, batch)
        f = f @ projection(f.shape[1], dims, seed + k)
        seeds.append(seed + k)
        stats.append(fit_feature_stats(f))
        feats.append(f)
    scores = np.mean([mahalanobis_score(f, st) for f, st in zip(feats, stats, strict=True)],
                     axis=0)
    # a training image at the quantile must still pass when serving batches it differently
    # (float round-off of a few ulps), hence the relative margin
    threshold = fit_ood_threshold(scores, keep) * (1.0 + 1e-6)
    log.info("OOD check: threshold %.3f lets %.1f %% of %d training images pass", threshold,
             100.0 * float(np.mean(scores <= threshold)), len(scores))
    return OodModel(threshold=threshold, dims=dims, seeds=tuple(seeds), stats=tuple(stats),
                    keep=keep, n_train=len(scores))


def ood_block(spec: ModelSpec, fold_states: Sequence[Mapping[str, torch.Tensor]],
              images: Sequence[np.ndarray | None], *, seed: int = 0) -> dict[str, Any] | None:
    """The model.json ``ood`` block for an image model; None (logged) when it cannot be fitted."""
    if tuple(spec.modalities) != ("image",):
        return None
    arr = [im for im in images if im is not None]
    if len(arr) < MIN_IMAGES:
        log.warning("no OOD check in the model: %d training image(s), %d needed", len(arr),
                    MIN_IMAGES)
        return None
    models = []
    for state in fold_states:
        model = create_model(spec)
        model.load_state_dict(dict(state))
        models.append(model.eval())
    return fit_ood(models, np.stack(arr), spec.in_chans, seed=seed).to_dict()
