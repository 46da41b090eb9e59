"""Model architectures (name -> builder registry) and loading of the trained model artifact.

Like timm, each architecture registers a builder under a name and :func:`create_model` looks the
name up, failing loudly on an unknown one. Architectures:

* ``image``  - a timm backbone (by name, ``num_classes=0``) followed by one linear head.
* ``fusion`` - the paper's fusion: image features ⊕ clinical MLP ⊕ lab MLP, concatenated, then one
  linear head. Any non-empty subset of branches works (bimodal, multimodal, monomodal clinical/lab).

Every model is called as ``model(image=None, clinical=None, lab=None)`` (image first, so Grad-CAM
tools can call ``model(x)``) and returns logits of shape ``(B, 1)``: sarcopenia logit for a binary
target, the value itself for a regression target.

``training/`` writes ``MODEL_DIR/model.json`` + ``fold_<k>.safetensors``; :func:`load_artifact` here
is the only reader. Weights are read with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.errors import ModelArtifactError
from inference.feature_names import CLINICAL_FEATURES, LAB_FEATURES
from inference.types import ModelInfo

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REQUIRED_KEYS: tuple[str, ...] = (
    "schema_version", "name", "version", "model_uid", "spec", "threshold", "folds",
)


@dataclass
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

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        unknown = set(self.modalities) - {"image", "clinical", "lab"}
        if unknown or not self.modalities:
            raise ValueError(f"modalities {self.modalities!r}: need a non-empty subset of "
                             "image, clinical, lab")
        if not self.arch:
            self.arch = "image" if self.modalities == ("image",) else "fusion"

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


# --------------------------------------------------------------------------------------------
# Artifact loading
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArtifact:
    """A loaded model directory.

    Attributes:
        info: identity for results (name, version, UID, backbone, threshold, fold count).
        spec: architecture and preprocessing parameters.
        models: one network per fold, in eval mode on ``device``.
        raw: the whole model.json dict (feature scaling, CV metrics, fingerprint, versions).
        model_dir: where it was loaded from.
    """

    info: ModelInfo
    spec: ModelSpec
    models: list[nn.Module]
    raw: dict[str, Any]
    model_dir: Path

    @property
    def feature_scaling(self) -> dict[str, Any]:
        return dict(self.raw.get("feature_scaling") or {})


def _fold_files(raw: dict[str, Any]) -> list[str]:
    folds = raw["folds"]
    if not isinstance(folds, list) or not folds:
        raise ModelArtifactError("model.json 'folds' must be a non-empty list")
    out = []
    for i, f in enumerate(folds):
        if not isinstance(f, dict) or not isinstance(f.get("file"), str):
            raise ModelArtifactError(f"model.json folds[{i}] has no 'file' name")
        name = f["file"]
        if "/" in name or "\\" in name or name.startswith("."):
            raise ModelArtifactError(f"model.json folds[{i}].file {name!r} must be a plain file name")
        out.append(name)
    return out


def read_model_json(model_dir: Path) -> dict[str, Any]:
    """Parse and check ``model.json`` (schema version, required keys); no weights are read."""
    model_dir = Path(model_dir)
    path = model_dir / "model.json"
    if not model_dir.is_dir():
        raise ModelArtifactError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ModelArtifactError(f"{path} is missing (not a model directory written by train)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelArtifactError(f"{path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ModelArtifactError(f"{path} lacks required key(s): {', '.join(missing)}")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise ModelArtifactError(
            f"{path} schema_version {raw['schema_version']!r} is not supported "
            f"(this node reads {SCHEMA_VERSION})"
        )
    if not isinstance(raw["spec"], dict):
        raise ModelArtifactError(f"{path} 'spec' must be an object")
    for k in ("backbone", "input_size", "in_chans", "modalities"):
        if k not in raw["spec"]:
            raise ModelArtifactError(f"{path} spec lacks required key {k!r}")
    thr = raw["threshold"]
    if not isinstance(thr, (int, float)) or not 0.0 <= float(thr) <= 1.0:
        if raw["spec"].get("target", "binary") == "binary":
            raise ModelArtifactError(f"{path} threshold {thr!r} is not a probability in 0..1")
    return raw


def _load_weights(model: nn.Module, file: Path) -> None:
    """Load one fold's safetensors into ``model``, naming any missing/unexpected/mis-shaped tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelArtifactError(f"{file}: not a readable safetensors file ({exc})") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelArtifactError(
            f"{file}: tensors do not match the architecture in model.json "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ModelArtifactError(
                f"{file}: tensor {k!r} has shape {tuple(t.shape)}, the architecture in model.json "
                f"expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=True)


def load_artifact(model_dir: Path, device: str | torch.device = "cpu") -> ModelArtifact:
    """Load and validate a model directory written by ``dicom-node train``.

    Raises:
        ModelArtifactError: naming the file/key that is missing or wrong.
    """
    model_dir = Path(model_dir)
    raw = read_model_json(model_dir)
    try:
        spec = ModelSpec.from_dict(raw["spec"])
    except (TypeError, ValueError) as exc:
        raise ModelArtifactError(f"{model_dir / 'model.json'} spec is invalid: {exc}") from exc
    spec.threshold = float(raw["threshold"])
    files = _fold_files(raw)
    absent = [f for f in files if not (model_dir / f).is_file()]
    if absent:
        raise ModelArtifactError(f"{model_dir}: fold file(s) missing: {', '.join(absent)}")
    models = []
    for name in files:
        model = create_model(spec)
        _load_weights(model, model_dir / name)
        model.to(device).eval()
        models.append(model)
    info = ModelInfo(
        name=str(raw["name"]), version=str(raw["version"]), model_uid=str(raw["model_uid"]),
        backbone=spec.backbone, threshold=spec.threshold, n_folds=len(models),
    )
    log.info("loaded model %s v%s (%s, %d folds) from %s", info.model_uid, info.version,
             spec.backbone, len(models), model_dir)
    return ModelArtifact(info=info, spec=spec, models=models, raw=raw, model_dir=model_dir)


def modality_inputs(modalities: Sequence[str]) -> tuple[str, ...]:
    """The keyword inputs a model with these modalities needs, in call order."""
    return tuple(m for m in ("image", "clinical", "lab") if m in modalities)
