"""Quantitative rectus femoris measurements from the ROI mask and the US calibration.

Clinicians already use RF cross-sectional area and thickness cut-offs and echo intensity for
sarcopenia; they are measured on the frame at its native resolution (the tissue-region crop the
reader returns), never on the 224x224 network input, so the calibration stays valid.
"""

from __future__ import annotations

import numpy as np

from inference.types import MuscleMeasurements


def measure_roi(
    image: np.ndarray, mask: np.ndarray, spacing_cm: tuple[float, float] | None
) -> MuscleMeasurements:
    """Measure the ROI.

    Args:
        image: float grayscale (H, W), 0..1 (``USFrame.image``).
        mask: bool (H, W), True inside the RF ROI, aligned with ``image``.
        spacing_cm: (row, col) pixel size in cm, or None when the image is uncalibrated.

    Returns:
        CSA = pixel count x pixel area (cm^2); thickness = the largest antero-posterior (row
        direction) extent of the ROI over all columns, first to last ROI row inclusive (cm);
        echo intensity mean and SD on the 0-255 grey scale. CSA and thickness are None without
        calibration.

    Raises:
        ValueError: if the shapes differ or the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    if not mask.any():
        raise ValueError("the ROI mask is empty")
    grey = np.asarray(image, dtype=np.float64)[mask] * 255.0
    csa = thickness = None
    if spacing_cm is not None:
        row_cm, col_cm = abs(float(spacing_cm[0])), abs(float(spacing_cm[1]))
        csa = float(mask.sum()) * row_cm * col_cm
        cols = np.flatnonzero(mask.any(axis=0))
        sub = mask[:, cols]
        first = sub.argmax(axis=0)
        last = sub.shape[0] - 1 - sub[::-1].argmax(axis=0)
        thickness = float((last - first + 1).max()) * row_cm
    return MuscleMeasurements(
        csa_cm2=csa,
        thickness_cm=thickness,
        echo_intensity_mean=float(grey.mean()),
        echo_intensity_sd=float(grey.std()),
    )
