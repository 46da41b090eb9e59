"""End to end: DCMTK storescu -> ``dicom-node serve`` (tiny trained model) -> Orthanc.

One scenario covers both promises of issue 5: the PACS is down when the results are ready, the
node is restarted while they wait in the outbox, the PACS comes up, and the SR plus heat maps
arrive in Orthanc in the source's study with the scores an offline run of the same model gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from dicom_node import results as R
from dicom_node.config import load_config
from dicom_node.delivery import sender as S
from dicom_node.scu import echo
from tests.conftest import free_port, require_tool
from tests.fixtures.orthanc import orthanc_binary, start_orthanc, stop_orthanc

pytestmark = [pytest.mark.slow, pytest.mark.network]

STORESCU = "/usr/bin/storescu"
# -R proposes only the SOP classes of the files (the SEG class is not in storescu's default list),
# -xy adds JPEG baseline next to the uncompressed syntaxes.
PUSHABLE = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50", None}


def _config_text(data_dir: Path, node_port: int, pacs_port: int, model_dir: Path) -> str:
    return f"""
[node]
ae_title = "DICOMNODE"
port = {node_port}
data_dir = "{data_dir}"
allowed_calling_aets = ["STORESCU"]
disk_reserve_mb = 0

[completion]
idle_seconds = 2
max_wait_seconds = 30
poll_seconds = 0.5
require_seg = true
on_missing_seg = "score-whole-region"

[worker]
poll_seconds = 0.5

[scoring]
enabled = true
model_dir = "{model_dir}"
torch_threads = 2
device = "cpu"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}

[delivery]
retry_initial_seconds = 1
retry_max_seconds = 2
poll_seconds = 0.5
timeout_seconds = 10
"""


def _start_node(config: Path, log_path: Path) -> subprocess.Popen:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from dicom_node.cli import main; sys.exit(main())",
         "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(config.parent),
    )


def _stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None,
          log_path: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise AssertionError(
                f"node exited ({proc.returncode}) while waiting for {what}\n{tail}")
        if cond():
            return
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _node_ready(port: int) -> bool:
    try:
        return echo("127.0.0.1", port, calling_aet="STORESCU", called_aet="DICOMNODE",
                    timeout=2) == 0
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def test_storescu_to_node_to_orthanc_across_outage_and_restart(
    synth_cohort, tiny_model_dir, tmp_path, tmp_path_factory
):
    require_tool(Path(STORESCU).exists(), "DCMTK (storescu)")
    require_tool(orthanc_binary() is not None, "Orthanc")
    manifest = json.loads(synth_cohort.manifest.read_text())
    # a study with SEGs sent with the images, in syntaxes DCMTK storescu proposes with -R -xy
    study = next(s for s in manifest["studies"]
                 if any(f["kind"] == "seg" for f in s["files"])
                 and not any(f["send_late"] for f in s["files"])
                 and {f.get("transfer_syntax") for f in s["files"]} <= PUSHABLE)
    files = [synth_cohort.out_dir / f["path"] for f in study["files"]]

    node_port, pacs_port, pacs_http = free_port(), free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(_config_text(tmp_path / "node-data", node_port, pacs_port, tiny_model_dir))
    cfg = load_config(config)
    log_path = tmp_path / "node.log"
    pacs_dir = tmp_path_factory.mktemp("orthanc-e2e")
    node = _start_node(config, log_path)
    try:
        # 1. PACS down: push like a modality, results wait in the outbox with the error
        _wait(lambda: _node_ready(node_port), 120, "node to answer C-ECHO", node, log_path)
        push = subprocess.run(
            [STORESCU, "-R", "-xy", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
             str(node_port), *map(str, files)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert push.returncode == 0, push.stderr
        _wait(lambda: any(r["attempts"] >= 1 and r["last_error"]
                          for r in S.outbox_rows(cfg.node.db_path)),
              240, "results queued and a failed send", node, log_path)
        waiting = S.outbox_rows(cfg.node.db_path)
        assert {r["study_uid"] for r in waiting} == {study["study_uid"]}
        assert {r["state"] for r in waiting} == {"pending"}
        _stop_node(node)

        # 2. PACS comes up, node restarts: the outbox is delivered, nothing lost
        pacs = start_orthanc(pacs_dir, pacs_http, pacs_port)
        node = _start_node(config, log_path)
        _wait(lambda: not S.outbox_rows(cfg.node.db_path), 180, "outbox to drain", node,
              log_path)
        sent = S.outbox_rows(cfg.node.db_path, ("sent",))
        held = pacs.instance_uids_in_study(study["study_uid"])
        assert {r["sop_uid"] for r in sent} == held
        datasets = [pydicom.dcmread(DicomBytesIO(pacs.instance_file(uid))) for uid in held]
    finally:
        _stop_node(node)
        stop_orthanc(pacs_dir)

    # 3. What arrived: one SR + one heat map per scored image, in the source's study
    srs = [d for d in datasets if d.Modality == "SR"]
    scs = [d for d in datasets if d.Modality != "SR"]
    assert len(srs) == 1
    sr = hd.sr.ComprehensiveSR.from_dataset(srs[0])
    assert sr.StudyInstanceUID == study["study_uid"] and sr.PatientID == study["patient_id"]

    # 4. The SR says what the same model says offline
    from inference.pipeline import ScoringPipeline

    pipeline = ScoringPipeline(tiny_model_dir, cfg.scoring, cfg.reader)
    try:
        score, _ = pipeline.score_study(files, allow_missing_seg=True)
    finally:
        pipeline.close()
    assert len(scs) == sum(im.heatmap is not None for im in score.images) > 0
    groups = sr.content.get_image_measurement_groups()
    (study_group,) = [g for g in groups if g.finding_type == R.SARCOPENIA]
    prob = [m for m in study_group.get_measurements(name=R.PROBABILITY) if m.derivation is None]
    assert prob[0].value == pytest.approx(score.probability, abs=1e-3)
    (verdict,) = study_group.get_qualitative_evaluations(name=R.SARCOPENIA)
    assert verdict.value == (R.PRESENT if score.positive else R.ABSENT)
    per_image = {}
    for g in sr.content.get_planar_roi_measurement_groups():
        for item in g[0].ContentSequence:
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121233":
                per_image[item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = g
    for g in groups:
        if g.source_images:
            per_image[g.source_images[0].referenced_sop_instance_uid] = g
    for im in score.images:
        g = per_image[im.frame.sop_instance_uid]
        values = [m.value for m in g.get_measurements(name=R.PROBABILITY) if m.derivation is None]
        assert any(v == pytest.approx(im.probability, abs=1e-3) for v in values)
