"""Sarcopenia changes the rendered muscle the way the literature says (and nothing else does)."""

from __future__ import annotations

import numpy as np

from training.synth_image import anatomy_for, render


def _measure(latent: float, n: int = 6) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    sp = 5.0 / 200
    area, mean, sd = [], [], []
    for _ in range(n):
        img, mask = render(anatomy_for(latent, "F", 22.0, rng), 180, 200, sp, rng)
        area.append(mask.sum() * sp * sp)
        mean.append(img[mask].mean())
        sd.append(img[mask].std())
    return float(np.mean(area)), float(np.mean(mean)), float(np.mean(sd))


def test_severity_shrinks_and_brightens_the_rectus_femoris() -> None:
    healthy, sarcopenic = _measure(-1.0), _measure(2.5)
    assert sarcopenic[0] < 0.8 * healthy[0]  # cross-sectional area
    assert sarcopenic[1] > healthy[1] + 5  # echo intensity (fat infiltration)
    assert sarcopenic[2] > healthy[2]  # heterogeneity (fibro-fatty patches)
    assert 2.0 < healthy[0] < 9.0  # cm^2, plausible for an older woman's RF


def test_speckle_is_rayleigh_like_in_homogeneous_tissue() -> None:
    from training.synth_image import speckle

    env = speckle(np.random.default_rng(1), (256, 256))
    # Rayleigh: mean/std = sqrt(pi / (4 - pi)) ~ 1.91
    assert abs(env.mean() / env.std() - 1.91) < 0.15
