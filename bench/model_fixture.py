"""An untrained fold-ensemble artifact for timing (random init: no downloads; say so in reports)."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from inference.artifact import build_model_json, write_artifact
from inference.model import ModelSpec, create_model


def untrained_artifact(out_dir: Path, backbone: str = "convnext_tiny", folds: int = 5,
                       input_size: int = 224, seed: int = 0) -> Path:
    """Write ``model.json`` + ``folds`` random-weight checkpoints; reuse if already there."""
    if (out_dir / "model.json").exists():
        return out_dir
    spec = ModelSpec(backbone=backbone, input_size=input_size)
    states = []
    for k in range(folds):
        torch.manual_seed(seed + k)
        states.append({n: t.contiguous() for n, t in create_model(spec).state_dict().items()})
    raw = build_model_json(spec=spec, fold_files=[f"fold_{k}.safetensors" for k in range(folds)],
                           fold_meta=[{} for _ in range(folds)], threshold=0.5,
                           model_uid=f"2.25.{uuid.uuid4().int}", version="bench-untrained",
                           name=f"bench {backbone} (untrained)")
    return write_artifact(out_dir, fold_states=states, model_json=raw)
