"""Issue 3 acceptance: the synthetic cohort pushed by DCMTK storescu into the node is accepted in
full, and every object read back *from the node's archive* aligns with the generator's truth.

This joins three parts that are tested separately elsewhere (generator, listener + archive,
reader) the way a site would use them: a modality (DCMTK) sends, the node stores, the reader reads
what the node stored.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from inference.reader import read_study
from tests.conftest import make_config, require_tool
from tests.dicom_node.node_harness import running_node, wait_for
from tests.inference.test_reader_synthetic import _check_frame

STORESCU = Path("/usr/bin/storescu")

pytestmark = pytest.mark.network


def test_cohort_pushed_by_storescu_is_archived_and_reads_back_aligned(
    synth_cohort, tmp_path: Path
) -> None:
    require_tool(STORESCU.exists(), "DCMTK (storescu)")
    cohort = Path(synth_cohort.out_dir)
    manifest = json.loads((cohort / "manifest.json").read_text())
    expected = {f["sop_instance_uid"]: f for s in manifest["studies"] for f in s["files"]}
    cfg = make_config(tmp_path / "node", completion={"idle_seconds": 60, "max_wait_seconds": 120})

    with running_node(cfg, processor=None, completion=False) as archive:
        proc = subprocess.run(
            [str(STORESCU), "-aet", "STORESCU", "-aec", cfg.node.ae_title,
             "-xf", str(cohort / "storescu.cfg"), "Synth", "+sd", "+r",
             "127.0.0.1", str(cfg.node.port), str(cohort / "dicom")],
            capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = wait_for(lambda: (lambda r: r if len(r) == len(expected) else None)(
            archive.query("SELECT sop_uid, study_uid, path, sha256 FROM instances")), timeout=30)

    # Accepted in full: every object indexed once, nothing quarantined.
    assert {r["sop_uid"] for r in rows} == set(expected)
    quarantine = cfg.node.quarantine_dir
    assert not quarantine.exists() or not any(quarantine.iterdir())

    # Read back what the node stored, study by study, and compare with the generator's truth.
    truth_dir = Path(synth_cohort.truth_dir)
    by_study: dict[str, list[Path]] = {}
    for r in rows:
        by_study.setdefault(r["study_uid"], []).append(cfg.node.data_dir / r["path"])
    n_frames = n_masked = 0
    for study in manifest["studies"]:
        result = read_study(by_study[study["study_uid"]])
        us = {f["sop_instance_uid"] for f in study["files"] if f["kind"] == "us"}
        assert {fr.sop_instance_uid for fr in result.frames} == us
        for frame in result.frames:
            _check_frame(frame, truth_dir)
            n_frames += 1
            n_masked += frame.mask is not None
    assert n_frames == sum(1 for f in expected.values() if f["kind"] == "us")
    assert n_masked > 0
