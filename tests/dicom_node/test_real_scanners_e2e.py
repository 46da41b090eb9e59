"""Issue 11 end to end: what real scanners send, through a running node, to a real Orthanc.

One ``dicom-node serve`` (the tiny trained model, ``results.not_assessable = "sr"``) receives,
with DCMTK storescu and ``dicom-node push``: a valid thigh study; a study with header quirks
(empty Type 2, over-precise TM, a leading-zero UID) and vendor SR / KOS / presentation state /
label-map SEG / PDF companions; a colour-Doppler, a sector (cardiac-like) and an implausibly
calibrated study; a SEG-only study; a JPEG-XL image; then a second valid study. Asserted: the
DIMSE outcome of each push, each study's state and per-image reasons, what reached Orthanc (a
"not assessable" SR without a Thigh finding site for non-muscle studies, nothing for the SEG-only
one), and that valid studies are scored before and after the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from dicom_node.config import load_config
from dicom_node.store.archive import Archive
from dicom_node.store.studies import study_table
from tests.builders import (
    as_jpeg_xl,
    encapsulated_pdf,
    study_companions,
    with_calibration_scale,
    with_header_quirks,
    with_leading_zero_uid,
)
from tests.conftest import free_port, require_tool
from tests.dicom_node.test_delivery_e2e import (
    PUSHABLE,
    _config_text,
    _node_ready,
    _start_node,
    _stop_node,
    _wait,
)
from tests.fixtures.orthanc import orthanc_binary, start_orthanc, stop_orthanc
from training.synth_nonmuscle import muscle_object, nonmuscle_object

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.lenient_pydicom]

STORESCU = "/usr/bin/storescu"
FINAL = {"scored", "not-applicable", "failed"}


def _save(ds: pydicom.Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{len(list(folder.iterdir())):03d}.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


def _storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STORESCU, "-R", "-xy", "+sd", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False)


def _push(port: int, folder: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "push", str(folder), "--config", str(config),
         "--to", f"127.0.0.1:{port}", "--aet", "STORESCU"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def _rows(data_dir: Path) -> dict[str, dict]:
    archive = Archive(data_dir)
    try:
        return {r["study_uid"]: r for r in study_table(archive)}
    finally:
        archive.close()


def _valid_study(manifest: dict, cohort_dir: Path, skip: set[str]) -> tuple[str, list[Path]]:
    s = next(s for s in manifest["studies"]
             if s["study_uid"] not in skip and any(f["kind"] == "seg" for f in s["files"])
             and not any(f["send_late"] for f in s["files"])
             and {f.get("transfer_syntax") for f in s["files"]} <= PUSHABLE)
    return s["study_uid"], [cohort_dir / f["path"] for f in s["files"]]


def test_real_scanner_quirks_through_a_running_node_to_orthanc(
        synth_cohort, tiny_model_dir, tmp_path, tmp_path_factory):
    require_tool(Path(STORESCU).exists(), "DCMTK (storescu)")
    require_tool(orthanc_binary() is not None, "Orthanc")
    manifest = json.loads(synth_cohort.manifest.read_text())
    first_uid, first_files = _valid_study(manifest, synth_cohort.out_dir, set())
    last_uid, last_files = _valid_study(manifest, synth_cohort.out_dir, {first_uid})
    rng = np.random.default_rng(11)

    # the quirky but valid thigh study: header quirks on the image, companions beside it
    quirky = muscle_object(rng, "mindray", "", regions=True).dataset  # grey: GSPS needs it
    companions = [*study_companions(quirky), encapsulated_pdf(quirky)]  # from the clean header
    with_leading_zero_uid(with_header_quirks(quirky))
    quirky_dir = tmp_path / "quirky"
    _save(quirky, quirky_dir)
    for other in companions:
        _save(other, quirky_dir)
    # images the model was not made for, each its own study
    doppler = nonmuscle_object("colour-doppler", rng, regions=False).dataset
    sector = nonmuscle_object("sector", rng, regions=True).dataset
    calib = with_calibration_scale(muscle_object(rng, "samsung", "", regions=True).dataset, 10.0)
    calib.BodyPartExamined = "THIGH"
    # a SEG whose images never come (another cohort study's)
    seg_only_uid, seg_files = _valid_study(manifest, synth_cohort.out_dir,
                                           {first_uid, last_uid})
    seg_only = [p for p in seg_files if pydicom.dcmread(p, stop_before_pixels=True).Modality
                == "SEG"]
    jxl = as_jpeg_xl(muscle_object(rng, "samsung", "", regions=True).dataset)

    node_port, pacs_port, pacs_http = free_port(), free_port(), free_port()
    config = tmp_path / "config.toml"
    text = _config_text(tmp_path / "node-data", node_port, pacs_port, tiny_model_dir)
    text = text.replace("require_seg = true", "require_seg = false")
    config.write_text(text + '\n[results]\nnot_assessable = "sr"\n')
    cfg = load_config(config)
    log_path = tmp_path / "node.log"
    pacs_dir = tmp_path_factory.mktemp("orthanc-quirks")
    pacs = start_orthanc(pacs_dir, pacs_http, pacs_port)
    node = _start_node(config, log_path)
    try:
        _wait(lambda: _node_ready(node_port), 120, "node to answer C-ECHO", node, log_path)
        # 1. a valid study first
        r = _storescu(node_port, first_files)
        assert r.returncode == 0, r.stderr
        # 2. everything else, with push (it goes on past refusals and names them)
        mixed = tmp_path / "mixed"
        for ds in (doppler, sector, calib, jxl):
            _save(ds, mixed)
        for p in seg_only:
            (mixed / f"seg-{p.name}").write_bytes(p.read_bytes())
        r = _push(node_port, mixed, config)
        assert r.returncode == 1, r.stdout + r.stderr  # the JPEG-XL file was not stored
        assert f"{4 + len(seg_only) - 1}/{4 + len(seg_only)} stored" in r.stdout, r.stdout
        refused = [line for line in r.stdout.splitlines() if line.startswith("  ")]
        assert len(refused) == 1 and "000.dcm" not in refused[0], r.stdout
        r = _push(node_port, quirky_dir, config)
        assert r.returncode == 0, r.stdout + r.stderr
        # 3. another valid study last: the worker still scores
        r = _storescu(node_port, last_files)
        assert r.returncode == 0, r.stderr

        studies = {
            "first": first_uid, "last": last_uid, "quirky": str(quirky.StudyInstanceUID),
            "doppler": str(doppler.StudyInstanceUID), "sector": str(sector.StudyInstanceUID),
            "calib": str(calib.StudyInstanceUID), "seg_only": seg_only_uid,
        }
        data_dir = cfg.node.data_dir

        def all_final() -> bool:
            rows = _rows(data_dir)
            return all(rows.get(u, {}).get("state") in FINAL for u in studies.values())

        _wait(all_final, 400, "every study to finish", node, log_path)
        rows = _rows(data_dir)
        state = {k: rows[u]["state"] for k, u in studies.items()}
        assert state == {"first": "scored", "last": "scored", "quirky": "scored",
                         "doppler": "not-applicable", "sector": "not-applicable",
                         "calib": "not-applicable", "seg_only": "not-applicable"}, state
        for key, code in (("doppler", "colour-flow"), ("sector", "sector-geometry"),
                          ("calib", "calibration-implausible")):
            images = rows[studies[key]]["images"]
            assert images and not any(i["scored"] for i in images), images
            assert any(code in i["reason"] for i in images), images
            assert rows[studies[key]]["job"]["attempts"] == 1
        assert all(i["scored"] for i in rows[studies["quirky"]]["images"]
                   if i["sop_uid"] == str(quirky.SOPInstanceUID))
        assert rows[studies["seg_only"]]["note"].startswith("not-applicable")

        def delivered() -> bool:
            return all(pacs.instance_uids_in_study(studies[k]) for k in
                       ("first", "last", "quirky", "doppler", "sector", "calib"))

        _wait(delivered, 180, "results to reach Orthanc", node, log_path)
        srs: dict[str, list[pydicom.Dataset]] = {}
        for key in ("first", "last", "quirky", "doppler", "sector", "calib", "seg_only"):
            got = [pydicom.dcmread(DicomBytesIO(pacs.instance_file(u)))
                   for u in pacs.instance_uids_in_study(studies[key])]
            srs[key] = [d for d in got if d.Modality == "SR"]
    finally:
        _stop_node(node)
        stop_orthanc(pacs_dir)

    assert not srs["seg_only"]  # no source image: nothing to say "not assessable" about
    for key in ("first", "last", "quirky", "doppler", "sector", "calib"):
        assert len(srs[key]) == 1, key
    for key in ("doppler", "sector", "calib"):
        text = str(srs[key][0])
        assert "Undetermined" in text and "Thigh" not in text, key
        assert "Sarcopenia" not in text or "Present" not in text, key
    for key in ("first", "last", "quirky"):
        assert "Undetermined" not in str(srs[key][0]).split("Sarcopenia", 1)[-1][:200], key
    # the quirky study's score survived its header: the SR is in the source's study
    assert srs["quirky"][0].StudyInstanceUID == str(quirky.StudyInstanceUID)
