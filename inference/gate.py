"""Input gate: decide per image whether the sarcopenia model may score it at all.

The model was trained on B-mode images of the thigh taken with a linear probe. Anything else a
modality sends with a study (cardiac, obstetric, colour Doppler, spectral strips, a sector probe,
a nonsense calibration) would still get a probability, and that probability means nothing. The
gate answers "is this an image the model was made for?" before the model sees it, and says why:

1. **Rules** from the node's ``[gate]`` config for sites that tag their studies: modality, SOP
   class, allow/deny regular expressions over BodyPartExamined / ProtocolName /
   SeriesDescription / StudyDescription, optionally per calling AE title.
2. **Image checks** that do not trust the header: colour-flow pixels inside the tissue region,
   sector (fan) vs linear geometry, spectral Doppler / ECG regions, enclosed anechoic (fluid)
   areas, calibration outside the range of a linear MSK probe, a too small tissue region.
3. **Out-of-distribution score** of the served model: :func:`energy_score` on its logits and
   :func:`fit_ood_threshold` on the training images (so that >= 95 % of them pass).

Nothing here imports the node or the trainer; the pipeline calls :func:`gate_dataset` per image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from inference.us_regions import TissueRegion, colour_mask, content_crop, regions_from_sequence

logger = logging.getLogger(__name__)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"

# Reason codes (stable strings: tests, the studies table and the SR use them).
PASSED = "passed"
DISABLED = "gate-disabled"
RULE_MODALITY = "rule-modality"
RULE_SOP_CLASS = "rule-sop-class"
RULE_DENY = "rule-deny-pattern"
RULE_NOT_ALLOWED = "rule-no-allow-pattern"
SPECTRAL = "spectral-doppler"
PHYSIO = "physiological-trace"
COLOUR = "colour-flow"
SECTOR = "sector-geometry"
FLUID = "anechoic-structure"
CALIBRATION = "calibration-implausible"
TOO_SMALL = "tissue-region-too-small"
NO_REGION = "no-tissue-region"
UNDECODABLE = "undecodable"
OOD = "out-of-distribution"
PANELS = "second-image-panel"

# RegionDataType values (PS3.3 C.8.5.5.1.2) that never belong in a B-mode muscle image.
SPECTRAL_TYPES = {3, 4, 5, 6, 7}  # PW/CW spectral Doppler and its traces
PHYSIO_TYPES = {10, 11, 12}  # ECG, pulse, phonocardiogram traces: cardiac/vascular exams
# Header words that, when the site sets them, name the thigh (so the SR may say "Thigh").
DEFAULT_SITE_PATTERNS = (r"THIGH", r"RECTUS", r"QUADRICEPS", r"\bRF\b", r"UPPER\s*LEG")
PATTERN_TAGS = ("BodyPartExamined", "ProtocolName", "SeriesDescription", "StudyDescription")


@dataclass(frozen=True)
class GateRules:
    """Header rules for one sender (or the default for all).

    Attributes:
        modalities: accepted Modality values.
        sop_classes: accepted SOP Class UIDs.
        allow_patterns: if non-empty, at least one regex must match one of ``PATTERN_TAGS``.
        deny_patterns: no regex may match any of ``PATTERN_TAGS`` (case-insensitive).
        assume_thigh: the sender only images thighs (a dedicated scanner): the SR may state the
            finding site even when the header does not name it.
    """

    modalities: tuple[str, ...] = ("US",)
    sop_classes: tuple[str, ...] = (US_IMAGE, US_MULTIFRAME)
    allow_patterns: tuple[str, ...] = ()
    deny_patterns: tuple[str, ...] = ()
    assume_thigh: bool = False


@dataclass(frozen=True)
class GateConfig:
    """Input gate settings (node config section ``[gate]``).

    Attributes:
        enabled: False lets every decodable US image through (the checks still record values).
        rules: header rules for every sender without its own entry.
        per_ae: calling AE title -> rules that replace ``rules`` for that sender.
        max_colour_fraction: colour-flow pixels allowed inside the tissue region (fraction).
        colour_min_chroma: a pixel counts as colour when max-min of its RGB reaches this (0..255)
            ...
        colour_min_saturation: ... and its saturation (chroma / max) reaches this; tinted
            (sepia, palette) B-mode has low saturation and passes.
        max_fan_ratio: a region is a fan when the lit fraction of its upper side columns is
            below this times the lit fraction of its centre columns.
        max_fluid_fraction: largest enclosed anechoic area allowed (fraction of the region).
        depth_cm_range: plausible displayed depth of a linear MSK probe.
        spacing_cm_range: plausible size of one pixel.
        require_calibration_plausible: False keeps such images but drops their calibration.
        min_region_px: shortest side of a tissue region the model can read.
        max_second_panel: without a region sequence, another image-like panel at least this
            large (relative to the tissue region) stops the image.
        site_patterns: header regexes that establish the thigh as finding site.

    The OOD threshold is not here: it belongs to the model and lives in its model.json.
    """

    enabled: bool = True
    rules: GateRules = field(default_factory=GateRules)
    per_ae: tuple[tuple[str, GateRules], ...] = ()
    max_colour_fraction: float = 0.01
    colour_min_chroma: int = 48
    colour_min_saturation: float = 0.4
    max_fan_ratio: float = 0.45
    max_fluid_fraction: float = 0.04
    depth_cm_range: tuple[float, float] = (1.5, 10.0)
    spacing_cm_range: tuple[float, float] = (0.005, 0.05)
    require_calibration_plausible: bool = True
    min_region_px: int = 64
    max_second_panel: float = 0.2
    site_patterns: tuple[str, ...] = DEFAULT_SITE_PATTERNS

    def rules_for(self, calling_ae: str | None) -> GateRules:
        """The rules of ``calling_ae`` (exact title, surrounding spaces ignored)."""
        ae = (calling_ae or "").strip()
        for title, rules in self.per_ae:
            if title.strip() == ae:
                return rules
        return self.rules


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision on one image.

    Attributes:
        sop_instance_uid: the image.
        sop_class_uid: its SOP class (so results can reference an image that was not scored).
        passed: the model may score it.
        reason: a stable code (``passed`` or what stopped it, e.g. ``colour-flow``).
        detail: one sentence for people (SR, studies table, logs; no PHI).
        measured: the values the checks measured (fractions, ratios, cm).
        site_established: the header or the sender's rules establish the thigh as site.
        calibration_ok: the region's cm calibration is plausible (cm values may be reported).
    """

    sop_instance_uid: str
    passed: bool
    reason: str
    detail: str
    measured: Mapping[str, float] = field(default_factory=dict)
    site_established: bool = False
    calibration_ok: bool = False
    sop_class_uid: str = ""

    @property
    def summary(self) -> str:
        """``passed`` or ``<reason>: <detail>`` (what the studies table shows)."""
        return PASSED if self.passed else f"{self.reason}: {self.detail}"


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------

_RULE_KEYS = {"modalities", "sop_classes", "allow_patterns", "deny_patterns", "assume_thigh"}


def _rules_from(table: Mapping[str, Any], key: str, base: GateRules) -> GateRules:
    unknown = set(table) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name in ("modalities", "sop_classes", "allow_patterns", "deny_patterns"):
        if name in table:
            value = table[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key}.{name}: expected a list of strings")
            if name.endswith("patterns"):
                for v in value:
                    try:
                        re.compile(v)
                    except re.error as exc:
                        raise ValueError(
                            f"{key}.{name}: bad regular expression {v!r}: {exc}") from exc
            out[name] = tuple(value)
    if "assume_thigh" in table:
        if not isinstance(table["assume_thigh"], bool):
            raise ValueError(f"{key}.assume_thigh: expected true/false")
        out["assume_thigh"] = table["assume_thigh"]
    return GateRules(**{**base.__dict__, **out})


def gate_config_from_dict(table: Mapping[str, Any], key: str = "gate") -> GateConfig:
    """Build a :class:`GateConfig` from the ``[gate]`` TOML table.

    Rule keys sit directly in ``[gate]``; ``[gate.ae."TITLE"]`` tables override them per sender
    (keys not given there are inherited). Range keys are ``[low, high]`` arrays.

    Raises:
        ValueError: naming the key, for anything unknown or out of range.
    """
    table = dict(table)
    per_ae_table = table.pop("ae", {}) or {}
    rule_part = {k: table.pop(k) for k in list(table) if k in _RULE_KEYS}
    rules = _rules_from(rule_part, key, GateRules())
    if not isinstance(per_ae_table, Mapping):
        raise ValueError(f"{key}.ae: expected a table of AE titles")  # noqa: TRY004 - config
    per_ae = tuple((str(ae), _rules_from(t, f"{key}.ae.{ae}", rules))
                   for ae, t in per_ae_table.items())
    defaults = GateConfig()
    kw: dict[str, Any] = {}
    for name, value in table.items():
        if name not in defaults.__dataclass_fields__ or name in ("rules", "per_ae"):
            raise ValueError(f"{key}.{name}: unknown key")
        current = getattr(defaults, name)
        if isinstance(current, tuple) and name.endswith("range"):
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, (int, float)) for v in value) or value[0] >= value[1]
                    or value[0] <= 0):
                raise ValueError(f"{key}.{name}: expected [low, high] with 0 < low < high")
            value = (float(value[0]), float(value[1]))
        elif isinstance(current, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key}.{name}: expected a list of strings")
            value = tuple(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key}.{name}: expected true/false")
        elif isinstance(current, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{key}.{name}: expected a non-negative number")
            if isinstance(current, int) and not isinstance(current, bool):
                value = int(value)
            else:
                value = float(value)
        kw[name] = value
    return GateConfig(rules=rules, per_ae=per_ae, **kw)


# ------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------


def _header_text(ds: Dataset) -> list[str]:
    return [str(ds.get(tag, "") or "") for tag in PATTERN_TAGS]


def site_established(ds: Dataset, cfg: GateConfig, calling_ae: str | None = None) -> bool:
    """True when the header names the thigh, or the sender is declared thigh-only."""
    if cfg.rules_for(calling_ae).assume_thigh:
        return True
    texts = _header_text(ds)
    return any(re.search(p, t, re.IGNORECASE) for p in cfg.site_patterns for t in texts)


def check_rules(ds: Dataset, cfg: GateConfig, calling_ae: str | None = None
                ) -> tuple[str, str] | None:
    """(reason, detail) when the header rules stop ``ds``; None when they let it through."""
    rules = cfg.rules_for(calling_ae)
    modality = str(ds.get("Modality", "") or "")
    if rules.modalities and modality not in rules.modalities:
        return (RULE_MODALITY,
                f"modality {modality or '(empty)'} is not one of {list(rules.modalities)}")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if rules.sop_classes and sop_class not in rules.sop_classes:
        return RULE_SOP_CLASS, f"SOP class {sop_class or '(empty)'} is not an accepted image class"
    texts = _header_text(ds)
    for pattern in rules.deny_patterns:
        for tag, text in zip(PATTERN_TAGS, texts, strict=True):
            if text and re.search(pattern, text, re.IGNORECASE):
                return RULE_DENY, f"{tag} matches deny pattern {pattern!r}"
    if rules.allow_patterns and not any(
            re.search(p, t, re.IGNORECASE) for p in rules.allow_patterns for t in texts if t):
        return RULE_NOT_ALLOWED, "no allow pattern matches " + "/".join(PATTERN_TAGS)
    return None


def region_types(ds: Dataset) -> set[int]:
    """RegionDataType values declared in the Sequence of Ultrasound Regions."""
    out: set[int] = set()
    for item in ds.get("SequenceOfUltrasoundRegions", []) or []:
        try:
            out.add(int(item.get("RegionDataType")))
        except (TypeError, ValueError):
            continue
    return out


# ------------------------------------------------------------------------------------------
# Image checks
# ------------------------------------------------------------------------------------------


def colour_fraction(rgb: np.ndarray, min_chroma: int, min_saturation: float) -> float:
    """Fraction of pixels of ``rgb`` (H, W, 3 uint8) that are saturated colour.

    Grey B-mode has R = G = B (JPEG chroma noise stays within a few levels); a tinted map
    (sepia) has chroma but low saturation; Doppler and elastography overlays have both.
    """
    if rgb.ndim != 3 or rgb.shape[-1] < 3 or rgb.size == 0:
        return 0.0
    px = rgb[..., :3].astype(np.int16)
    hi, lo = px.max(axis=-1), px.min(axis=-1)
    chroma = hi - lo
    sat = chroma / np.maximum(hi, 1)
    return float(np.mean((chroma >= min_chroma) & (sat >= min_saturation)))


def lit_mask(gray: np.ndarray) -> np.ndarray:
    """Where the probe images tissue: locally non-black after smoothing out the speckle."""
    k = int(max(3, min(gray.shape) // 40)) | 1
    mean = ndimage.uniform_filter(gray.astype(np.float32, copy=False), k)
    lit: np.ndarray = mean > 0.03
    return lit


def fan_ratio(gray: np.ndarray) -> float:
    """Lit fraction of the upper side columns divided by that of the upper centre columns.

    A linear probe lights the whole width from the skin down (ratio ~1, also under a dark
    gel standoff, where both are ~0 and the ratio is reported as 1); a sector or curvilinear
    probe lights a fan whose top corners are black (ratio ~0).
    """
    h, w = gray.shape
    lit = lit_mask(gray)
    top = lit[int(h * 0.08): max(int(h * 0.30), int(h * 0.08) + 1)]
    centre = float(top[:, int(w * 0.4): max(int(w * 0.6), int(w * 0.4) + 1)].mean())
    sides = float(np.concatenate([top[:, : max(1, int(w * 0.12))],
                                  top[:, w - max(1, int(w * 0.12)):]], axis=1).mean())
    if centre < 0.5:
        return 1.0
    return sides / centre


def fluid_fraction(gray: np.ndarray) -> float:
    """Largest enclosed anechoic area as a fraction of the region.

    Fluid (bladder, amniotic fluid, cysts, vessels in cross-section) is black with no speckle
    and tissue all around; an acoustic shadow under bone is dark too, but reaches the bottom of
    the image, and the black outside a fan touches its sides, so components touching the lower
    or side edges do not count.
    """
    h, w = gray.shape
    k = int(max(3, min(h, w) // 40)) | 1
    mean = ndimage.uniform_filter(gray.astype(np.float32, copy=False), k)
    dark = ndimage.binary_opening(mean < 0.04, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(dark)
    if n == 0:
        return 0.0
    edge = np.zeros_like(dark)
    edge[-max(2, h // 20):, :] = True
    edge[:, : max(2, w // 40)] = True
    edge[:, -max(2, w // 40):] = True
    touching = set(np.unique(labels[edge & dark]).tolist())
    sizes = ndimage.sum_labels(dark, labels, index=np.arange(1, n + 1))
    best = max((s for i, s in enumerate(sizes, start=1) if i not in touching), default=0.0)
    return float(best) / float(h * w)


def calibration_plausible(spacing_cm: tuple[float, float] | None, rows: int,
                          cfg: GateConfig) -> tuple[bool, str]:
    """Whether a region's cm/pixel and the depth it implies fit a linear MSK probe.

    Why these ranges: a linear probe for the thigh images 2-8 cm (rectus femoris 1-3 cm thick,
    subcutaneous fat up to 3 cm, femur at 3-6 cm) and no linear probe goes far beyond 10 cm;
    the display samples it at 5-500 um per pixel (finer is up-sampling, coarser leaves a 1.5 cm
    muscle fewer than 30 pixels). A PhysicalDelta that implies 40 cm is a header error or an
    abdominal/obstetric probe, and cm values from it would be wrong either way.
    """
    if spacing_cm is None:
        return False, "no cm calibration"
    lo, hi = cfg.spacing_cm_range
    dy, dx = spacing_cm
    depth = rows * dy
    dlo, dhi = cfg.depth_cm_range
    if not dlo <= depth <= dhi:
        return False, f"depth {depth:.1f} cm outside {dlo}-{dhi} cm of a linear MSK probe"
    if not (lo <= dy <= hi and lo <= dx <= hi):
        return False, f"pixel size {dy:.4f} x {dx:.4f} cm outside {lo}-{hi} cm"
    return True, f"depth {depth:.1f} cm, {dy * 1e4:.0f} um/px"


def check_image(
    frame: np.ndarray,
    region: TissueRegion,
    cfg: GateConfig,
    *,
    declared_types: set[int] | None = None,
) -> tuple[str, str, dict[str, float], bool]:
    """Header-independent checks on one decoded frame.

    Args:
        frame: the full frame, RGB (H, W, 3) uint8 or grey (H, W) uint8 / float in 0..1.
        region: the tissue region (from the region sequence or found in the pixels).
        cfg: thresholds.
        declared_types: RegionDataType values of the object (spectral/ECG regions stop it).

    Returns:
        (reason, detail, measured values, calibration plausible); reason ``passed`` when all hold.
    """
    r0, c0, r1, c1 = region.box
    measured: dict[str, float] = {"region_rows": float(r1 - r0), "region_cols": float(c1 - c0)}
    types = declared_types or set()
    cal_ok, cal_text = calibration_plausible(region.spacing_cm, r1 - r0, cfg)
    if region.spacing_cm is not None:
        measured["spacing_cm"] = float(region.spacing_cm[0])
        measured["depth_cm"] = float((r1 - r0) * region.spacing_cm[0])
    if types & SPECTRAL_TYPES:
        return SPECTRAL, "the object declares a spectral Doppler region", measured, cal_ok
    if types & PHYSIO_TYPES:
        return PHYSIO, "the object declares an ECG/pulse trace region", measured, cal_ok
    if min(r1 - r0, c1 - c0) < cfg.min_region_px:
        return (TOO_SMALL, f"tissue region {r1 - r0}x{c1 - c0} px, below {cfg.min_region_px} px",
                measured, cal_ok)
    crop = frame[r0:r1, c0:c1]
    if crop.ndim == 3:
        measured["colour_fraction"] = colour_fraction(
            _to_uint8(crop), cfg.colour_min_chroma, cfg.colour_min_saturation)
        gray = crop[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        measured["colour_fraction"] = 0.0
        gray = crop.astype(np.float32)
    if frame.dtype.kind in "ui" or float(gray.max(initial=0.0)) > 1.0:
        gray = gray / 255.0
    if measured["colour_fraction"] > cfg.max_colour_fraction:
        detail = (f"{measured['colour_fraction']:.1%} of the tissue region is colour-flow or "
                  "elastography colour")
        return COLOUR, detail, measured, cal_ok
    measured["fan_ratio"] = fan_ratio(gray)
    if measured["fan_ratio"] < cfg.max_fan_ratio:
        detail = (f"sector/curvilinear field of view (side/centre lit ratio "
                  f"{measured['fan_ratio']:.2f}), not a linear probe")
        return SECTOR, detail, measured, cal_ok
    measured["fluid_fraction"] = fluid_fraction(gray)
    if measured["fluid_fraction"] > cfg.max_fluid_fraction:
        detail = (f"enclosed anechoic (fluid-filled) structure covers "
                  f"{measured['fluid_fraction']:.1%} of the tissue region")
        return FLUID, detail, measured, cal_ok
    if region.spacing_cm is not None and not cal_ok and cfg.require_calibration_plausible:
        return CALIBRATION, cal_text, measured, cal_ok
    if cal_ok and region.doubt is not None:  # scored, but not measured in cm
        detail = f"B-mode image of a linear probe (no cm values: {region.doubt})"
        return PASSED, detail, measured, False
    detail = "B-mode image of a linear probe " + (
        f"({cal_text})" if cal_ok else "(uncalibrated: no cm values)")
    return PASSED, detail, measured, cal_ok


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        return np.clip(arr * 255.0 if float(arr.max(initial=0)) <= 1.0 else arr, 0, 255
                       ).astype(np.uint8)
    peak = float(arr.max(initial=0))
    return (arr.astype(np.float32) * (255.0 / peak if peak > 255 else 1.0)).astype(np.uint8)


def decode_display_frame(ds: Dataset) -> np.ndarray:
    """The middle frame as displayed: RGB uint8 for colour objects, grey uint8 otherwise.

    Raises:
        ValueError: the pixel data cannot be decoded (callers record ``undecodable``).
    """
    from pydicom.pixels import apply_color_lut, pixel_array

    n = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        arr = pixel_array(ds, index=n // 2 if n > 1 else None)
    except Exception as exc:
        raise ValueError(f"pixel data could not be decoded: {exc}") from exc
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        peak = 65535.0 if int(rgb.max(initial=0)) > 255 else 255.0
        return (rgb[..., :3].astype(np.float32) * (255.0 / peak)).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] >= 3:
        return _to_uint8(arr[..., :3])
    gray = arr.astype(np.float32)
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits > 8:
        lo, hi = float(gray.min()), float(gray.max())
        gray = (gray - lo) * (255.0 / max(hi - lo, 1.0))
    if pi == "MONOCHROME1":
        gray = gray.max() - gray
    return np.clip(gray, 0, 255).astype(np.uint8)


def find_region(ds: Dataset, frame: np.ndarray, cfg: GateConfig | None = None
                ) -> TissueRegion | None:
    """The largest 2D tissue region: from the region sequence, else found in the pixels
    (colour pixels are excluded, so a Doppler box or colour bar does not widen the crop)."""
    cfg = cfg or GateConfig()
    rows, cols = frame.shape[:2]
    if "SequenceOfUltrasoundRegions" in ds and len(ds.SequenceOfUltrasoundRegions):
        regions = regions_from_sequence(ds, rows, cols, check_calibration=False)
        return regions[0] if regions else None
    gray = frame.astype(np.float32)
    exclude = None
    if frame.ndim == 3:
        gray = gray[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
        exclude = colour_mask(frame, cfg.colour_min_chroma, cfg.colour_min_saturation)
    crop = content_crop(gray / 255.0, exclude)
    if crop is None:
        return None
    from inference.us_regions import pixel_spacing_cm

    return TissueRegion(box=crop.box, spacing_cm=pixel_spacing_cm(ds), source="content",
                        doubt=crop.doubt)


def second_panel_fraction(frame: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Area of another image-like panel outside ``box``, relative to ``box``.

    Without a region sequence nothing says which of two panels is B-mode: a duplex screen has a
    spectral Doppler strip under the B-mode, an M-mode screen a time-motion strip, a dual view
    two images. The gate then does not guess.
    """
    gray = frame.astype(np.float32)
    if frame.ndim == 3:
        gray = gray[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    gray = gray / 255.0
    r0, c0, r1, c1 = box
    pad = max(4, min(gray.shape) // 50)
    rest = gray.copy()
    rest[max(0, r0 - pad):r1 + pad, max(0, c0 - pad):c1 + pad] = 0.0
    k = int(max(3, min(gray.shape) // 60)) | 1
    mean = ndimage.uniform_filter(rest, k)
    std = np.sqrt(np.maximum(ndimage.uniform_filter(rest * rest, k) - mean * mean, 0.0))
    cand = ndimage.binary_opening((mean > 0.03) & (std > 0.02), structure=np.ones((k, k), bool))
    labels, n = ndimage.label(cand)
    if n == 0:
        return 0.0
    largest = float(ndimage.sum_labels(cand, labels, index=np.arange(1, n + 1)).max())
    return largest / max(1, (r1 - r0) * (c1 - c0))


def gate_dataset(ds: Dataset, cfg: GateConfig, calling_ae: str | None = None,
                 frame: np.ndarray | None = None) -> GateVerdict:
    """The gate's verdict on one US object (a full dataset with Pixel Data).

    Rules first (cheap, header only), then the image checks on the middle frame. With
    ``cfg.enabled`` False every image passes, but the measured values are still recorded.
    """
    sop = str(ds.get("SOPInstanceUID", "") or "")
    site = site_established(ds, cfg, calling_ae)

    def verdict(reason: str, detail: str, measured: dict[str, float] | None = None,
                cal_ok: bool = False) -> GateVerdict:
        passed = reason == PASSED or not cfg.enabled
        if not cfg.enabled and reason != PASSED:
            detail = f"gate disabled; would have stopped it: {reason}: {detail}"
            reason = DISABLED
        return GateVerdict(sop, passed, reason, detail, dict(measured or {}), site, cal_ok,
                           str(ds.get("SOPClassUID", "") or ""))

    ruled = check_rules(ds, cfg, calling_ae)
    if ruled is not None:
        return verdict(*ruled)
    try:
        if frame is None:
            frame = decode_display_frame(ds)
    except ValueError as exc:
        return verdict(UNDECODABLE, str(exc))
    region = find_region(ds, frame, cfg)
    if region is None:
        return verdict(NO_REGION, "no 2D tissue region in the region sequence or the pixels")
    reason, detail, measured, cal_ok = check_image(
        frame, region, cfg, declared_types=region_types(ds))
    if reason == PASSED and region.source == "content":
        measured["second_panel"] = second_panel_fraction(frame, region.box)
        if measured["second_panel"] >= cfg.max_second_panel:
            return verdict(PANELS, f"a second image panel ({measured['second_panel']:.0%} of the "
                           "tissue region: spectral Doppler, M-mode or dual view) and no region "
                           "sequence saying which is B-mode", measured, cal_ok)
    return verdict(reason, detail, measured, cal_ok)


def apply_ood(verdict: GateVerdict, score: float, threshold: float | None,
              cfg: GateConfig) -> GateVerdict:
    """Add the served model's OOD score to a verdict; stop the image above ``threshold``.

    ``threshold`` comes from the model artifact (fitted at training time with
    :func:`fit_ood_threshold`); None means the model has none and the score is only recorded.
    """
    measured = {**verdict.measured, "ood_score": float(score)}
    keep = (verdict.sop_instance_uid, verdict.passed, verdict.reason, verdict.detail)
    rest = (verdict.site_established, verdict.calibration_ok, verdict.sop_class_uid)
    if not verdict.passed or threshold is None or score <= threshold:
        return GateVerdict(*keep, measured, *rest)
    detail = f"out-of-distribution score {score:.3f} above the model's {threshold:.3f}"
    if not cfg.enabled:
        return GateVerdict(verdict.sop_instance_uid, True, DISABLED,
                           f"gate disabled; would have stopped it: {OOD}: {detail}", measured,
                           *rest)
    return GateVerdict(verdict.sop_instance_uid, False, OOD, detail, measured, *rest)


# ------------------------------------------------------------------------------------------
# Out-of-distribution score of the served model
# ------------------------------------------------------------------------------------------


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy, -T logsumexp(z/T), per row: higher means less like training data.

    Liu et al. 2020 (energy-based OOD detection). A binary head with one logit is read as the
    two-class logits (-z/2, z/2) (the same sigmoid, symmetric). Args: logits (N,) or (N, C).
    Returns (N,) float64.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = np.stack([-z / 2.0, z / 2.0], axis=1)
    from scipy.special import logsumexp

    energy: np.ndarray = -temperature * logsumexp(z / temperature, axis=1)
    return energy


def energy_from_probability(prob: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """:func:`energy_score` of a sigmoid head given its probabilities (the ensemble's output).

    For one binary logit the energy only measures confidence; Mahalanobis distance on pooled
    features (:func:`mahalanobis_score`) is the stronger OOD signal when the artifact has them.
    """
    p = np.clip(np.asarray(prob, dtype=np.float64), eps, 1.0 - eps)
    return energy_score(np.log(p / (1.0 - p)))


@dataclass(frozen=True)
class FeatureStats:
    """Mean and (shrunk) inverse covariance of the training images' pooled features."""

    mean: np.ndarray
    precision: np.ndarray


def fit_feature_stats(features: np.ndarray) -> FeatureStats:
    """Ledoit-Wolf shrinkage covariance of (N, D) training features (stable for N < D)."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError("need a (N, D) feature matrix with N >= 2")
    lw = LedoitWolf().fit(x)
    return FeatureStats(mean=lw.location_, precision=lw.precision_)


def mahalanobis_score(features: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """Mahalanobis distance of each (N, D) feature row to the training distribution."""
    d = np.asarray(features, dtype=np.float64) - stats.mean
    dist: np.ndarray = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, stats.precision, d), 0.0))
    return dist


def fit_ood_threshold(train_scores: Sequence[float] | np.ndarray, keep: float = 0.95) -> float:
    """Smallest threshold that lets at least ``keep`` of the training images pass.

    An image passes when its score is <= the threshold, so this is the ``keep`` quantile taken
    from above ("higher" interpolation), which guarantees the fraction even for few images.
    """
    s = np.asarray(train_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite training scores to fit an OOD threshold on")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return float(np.quantile(s, keep, method="higher"))
