"""``dicom-node demo``: a reduced run end to end, plus its config and SR-reading helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import tomli_w
import tomllib

from dicom_node.config import config_from_dict
from dicom_node.demo.collect import summarize_sr
from dicom_node.demo.node import node_toml
from testing.peers import PynetdicomPeer


def test_demo_node_config_is_valid_toml_and_config(tmp_path: Path) -> None:
    pacs = PynetdicomPeer(tmp_path / "pacs")
    try:
        data = node_toml(tmp_path, tmp_path / "model", pacs, threads=2)
        text = tomli_w.dumps(data)
        assert tomllib.loads(text) == data
        cfg = config_from_dict(tomllib.loads(text), base_dir=tmp_path)
    finally:
        pacs.stop()
    assert cfg.scoring.enabled and cfg.scoring.model_dir == tmp_path / "model"
    assert cfg.destinations[0].port == pacs.port
    assert cfg.node.host == "127.0.0.1" and not cfg.node.allow_any_calling_aet


def test_summarize_sr_reads_what_the_node_writes(tmp_path: Path) -> None:
    """The demo's table values come from the node's TID 1500 SR, read back with highdicom."""
    from dicom_node import results as R
    from tests.builders import us_series
    from tests.conftest import make_config
    from tests.dicom_node.test_results import make_score

    sources = us_series(2, rows=96, cols=128)
    score = make_score(sources, probs=(0.3, 0.2))
    cfg = make_config(tmp_path / "node")
    paths = R.write_results(R.build_results(score, {s.SOPInstanceUID: s for s in sources},
                                            cfg.results), cfg)
    summary = summarize_sr(paths[0])
    assert summary.probability == pytest.approx(score.probability)
    assert summary.positive is False and summary.images == 2
    assert summary.spread == pytest.approx([im.fold_spread for im in score.images])
    assert summary.csa == pytest.approx([3.21, 3.21])
    assert summary.thickness == pytest.approx([1.23, 1.23])


def _our_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (the demo's work dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker in cmdline.decode(errors="replace"):
                pids.append(int(p.name))
    return pids


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_reduced_demo_end_to_end(tmp_path: Path) -> None:
    """Generate -> train -> serve + PACS -> push -> SR and heat maps read back -> all stopped."""
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dicom_node.cli", "demo", "--workdir", str(work),
           "--participants", "12", "--held-out", "2", "--epochs", "1", "--image-size", "64",
           "--timeout", "180"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400,
                       cwd=tmp_path,
                       env={**os.environ, "COLUMNS": "200"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Held-out studies scored by dicom-node" in out
    assert "metrics report:" in out
    srs = sorted((work / "results").glob("*/sr.dcm"))
    assert len(srs) == 2, out[-2000:]
    for sr in srs:
        assert pydicom.dcmread(sr).Modality == "SR"
        summary = summarize_sr(sr)
        assert summary.probability is not None and 0.0 <= summary.probability <= 1.0
        assert summary.positive in (True, False)
        assert summary.images >= 1
        assert list(sr.parent.glob("heatmap_*.png")), f"no heat-map preview beside {sr}"
    assert (work / "model" / "model.json").exists()
    assert not _our_processes(str(work)), "the demo left a node or PACS process running"
