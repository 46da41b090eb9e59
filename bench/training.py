"""Training speed: the real trainer's epoch vs a bare timm loop on the same data, same run.

The real trainer (``training.trainer.train_fold``: MONAI augmentation, AdamW with warm-up +
cosine, BCE, per-epoch validation and atomic checkpoints) trains the default backbone on N
preprocessed 224² images; a bare loop (timm model, AdamW, BCE, channels-last, no augmentation,
no validation, no checkpoints) trains the same backbone on the same tensors with the same batch
size. Figures: training images/s of the last epoch of each and the overhead ratio.

    .venv/bin/python bench/training.py --n 48 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
from common import save_result

from dicom_node.config import TrainConfig


def _data(n: int, size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = [rng.random((1, size, size), dtype=np.float32) for _ in range(n)]
    y = np.asarray([i % 2 for i in range(n)], dtype=np.float64)
    return images, y


def real_trainer(n: int, epochs: int, cfg: TrainConfig, work: Path) -> list[float]:
    """Seconds per epoch of ``train_fold`` (epoch boundaries from its on_epoch_end hook)."""
    from inference.model import ModelSpec
    from training.trainer import ArrayData, train_fold

    images, y = _data(n, cfg.input_size)
    vimg, vy = _data(4, cfg.input_size, seed=1)
    spec = ModelSpec(backbone=cfg.backbone, input_size=cfg.input_size, in_chans=cfg.in_chans)
    marks = [time.perf_counter()]
    train_fold(0, ArrayData(y, images), ArrayData(vy, vimg), spec, cfg, work_dir=work,
               on_epoch_end=lambda fold, epoch: marks.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(marks)]


def bare_loop(n: int, epochs: int, cfg: TrainConfig) -> list[float]:
    """Seconds per epoch of the plainest timm training loop on the same tensors."""
    import timm
    import torch

    images, y = _data(n, cfg.input_size)
    x = torch.from_numpy(__import__("numpy").stack(images)).repeat(1, cfg.in_chans, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.from_numpy(y).float()
    torch.manual_seed(0)
    model = timm.create_model(cfg.backbone, pretrained=False, num_classes=1,
                              in_chans=cfg.in_chans).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = loss_fn(model(x[idx]).reshape(-1), t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times


def run(n: int = 48, epochs: int = 2, backbone: str = "convnext_tiny", batch: int = 16,
        threads: int = 2) -> dict:
    import torch

    torch.set_num_threads(threads)
    cfg = dataclasses.replace(TrainConfig(), backbone=backbone, epochs=epochs, warmup_epochs=1,
                              batch_size=batch, downsample_negatives=False, device="cpu")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        real = real_trainer(n, epochs, cfg, Path(tmp))
    bare = bare_loop(n, epochs, cfg)
    real_rate, bare_rate = n / real[-1], n / bare[-1]
    return {"backbone": backbone, "n_images": n, "input_size": cfg.input_size, "batch": batch,
            "epochs": epochs, "trainer_epoch_s": real, "bare_epoch_s": bare,
            "trainer_img_s": real_rate, "bare_img_s": bare_rate,
            "overhead_ratio": bare_rate / real_rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--backbone", default="convnext_tiny")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    r = run(args.n, args.epochs, args.backbone, args.batch)
    print(f"training {r['backbone']} {r['input_size']}² batch {r['batch']}, "
          f"{r['n_images']} images: "
          f"trainer {r['trainer_img_s']:.2f} img/s vs bare timm loop {r['bare_img_s']:.2f} img/s "
          f"(last epoch) -> trainer time / bare time = {r['overhead_ratio']:.2f}")
    save_result("training", r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
