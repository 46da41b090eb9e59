"""Crash safety: SIGKILL the real `serve` process while senders push, restart, check everything.

Every instance acknowledged with 0x0000 must be on disk, indexed and hash-identical; no temp
file survives as an instance; each study completes and is queued exactly once, also across a
further clean restart.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.errors import DeliveryError
from dicom_node.scu import store_files
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
    studies = [write_study(tmp_path / f"s{i}", 80, patient_id=f"P{i}", seed=1000 * i) for i in range(3)]
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
            assert len(ds.PixelData) == 64 * 64 and path.stem == ds.SOPInstanceUID
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
