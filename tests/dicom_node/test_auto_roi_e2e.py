"""End to end: a study pushed WITHOUT SEG -> ``dicom-node serve`` segments it -> Orthanc holds
the SR, the heat maps and the AI DICOM-SEG, all dciodvfy-clean, the SR pointing at the AI SEG.

The tiny test segmenter is too weak for the production QC limits, so the test artifact's own
model.json carries relaxed limits (QC lives in the model, never in the node's config).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from dicom_node import results as R
from tests.conftest import free_port, require_tool
from tests.dicom_node.test_delivery_e2e import (
    PUSHABLE,
    STORESCU,
    _config_text,
    _node_ready,
    _start_node,
    _stop_node,
    _wait,
)
from tests.fixtures.orthanc import orthanc_binary, start_orthanc, stop_orthanc

pytestmark = [pytest.mark.slow, pytest.mark.network]

SEG_WAIT = 3.0
PERMISSIVE_QC = {"min_confidence": 0.0, "min_csa_cm2": 0.0, "max_csa_cm2": 1e6,
                 "min_thickness_cm": 0.0, "max_thickness_cm": 1e6, "max_second_component": 1.0}


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                         check=False)
    return [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]


def test_study_without_seg_comes_back_with_sr_heatmaps_and_ai_seg(
        synth_cohort, tiny_model_dir, tiny_segmenter_dir, tmp_path, tmp_path_factory):
    require_tool(Path(STORESCU).exists(), "DCMTK (storescu)")
    require_tool(orthanc_binary() is not None, "Orthanc")
    require_tool(Path("/usr/bin/dciodvfy").exists(), "dciodvfy")
    seg_dir = tmp_path / "segmenter"
    shutil.copytree(tiny_segmenter_dir, seg_dir)
    raw = json.loads((seg_dir / "model.json").read_text())
    raw["qc"] = PERMISSIVE_QC
    (seg_dir / "model.json").write_text(json.dumps(raw))

    manifest = json.loads(synth_cohort.manifest.read_text())
    study = next(s for s in manifest["studies"]
                 if s["seg"] == "none"
                 and {f.get("transfer_syntax") for f in s["files"]} <= PUSHABLE)
    files = [synth_cohort.out_dir / f["path"] for f in study["files"] if f["kind"] == "us"]

    node_port, pacs_port, pacs_http = free_port(), free_port(), free_port()
    text = _config_text(tmp_path / "node-data", node_port, pacs_port, tiny_model_dir)
    text = text.replace('on_missing_seg = "score-whole-region"',
                        f'on_missing_seg = "auto"\nseg_wait_seconds = {SEG_WAIT}')
    text = text.replace("[scoring]\n", f'[scoring]\nsegmentation_model_dir = "{seg_dir}"\n')
    config = tmp_path / "config.toml"
    config.write_text(text)
    log_path = tmp_path / "node.log"
    pacs_dir = tmp_path_factory.mktemp("orthanc-auto-roi")
    pacs = start_orthanc(pacs_dir, pacs_http, pacs_port)
    node = _start_node(config, log_path)
    try:
        _wait(lambda: _node_ready(node_port), 180, "node to answer C-ECHO", node, log_path)
        push = subprocess.run(
            [STORESCU, "-R", "-xy", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
             str(node_port), *map(str, files)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
        assert push.returncode == 0, push.stderr

        def delivered() -> bool:
            """The SR is there and every SEG and heat map of its image groups too."""
            held = pacs.instance_uids_in_study(study["study_uid"])
            heads = [pydicom.dcmread(DicomBytesIO(pacs.instance_file(u)),
                                     stop_before_pixels=True) for u in held]
            srs = [h for h in heads if h.Modality == "SR"]
            if not srs:
                return False
            n = len(hd.sr.ComprehensiveSR.from_dataset(
                pydicom.dcmread(DicomBytesIO(pacs.instance_file(srs[0].SOPInstanceUID))))
                .content.get_planar_roi_measurement_groups())
            kinds = [h.Modality for h in heads]
            return n > 0 and kinds.count("SEG") == n and len(kinds) - 1 - n >= n

        # generous: seg wait + scoring on a shared CPU + delivery; no wall-clock assert
        _wait(delivered, 300, "SR + heat maps + AI SEGs at the PACS", node, log_path)
        held = pacs.instance_uids_in_study(study["study_uid"])
        datasets = [pydicom.dcmread(DicomBytesIO(pacs.instance_file(u))) for u in held]
    finally:
        _stop_node(node)
        stop_orthanc(pacs_dir)

    srs = [d for d in datasets if d.Modality == "SR"]
    segs = [d for d in datasets if d.Modality == "SEG"]
    scs = [d for d in datasets if d.Modality not in ("SR", "SEG")]
    assert len(srs) == 1 and segs and scs
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert not _dciodvfy_errors(path), (ds.Modality, _dciodvfy_errors(path))
    for s in segs:
        desc = hd.seg.Segmentation.from_dataset(s).get_segment_description(1)
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert desc.algorithm_identification[0].AlgorithmName == raw["name"]
    sr = hd.sr.ComprehensiveSR.from_dataset(srs[0])
    groups = list(sr.content.get_planar_roi_measurement_groups())
    assert len(groups) == len(segs)
    text = str(srs[0])
    assert all(str(s.SOPInstanceUID) in text for s in segs)
    assert "ROI-AUTO" in text
    for g in groups:  # measured on the automatic ROI: CSA, thickness, echo intensity
        assert g.get_measurements(name=R.AREA) and g.get_measurements(name=R.THICKNESS)
        assert g.get_measurements(name=R.ECHO_INTENSITY)
