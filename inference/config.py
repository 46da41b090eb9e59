"""Settings of the scoring library: plain frozen dataclasses, no file loading.

The application (``dicom_node.config``) reads ``config.toml`` once and builds these. Values that
must match training (frame policy, region policy, study rule) default to ``None`` = "use what the
model's model.json says"; a value that is set must agree with the model (checked when the
pipeline is built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FramePolicy = Literal["all", "middle", "max-contrast"]
RegionPolicy = Literal["largest", "all"]
StudyRule = Literal["mean", "max", "median"]
Backend = Literal["eager", "compile", "onnx"]
CamMethod = Literal["torchcam", "gap"]
DeviceName = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class ReaderConfig:
    """How US objects are turned into images.

    Attributes:
        frame_policy: which frames of a cine loop are scored; None = the model's.
        max_frames: at most this many frames per cine loop (memory bound).
        region_policy: which tissue region(s) of a multi-region image; None = the model's.
    """

    frame_policy: FramePolicy | None = None
    max_frames: int = 16
    region_policy: RegionPolicy | None = None


@dataclass(frozen=True)
class ScoringConfig:
    """Which model scores studies and how (device, threads, backend, CAM).

    ``study_rule`` None = the rule recorded in the model (the one its threshold was chosen with).
    ``segmentation_model_dir``: the automatic ROI model (``dicom-node train --task
    segmentation``) used for images no DICOM-SEG covers; None = no automatic ROI.
    """

    enabled: bool = True
    model_dir: Path | None = None
    segmentation_model_dir: Path | None = None
    study_rule: StudyRule | None = None
    cam_enabled: bool = True
    cam_target_layer: str = "auto"
    torch_threads: int = 2
    device: DeviceName = "auto"
    backend: Backend = "eager"
    cam_method: CamMethod = "torchcam"
