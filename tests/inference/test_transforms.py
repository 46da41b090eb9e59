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


def _ellipse(shape: tuple[int, int], center: tuple[float, float], radii_px: tuple[float, float]
             ) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return ((rr - center[0]) / radii_px[0]) ** 2 + ((cc - center[1]) / radii_px[1]) ** 2 <= 1.0


def test_physical_crop_keeps_the_muscles_true_size() -> None:
    """A 2x larger muscle (in cm) covers ~4x the input area; with the ROI-box crop it does not."""
    from inference.transforms import preprocess_transforms

    spacing = (0.02, 0.02)  # cm per pixel
    img = np.full((300, 400), 0.6, dtype=np.float32)
    small = _ellipse(img.shape, (150, 200), (0.5 / 0.02, 1.0 / 0.02))  # 1 x 2 cm
    large = _ellipse(img.shape, (150, 200), (1.0 / 0.02, 2.0 / 0.02))  # 2 x 4 cm
    phys = preprocess_transforms(64, 0.1, fov_cm=6.0)
    box = preprocess_transforms(64, 0.1)

    def area(pre, mask: np.ndarray) -> float:  # noqa: ANN001
        out = np.asarray(pre({"image": img[None], "mask": mask[None], "spacing_cm": spacing})
                         ["image"])
        return float((out > 0.3).mean())

    assert 3.4 < area(phys, large) / area(phys, small) < 4.6
    # the field of view is 6 cm: a 2 x 4 cm ellipse fills pi*1*2/36 of it
    assert abs(area(phys, large) - np.pi * 2 / 36) < 0.02
    assert 0.9 < area(box, large) / area(box, small) < 1.1  # the ROI-box crop loses the size


def test_physical_crop_is_the_same_at_another_pixel_spacing() -> None:
    from inference.transforms import preprocess_transforms

    pre = preprocess_transforms(64, 0.1, fov_cm=6.0)
    outs = []
    for sp in (0.02, 0.03):
        shape = (int(8 / sp), int(10 / sp))
        mask = _ellipse(shape, (4 / sp, 5 / sp), (0.8 / sp, 1.6 / sp))
        img = np.full(shape, 0.5, dtype=np.float32)
        outs.append(np.asarray(pre({"image": img[None], "mask": mask[None],
                                    "spacing_cm": (sp, sp)})["image"]))
    assert outs[0].shape == outs[1].shape == (1, 64, 64)
    assert np.mean(np.abs(outs[0] - outs[1])) < 0.02


def test_physical_crop_pads_at_the_edge_and_needs_the_spacing() -> None:
    import pytest

    from inference.transforms import fov_box, preprocess_transforms

    mask = np.zeros((100, 100), bool)
    mask[0:10, 0:10] = True
    r0, c0, r1, c1 = fov_box(mask, mask.shape, (0.1, 0.1), 4.0)
    assert (r1 - r0, c1 - c0) == (40, 40) and r0 < 0 and c0 < 0  # centred on the ROI, padded
    pre = preprocess_transforms(32, 0.1, fov_cm=4.0)
    out = np.asarray(pre({"image": np.ones((1, 100, 100), np.float32), "mask": mask[None],
                          "spacing_cm": (0.1, 0.1)})["image"])
    assert out.shape == (1, 32, 32) and out[0, 0, 0] == 0 and out[0, 16, 16] > 0.9
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the transform's ValueError
        pre({"image": np.ones((1, 100, 100), np.float32), "mask": mask[None], "spacing_cm": None})
    assert isinstance(err.value.__cause__, ValueError)
    assert "pixel spacing" in str(err.value.__cause__)
