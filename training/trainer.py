"""Train one cross-validation fold: AdamW, warm-up + cosine, BCE, selection on validation AUC.

Determinism: every random choice is derived from (seed, fold, epoch[, sample]) instead of a
running generator: the negatives kept each epoch, the batch order (DistributedSampler seeded with
the epoch), each sample's augmentation and the dropout stream (torch reseeded per epoch). So a run
resumed from its last epoch checkpoint continues exactly like an uninterrupted one, and the
resume state is just weights + optimizer + step (no RNG blobs).

Distributed: under ``torchrun`` each process trains on its DistributedSampler shard of the same
per-epoch subset with DDP (gloo on CPU, NCCL on GPU); the per-process batch is
``batch_size // world_size`` so the global batch stays the paper's 48. Only rank 0 writes files.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from inference.durable import write_durable
from inference.model import ModelSpec, create_model
from inference.transforms import augment_transforms, finish_transforms
from training.errors import TrainingError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA when present (this process's local GPU), else CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        log.info("DDP rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistInfo(rank, world, local, device)


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class ArrayData:
    """Model inputs for a set of samples, already preprocessed (images cached, features scaled)."""

    y: np.ndarray
    images: Sequence[np.ndarray] | None = None  # each float32 (1, S, S)
    clinical: np.ndarray | None = None  # float32 (n, n_clinical)
    lab: np.ndarray | None = None  # float32 (n, n_lab)

    def __len__(self) -> int:
        return len(self.y)


class FoldDataset(Dataset):
    """Yields dicts of model inputs + target; augmentation seeded per (seed, epoch, index)."""

    def __init__(self, data: ArrayData, in_chans: int, augment: Any | None = None,
                 seed: int = 0) -> None:
        self.data = data
        self.augment = augment
        self.finish = finish_transforms(in_chans)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = self.data
        out: dict[str, torch.Tensor] = {"y": torch.tensor(float(d.y[i]), dtype=torch.float32)}
        if d.images is not None:
            item = {"image": d.images[i]}
            if self.augment is not None:
                self.augment.set_random_state(
                    seed=int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
                )
                item = self.augment(item)
            out["image"] = self.finish(item)["image"]
        if d.clinical is not None:
            out["clinical"] = torch.from_numpy(np.asarray(d.clinical[i], dtype=np.float32))
        if d.lab is not None:
            out["lab"] = torch.from_numpy(np.asarray(d.lab[i], dtype=np.float32))
        return out


# --------------------------------------------------------------------------------------------
# Schedule and loop
# --------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          min_lr: float = 0.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    1) linear warm-up from base_lr/warmup_steps to base_lr over the first ``warmup_steps``;
    2) then cosine decay from base_lr to ``min_lr`` at ``total_steps``;
    3) past the end, stay at ``min_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


@dataclass
class FoldResult:
    """What one fold hands back: best weights, their validation predictions, the history."""

    fold: int
    best_epoch: int
    best_score: float
    best_state: dict[str, torch.Tensor]
    val_pred: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    target_scaling: dict[str, float] | None = None
    test_pred: np.ndarray | None = None  # predictions on the held-out (outer) fold, best epoch


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _score(y: np.ndarray, pred: np.ndarray, target: str) -> float:
    """Selection score: validation AUC (binary) or minus MAE (regression); NaN if undefined."""
    if target == "regression":
        return -float(np.mean(np.abs(pred - y)))
    if len(np.unique(y)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, pred))


@torch.no_grad()
def predict(model: nn.Module, data: ArrayData, in_chans: int, batch_size: int,
            device: torch.device, dist: DistInfo | None = None) -> np.ndarray:
    """Raw model outputs (logits or standardized values), one per sample, in order.

    Under DDP each rank predicts a strided shard and the shards are gathered, so every rank ends
    with the full vector.
    """
    model.eval()
    n = len(data)
    world = dist.world_size if dist and dist.distributed else 1
    rank = dist.rank if dist and dist.distributed else 0
    idx = list(range(rank, n, world))
    ds = Subset(FoldDataset(data, in_chans), idx)
    outs = []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        batch = _to(batch, device)
        batch.pop("y")
        outs.append(model(**batch).reshape(-1).float().cpu())
    mine = torch.cat(outs).numpy() if outs else np.zeros(0, np.float32)
    if world == 1:
        return mine.astype(np.float64)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (idx, mine))
    full = np.zeros(n, dtype=np.float64)
    for ids, vals in gathered:
        full[ids] = vals
    return full


class _Checkpoints:
    """Files of one fold's resumable state (written by rank 0 through inference.durable)."""

    def __init__(self, work_dir: Path, fold: int) -> None:
        self.dir = Path(work_dir) / f"fold_{fold}"
        self.last = self.dir / "last.safetensors"
        self.opt = self.dir / "last_optimizer.pt"
        self.best = self.dir / "best.safetensors"
        self.progress = self.dir / "progress.json"
        self.done = self.dir / "done.json"

    def save_epoch(self, model: nn.Module, opt: torch.optim.Optimizer, progress: dict[str, Any],
                   best: bool) -> None:
        from inference.artifact import save_weights

        self.dir.mkdir(parents=True, exist_ok=True)
        save_weights(model.state_dict(), self.last)
        if best:
            save_weights(model.state_dict(), self.best)
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict()}, buf)
        write_durable(self.opt, buf.getvalue())
        _write_json(self.progress, progress)  # last: marks the epoch as complete

    def load_progress(self) -> dict[str, Any] | None:
        if not self.progress.is_file():
            return None
        return json.loads(self.progress.read_text())


def _write_json(path: Path, obj: Any) -> None:
    write_durable(path, json.dumps(obj, indent=1).encode("utf-8"))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def train_fold(
    fold: int,
    train: ArrayData,
    val: ArrayData,
    spec: ModelSpec,
    cfg: Any,
    *,
    work_dir: Path,
    dist: DistInfo | None = None,
    resume: bool = False,
    pretrained: Path | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    test: ArrayData | None = None,
) -> FoldResult:
    """Train fold ``fold`` for ``cfg.epochs`` epochs and return the best-validation model.

    Args:
        val: the data the epoch is selected on (nested selection: the inner validation split).
        test: data the selected model predicts but never looks at while training or selecting
            (nested selection: the outer fold, whose predictions become the OOF results).
        cfg: a :class:`training.config.TrainConfig` (epochs, lr, batch size, augmentation...).
        work_dir: where the per-epoch checkpoints live (``fold_<k>/``).
        resume: continue from ``work_dir``'s last completed epoch of this fold, if any.
        on_epoch_end: called as ``fn(fold, epoch)`` after each epoch's checkpoint (tests use it
            to interrupt a run).
    """
    dist = dist or DistInfo()
    device = dist.device
    ck = _Checkpoints(work_dir, fold)
    regression = spec.target == "regression"
    y_train = np.asarray(train.y, dtype=np.float64)
    t_mean, t_std = (float(y_train.mean()), float(y_train.std() or 1.0)) if regression else (0.0, 1.0)
    y_train_fit = (y_train - t_mean) / t_std
    train_fit = ArrayData(y_train_fit, train.images, train.clinical, train.lab)

    if device.type == "cuda":  # reproducible convolutions (slower autotuning is not worth it)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.manual_seed(_seed_for(cfg.seed, fold))
    model = create_model(spec, pretrained=pretrained).to(device)
    if train.images is not None and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    net: nn.Module = model
    if dist.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    balance = cfg.downsample_negatives and not regression
    n_epoch = len(_epoch_indices(y_train, balance, cfg.seed, fold, 0))
    per_rank_batch = max(1, cfg.batch_size // dist.world_size)
    steps_per_epoch = math.ceil(math.ceil(n_epoch / dist.world_size) / per_rank_batch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(cfg.warmup_epochs * steps_per_epoch, max(0, total_steps - 1))

    start_epoch, step = 0, 0
    best_score, best_epoch = -math.inf, -1
    best_pred: np.ndarray | None = None  # validation predictions of the best epoch
    history: list[dict[str, float]] = []
    if not resume and dist.is_main and ck.dir.exists():
        import shutil

        shutil.rmtree(ck.dir)
    barrier(dist)
    prog = ck.load_progress() if resume else None
    if prog is not None:
        if prog.get("world_size", 1) != dist.world_size:
            log.warning("fold %d: resuming with %d processes, checkpoint had %d (the epoch "
                        "continues, results differ slightly)", fold, dist.world_size,
                        prog.get("world_size"))
        model.load_state_dict(_load_state(ck.last))
        opt.load_state_dict(torch.load(ck.opt, map_location=device, weights_only=True)["optimizer"])
        start_epoch, step = int(prog["epoch"]) + 1, int(prog["step"])
        best_score, best_epoch = float(prog["best_score"]), int(prog["best_epoch"])
        history = list(prog["history"])
        if prog.get("best_pred") is not None:
            best_pred = np.asarray(prog["best_pred"], dtype=np.float64)
        log.info("fold %d: resuming after epoch %d (best val %.4f at epoch %d)", fold,
                 start_epoch, best_score, best_epoch + 1)
    barrier(dist)

    loss_fn = nn.MSELoss() if regression else nn.BCEWithLogitsLoss()
    ds = FoldDataset(train_fit, spec.in_chans,
                     augment_transforms(cfg) if train.images is not None else None,
                     seed=_seed_for(cfg.seed, fold, 1))
    show = dist.is_main and sys.stderr.isatty()
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(_seed_for(cfg.seed, fold, epoch, dist.rank))  # dropout stream
        ds.epoch = epoch
        subset = Subset(ds, _epoch_indices(y_train, balance, cfg.seed, fold, epoch).tolist())
        sampler = DistributedSampler(subset, num_replicas=dist.world_size, rank=dist.rank,
                                     shuffle=True, seed=_seed_for(cfg.seed, fold, 2))
        sampler.set_epoch(epoch)
        loader = DataLoader(subset, batch_size=per_rank_batch, sampler=sampler,
                            num_workers=cfg.num_workers, drop_last=False)
        net.train()
        losses = []
        bar = _bar(loader, f"fold {fold + 1} epoch {epoch + 1}/{cfg.epochs}", show)
        for batch in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr)
            batch = _to(batch, device)
            y = batch.pop("y")
            if "image" in batch and device.type == "cpu":
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            loss = loss_fn(net(**batch).reshape(-1), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if show:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        raw = predict(model, val, spec.in_chans, cfg.batch_size, device, dist)
        pred = raw * t_std + t_mean if regression else 1.0 / (1.0 + np.exp(-raw))
        score = _score(np.asarray(val.y, dtype=np.float64), pred, spec.target)
        if math.isnan(score):  # one-class validation fold: keep the last epoch
            score = -1e9 + epoch
        improved = score > best_score
        if improved:
            best_score, best_epoch, best_pred = score, epoch, pred
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else 0.0,
                        "val_score": score, "lr": lr_at(max(step - 1, 0), total_steps,
                                                        warmup_steps, cfg.lr)})
        log.info("fold %d epoch %d/%d: train loss %.4f, val %s %.4f%s", fold, epoch + 1,
                 cfg.epochs, history[-1]["train_loss"], "-MAE" if regression else "AUC", score,
                 " (best)" if improved else "")
        if dist.is_main:
            ck.save_epoch(model, opt, {"epoch": epoch, "step": step, "best_score": best_score,
                                       "best_epoch": best_epoch, "history": history,
                                       "best_pred": None if best_pred is None
                                       else best_pred.tolist(),
                                       "world_size": dist.world_size}, improved)
        barrier(dist)
        if on_epoch_end is not None:
            on_epoch_end(fold, epoch)

    best_state = _load_state(ck.best) if ck.best.is_file() else model.state_dict()
    model.load_state_dict(best_state)
    if best_pred is None or len(best_pred) != len(val):  # e.g. zero epochs left to run
        raw = predict(model, val, spec.in_chans, cfg.batch_size, device, dist)
        best_pred = raw * t_std + t_mean if regression else 1.0 / (1.0 + np.exp(-raw))
    pred = best_pred
    test_pred = None
    if test is not None:
        raw = predict(model, test, spec.in_chans, cfg.batch_size, device, dist)
        test_pred = raw * t_std + t_mean if regression else 1.0 / (1.0 + np.exp(-raw))
    return FoldResult(fold, best_epoch, best_score,
                      {k: v.detach().cpu() for k, v in best_state.items()}, pred, history,
                      {"mean": t_mean, "std": t_std} if regression else None, test_pred)


def save_done(work_dir: Path, result: FoldResult) -> None:
    """Mark a fold finished (rank 0): its best weights and validation predictions stay on disk."""
    from inference.artifact import save_weights

    ck = _Checkpoints(work_dir, result.fold)
    ck.dir.mkdir(parents=True, exist_ok=True)
    save_weights(result.best_state, ck.best)
    _write_json(ck.done, {"fold": result.fold, "best_epoch": result.best_epoch,
                          "best_score": result.best_score, "val_pred": result.val_pred.tolist(),
                          "history": result.history, "target_scaling": result.target_scaling,
                          "test_pred": None if result.test_pred is None
                          else result.test_pred.tolist()})


def load_done(work_dir: Path, fold: int) -> FoldResult | None:
    """A finished fold's result from ``work_dir`` (for ``--resume``), or None."""
    ck = _Checkpoints(work_dir, fold)
    if not (ck.done.is_file() and ck.best.is_file()):
        return None
    d = json.loads(ck.done.read_text())
    return FoldResult(fold, int(d["best_epoch"]), float(d["best_score"]), _load_state(ck.best),
                      np.asarray(d["val_pred"], dtype=np.float64), list(d["history"]),
                      d.get("target_scaling"),
                      None if d.get("test_pred") is None
                      else np.asarray(d["test_pred"], dtype=np.float64))


def _epoch_indices(y: np.ndarray, balance: bool, seed: int, fold: int, epoch: int) -> np.ndarray:
    """The training indices used in ``epoch``: down-sampled to parity when ``balance``."""
    from training.cv import balanced_indices

    if not balance:
        return np.arange(len(y))
    return np.sort(balanced_indices(y, np.random.default_rng([seed, fold, epoch, 3])))


def _bar(it: Any, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, disable=not show, dynamic_ncols=True)
