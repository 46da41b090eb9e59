"""The model artifact: ``model.json`` + ``fold_<k>.safetensors``; read, write, validate here only.

``model.json`` carries everything serving must reproduce so that the node scores exactly as
training evaluated: the preprocessing (input size, channels, ROI margin and crop), the frame and
region policy the cohort was read with, the rule that pools images into a study probability, and
the decision threshold with how it was chosen (method, level, pooling rule). Training writes
through :func:`write_artifact`; serving and evaluation read through :func:`load_artifact` (or
:func:`read_card` when no weights are needed). Older files (schema 1) stay readable: fields they
lack get the values every schema-1 model was trained with.

Everything is written into a staging directory beside the target and swapped in at the end (as
timm's checkpoint saver does), so a crash never leaves a half-written model where the scorer
would load it. Weights are safetensors only (no pickle).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch
from torch import nn

from inference.config import FramePolicy, RegionPolicy, StudyRule
from inference.durable import fsync_dir, write_durable
from inference.ensemble import FoldCalibration
from inference.errors import ModelArtifactError
from inference.model import ModelSpec, create_model
from inference.types import ModelInfo

if TYPE_CHECKING:
    from inference.ood import OodModel

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
REQUIRED_KEYS: tuple[str, ...] = (
    "schema_version", "name", "version", "model_uid", "spec", "threshold", "folds",
)
# How a crop is made (transforms.roi_box + eval_transforms); recorded so a reader can check it.
CROP_SEMANTICS = "roi-box-plus-margin"
INTENSITY = "0..1 (clipped); outside ROI zeroed; crop to ROI box + margin"
# spec.fov_cm > 0: a fov_cm square around the ROI box centre, zero-padded, from the pixel spacing
PHYSICAL_CROP_SEMANTICS = "physical-fov-around-roi"
PHYSICAL_INTENSITY = "0..1 (clipped); outside ROI zeroed; fixed field of view in cm around the ROI"

_PACKAGES = ("dicom-node", "torch", "timm", "monai", "numpy", "scikit-learn", "safetensors",
             "pydicom", "highdicom")


@dataclass(frozen=True)
class Decision:
    """The decision threshold and how it was chosen.

    Attributes:
        threshold: probability at or above which a study is called positive.
        method: "youden_j" (maximises sensitivity + specificity - 1) or "fixed".
        level: the unit the threshold was tuned on ("participant", "study" or "image").
        rule: how image probabilities were pooled to that level ("mean", "max", "median").
        predictions: which predictions it was tuned on ("out-of-fold", or
            "out-of-fold-calibrated": each participant's outer-fold model, calibrated).
        expected: what CV measured at the threshold on those predictions (sensitivity,
            specificity, n, n_positive, ece, brier); the SR quotes it as the operating point.
        image_threshold: a per-image threshold, when one was tuned; heat maps carry an image
            verdict only then.
    """

    threshold: float = 0.5
    method: str = "youden_j"
    level: str = "participant"
    rule: StudyRule = "mean"
    predictions: str = "out-of-fold"
    expected: Mapping[str, float] = field(default_factory=dict)
    image_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expected"] = dict(self.expected)
        return d


@dataclass(frozen=True)
class ServingPolicy:
    """How serving must read and pool a study to match training.

    Attributes:
        frame_policy: frames of a cine loop ("middle", "all", "max-contrast").
        region_policy: tissue regions of a multi-region image ("largest", "all").
        study_rule: pooling of image probabilities into the study probability.
    """

    frame_policy: FramePolicy = "middle"
    region_policy: RegionPolicy = "largest"
    study_rule: StudyRule = "mean"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelCard:
    """What ``model.json`` says, checked and frozen (no weights).

    ``calibration`` is model.json's raw table (None for models trained before calibration);
    ``calibrator`` is it parsed and checked against the number of folds.
    """

    name: str
    version: str
    model_uid: str
    schema_version: int
    spec: ModelSpec
    decision: Decision
    policy: ServingPolicy
    fold_files: tuple[str, ...]
    calibration: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    calibrator: FoldCalibration = field(default_factory=FoldCalibration)

    @property
    def threshold(self) -> float:
        return self.decision.threshold

    @property
    def info(self) -> ModelInfo:
        exp = self.decision.expected
        return ModelInfo(name=self.name, version=self.version, model_uid=self.model_uid,
                         backbone=self.spec.backbone, threshold=self.threshold,
                         n_folds=len(self.fold_files), calibration=self.calibrator.method,
                         expected_sensitivity=_opt_float(exp.get("sensitivity")),
                         expected_specificity=_opt_float(exp.get("specificity")),
                         image_threshold=self.decision.image_threshold,
                         decision_level=self.decision.level)


def _opt_float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded model directory: its card and one network per fold (eval mode)."""

    card: ModelCard
    models: tuple[nn.Module, ...]
    model_dir: Path

    @property
    def info(self) -> ModelInfo:
        return self.card.info

    @property
    def spec(self) -> ModelSpec:
        return self.card.spec

    @property
    def raw(self) -> Mapping[str, Any]:
        """The whole model.json (feature scaling, CV metrics, fingerprint, versions)."""
        return self.card.raw

    @property
    def feature_scaling(self) -> dict[str, Any]:
        return dict(self.raw.get("feature_scaling") or {})

    @property
    def ood(self) -> OodModel | None:
        """The OOD check fitted at training time (model.json ``ood``); None when absent."""
        from inference.ood import OodModel

        return OodModel.from_dict(self.raw.get("ood"))


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------


def fold_files(raw: Mapping[str, Any], model_dir: Path, *, on_disk: bool = True
               ) -> tuple[str, ...]:
    """The fold file names, checked: a non-empty list of plain names (existing, if ``on_disk``)."""
    folds = raw["folds"]
    if not isinstance(folds, list) or not folds:
        raise ModelArtifactError(f"{model_dir / 'model.json'}: 'folds' must be a non-empty list")
    out = []
    for i, f in enumerate(folds):
        if not isinstance(f, dict) or not isinstance(f.get("file"), str):
            raise ModelArtifactError(f"{model_dir / 'model.json'}: folds[{i}] has no 'file' name")
        name = f["file"]
        if "/" in name or "\\" in name or name.startswith("."):
            raise ModelArtifactError(
                f"{model_dir / 'model.json'}: folds[{i}].file {name!r} must be a plain file name")
        out.append(name)
    absent = [f for f in out if not (model_dir / f).is_file()] if on_disk else []
    if absent:
        raise ModelArtifactError(f"{model_dir}: fold file(s) missing: {', '.join(absent)}")
    return tuple(out)


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
    if raw.get("task", "classification") != "classification":
        raise ModelArtifactError(
            f"{path} is a {raw['task']!r} model, not the classifier (a segmentation model is "
            "served from scoring.segmentation_model_dir)")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ModelArtifactError(f"{path} lacks required key(s): {', '.join(missing)}")
    if raw["schema_version"] not in READABLE_SCHEMAS:
        raise ModelArtifactError(
            f"{path} schema_version {raw['schema_version']!r} is not supported "
            f"(this node reads {', '.join(map(str, READABLE_SCHEMAS))})"
        )
    if not isinstance(raw["spec"], dict):
        raise ModelArtifactError(f"{path} 'spec' must be an object")
    for k in ("backbone", "input_size", "in_chans", "modalities"):
        if k not in raw["spec"]:
            raise ModelArtifactError(f"{path} spec lacks required key {k!r}")
    thr = raw["threshold"]
    valid = isinstance(thr, (int, float)) and 0.0 <= float(thr) <= 1.0
    if not valid and raw["spec"].get("target", "binary") == "binary":
        raise ModelArtifactError(f"{path} threshold {thr!r} is not a probability in 0..1")
    return raw


def _choice(value: Any, allowed: Any, what: str, path: Path) -> Any:
    if value not in get_args(allowed):
        raise ModelArtifactError(
            f"{path}: {what} {value!r} is not one of {', '.join(get_args(allowed))}")
    return value


def read_card(model_dir: Path, *, require_fold_files: bool = True) -> ModelCard:
    """model.json checked and frozen, fold files present; weights are not read.

    ``require_fold_files=False`` reads a model.json kept without its weights (the reference runs
    under docs/ are such).

    A schema-1 file has no "serving"/"decision" tables: its model was read with the middle frame
    (or its ``spec.frame_policy``) and the largest region, pooled by the mean, and its threshold
    was Youden's J on participant-level mean-pooled out-of-fold predictions.
    """
    model_dir = Path(model_dir)
    path = model_dir / "model.json"
    raw = read_model_json(model_dir)
    try:
        spec = ModelSpec.from_dict({**raw["spec"], "threshold": float(raw["threshold"])})
    except (TypeError, ValueError) as exc:
        raise ModelArtifactError(f"{path} spec is invalid: {exc}") from exc
    files = fold_files(raw, model_dir, on_disk=require_fold_files)
    serving = raw.get("serving") or {}
    policy = ServingPolicy(
        frame_policy=_choice(serving.get("frame_policy", spec.frame_policy), FramePolicy,
                             "serving.frame_policy", path),
        region_policy=_choice(serving.get("region_policy", "largest"), RegionPolicy,
                              "serving.region_policy", path),
        study_rule=_choice(serving.get("study_rule", "mean"), StudyRule,
                           "serving.study_rule", path),
    )
    d = raw.get("decision") or {}
    decision = Decision(
        threshold=float(raw["threshold"]),
        method=str(d.get("method", "youden_j" if spec.target == "binary" else "none")),
        level=str(d.get("level", "participant")),
        rule=_choice(d.get("rule", "mean"), StudyRule, "decision.rule", path),
        predictions=str(d.get("predictions", "out-of-fold")),
        expected={k: float(v) for k, v in (d.get("expected") or {}).items()
                  if isinstance(v, (int, float))},
        image_threshold=_opt_float(d.get("image_threshold")),
    )
    try:
        calibrator = FoldCalibration.from_dict(raw.get("calibration"), len(files))
    except ValueError as exc:
        raise ModelArtifactError(f"{path}: {exc}") from exc
    if decision.level not in ("participant", "study", "image"):
        raise ModelArtifactError(f"{path}: decision.level {decision.level!r} is not participant, "
                                 "study or image")
    return ModelCard(
        name=str(raw["name"]), version=str(raw["version"]), model_uid=str(raw["model_uid"]),
        schema_version=int(raw["schema_version"]), spec=spec, decision=decision, policy=policy,
        fold_files=files, calibration=raw.get("calibration"), raw=raw, calibrator=calibrator,
    )


def check_servable(card: ModelCard, model_dir: Path) -> None:
    """The node has nothing but images: it serves image-only binary classifiers only."""
    spec = card.spec
    if tuple(spec.modalities) != ("image",):
        raise ModelArtifactError(
            f"{model_dir}: model uses {'+'.join(spec.modalities)}; the node only has the "
            "images, so it can serve image-only models"
        )
    if spec.target != "binary":
        raise ModelArtifactError(f"{model_dir}: target {spec.target!r} is not a binary classifier")


def load_weights(model: nn.Module, file: Path) -> None:
    """Load one fold's safetensors into ``model``; names missing/unexpected/mis-shaped tensors."""
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
    card = read_card(model_dir)
    models = []
    for name in card.fold_files:
        model = create_model(card.spec)
        load_weights(model, model_dir / name)
        model.to(device).eval()
        models.append(model)
    log.info("loaded model %s v%s (%s, %d folds) from %s", card.model_uid, card.version,
             card.spec.backbone, len(models), model_dir)
    return ModelArtifact(card=card, models=tuple(models), model_dir=model_dir)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape training, for provenance."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def data_fingerprint(sop_uids: Sequence[str]) -> dict[str, Any]:
    """The SOP Instance UIDs used, plus their SHA-256 (sorted, newline-joined) for quick compare."""
    uids = sorted(set(sop_uids))
    digest = hashlib.sha256("\n".join(uids).encode("ascii", "replace")).hexdigest()
    return {"n_instances": len(uids), "sha256": digest, "sop_instance_uids": uids}


def save_weights(state: Mapping[str, torch.Tensor], path: Path, *, sync_dir: bool = True) -> None:
    """Save a state dict as safetensors (contiguous CPU copies; never pickle), atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    write_durable(Path(path), save(tensors), sync_dir=sync_dir)


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out_dir``; on success it atomically becomes ``out_dir``.

    An existing ``out_dir`` is moved aside first and deleted only after the swap, so at every
    instant either the old or the new complete model is in place. On error the staging dir is
    removed and ``out_dir`` is untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    log.info("model artifact written to %s", out_dir)


def build_model_json(
    *,
    spec: ModelSpec,
    fold_files: Sequence[str],
    fold_meta: Sequence[Mapping[str, Any]],
    threshold: float,
    model_uid: str,
    version: str,
    name: str = "dicom-node SARCO",
    decision: Decision | None = None,
    policy: ServingPolicy | None = None,
    calibration: Mapping[str, Any] | None = None,
    cv_metrics: Mapping[str, Any] | None = None,
    feature_scaling: Mapping[str, Any] | None = None,
    sop_uids: Sequence[str] = (),
    train_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the ``model.json`` dict (schema documented in docs/contracts.md).

    ``decision`` defaults to Youden's J on participant-level mean-pooled out-of-fold predictions
    (what ``training.run`` does) at ``threshold``; ``policy`` to the spec's frame policy, the
    largest region and the mean.
    """
    decision = decision or Decision(
        threshold=float(threshold), method="youden_j" if spec.target == "binary" else "none")
    if abs(decision.threshold - float(threshold)) > 1e-12:
        raise ValueError(
            f"threshold {threshold} and decision.threshold {decision.threshold} differ")
    policy = policy or ServingPolicy(frame_policy=spec.frame_policy)
    if policy.frame_policy != spec.frame_policy:
        raise ValueError(f"spec.frame_policy {spec.frame_policy!r} and serving.frame_policy "
                         f"{policy.frame_policy!r} differ")
    spec_d = spec.to_dict()
    spec_d["threshold"] = float(threshold)
    folds = []
    for k, (f, meta) in enumerate(zip(fold_files, fold_meta, strict=True)):
        folds.append({"fold": k, "file": f, **dict(meta)})
    raw: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "model_uid": model_uid,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec_d,
        "threshold": float(threshold),
        "threshold_method": f"{decision.method}_oof" if decision.method == "youden_j" else "none",
        "decision": decision.to_dict(),
        "serving": policy.to_dict(),
        "calibration": dict(calibration) if calibration is not None else None,
        "preprocessing": {
            "input_size": spec.input_size,
            "in_chans": spec.in_chans,
            "roi_margin": spec.roi_margin,
            "crop": CROP_SEMANTICS if spec.fov_cm <= 0 else PHYSICAL_CROP_SEMANTICS,
            "fov_cm": spec.fov_cm,
            "intensity": INTENSITY if spec.fov_cm <= 0 else PHYSICAL_INTENSITY,
            "frame_policy": spec.frame_policy,
        },
        "folds": folds,
        "feature_scaling": dict(feature_scaling or {}),
        "cv_metrics": dict(cv_metrics or {}),
        "data_fingerprint": data_fingerprint(sop_uids),
        "package_versions": package_versions(),
        "train_config": dict(train_config or {}),
    }
    if extra:
        raw.update(extra)
    return raw


def write_artifact(
    out_dir: Path,
    *,
    fold_states: Sequence[Mapping[str, torch.Tensor]],
    model_json: dict[str, Any],
    extra_files: Mapping[str, bytes | str] | None = None,
    populate: Callable[[Path], None] | None = None,
) -> Path:
    """Write fold weights, ``model.json`` and extras atomically.

    Args:
        extra_files: relative path -> content, written beside model.json.
        populate: called with the staging dir after model.json is written (oof.csv, the report),
            so everything appears in ``out_dir`` at once.
    """
    files = [f["file"] for f in model_json["folds"]]
    if len(files) != len(fold_states):
        raise ValueError("one fold file name per fold state is required")
    with staging_dir(out_dir) as tmp:
        for f, state in zip(files, fold_states, strict=True):
            save_weights(state, tmp / f, sync_dir=False)
        for rel, content in (extra_files or {}).items():
            data = content if isinstance(content, bytes) else content.encode("utf-8")
            write_durable(tmp / rel, data, sync_dir=False)
        write_durable(tmp / "model.json",
                      json.dumps(model_json, indent=2, default=str).encode("utf-8"),
                      sync_dir=False)
        if populate is not None:
            populate(tmp)
    return Path(out_dir)
