"""Model architectures (name -> builder registry) and loading of the trained model artifact.

Like timm, each architecture registers a builder under a name and :func:`create_model` looks the
name up, failing loudly on an unknown one. Architectures:

* ``image``  - a timm backbone (by name, ``num_classes=0``) followed by one linear head.
* ``fusion`` - the paper's fusion: image features ⊕ clinical MLP ⊕ lab MLP, concatenated, then one
  linear head. Any non-empty subset of branches works (bimodal, multimodal, monomodal clinical/lab).

Every model is called as ``model(image=None, clinical=None, lab=None)`` (image first, so Grad-CAM
tools can call ``model(x)``) and returns logits of shape ``(B, 1)``: sarcopenia logit for a binary
target, the value itself for a regression target.

The model directory (``model.json`` + fold weights) is read, written and validated by
:mod:`inference.artifact` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.errors import ModelArtifactError
from inference.feature_names import CLINICAL_FEATURES, LAB_FEATURES

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network and preprocess its inputs (``model.json`` "spec").

    Attributes:
        backbone: timm model name (used when "image" is a modality).
        timm_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. drop_path_rate).
        input_size: square side in pixels the image is resized to.
        in_chans: channels the backbone takes (grey image repeated).
        roi_margin: relative margin around the ROI box before resizing.
        modalities: subset of ("image", "clinical", "lab").
        threshold: decision threshold on the probability (Youden's J on out-of-fold predictions).
        target: "binary" or "regression".
        n_clinical: clinical feature width after preprocessing (one-hot sex may widen it).
        n_lab: laboratory feature width.
        mlp_hidden: hidden width of the clinical/lab MLP branches.
        mlp_dropout: dropout in those branches.
        arch: registry name; derived from ``modalities`` when empty.
        frame_policy: which frames of a cine loop were used in training.
        pretrained: local weights file used for initialisation at training time (provenance only).
        fov_cm: > 0: the input is a fixed field of view of this many cm around the ROI
            (physically scaled); 0: the ROI box plus ``roi_margin`` (inference.transforms).
    """

    backbone: str = "convnext_tiny"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    in_chans: int = 3
    roi_margin: float = 0.1
    modalities: tuple[str, ...] = ("image",)
    threshold: float = 0.5
    target: str = "binary"
    n_clinical: int = len(CLINICAL_FEATURES)
    n_lab: int = len(LAB_FEATURES)
    mlp_hidden: int = 128
    mlp_dropout: float = 0.2
    arch: str = ""
    frame_policy: str = "middle"
    pretrained: str | None = None
    fov_cm: float = 0.0

    def __post_init__(self) -> None:
        mods = tuple(self.modalities)
        object.__setattr__(self, "modalities", mods)
        unknown = set(mods) - {"image", "clinical", "lab"}
        if unknown or not mods:
            raise ValueError(f"modalities {mods!r}: need a non-empty subset of "
                             "image, clinical, lab")
        if not self.arch:
            object.__setattr__(self, "arch", "image" if mods == ("image",) else "fusion")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Build from a model.json "spec" table; unknown keys are ignored (newer writers)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[ModelSpec, Path | None], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register an architecture builder ``fn(spec, pretrained) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(spec: ModelSpec, pretrained: Path | None = None) -> nn.Module:
    """timm backbone without classifier (``num_classes=0``: pooled features out).

    Local weights load through timm's ``pretrained_cfg_overlay=dict(file=...)``; nothing is
    ever downloaded: a missing file is an error, not a fallback.
    """
    import timm

    kwargs = dict(spec.timm_kwargs)
    if pretrained is not None:
        path = Path(pretrained)
        if not path.is_file():
            raise ModelArtifactError(f"pretrained weights file {path} does not exist")
        return timm.create_model(
            spec.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
            num_classes=0, in_chans=spec.in_chans, **kwargs,
        )
    try:
        return timm.create_model(
            spec.backbone, pretrained=False, num_classes=0, in_chans=spec.in_chans, **kwargs
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ModelArtifactError(f"backbone {spec.backbone!r}: {exc}") from exc


def mlp_branch(in_features: int, hidden: int, dropout: float) -> nn.Sequential:
    """The paper's tabular branch: two linear layers of ``hidden`` units with GELU and dropout."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
    )


class ImageClassifier(nn.Module):
    """timm backbone -> pooled features -> linear head. ``backbone``/``head`` are public for CAM."""

    def __init__(self, backbone: nn.Module, num_outputs: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), num_outputs)

    def forward(self, image: torch.Tensor | None = None, clinical: torch.Tensor | None = None,
                lab: torch.Tensor | None = None) -> torch.Tensor:
        if image is None:
            raise ValueError("ImageClassifier needs an image tensor")
        return self.head(self.backbone(image))


class FusionNet(nn.Module):
    """Concatenation fusion of image features and clinical/lab MLP features -> linear head."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module | None, num_outputs: int = 1) -> None:
        super().__init__()
        self.modalities = tuple(spec.modalities)
        width = 0
        self.backbone = backbone
        if "image" in self.modalities:
            assert backbone is not None
            width += int(backbone.num_features)
        self.clinical = (mlp_branch(spec.n_clinical, spec.mlp_hidden, spec.mlp_dropout)
                         if "clinical" in self.modalities else None)
        self.lab = (mlp_branch(spec.n_lab, spec.mlp_hidden, spec.mlp_dropout)
                    if "lab" in self.modalities else None)
        width += spec.mlp_hidden * (("clinical" in self.modalities) + ("lab" in self.modalities))
        self.head = nn.Linear(width, num_outputs)

    def features(self, image: torch.Tensor | None = None, clinical: torch.Tensor | None = None,
                 lab: torch.Tensor | None = None) -> torch.Tensor:
        """The concatenated feature vector the head sees (used for SHAP per modality)."""
        parts = []
        for name, x, branch in (("image", image, self.backbone), ("clinical", clinical, self.clinical),
                                ("lab", lab, self.lab)):
            if name not in self.modalities:
                continue
            if x is None:
                raise ValueError(f"this model needs the {name!r} input")
            parts.append(branch(x))  # type: ignore[misc]
        return torch.cat(parts, dim=1)

    def forward(self, image: torch.Tensor | None = None, clinical: torch.Tensor | None = None,
                lab: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(image, clinical, lab))


@register_model("image")
def _build_image(spec: ModelSpec, pretrained: Path | None = None) -> nn.Module:
    return ImageClassifier(create_backbone(spec, pretrained))


@register_model("fusion")
def _build_fusion(spec: ModelSpec, pretrained: Path | None = None) -> nn.Module:
    backbone = create_backbone(spec, pretrained) if "image" in spec.modalities else None
    return FusionNet(spec, backbone)


def create_model(spec: ModelSpec | dict[str, Any], pretrained: Path | None = None) -> nn.Module:
    """Build the network a spec describes (random init, or local ``pretrained`` backbone weights).

    Raises:
        ModelArtifactError: unknown architecture or timm backbone name.
    """
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    builder = _REGISTRY.get(spec.arch)
    if builder is None:
        raise ModelArtifactError(
            f"unknown architecture {spec.arch!r} (known: {', '.join(list_architectures())})"
        )
    return builder(spec, pretrained)


def default_cam_layer(model: nn.Module) -> str:
    """Name of the module a Grad-CAM should hook: the backbone's last stage where known."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError("model has no image backbone")
    for attr in ("stages", "layers", "blocks", "features"):
        seq = getattr(backbone, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
            return f"backbone.{attr}.{len(seq) - 1}"
    if hasattr(backbone, "layer4"):
        return "backbone.layer4"
    raise ValueError(f"no known last stage in {type(backbone).__name__}; set cam_target_layer")


def modality_inputs(modalities: Sequence[str]) -> tuple[str, ...]:
    """The keyword inputs a model with these modalities needs, in call order."""
    return tuple(m for m in ("image", "clinical", "lab") if m in modalities)
