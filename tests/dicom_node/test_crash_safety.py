"""Crash safety: SIGKILL the real `serve` process while senders push, restart, check everything.

Every instance acknowledged with 0x0000 must be on disk, indexed and hash-identical; no temp
file survives as an instance; each study completes and is queued exactly once, also across a
further clean restart.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.errors import DeliveryError
from dicom_node.scu import store_files
from dicom_node.store.archive import uid_name
from tests.builders import write_study
from tests.conftest import free_port
from tests.dicom_node.node_harness import ServeProcess, wait_for, write_toml

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_sigkill_mid_push_loses_no_acknowledged_instance(tmp_path):
    port = free_port()
    data = tmp_path / "node"
    config = write_toml({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "data_dir": str(data),
                 "allowed_calling_aets": ["PYNETDICOM", "ECHOSCU"], "disk_reserve_mb": 0},
        "completion": {"idle_seconds": 1.0, "max_wait_seconds": 120, "poll_seconds": 0.2,
                       "require_seg": False},
        "worker": {"poll_seconds": 0.2, "retry_base_seconds": 1},
        "scoring": {"enabled": False},
    }, tmp_path / "config.toml")
    log = tmp_path / "serve.log"
    studies = [write_study(tmp_path / f"s{i}", 80, patient_id=f"P{i}", seed=1000 * i)
               for i in range(3)]
    db = data / "index.sqlite"

    node = ServeProcess(config, port, log).start()
    acked: list[list[tuple[str, int]]] = [[] for _ in studies]
    aborted: list[bool] = [False for _ in studies]

    def sender(i: int) -> None:
        try:
            acked[i] = store_files("127.0.0.1", port, studies[i], calling_aet="PYNETDICOM",
                                   called_aet="DICOMNODE", timeout=20)
        except DeliveryError as exc:
            acked[i] = list(getattr(exc, "partial", []))
            aborted[i] = True

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(len(studies))]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: db.exists() and _query(db, "SELECT count(*) FROM instances")[0][0] >= 40,
                 timeout=60, interval=0.02)
        assert node.kill(signal.SIGKILL) == -signal.SIGKILL
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert any(aborted), "the kill should have interrupted at least one sender"

        node = ServeProcess(config, port, log).start()
        ok = [uid for per in acked for uid, status in per if status == 0]
        assert ok, "some instances were acknowledged before the kill"
        rows = dict(_query(db, "SELECT sop_uid, path || '|' || sha256 FROM instances"))
        for uid in ok:
            assert uid in rows, f"acknowledged {uid} is not indexed"
            rel, sha = rows[uid].split("|")
            path = data / rel
            assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha
        # no temp file survives restart, and every file in the archive is a complete DICOM file
        assert not list((data / "archive").rglob("*.tmp"))
        for path in (data / "archive").rglob("*.dcm"):
            ds = dcmread(path)
            assert len(ds.PixelData) == 64 * 64 and path.stem == uid_name(ds.SOPInstanceUID)
        # each study completes after the restart and is queued exactly once
        study_uids = {dcmread(s[0], stop_before_pixels=True).StudyInstanceUID for s in studies}
        indexed_studies = {r[0] for r in _query(db, "SELECT study_uid FROM studies")}
        assert indexed_studies <= study_uids

        def all_scored() -> bool:
            states = _query(db, "SELECT state FROM studies")
            return bool(states) and all(s == "scored" for (s,) in states)

        wait_for(all_scored, timeout=60)
        jobs = _query(db, "SELECT study_uid, count(*) FROM jobs GROUP BY study_uid")
        assert sorted(jobs) == sorted((u, 1) for u in indexed_studies)

        node.kill(signal.SIGTERM)
        assert node.proc.returncode == 0, log.read_text()[-3000:]
        node = ServeProcess(config, port, log).start()
        threading.Event().wait(1.0)  # a few completion/worker polls
        jobs = _query(db, "SELECT study_uid, count(*), min(state) FROM jobs GROUP BY study_uid")
        assert sorted(jobs) == sorted((u, 1, "done") for u in indexed_studies)
    finally:
        node.stop()


# ------------------------------------------------------------------------------------------
# Exactly-once results: SIGKILL anywhere between scoring and delivery
# ------------------------------------------------------------------------------------------

STORESCP = "/usr/bin/storescp"
# log lines of one job's way from scoring to the PACS, in order; a kill is aimed at a random
# moment shortly after one of them
MARKERS = (": scoring ", "results archived", "file(s) to queue", "): done",
           "result(s) delivered to")


def _pacs_srs(pacs_dir: Path) -> dict[str, set[str]]:
    """SR SOP Instance UIDs the PACS (storescp) holds, by study."""
    out: dict[str, set[str]] = {}
    for f in pacs_dir.iterdir():
        ds = dcmread(f, stop_before_pixels=True)
        if ds.Modality == "SR":
            out.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


def _wait_marker(log: Path, offset: int, marker: str, proc: subprocess.Popen,
                 timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if marker in log.read_bytes()[offset:].decode(errors="replace"):
            return True
        time.sleep(0.01)
    return False


def test_sigkill_between_scoring_and_delivery_yields_one_result_set(
        tiny_model_dir, synth_cohort, tmp_path):
    """Kill the real node at random moments of its scoring -> results -> outbox -> C-STORE path,
    restart it each time; at the end the PACS holds exactly one SR per study and nothing is
    left undelivered."""
    import json
    import random

    from tests.conftest import require_tool

    require_tool(Path(STORESCP).is_file(), "DCMTK storescp")
    rng = random.Random(20261202)
    port, pacs_port = free_port(), free_port()
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen([STORESCP, "--aetitle", "PACS", "+xa", "-od", str(pacs_dir),
                             str(pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = tmp_path / "node"
    config = write_toml({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "data_dir": str(data),
                 "allowed_calling_aets": ["PYNETDICOM", "ECHOSCU"], "disk_reserve_mb": 0},
        "completion": {"idle_seconds": 0.5, "max_wait_seconds": 60, "poll_seconds": 0.1,
                       "require_seg": False},
        "worker": {"poll_seconds": 0.1, "retry_base_seconds": 0.1, "max_attempts": 50},
        "scoring": {"enabled": True, "model_dir": str(tiny_model_dir), "device": "cpu",
                    "torch_threads": 1},
        "delivery": {"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0, "poll_seconds": 0.1,
                     "timeout_seconds": 10},
    }, tmp_path / "config.toml")
    with open(config, "a") as fh:
        fh.write(f'\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                 f"port = {pacs_port}\n")
    studies = json.loads(Path(synth_cohort.manifest).read_text())["studies"][:3]
    files = [[Path(synth_cohort.out_dir) / f["path"] for f in s["files"]] for s in studies]
    uids = {s["study_uid"] for s in studies}
    log = tmp_path / "serve.log"
    db = data / "index.sqlite"
    node = None
    kills = 0
    try:
        node = ServeProcess(config, port, log).start(timeout=120)
        for f in files:  # like modalities: every instance acknowledged before the kills start
            assert all(status == 0 for _, status in store_files(
                "127.0.0.1", port, f, calling_aet="PYNETDICOM", called_aet="DICOMNODE",
                timeout=30))
        offset = 0
        for round_ in range(6):
            marker = MARKERS[round_ % len(MARKERS)]
            # a fresh process loads torch and the model first: allow for a busy machine
            if not _wait_marker(log, offset, marker, node.proc, timeout=120):
                break  # nothing left to interrupt at this stage
            threading.Event().wait(rng.uniform(0.0, 0.25))
            assert node.kill(signal.SIGKILL) == -signal.SIGKILL
            kills += 1
            offset = log.stat().st_size
            node = ServeProcess(config, port, log).start(timeout=120)
        assert kills >= 3, log.read_text()[-3000:]

        def finished() -> bool:
            states = _query(db, "SELECT state FROM studies")
            undelivered = _query(db, "SELECT count(*) FROM outbox WHERE state != 'sent'")[0][0]
            return (len(states) == len(uids) and all(s == "scored" for (s,) in states)
                    and undelivered == 0)

        wait_for(finished, timeout=240, interval=0.2)
    finally:
        if node is not None:
            node.stop()
        pacs.terminate()
        pacs.wait(timeout=20)
    srs = _pacs_srs(pacs_dir)
    assert set(srs) == uids
    assert all(len(v) == 1 for v in srs.values()), srs
    # the node itself kept one result set per study, and every file of it reached the PACS
    sets = [p for p in (data / "results").glob("*/*") if p.is_dir()]
    assert len(sets) == len(uids) and not list((data / "results").glob("*/.*"))
    held = {f.name.split(".", 1)[1] for f in pacs_dir.iterdir()}
    queued = {sop for (sop,) in _query(db, "SELECT sop_uid FROM outbox")}
    assert queued <= held and len(queued) == sum(
        len(json.loads((s / "manifest.json").read_text())["files"]) for s in sets)
