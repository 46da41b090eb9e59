"""Step 2: train a small real fold ensemble with the trainer ``dicom-node train`` runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dicom_node.config import config_from_dict
from dicom_node.demo.study import DemoError


def demo_threads() -> int:
    """Torch threads for the demo's training and scoring: the CPUs, at most four."""
    return max(1, min(os.cpu_count() or 1, 4))


def train(dicom: Path, labels: Path, model_dir: Path, *, backbone: str, image_size: int,
          epochs: int, folds: int, console: Any) -> None:
    """Run the real trainer with a demo-sized TrainConfig; a progress bar counts the epochs."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from training.run import run_training

    cfg = config_from_dict({
        "node": {"allow_any_calling_aet": True},
        "scoring": {"enabled": False},
        "train": {"backbone": backbone, "input_size": image_size, "folds": folds,
                  "epochs": epochs, "warmup_epochs": min(1, max(epochs - 1, 0)),
                  "batch_size": 16, "lr": 1e-3, "output_dir": str(model_dir),
                  "torch_threads": demo_threads(), "device": "cpu"},
    }, base_dir=model_dir.parent).train
    torch.set_num_threads(cfg.torch_threads)
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} epochs"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task(f"training {folds} folds", total=folds * epochs)

        def on_epoch_end(fold: int, epoch: int) -> None:
            bar.advance(task)
            if not console.is_terminal and epoch + 1 == epochs:  # logs have no live bar
                console.print(f"fold {fold + 1}/{folds} trained")

        path = run_training(dicom, labels, model_dir, cfg, on_epoch_end=on_epoch_end)
    if path is None or not (model_dir / "model.json").exists():
        raise DemoError(f"the trainer wrote no model.json in {model_dir}")
