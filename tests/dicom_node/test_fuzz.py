"""Seeded fuzzing of a running ``dicom-node serve`` over C-STORE (issue: one bad image ...).

``DICOM_NODE_FUZZ_CASES`` (default 300) and ``DICOM_NODE_FUZZ_SEED`` (default 0) choose the
run; a developer runs 1,000+ with e.g. ``DICOM_NODE_FUZZ_CASES=1000``. Every case must get a
DIMSE status (or, for a syntax nobody decodes, a refused presentation context), the node must
stay up, unmutated controls must be stored, and a valid study sent afterwards must be archived
and processed to the end.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess

import pytest
from pydicom import dcmread

from dicom_node.scu import push_files
from tests.builders import write_study
from tests.conftest import free_port
from tests.dicom_node.node_harness import ServeProcess, wait_for, write_toml
from tests.fuzz import runner
from tests.fuzz.mutations import CONTROL, FORGED_LINE, generate

# hostile input on purpose: pydicom's default (warning) validation, as the node runs in production
pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.lenient_pydicom]

CASES = int(os.environ.get("DICOM_NODE_FUZZ_CASES", "300"))
SEED = int(os.environ.get("DICOM_NODE_FUZZ_SEED", "0"))
_UNFINISHED = ("receiving", "complete", "scoring", "queued")


def _config(tmp_path, port, scoring: dict) -> object:
    return write_toml({
        "node": {"ae_title": "DICOMNODE", "port": port, "data_dir": str(tmp_path / "data"),
                 "allowed_calling_aets": ["PYNETDICOM", "STORESCU", "ECHOSCU"],
                 "disk_reserve_mb": 0},
        "completion": {"idle_seconds": 1, "max_wait_seconds": 5, "poll_seconds": 0.2,
                       "require_seg": False},
        "worker": {"max_attempts": 2, "retry_base_seconds": 0.2, "poll_seconds": 0.2},
        "scoring": scoring,
    }, tmp_path / "config.toml")


def _query(data_dir, sql, args=()):
    with sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args)]


def _fuzz_then_valid_study(tmp_path, scoring: dict, cases: int, files=None) -> dict:
    """Fuzz a fresh ``serve``, then store ``files`` (default: 3 synthetic US) with storescu."""
    port = free_port()
    config = _config(tmp_path, port, scoring)
    node = ServeProcess(config, port, tmp_path / "node.log").start(timeout=120)
    try:
        report = runner.run(generate(cases, SEED), port,
                            alive=lambda: node.proc is not None and node.proc.poll() is None)
        assert node.proc is not None and node.proc.poll() is None, "the node died"
        summary = {"cases": cases, "seed": SEED, "histogram": report.histogram}
        assert not report.unanswered(), report.unanswered()[:20]
        assert not [o for o in report.outcomes.values() if o[0].startswith("not-sent")]
        controls = [(o, name) for o, name in report.outcomes.values()
                    if name.split()[-1] == CONTROL]
        assert controls and {o for o, _ in controls} == {"0x0000"}, controls
        # a valid study afterwards, from a real modality stand-in: archived and processed to the end
        if files is None:  # a real modality stand-in: DCMTK storescu
            files = write_study(tmp_path / "valid", 3, patient_id="AFTER")
            r = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "DICOMNODE",
                                "127.0.0.1", str(port), *map(str, files)],
                               check=False, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        else:  # a cohort study (JPEG, RLE, SEG): the node's own push proposes what each file needs
            outcomes = push_files("127.0.0.1", port, files, calling_aet="PYNETDICOM",
                                  called_aet="DICOMNODE")
            assert all(o.stored for o in outcomes), [o for o in outcomes if not o.stored]
        study = str(dcmread(files[0]).StudyInstanceUID)
        data = tmp_path / "data"
        assert {r["sop_uid"] for r in _query(data, "SELECT sop_uid FROM instances WHERE "
                                             "study_uid = ?", (study,))} == \
            {str(dcmread(f).SOPInstanceUID) for f in files}
        row = wait_for(lambda: next((r for r in _query(
            data, "SELECT state, note FROM studies WHERE study_uid = ?", (study,))
            if r["state"] not in _UNFINISHED), None), timeout=600)
        summary["valid_study_state"], summary["valid_study_note"] = row["state"], row["note"]
        # no stuck study: every accepted case ends scored, not applicable or failed with a reason
        wait_for(lambda: not _query(data, "SELECT 1 FROM studies WHERE state IN (?, ?, ?, ?)",
                                    _UNFINISHED), timeout=600)
        summary["study_states"] = {r["state"]: r["n"] for r in _query(
            data, "SELECT state, count(*) AS n FROM studies GROUP BY state")}
        assert not _query(data, "SELECT 1 FROM studies WHERE state = 'failed' AND "
                                "coalesce(note, '') = ''")
        assert node.proc.poll() is None
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_bytes()
    summary["forged_log_lines"] = log.count(FORGED_LINE.encode())
    (tmp_path / "fuzz-report.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    # no patient name, no control byte, no forged or continuation line in the node's log
    assert not [b for b in log if b < 32 and b not in b"\n\t"] and b"\x7f" not in log
    for name in (b"Doe", b"Jane", b"Test^Patient", b"Yamada", b"DOEJANE"):
        assert name not in log, name
    lines = log.decode("utf-8", "replace").splitlines()
    assert not [line for line in lines if line.startswith(FORGED_LINE[:10]) and "1.2.3.4" in line]
    other = [line for line in lines if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)]
    summary["non_log_lines"] = other[:5]
    # with scoring on, the C decoders (openjpeg, libjpeg) print their own complaints to stderr
    assert not other or scoring.get("enabled"), other[:5]
    return summary


def test_fuzz_every_case_answered_node_stays_up(tmp_path):
    summary = _fuzz_then_valid_study(tmp_path, {"enabled": False}, CASES)
    assert summary["valid_study_state"] not in ("failed",)
    assert sum(summary["histogram"].values()) == CASES


def test_fuzz_with_scoring_then_a_valid_study_is_scored(tmp_path, synth_cohort, tiny_model_dir):
    """The same, with the tiny real model scoring every accepted case and a cohort study after."""
    by_study: dict[str, list] = {}
    for f in sorted(synth_cohort.dicom_dir.rglob("*.dcm")):
        by_study.setdefault(str(dcmread(f, stop_before_pixels=True).StudyInstanceUID), []).append(f)
    files = next(iter(by_study.values()))
    cases = int(os.environ.get("DICOM_NODE_FUZZ_SCORED_CASES", "100"))
    summary = _fuzz_then_valid_study(
        tmp_path, {"enabled": True, "model_dir": str(tiny_model_dir), "device": "cpu",
                   "torch_threads": 1}, cases, files)
    assert summary["valid_study_state"] == "scored", summary
    assert "archive-only" not in (summary["valid_study_note"] or "")
