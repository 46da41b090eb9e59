"""A backbone comparison as in the paper: each backbone trained under the same folds, one table.

Why the same folds: ``training.cv.participant_folds`` depends only on the participants, their
labels, the number of folds and the seed, so every backbone's out-of-fold predictions cover the
same participants in the same folds and the paired DeLong test compares like with like. Each
backbone's model directory is complete and servable on its own; the node serves the one its
``scoring.model_dir`` names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference.durable import write_durable
from training.config import TrainConfig
from training.errors import TrainingError

log = logging.getLogger(__name__)

TABLE_NAME = "backbones.md"


def run_backbones(source: Path, labels: Path, out_root: Path, cfg: TrainConfig,
                  backbones: Sequence[str], **kwargs: Any) -> Path | None:
    """Train ``cfg`` once per backbone into ``out_root/<backbone>``; write the comparison table.

    Keyword arguments go to :func:`training.run.run_training` (dist, resume, also, ...).
    Returns the table's path (None on non-zero DDP ranks).
    """
    from training.run import run_training

    names = list(dict.fromkeys(backbones))
    if len(names) < 2:
        raise TrainingError("--backbones needs at least two different backbones to compare")
    dirs = {}
    for name in names:
        log.info("backbone comparison: training %s", name)
        path = run_training(source, labels, Path(out_root) / _safe(name),
                            dataclasses.replace(cfg, backbone=name), **kwargs)
        if path is None:
            return None
        dirs[name] = path
    return write_comparison(Path(out_root), dirs)


def compare_backbones(dirs: dict[str, Path], level: str = "participant") -> list[dict[str, Any]]:
    """AUC (DeLong CI) of each backbone and the paired DeLong test of each against the first."""
    from training import metrics as M
    from training.compare import compare_runs
    from training.oof import combination_name, read_oof

    names = list(dirs)
    tables = {n: read_oof(d) for n, d in dirs.items()}
    served = {n: json.loads((d / "model.json").read_text()).get("served_combination")
              or combination_name(["image"]) for n, d in dirs.items()}
    rows = []
    ref = names[0]
    for n in names:
        agg = M.aggregate(tables[n].select(modalities=served[n]), level)  # type: ignore[arg-type]
        auc = M.delong_auc(agg.labels, agg.scores)
        row: dict[str, Any] = {"backbone": n, "combination": served[n], "auc": auc.auc,
                               "ci_low": auc.ci_low, "ci_high": auc.ci_high,
                               "n": auc.n_pos + auc.n_neg, "vs": None, "p_value": None,
                               "model_dir": str(dirs[n])}
        if n != ref:
            c = compare_runs(tables[n], tables[ref], served[n], served[ref], level)[0]  # type: ignore[arg-type]
            row.update(vs=ref, p_value=c.test.p_value, difference=c.test.difference,
                       paired=c.test.paired, n_matched=c.n_matched)
        rows.append(row)
    return rows


def write_comparison(out_root: Path, dirs: dict[str, Path]) -> Path:
    """``backbones.md`` + ``backbones.json`` under ``out_root``."""
    rows = compare_backbones(dirs)
    lines = ["# Backbone comparison (same participant folds)\n",
             "Participant-level pooled out-of-fold AUC with DeLong 95% CI; P: paired DeLong test "
             f"against {rows[0]['backbone']}. Serve one by pointing scoring.model_dir at its "
             "directory.\n",
             "| Backbone | Combination | AUC (95% CI) | n | vs | P | Model directory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "" if r["p_value"] is None else f"{r['p_value']:.3g}"
        lines.append(f"| {r['backbone']} | {r['combination']} | {r['auc']:.3f} "
                     f"({r['ci_low']:.3f}-{r['ci_high']:.3f}) | {r['n']} | {r['vs'] or ''} | {p} "
                     f"| {Path(r['model_dir']).name} |")
    out_root.mkdir(parents=True, exist_ok=True)
    write_durable(out_root / "backbones.json", json.dumps(rows, indent=2).encode())
    path = out_root / TABLE_NAME
    write_durable(path, ("\n".join(lines) + "\n").encode())
    log.info("backbone comparison written to %s", path)
    return path


def _safe(name: str) -> str:
    """A backbone name as a directory name ("hf-hub:org/x" -> "hf-hub_org_x")."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
