"""Two-process DDP (torchrun, gloo on CPU) through the real ``dicom-node train`` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.model import TINY_TRAIN

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_ddp_trains_with_the_single_process_split(
    synth_cohort, tiny_model_dir: Path, tmp_path: Path
) -> None:
    t = TINY_TRAIN
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[node]\nallow_any_calling_aet = true\n[scoring]\nenabled = false\n"
        f'[train]\nbackbone = "{t.backbone}"\ninput_size = {t.input_size}\nfolds = {t.folds}\n'
        f"epochs = 1\nwarmup_epochs = 0\nbatch_size = {t.batch_size}\nlr = {t.lr}\n"
        f'seed = {t.seed}\ntorch_threads = 1\ndevice = "cpu"\n'
    )
    out = tmp_path / "ddp_model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dicom_node.cli", "train", "--config", str(cfg),
           "--archive", str(synth_cohort.dicom_dir), "--labels", str(synth_cohort.labels_csv),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DDP rank 1/2" in proc.stderr  # both ranks joined the gloo group

    from inference.artifact import load_artifact

    art = load_artifact(out)
    assert art.raw["distributed"]["world_size"] == 2 and art.info.n_folds == 2
    single = json.loads((tiny_model_dir / "model.json").read_text())
    assert [f["val_participants"] for f in art.raw["folds"]] == \
        [f["val_participants"] for f in single["folds"]]
    assert not list(tmp_path.glob(".ddp_model.*"))
