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
from functools import lru_cache

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
    k = rng.integers(2, 5, size=4)
    amps = rng.uniform(0.005, 0.03, size=4)
    phases = rng.uniform(0, 2 * np.pi, size=4)
    return Anatomy(
        rf_csa_cm2=float(csa), rf_thickness_cm=thickness,
        rf_center_x_cm=float(rng.normal(0.0, 0.25)), fat_cm=fat,
        vi_thickness_cm=float(np.clip(1.5 * np.exp(-0.1 * z) + rng.normal(0, 0.15), 0.7, 2.4)),
        femur_radius_cm=float(rng.uniform(1.0, 1.3)),
        echo=float(0.20 + 0.04 * z + rng.normal(0.0, 0.03)),
        heterogeneity=float(np.clip(0.14 + 0.12 * z + rng.normal(0.0, 0.05), 0.02, 0.7)),
        streaks=float(np.clip(0.45 - 0.03 * z + rng.normal(0.0, 0.05), 0.1, 0.8)),
        fiber_angle=float(rng.normal(0.0, 0.12)),
        boundary=tuple(np.concatenate([k, amps, phases]).tolist()),
        gain_db=float(rng.normal(0.0, 1.5)),
        focus_cm=float(rng.uniform(1.8, 3.0)),
    )


@lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation as a (n_out, n_in) matrix: upsampling becomes two small matmuls."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float],
           down: int = 4) -> np.ndarray:
    """Smooth random field (unit variance) computed at 1/down resolution and upsampled.

    The smoothing length is many pixels, so the coarse grid loses nothing visible and costs a
    sixteenth; bilinear upsampling is two BLAS matmuls (much faster than ndimage.zoom).
    """
    small = (max(shape[0] // down, 4), max(shape[1] // down, 4))
    f = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32),
                                (max(sigma[0] / down, 0.3), max(sigma[1] / down, 0.3)))
    f /= f.std() + 1e-6
    return _interp_matrix(shape[0], small[0]) @ f @ _interp_matrix(shape[1], small[1]).T


def speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rayleigh-distributed envelope with a short axial and longer lateral correlation.

    The complex echo is drawn at half lateral resolution and each sample spread over two
    columns: the lateral speckle size of a linear array is about twice the axial one anyway.
    """
    half = (shape[0], (shape[1] + 1) // 2)
    re = ndimage.uniform_filter(rng.standard_normal(half, dtype=np.float32), size=(2, 2))
    im = ndimage.uniform_filter(rng.standard_normal(half, dtype=np.float32), size=(2, 2))
    env = np.sqrt(re * re + im * im)
    env = np.repeat(env, 2, axis=1)[:, : shape[1]]
    return env / env.mean()


def _rows(depth_cm: float, spacing_cm: float, rows: int) -> int:
    """Row index of a depth, clipped to the image."""
    return int(np.clip(round(depth_cm / spacing_cm), 0, rows))


def render(anatomy: Anatomy, rows: int, cols: int, spacing_cm: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one B-mode frame.

    Tissue layers are horizontal bands, so they are filled by row slices; per-pixel geometry
    (the RF outline, the femur) is only evaluated inside its bounding box.

    Args:
        anatomy: scan parameters.
        rows: image height in pixels (depth).
        cols: image width in pixels (lateral).
        spacing_cm: square pixel size in cm.
        rng: random stream for textures and speckle.

    Returns:
        ``(image, mask)``: uint8 (rows, cols) grey levels and the bool RF mask.
    """
    a, sp = anatomy, spacing_cm
    depth = (np.arange(rows, dtype=np.float32) + 0.5) * sp  # cm, per row
    lateral = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) * sp  # cm, per column

    skin = 0.12
    fat_bottom = skin + a.fat_cm
    r_skin, r_fat = _rows(skin, sp, rows), _rows(fat_bottom, sp, rows)
    fascia_px = max(1, int(round(0.04 / sp)))
    tissue = np.empty((rows, cols), np.float32)
    tissue[:r_skin] = 0.85
    # hypoechoic subcutaneous fat crossed by bright connective-tissue septa
    if r_fat > r_skin:
        septa = _field(rng, (r_fat - r_skin, cols), (0.03 / sp, 0.7 / sp))
        tissue[r_skin:r_fat] = np.where(septa > 1.5, 0.4, 0.1)
    # muscle below the superficial fascia: vastus lateralis/medialis/intermedius share the
    # texture of the RF (perimysium streaks + fibro-fatty patches) at a slightly lower level
    r_mus = min(r_fat + fascia_px, rows)
    n_mus = rows - r_mus
    if n_mus > 0:
        streak = _field(rng, (n_mus, cols), (0.02 / sp, 0.22 / sp), down=2)
        # perimysium runs slightly oblique to the transducer: shear the streak field
        shift = (np.tan(a.fiber_angle) * (np.arange(cols) - cols / 2)).astype(np.intp)
        streak = streak[(np.arange(n_mus)[:, None] + shift[None, :]) % n_mus,
                        np.arange(cols)[None, :]]
        patches = _field(rng, (n_mus, cols), (0.12 / sp, 0.18 / sp))
        texture = (a.streaks * np.clip(streak - 1.0, 0, None)
                   + a.heterogeneity * np.clip(patches - 0.4, 0, None))
        tissue[r_mus:] = 0.72 * a.echo + 0.9 * texture
    full_texture = np.zeros((rows, cols), np.float32)
    if n_mus > 0:
        full_texture[r_mus:] = texture
    tissue[max(r_fat - fascia_px, 0):r_mus] = 0.85  # superficial fascia

    # rectus femoris: an irregular, deep-flattened ellipse inside a bright epimysium
    b = a.rf_thickness_cm / 2
    half_w = a.rf_csa_cm2 / (np.pi * b)
    cy = fat_bottom + 0.06 + b
    k, amp, ph = np.split(np.asarray(a.boundary, np.float32), 3)
    r0, r1 = _rows(cy - 1.4 * b, sp, rows), _rows(cy + 1.4 * b, sp, rows)
    c0 = int(np.clip((a.rf_center_x_cm - 1.4 * half_w) / sp + cols / 2, 0, cols))
    c1 = int(np.clip((a.rf_center_x_cm + 1.4 * half_w) / sp + cols / 2, 0, cols))
    dy = (depth[r0:r1] - cy)[:, None]
    dx = (lateral[c0:c1] - a.rf_center_x_cm)[None, :]
    theta = np.arctan2(dy / b, dx / half_w)
    radius = 1.0 + sum(amp[i] * np.cos(k[i] * theta + ph[i]) for i in range(len(k)))
    radius *= 1.0 - 0.08 * np.clip(dy / b, 0, None)
    r = np.sqrt((dx / half_w) ** 2 + (dy / b) ** 2) / radius
    inside = r < 1.0
    epimysium = (r >= 1.0) & (r < 1.0 + 0.06 / b)
    box = tissue[r0:r1, c0:c1]
    box[inside] = a.echo + full_texture[r0:r1, c0:c1][inside]
    box[epimysium] = 0.95
    mask = np.zeros((rows, cols), bool)
    mask[r0:r1, c0:c1] = inside

    # deep fascia between RF and vastus intermedius, then the femur: cortex and shadow
    vi_top = cy + b * 0.95 + 0.1
    rv = _rows(vi_top, sp, rows)
    tissue[max(rv - fascia_px // 2, 0):rv + fascia_px // 2 + 1] = np.maximum(
        tissue[max(rv - fascia_px // 2, 0):rv + fascia_px // 2 + 1], 0.75)
    fx = a.rf_center_x_cm * 0.5
    femur_cy = vi_top + a.vi_thickness_cm + a.femur_radius_cm
    fc0 = int(np.clip((fx - a.femur_radius_cm) / sp + cols / 2, 0, cols))
    fc1 = int(np.clip((fx + a.femur_radius_cm) / sp + cols / 2, 0, cols))
    if fc1 > fc0:
        top = femur_cy - np.sqrt(np.clip(a.femur_radius_cm ** 2
                                         - (lateral[fc0:fc1] - fx) ** 2, 0, None))
        below = depth[:, None] - top[None, :]  # cm below the bone surface, per column
        band = tissue[:, fc0:fc1]
        band[(below >= 0) & (below < 0.12)] = 1.2
        band[below >= 0.12] = 0.04

    img = tissue * speckle(rng, (rows, cols))
    # attenuation (~0.5 dB/cm/MHz, two-way) partly compensated by TGC, plus the focal zone
    gain = (np.exp(-0.17 * depth) * (1.0 + 0.35 * np.exp(-((depth - a.focus_cm) / 0.7) ** 2))
            * 10 ** (a.gain_db / 20)).astype(np.float32)
    img *= gain[:, None]
    db = 20 * np.log10(img + 1e-3)
    out = np.clip((db + 31.0) / 40.0 * 255.0, 0, 255).astype(np.uint8)
    return out, mask
