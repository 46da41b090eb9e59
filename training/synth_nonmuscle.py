"""Non-muscle ultrasound a modality sends alongside (or instead of) thigh images.

The input gate must stop these before the sarcopenia model sees them, so the project makes them
itself: colour Doppler (a colour box over B-mode, RGB), cardiac-like sector scans, obstetric and
other fluid-filled structures (anechoic regions), and duplex layouts with a spectral Doppler strip.
Each kind comes with and without a Sequence of Ultrasound Regions, because many exports drop it.
:func:`gate_mix` draws a seeded mix of these and of thigh-muscle images (the regular generator,
every vendor quirk included) and measures the gate on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage

from inference.gate import GateConfig, GateVerdict, gate_dataset
from training.synth_dicom import (
    PROFILES,
    Layout,
    _region,
    build_us,
    compose_frame,
    make_layout,
    mmode_strip,
    ui_template,
)
from training.synth_image import anatomy_for, render, speckle

KINDS = ("colour-doppler", "sector", "obstetric", "fluid", "spectral")
MUSCLE_QUIRKS = {"supersonic": "side-by-side", "mindray": "m-mode", "samsung": "palette"}


@dataclass
class SynthImage:
    """One rendered object: the DICOM dataset and what it shows."""

    kind: str  # "muscle" or one of KINDS
    dataset: Dataset
    regions: bool  # whether the Sequence of Ultrasound Regions was written


def _log_compress(echo: np.ndarray) -> np.ndarray:
    """The B-mode mapping of ``training.synth_image.render``: echo amplitude -> uint8."""
    db = 20 * np.log10(echo + 1e-3)
    return np.clip((db + 31.0) / 40.0 * 255.0, 0, 255).astype(np.uint8)


def _soft_tissue(rng: np.random.Generator, h: int, w: int, level: float = 0.3) -> np.ndarray:
    """Echo amplitude of generic soft tissue: smooth brightness variation times speckle."""
    var = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 6.0)
    var /= var.std() + 1e-6
    return np.clip(level * (1.0 + 0.3 * var), 0.02, None) * speckle(rng, (h, w))


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


def _fan_mask(h: int, w: int, apex_row: float, r_min: float, half_angle: float) -> np.ndarray:
    """Sector (apex on the top edge) or curvilinear (apex above it) field of view."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - apex_row, xx - w / 2.0
    r = np.hypot(dy, dx)
    ang = np.arctan2(dx, dy)
    return (r >= r_min) & (r <= h - apex_row) & (np.abs(ang) <= half_angle)


def render_kind(kind: str, rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
    """RGB tissue-region image (h, w, 3) of one non-muscle kind and its depth in cm."""
    if kind == "sector":  # cardiac-like: apex at the top, chambers dark, myocardium bright
        echo = _soft_tissue(rng, h, w, 0.35)
        fan = _fan_mask(h, w, 0.0, 0.0, np.deg2rad(rng.uniform(35, 45)))
        for _ in range(int(rng.integers(2, 4))):
            ch = _ellipse(h, w, rng.uniform(0.35, 0.7) * h, rng.uniform(0.35, 0.65) * w,
                          rng.uniform(0.08, 0.16) * h, rng.uniform(0.06, 0.12) * w)
            echo[ch] *= 0.02
        echo[~fan] = 0.0
        gray, depth = _log_compress(echo), rng.uniform(13.0, 18.0)
        gray[~fan] = 0
    elif kind == "obstetric":  # curvilinear: gestational sac with a fetus-like echo inside
        echo = _soft_tissue(rng, h, w, 0.3)
        fov = _fan_mask(h, w, -0.35 * h, 0.35 * h, np.deg2rad(rng.uniform(28, 36)))
        sac = _ellipse(h, w, rng.uniform(0.45, 0.6) * h, w / 2 + rng.uniform(-0.1, 0.1) * w,
                       rng.uniform(0.15, 0.25) * h, rng.uniform(0.2, 0.3) * w)
        echo[sac] *= 0.01
        fetus = _ellipse(h, w, 0.55 * h, w / 2, 0.06 * h, 0.1 * w) & sac
        echo[fetus] = 0.6 * speckle(rng, (h, w))[fetus]
        gray, depth = _log_compress(echo), rng.uniform(10.0, 16.0)
        gray[~fov] = 0
    elif kind == "fluid":  # linear probe over a cyst / bladder / vessel cross-sections
        echo = _soft_tissue(rng, h, w, 0.3)
        for _ in range(int(rng.integers(1, 3))):
            cyst = _ellipse(h, w, rng.uniform(0.3, 0.6) * h, rng.uniform(0.3, 0.7) * w,
                            rng.uniform(0.1, 0.2) * h, rng.uniform(0.1, 0.25) * w)
            echo[cyst] *= 0.01
            # posterior acoustic enhancement below the fluid
        gray, depth = _log_compress(echo), rng.uniform(3.0, 7.0)
    elif kind == "colour-doppler":  # linear probe, a colour box with flow in two vessels
        echo = _soft_tissue(rng, h, w, 0.3)
        gray = np.repeat(_log_compress(echo)[..., None], 3, axis=2)
        b0, b1 = int(h * rng.uniform(0.1, 0.25)), int(h * rng.uniform(0.6, 0.85))
        c0, c1 = int(w * rng.uniform(0.15, 0.35)), int(w * rng.uniform(0.6, 0.85))
        for sign in (1, -1):
            vessel = _ellipse(h, w, rng.uniform(b0 + 10, b1 - 10), rng.uniform(c0 + 10, c1 - 10),
                              rng.uniform(0.04, 0.09) * h, rng.uniform(0.04, 0.09) * w)
            vel = np.clip(rng.uniform(0.5, 1.0) * (0.6 + 0.4 * speckle(rng, (h, w))), 0, 1)
            colour = (np.stack([vel * 230, vel * 60, vel * 20], -1) if sign > 0
                      else np.stack([vel * 20, vel * 90, vel * 240], -1))
            gray[vessel] = colour[vessel].astype(np.uint8)
        # the colour box outline the scanner draws
        img = Image.fromarray(gray)
        ImageDraw.Draw(img).rectangle([c0, b0, c1, b1], outline=(200, 200, 200))
        return np.asarray(img), rng.uniform(3.0, 5.0)
    else:
        raise ValueError(f"unknown kind {kind!r} (one of {KINDS})")
    return np.repeat(gray[..., None], 3, axis=2), depth


def _spectral_strip(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Spectral Doppler display: filled velocity envelope over time above a baseline."""
    t = np.linspace(0, rng.uniform(3, 6) * 2 * np.pi, w)
    env = 0.15 + 0.55 * np.clip(np.sin(t), 0, None) ** 3 + 0.05 * rng.standard_normal(w)
    base = int(h * 0.75)
    yy = np.arange(h)[:, None]
    top = base - (env * base)[None, :]
    filled = (yy >= top) & (yy <= base)
    amp = np.where(filled, 0.5 * speckle(rng, (h, w)), 0.0)
    out = _log_compress(amp)
    out[~filled] = 0
    out[base, :] = 200
    return np.repeat(out[..., None], 3, axis=2)


def nonmuscle_object(kind: str, rng: np.random.Generator, *, regions: bool, scale: float = 0.5,
                     uid_root: str | None = None) -> SynthImage:
    """One non-muscle US object as a scanner would export it (RGB, uncompressed)."""
    profile = PROFILES["samsung"]
    layout = make_layout(profile, scale, "")
    rows, cols = layout.rows, layout.cols
    r0, c0, r1, c1 = layout.tissue_box
    ui = ui_template("samsung", profile.models[0][0], profile.models[0][1], layout).copy()
    frame = ui.copy()
    if kind == "spectral":  # B-mode on top (upper 45 %), spectral strip below it
        mid = r0 + int((r1 - r0) * 0.45)
        bbox = (r0, c0 + (c1 - c0) // 4, mid, c1 - (c1 - c0) // 4)
        bh, bw = bbox[2] - bbox[0], bbox[3] - bbox[1]
        frame[bbox[0]:bbox[2], bbox[1]:bbox[3]] = np.repeat(
            _log_compress(_soft_tissue(rng, bh, bw))[..., None], 3, axis=2)
        sbox = (mid + 8, c0, r1, c1)
        frame[sbox[0]:sbox[2], sbox[1]:sbox[3]] = _spectral_strip(rng, sbox[2] - sbox[0],
                                                                   sbox[3] - sbox[1])
        depth = rng.uniform(3.0, 5.0)
        sp = depth / bh
        decl = [_region(bbox, sp, sp), _region(sbox, 0.01, 0.02, fmt=3, dtype=3,
                                               units_x=4, units_y=7)]
    else:
        img, depth = render_kind(kind, rng, r1 - r0, c1 - c0)
        frame[r0:r1, c0:c1] = img
        sp = depth / (r1 - r0)
        decl = [_region(layout.tissue_box, sp, sp)]
        if kind == "colour-doppler":
            decl.append(_region(layout.tissue_box, sp, sp, dtype=2))
    lay = Layout(rows, cols, layout.tissue_box, (sp, sp), decl if regions else [], "")
    ds = _dataset([frame], lay, rng, uid_root, description=kind)
    if not regions:
        del ds.SequenceOfUltrasoundRegions
    return SynthImage(kind, ds, regions)


def muscle_object(rng: np.random.Generator, vendor: str, quirk: str, *, scale: float = 0.5,
                  regions: bool = True, uid_root: str | None = None) -> SynthImage:
    """One thigh-muscle object of the regular generator (vendor encoding and quirk)."""
    profile = PROFILES[vendor]
    layout = make_layout(profile, scale, quirk)
    r0, c0, r1, c1 = layout.tissue_box
    anatomy = anatomy_for(float(rng.normal()), "M" if rng.random() < 0.5 else "F",
                          float(rng.uniform(18, 32)), rng)
    tissue, _ = render(anatomy, r1 - r0, c1 - c0, layout.spacing_cm[0], rng)
    model = profile.models[0]
    ui = ui_template(vendor, model[0], model[1], layout)
    mmode = None
    if quirk == "m-mode":
        reg = layout.regions[1]
        mmode = mmode_strip(tissue, reg["RegionLocationMaxY1"] - reg["RegionLocationMinY0"] + 1,
                            reg["RegionLocationMaxX1"] - reg["RegionLocationMinX0"] + 1, rng)
    frame = compose_frame(tissue, layout, ui, mmode,
                          r0 + int(anatomy.focus_cm / layout.spacing_cm[0]))
    ds = _dataset([frame], layout, rng, uid_root, description="RF transverse", vendor=vendor)
    if not regions:
        del ds.SequenceOfUltrasoundRegions
    return SynthImage("muscle", ds, regions)


def _dataset(frames: list[np.ndarray], layout: Layout, rng: np.random.Generator,
             uid_root: str | None, *, description: str, vendor: str = "samsung") -> Dataset:
    from io import BytesIO

    from pydicom import dcmread

    def uid() -> str:  # deterministic per seed, like the rest of the generator
        return str(generate_uid(entropy_srcs=[str(int(rng.integers(2**62)))]))

    patient = {"PatientID": f"NM{int(rng.integers(1_000_000)):06d}", "PatientName": "SYNTH^NONMUSCLE",
               "PatientSex": "O", "PatientBirthDate": ""}
    ds = build_us(frames, profile=PROFILES[vendor], layout=layout,
                  model=PROFILES[vendor].models[0], patient=patient,
                  uids={"study": uid(), "series": uid(), "sop": uid(), "accession": "NM1"},
                  instance_number=1, series_number=1, laterality="R", study_date="20250301")
    # a non-muscle exam never says "thigh": the header is as generic as real exports are
    ds.StudyDescription = "US"
    ds.SeriesDescription = description if description != "RF transverse" else ds.SeriesDescription
    if description != "RF transverse":
        ds.BodyPartExamined = ""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # encode and decode as the node would receive it
    buf.seek(0)
    return dcmread(buf)


def synth_mix(n_muscle: int, n_other: int, seed: int, scale: float = 0.5) -> list[SynthImage]:
    """A seeded mix: muscle images over every vendor and quirk (a third without a region
    sequence), non-muscle over every kind, half of each kind without a region sequence."""
    rng = np.random.default_rng(seed)
    out: list[SynthImage] = []
    vendors = sorted(PROFILES)
    for i in range(n_muscle):
        vendor = vendors[i % len(vendors)]
        turn = (i // len(vendors)) % 3  # plain, the vendor's quirk, plain without regions
        quirk = MUSCLE_QUIRKS[vendor] if turn == 1 else ""
        out.append(muscle_object(rng, vendor, quirk, scale=scale, regions=turn != 2))
    for i in range(n_other):
        kind = KINDS[i % len(KINDS)]
        out.append(nonmuscle_object(kind, rng, regions=(i // len(KINDS)) % 2 == 0, scale=scale))
    return out


def gate_mix(images: list[SynthImage], cfg: GateConfig | None = None
             ) -> tuple[dict[str, float], list[tuple[SynthImage, GateVerdict]]]:
    """Gate every image; returns rates (muscle pass rate, others stopped rate, per kind) and
    the verdicts."""
    cfg = cfg or GateConfig()
    results = [(im, gate_dataset(im.dataset, cfg)) for im in images]
    rates: dict[str, float] = {}
    muscle = [v for im, v in results if im.kind == "muscle"]
    other = [v for im, v in results if im.kind != "muscle"]
    if muscle:
        rates["muscle_passed"] = sum(v.passed for v in muscle) / len(muscle)
    if other:
        rates["other_stopped"] = sum(not v.passed for v in other) / len(other)
    for kind in KINDS:
        vs = [v for im, v in results if im.kind == kind]
        if vs:
            rates[f"{kind}_stopped"] = sum(not v.passed for v in vs) / len(vs)
    return rates, results


def write_nonmuscle(out_dir: Path, n: int, seed: int, scale: float = 0.5) -> list[dict[str, Any]]:
    """Write ``n`` non-muscle objects (each its own study) under ``out_dir/nonmuscle/``.

    Returns manifest entries (path, kind, SOP Instance UID, regions) for the cohort manifest.
    """
    folder = out_dir / "nonmuscle"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7919])
    entries = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        im = nonmuscle_object(kind, rng, regions=(i // len(KINDS)) % 2 == 0, scale=scale)
        path = folder / f"{kind}_{i + 1:03d}.dcm"
        im.dataset.save_as(path, enforce_file_format=True)
        entries.append({"path": str(path.relative_to(out_dir)), "kind": kind,
                        "sop_instance_uid": str(im.dataset.SOPInstanceUID),
                        "study_instance_uid": str(im.dataset.StudyInstanceUID),
                        "regions": im.regions})
    return entries
