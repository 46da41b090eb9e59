"""MONAI dictionary transforms shared by the trainer and the scorer.

Training and serving build their pipelines from the same functions here, so an image is masked,
cropped, resized and scaled identically in both places (no train/serve skew). Every pipeline takes
``{"image": float32 (1, H, W) in 0..1, "mask": (1, H, W) or absent}`` and returns
``{"image": torch.float32 (C, S, S)}``.

The deterministic part (:func:`preprocess_transforms`) is split from the channel expansion so the
trainer can cache preprocessed (1, S, S) frames once and only run the random augmentations per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RepeatChanneld,
    Resized,
    ScaleIntensityRanged,
)


def roi_box(
    mask: np.ndarray | None, shape: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    """Bounding box (row0, col0, row1, col1; end exclusive) of the ROI grown by ``margin``.

    ``margin`` is a fraction of the box's own height/width added on each side, so the crop keeps
    some context around the muscle regardless of image resolution. Without a mask (or with an empty
    one) the whole image is the box.
    """
    h, w = shape
    if mask is None or not np.any(mask):
        return 0, 0, h, w
    rows = np.flatnonzero(np.any(mask, axis=1))
    cols = np.flatnonzero(np.any(mask, axis=0))
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    dr = int(math.ceil((r1 - r0) * margin))
    dc = int(math.ceil((c1 - c0) * margin))
    return max(0, r0 - dr), max(0, c0 - dc), min(h, r1 + dr), min(w, c1 + dc)


def fov_box(
    mask: np.ndarray | None, shape: tuple[int, int], spacing_cm: tuple[float, float] | None,
    fov_cm: float,
) -> tuple[int, int, int, int]:
    """A ``fov_cm`` x ``fov_cm`` window centred on the ROI box (or the image), in pixels.

    The window may extend past the image (it is zero-padded there), so every crop covers the same
    physical area and a small muscle stays small after resizing.

    Raises:
        ValueError: no usable pixel spacing (the image carries no US region calibration).
    """
    if spacing_cm is None or not all(np.isfinite(v) and v > 0 for v in spacing_cm):
        raise ValueError("a physically scaled crop needs the pixel spacing (US region "
                         "calibration), and this image has none")
    r0, c0, r1, c1 = roi_box(mask, shape, 0.0)
    cr, cc = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    hr = fov_cm / float(spacing_cm[0]) / 2.0
    hc = fov_cm / float(spacing_cm[1]) / 2.0
    return (int(round(cr - hr)), int(round(cc - hc)), int(round(cr + hr)), int(round(cc + hc)))


class MaskAndCropROId(MapTransform):
    """Zero the image outside the ROI mask, then crop it to the ROI box with a relative margin.

    MONAI's CropForegroundd takes its margin in pixels; the paper's crop is relative to the ROI,
    hence this small transform. The mask key is consumed (removed) so the output holds only the
    image. Without a mask the whole image passes through unchanged.
    """

    def __init__(self, image_key: str = "image", mask_key: str = "mask", margin: float = 0.1,
                 fov_cm: float = 0.0, spacing_key: str = "spacing_cm"):
        super().__init__(keys=[image_key], allow_missing_keys=False)
        self.image_key = image_key
        self.mask_key = mask_key
        self.margin = float(margin)
        self.fov_cm = float(fov_cm)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = np.asarray(d[self.image_key], dtype=np.float32)
        if image.ndim == 2:
            image = image[None]
        mask = d.pop(self.mask_key, None)
        m2d: np.ndarray | None = None
        if mask is not None:
            m2d = np.asarray(mask).astype(bool)
            if m2d.ndim == 3:
                m2d = m2d[0]
            if m2d.shape != image.shape[1:]:
                raise ValueError(
                    f"mask shape {m2d.shape} does not match image shape {image.shape[1:]}"
                )
            if not m2d.any():
                m2d = None
        if m2d is not None:
            image = image * m2d[None].astype(np.float32)
        spacing = d.pop(self.spacing_key, None)
        if self.fov_cm > 0:
            d[self.image_key] = _padded_crop(image, fov_box(m2d, image.shape[1:], spacing,
                                                            self.fov_cm))
            return d
        r0, c0, r1, c1 = roi_box(m2d, image.shape[1:], self.margin)
        d[self.image_key] = np.ascontiguousarray(image[:, r0:r1, c0:c1])
        return d


def _padded_crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(C, H, W)[box] with zeros where the box leaves the image."""
    r0, c0, r1, c1 = box
    _, h, w = image.shape
    out = np.zeros((image.shape[0], max(r1 - r0, 1), max(c1 - c0, 1)), dtype=np.float32)
    rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if rr1 > rr0 and cc1 > cc0:
        out[:, rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = image[:, rr0:rr1, cc0:cc1]
    return out


def preprocess_transforms(input_size: int, roi_margin: float, fov_cm: float = 0.0) -> Compose:
    """Deterministic part: ROI mask + crop, resize to ``input_size``², clip to 0..1 -> (1, S, S).

    ``fov_cm`` > 0: the crop is a fixed ``fov_cm`` square around the ROI (needs the data key
    "spacing_cm"), so the network sees the muscle's true size; 0: the ROI box plus ``roi_margin``
    stretched to the input size (size information lost, the paper's crop).
    """
    return Compose(
        [
            MaskAndCropROId(margin=roi_margin, fov_cm=fov_cm),
            Resized(keys="image", spatial_size=(input_size, input_size), mode="area"),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


def finish_transforms(in_chans: int) -> Compose:
    """Repeat the grey channel to the backbone's ``in_chans`` and hand out a plain float tensor."""
    steps: list[Any] = []
    if in_chans > 1:
        steps.append(RepeatChanneld(keys="image", repeats=in_chans))
    steps.append(EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(steps)


def augment_transforms(train_cfg: Any) -> Compose:
    """The paper's augmentation on a preprocessed (1, S, S) image, parameters from ``[train]``.

    Horizontal flip only (a vertical flip would put the skin at the bottom, which no probe does);
    affine shift/scale/rotation (half the images, so the network also sees un-resampled pixels as
    at serving time) with zero padding like the masked background; brightness as a
    multiplicative factor and contrast as a scaling about the image mean; then clip back to 0..1.
    """
    s = int(train_cfg.input_size)
    steps: list[Any] = [
        RandFlipd(keys="image", prob=float(train_cfg.flip_prob), spatial_axis=1),
        RandAffined(
            keys="image",
            prob=0.5,
            rotate_range=(math.radians(float(train_cfg.rotate_degrees)),),
            translate_range=(float(train_cfg.shift) * s, float(train_cfg.shift) * s),
            scale_range=(float(train_cfg.scale), float(train_cfg.scale)),
            mode="bilinear",
            padding_mode="zeros",
        ),
    ]
    if train_cfg.brightness > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=float(train_cfg.brightness), prob=0.5))
    if train_cfg.contrast > 0:
        steps.append(
            RandScaleIntensityFixedMeand(keys="image", factors=float(train_cfg.contrast), prob=0.5)
        )
    steps.append(
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
    )
    steps.append(EnsureTyped(keys="image", data_type="tensor", track_meta=False))
    return Compose(steps)


def eval_transforms(input_size: int, in_chans: int, roi_margin: float,
                    fov_cm: float = 0.0) -> Compose:
    """What the scorer (and validation during training) applies to every frame."""
    return Compose(
        [preprocess_transforms(input_size, roi_margin, fov_cm), finish_transforms(in_chans)]
    )


def train_transforms(train_cfg: Any) -> Compose:
    """Eval preprocessing + the random augmentations, from a :class:`TrainConfig`."""
    return Compose(
        [
            preprocess_transforms(train_cfg.input_size, train_cfg.roi_margin,
                                  float(getattr(train_cfg, "fov_cm", 0.0))),
            augment_transforms(train_cfg),
            finish_transforms(train_cfg.in_chans),
        ]
    )
