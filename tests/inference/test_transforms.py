"""The shared MONAI preprocessing: mask, ROI crop with margin, resize, 0..1, channels."""

from __future__ import annotations

import numpy as np
import torch

from inference.transforms import (
    eval_transforms,
    preprocess_transforms,
    roi_box,
    train_transforms,
)
from training.config import TrainConfig


def _image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = rng.random((1, 100, 160), dtype=np.float32) * 0.5 + 0.5  # no zeros anywhere
    mask = np.zeros((1, 100, 160), bool)
    mask[0, 20:60, 40:120] = True
    return img, mask


def test_roi_box_margin_and_clipping() -> None:
    m = np.zeros((100, 160), bool)
    m[20:60, 40:120] = True
    assert roi_box(m, (100, 160), 0.0) == (20, 40, 60, 120)
    assert roi_box(m, (100, 160), 0.1) == (16, 32, 64, 128)
    assert roi_box(m, (100, 160), 1.0) == (0, 0, 100, 160)
    assert roi_box(None, (100, 160), 0.1) == (0, 0, 100, 160)
    assert roi_box(np.zeros((100, 160), bool), (100, 160), 0.1) == (0, 0, 100, 160)


def test_eval_masks_crops_and_resizes() -> None:
    img, mask = _image_and_mask()
    out = eval_transforms(32, 3, 0.0)({"image": img, "mask": mask})
    x = out["image"]
    assert set(out) == {"image"}
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[2])
    # margin 0: the crop is exactly the ROI, which has no zeros
    assert float(x.min()) > 0.4 and float(x.max()) <= 1.0
    # margin 0.5: the border outside the ROI is zeroed
    y = eval_transforms(32, 1, 0.5)({"image": img, "mask": mask})["image"]
    assert y.shape == (1, 32, 32) and float(y[0, 0, 0]) == 0.0 and float(y[0, 16, 16]) > 0.4


def test_without_mask_uses_whole_image_and_clips() -> None:
    img = np.full((1, 40, 80), 1.7, np.float32)
    x = preprocess_transforms(16, 0.1)({"image": img})["image"]
    assert tuple(x.shape) == (1, 16, 16) and float(np.asarray(x).max()) == 1.0


def test_train_transforms_seeded_and_in_range() -> None:
    img, mask = _image_and_mask()
    cfg = TrainConfig(input_size=32, in_chans=3)
    t = train_transforms(cfg)
    t.set_random_state(7)
    a = [t({"image": img, "mask": mask})["image"] for _ in range(3)]
    t.set_random_state(7)
    b = [t({"image": img, "mask": mask})["image"] for _ in range(3)]
    for x, y in zip(a, b):
        assert x.shape == (3, 32, 32) and torch.equal(x, y)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert not torch.equal(a[0], a[1])  # augmentation actually changes the image
