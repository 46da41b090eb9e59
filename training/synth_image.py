"""B-mode images of the mid-thigh from simple tissue physics, vectorised with numpy.

A transverse scan of the anterior thigh is built as a backscatter map (skin, subcutaneous fat
with septa, the rectus femoris (RF) cross-section with bright fascia and perimysium streaks, the
vastus intermedius, the femur with its bright cortex and acoustic shadow), multiplied by
Rayleigh speckle (envelope of correlated complex Gaussian noise), attenuated with depth, partly
compensated by time-gain, brightened at the focal zone and log-compressed. The RF mask is the
region inside the fascia, i.e. what a sonographer would outline. Sarcopenia only enters through
the latent score: smaller area and thickness, brighter and more heterogeneous muscle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Anatomy:
    """Physical parameters of one scan (cm, unitless echo levels)."""

    rf_csa_cm2: float
    rf_thickness_cm: float
    rf_center_x_cm: float
    fat_cm: float
    vi_thickness_cm: float
    femur_radius_cm: float
    echo: float  # muscle backscatter level (fat infiltration raises it)
    heterogeneity: float  # amplitude of fibro-fatty patches
    streaks: float  # perimysium brightness
    fiber_angle: float  # radians, perimysium orientation
    boundary: tuple[float, ...]  # harmonic amplitudes/phases of the irregular RF outline
    gain_db: float  # operator gain
    focus_cm: float


def anatomy_for(latent: float, sex: str, bmi: float | None,
                rng: np.random.Generator) -> Anatomy:
    """Map the participant's latent severity to RF geometry and echo texture for one image.

    Per-image jitter (probe pressure, angle, gain) makes images of one participant differ, as
    in real repeated acquisitions.
    """
    z = latent + rng.normal(0.0, 0.25)  # acquisition-to-acquisition variability
    base_csa = 6.4 if sex == "M" else 4.9
    csa = base_csa * np.exp(-0.16 * z + rng.normal(0.0, 0.10))
    thickness = (1.95 if sex == "M" else 1.65) * np.exp(-0.12 * z + rng.normal(0.0, 0.08))
    # keep the ellipse plausible: width/thickness between 1.4 and 2.6
    thickness = float(np.clip(thickness, np.sqrt(4 * csa / np.pi / 2.6),
                              np.sqrt(4 * csa / np.pi / 1.4)))
    bmi_v = 23.0 if bmi is None else bmi
    fat = float(np.clip((0.55 if sex == "M" else 0.95) + 0.07 * (bmi_v - 23.0)
                        + rng.normal(0.0, 0.15), 0.25, 2.2))
    k = rng.integers(2, 6, size=4)
    amps = rng.uniform(0.01, 0.05, size=4)
    phases = rng.uniform(0, 2 * np.pi, size=4)
    return Anatomy(
        rf_csa_cm2=float(csa), rf_thickness_cm=thickness,
        rf_center_x_cm=float(rng.normal(0.0, 0.25)), fat_cm=fat,
        vi_thickness_cm=float(np.clip(1.5 * np.exp(-0.1 * z) + rng.normal(0, 0.15), 0.7, 2.4)),
        femur_radius_cm=float(rng.uniform(1.0, 1.3)),
        echo=float(0.20 + 0.04 * z + rng.normal(0.0, 0.03)),
        heterogeneity=float(np.clip(0.18 + 0.08 * z + rng.normal(0.0, 0.04), 0.02, 0.6)),
        streaks=float(np.clip(0.45 - 0.06 * z + rng.normal(0.0, 0.05), 0.1, 0.8)),
        fiber_angle=float(rng.normal(0.0, 0.12)),
        boundary=tuple(np.concatenate([k, amps, phases]).tolist()),
        gain_db=float(rng.normal(0.0, 1.5)),
        focus_cm=float(rng.uniform(1.8, 3.0)),
    )


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float],
           down: int = 4) -> np.ndarray:
    """Smooth random field (unit variance) computed at 1/down resolution and upsampled."""
    small = (max(shape[0] // down, 4), max(shape[1] // down, 4))
    f = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32),
                                (max(sigma[0] / down, 0.3), max(sigma[1] / down, 0.3)))
    f /= f.std() + 1e-6
    zoomed = ndimage.zoom(f, (shape[0] / small[0], shape[1] / small[1]), order=1)
    out = np.zeros(shape, np.float32)
    out[: zoomed.shape[0], : zoomed.shape[1]] = zoomed[: shape[0], : shape[1]]
    return out


def speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rayleigh-distributed envelope with a short axial and longer lateral correlation."""
    re = rng.standard_normal(shape, dtype=np.float32)
    im = rng.standard_normal(shape, dtype=np.float32)
    re = ndimage.uniform_filter(re, size=(2, 3))
    im = ndimage.uniform_filter(im, size=(2, 3))
    env = np.sqrt(re * re + im * im)
    return env / env.mean()


def render(anatomy: Anatomy, rows: int, cols: int, spacing_cm: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one B-mode frame.

    Args:
        anatomy: scan parameters.
        rows: image height in pixels (depth).
        cols: image width in pixels (lateral).
        spacing_cm: square pixel size in cm.
        rng: random stream for textures and speckle.

    Returns:
        ``(image, mask)``: uint8 (rows, cols) grey levels and the bool RF mask.
    """
    a = anatomy
    y = (np.arange(rows, dtype=np.float32) + 0.5)[:, None] * spacing_cm  # depth, cm
    x = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2)[None, :] * spacing_cm  # lateral

    skin = 0.12
    fat_bottom = skin + a.fat_cm
    b = a.rf_thickness_cm / 2
    half_w = a.rf_csa_cm2 / (np.pi * b)
    cy = fat_bottom + 0.06 + b
    dx, dy = x - a.rf_center_x_cm, y - cy
    theta = np.arctan2(dy / b, dx / half_w)
    k, amp, ph = np.split(np.asarray(a.boundary, np.float32), 3)
    radius = 1.0 + sum(amp[i] * np.cos(k[i] * theta + ph[i]) for i in range(len(k)))
    # the RF is flatter on its deep side and tapers laterally (a "teardrop" ellipse)
    radius = radius * (1.0 - 0.08 * np.clip(dy / b, 0, None))
    r = np.sqrt((dx / half_w) ** 2 + (dy / b) ** 2) / radius
    fascia_w = 0.05 / b
    mask = r < 1.0

    vi_top = cy + b * 0.95 + 0.1
    femur_cy = vi_top + a.vi_thickness_cm + a.femur_radius_cm
    femur_top = femur_cy - np.sqrt(np.clip(a.femur_radius_cm ** 2
                                           - (x - a.rf_center_x_cm * 0.5) ** 2, 0, None))
    in_femur_cols = np.abs(x - a.rf_center_x_cm * 0.5) < a.femur_radius_cm

    # --- backscatter map -------------------------------------------------------------------
    tissue = np.full((rows, cols), 0.1, np.float32)  # fat default
    septa = _field(rng, (rows, cols), (0.6 / spacing_cm * 0.05, 1.2 / spacing_cm * 0.6))
    fat_zone = (y >= skin) & (y < fat_bottom)
    tissue = np.where(fat_zone, 0.1 + 0.3 * (septa > 1.5), tissue)
    tissue = np.where(y < skin, 0.85, tissue)
    # superficial fascia (fat/muscle interface) across the whole width
    tissue = np.where(np.abs(y - fat_bottom) < 0.04, 0.85, tissue)
    # muscles: vastus lateralis/medialis beside the RF and vastus intermedius below
    muscle_zone = (y >= fat_bottom + 0.04) & ~(in_femur_cols & (y >= femur_top))
    streak = _field(rng, (rows, cols), (0.02 / spacing_cm, 0.22 / spacing_cm), down=2)
    # perimysium runs slightly oblique to the transducer: shear the streak field
    shift = (np.tan(a.fiber_angle) * (np.arange(cols) - cols / 2)).astype(np.intp)
    streak = streak[(np.arange(rows)[:, None] + shift[None, :]) % rows, np.arange(cols)[None, :]]
    patches = _field(rng, (rows, cols), (0.12 / spacing_cm, 0.18 / spacing_cm))
    muscle = (0.8 * a.echo + a.streaks * np.clip(streak - 1.0, 0, None)
              + a.heterogeneity * np.clip(patches - 0.4, 0, None))
    tissue = np.where(muscle_zone, muscle * 0.9, tissue)
    rf_muscle = a.echo + a.streaks * np.clip(streak - 1.0, 0, None) + a.heterogeneity * np.clip(
        patches - 0.4, 0, None)
    tissue = np.where(mask, rf_muscle, tissue)
    tissue = np.where((r >= 1.0) & (r < 1.0 + fascia_w * 1.6), 0.95, tissue)  # epimysium
    # intermuscular fascia RF / vastus intermedius
    tissue = np.where(np.abs(y - vi_top) < 0.035, np.maximum(tissue, 0.75), tissue)
    # femur: bright cortex, then shadow
    cortex = in_femur_cols & (y >= femur_top) & (y < femur_top + 0.12)
    tissue = np.where(cortex, 1.2, tissue)
    shadow = in_femur_cols & (y >= femur_top + 0.12)
    tissue = np.where(shadow, 0.04, tissue)

    img = tissue * speckle(rng, (rows, cols))
    # attenuation (~0.7 dB/cm/MHz at ~10 MHz, two-way) partly compensated by TGC, focal zone
    atten = np.exp(-0.55 * y) * np.exp(0.38 * y)
    focus = 1.0 + 0.35 * np.exp(-((y - a.focus_cm) / 0.7) ** 2)
    img = img * atten * focus * (10 ** (a.gain_db / 20))
    db = 20 * np.log10(img + 1e-3)
    out = np.clip((db + 31.0) / 40.0 * 255.0, 0, 255).astype(np.uint8)
    return out, mask
