"""Settings of the training library: the paper's protocol as one frozen dataclass.

The application (``dicom_node.config``) builds :class:`TrainConfig` from the ``[train]`` table and
calls :func:`check_train_config`, turning a :class:`~training.errors.TrainConfigError` into its own
error that names ``train.<key>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inference.config import DeviceName, FramePolicy

Modality = Literal["image", "clinical", "lab"]
Target = Literal["binary", "regression"]
Selection = Literal["nested", "optimistic"]
CalibrationMethod = Literal["auto", "platt", "isotonic", "none"]


@dataclass(frozen=True)
class TrainConfig:
    """The paper's training protocol (Chen et al. 2025); defaults are the paper's values."""

    backbone: str = "convnext_tiny"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # a local weights file, "timm" (timm's default tag for the backbone) or a hub tag
    # ("hf-hub:org/name", "timm/<model>.<tag>"); see training.pretrained
    pretrained: str | None = None
    input_size: int = 224
    in_chans: int = 3
    folds: int = 5
    epochs: int = 150
    warmup_epochs: int = 5
    batch_size: int = 48
    lr: float = 3e-4
    weight_decay: float = 0.05
    downsample_negatives: bool = True
    flip_prob: float = 0.5
    shift: float = 0.1
    scale: float = 0.1
    rotate_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    roi_margin: float = 0.1
    # > 0: physically scaled input, a fixed field of view of fov_cm x fov_cm around the ROI
    # (resampled from the US calibration, ROI masked); 0: the ROI box + roi_margin stretched
    fov_cm: float = 0.0
    modalities: tuple[Modality, ...] = ("image",)
    mlp_hidden: int = 128
    mlp_dropout: float = 0.2
    tabular_epochs: int = 0
    complete_cases: bool = False
    target: Target = "binary"
    regression_column: str = "asmi"
    seed: int = 42
    # "nested": epochs are selected (and calibrators fitted) on an inner validation split of each
    # outer training fold, so the outer predictions are untouched out-of-fold results;
    # "optimistic": selected on the outer fold itself (the paper's way; reported as optimistic)
    selection: Selection = "nested"
    calibration: CalibrationMethod = "auto"
    num_workers: int = 0
    device: DeviceName = "auto"
    torch_threads: int = 2
    output_dir: Path = Path("./runs/model")
    frame_policy: FramePolicy = "middle"


def check_train_config(t: TrainConfig) -> None:
    """Value checks a run needs before it starts.

    Raises:
        TrainConfigError: naming the key inside ``[train]``.
    """
    from training.errors import TrainConfigError

    if t.folds < 2:
        raise TrainConfigError("folds", "must be >= 2")
    for k in ("epochs", "batch_size", "input_size"):
        if getattr(t, k) < 1:
            raise TrainConfigError(k, "must be >= 1")
    if t.warmup_epochs < 0:
        raise TrainConfigError("warmup_epochs", "must be >= 0")
    if t.lr <= 0:
        raise TrainConfigError("lr", "must be > 0")
    if t.in_chans not in (1, 3):
        raise TrainConfigError("in_chans", "must be 1 or 3")
    if t.fov_cm < 0:
        raise TrainConfigError("fov_cm", "must be >= 0 (0: ROI box crop)")
    if t.selection not in ("nested", "optimistic"):
        raise TrainConfigError("selection", "must be 'nested' or 'optimistic'")
    if t.calibration not in ("auto", "platt", "isotonic", "none"):
        raise TrainConfigError("calibration", "must be 'auto', 'platt', 'isotonic' or 'none'")
    if not t.modalities:
        raise TrainConfigError("modalities", "must name at least one of image, clinical, lab")
