"""`dicom-node studies` output (table and --json), with and without a sender outbox."""

from __future__ import annotations

import io
import json
import time

from dicom_node.cli import main
from dicom_node.completion import check_studies
from dicom_node.config import CompletionConfig
from dicom_node.store.archive import Archive
from dicom_node.store.outbox import OutboxItem, add_items
from dicom_node.validate import validate
from tests.builders import make_seg, make_us
from tests.dicom_node.node_harness import write_toml


def _put(archive, ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    info = validate(ds, affected_sop_class=ds.SOPClassUID, affected_sop_instance=ds.SOPInstanceUID,
                    transfer_syntax=ds.file_meta.TransferSyntaxUID)
    archive.store(buf.getvalue(), info, calling_aet="T",
                  transfer_syntax=ds.file_meta.TransferSyntaxUID)


def test_studies_json_and_table(tmp_path, capsys):
    data = tmp_path / "node"
    config = write_toml({
        "node": {"data_dir": str(data), "allow_any_calling_aet": True},
        "scoring": {"enabled": False},
    }, tmp_path / "config.toml")
    assert main(["studies", "--config", str(config)]) == 1  # nothing received yet
    archive = Archive(data).init()
    us = make_us(patient_id="PID1")
    _put(archive, us)
    _put(archive, make_seg(us))
    other = make_us(patient_id="PID2")
    _put(archive, other)
    cfg = CompletionConfig(idle_seconds=1, max_wait_seconds=10, require_seg=True)
    check_studies(archive, cfg, max_attempts=3, now=time.time() + 2)
    capsys.readouterr()
    assert main(["studies", "--config", str(config), "--json"]) == 0
    rows = {r["study_uid"]: r for r in json.loads(capsys.readouterr().out)}
    a, b = rows[us.StudyInstanceUID], rows[other.StudyInstanceUID]
    assert (a["state"], a["instances"], a["us"], a["seg"], a["missing_seg"]) == (
        "complete", 2, 1, 1, False)
    assert a["job"]["state"] == "queued" and a["patient_id"] == "PID1"
    assert b["state"] == "receiving" and b["job"] is None  # waits for its SEG
    assert a["delivery"] == {}  # nothing queued for delivery yet
    # outbox rows add delivery counts per study
    with archive.transaction() as conn:
        add_items(conn, [OutboxItem(str(us.StudyInstanceUID), "pacs", f"results/{i}.dcm", str(i))
                         for i in range(2)])
        conn.execute("UPDATE outbox SET state = 'sent' WHERE sop_uid = '0'")
    archive.close()
    assert main(["studies", "--config", str(config), "--json"]) == 0
    rows = {r["study_uid"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[us.StudyInstanceUID]["delivery"] == {"sent": 1, "pending": 1}
    assert main(["studies", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "receiving" in out
