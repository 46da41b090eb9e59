"""Archive: durable layout, idempotent re-send, quarantine, temp sweep, disk reserve, schema."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from dicom_node.errors import OutOfResourcesError
from dicom_node.store.archive import Archive, uid_name
from dicom_node.store.db import SCHEMA
from dicom_node.validate import validate
from inference.durable import write_durable
from tests.builders import make_us


def _raw_info(ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    info = validate(ds, affected_sop_class=ds.SOPClassUID, affected_sop_instance=ds.SOPInstanceUID,
                    transfer_syntax=ds.file_meta.TransferSyntaxUID)
    return buf.getvalue(), info


@pytest.fixture
def archive(tmp_path):
    a = Archive(tmp_path / "node").init()
    yield a
    a.close()


def test_store_layout_hash_and_contract_columns(archive):
    ds = make_us(patient_id="PX")
    raw, info = _raw_info(ds)
    out = archive.store(raw, info, calling_aet="MOD",
                        transfer_syntax=ds.file_meta.TransferSyntaxUID)
    assert out.kind == "stored"
    expected = (archive.archive_dir / uid_name(ds.StudyInstanceUID) / uid_name(ds.SeriesInstanceUID)
                / f"{uid_name(ds.SOPInstanceUID)}.dcm")
    assert out.path == expected
    assert out.path.read_bytes() == raw
    row = archive.query("SELECT * FROM instances")[0]
    assert row["sha256"] == hashlib.sha256(raw).hexdigest() and row["size"] == len(raw)
    assert row["calling_aet"] == "MOD" and row["manufacturer"] == "TestVendor"
    assert archive.query("SELECT patient_id FROM patients") == [{"patient_id": "PX"}]
    # the columns docs/contracts.md promises
    for table, (columns, _) in SCHEMA.items():
        assert set(columns) <= set(archive.db()[table].columns_dict), table
    assert archive.db().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_resend_same_is_duplicate_and_different_replaces(archive):
    ds = make_us(seed=1)
    raw, info = _raw_info(ds)
    archive.store(raw, info, calling_aet="MOD", transfer_syntax="1.2.840.10008.1.2.1")
    again = archive.store(raw, info, calling_aet="MOD", transfer_syntax="1.2.840.10008.1.2.1")
    assert again.kind == "duplicate"
    assert archive.instance_count() == 1
    ds.PixelData = make_us(seed=2).PixelData
    raw2, info2 = _raw_info(ds)
    out = archive.store(raw2, info2, calling_aet="MOD", transfer_syntax="1.2.840.10008.1.2.1")
    assert out.kind == "replaced" and out.path.read_bytes() == raw2
    assert archive.instance_count() == 1


def test_no_uid_becomes_a_path(archive):
    """File names are hashes: even a hostile UID stays one level inside its parent folder."""
    _, info = _raw_info(make_us())
    for bad in ("1.2/../..", "..", "1.2.3/x", "1..2", "", "01.2", "/etc/passwd", "a\x00b"):
        for field in ("study_uid", "series_uid", "sop_uid"):
            rel = archive.relative_path(info.__class__(**{**info.__dict__, field: bad}))
            assert len(rel.parts) == 4 and rel.parts[0] == "archive"
            assert all(len(part.removesuffix(".dcm")) == 32 for part in rel.parts[1:])
            assert (archive.data_dir / rel).resolve().is_relative_to(archive.archive_dir)


def test_instances_filed_under_the_older_uid_layout_still_read(archive):
    """An index row written by an older node (UID-named folders) is read through its path."""
    ds = make_us(patient_id="PX")
    raw, info = _raw_info(ds)
    archive.store(raw, info, calling_aet="MOD", transfer_syntax=ds.file_meta.TransferSyntaxUID)
    old = f"archive/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    write_durable(archive.data_dir / old, raw)
    (archive.data_dir / archive.relative_path(info)).unlink()
    with archive.transaction() as conn:
        conn.execute("UPDATE instances SET path = ?", (old,))
    assert archive.study_paths(ds.StudyInstanceUID) == [archive.data_dir / old]
    again = archive.store(raw, info, calling_aet="MOD", transfer_syntax="1.2.840.10008.1.2.1")
    assert again.kind == "duplicate" and again.path == archive.data_dir / old


def test_quarantine_keeps_file_and_reason_with_generated_name(archive):
    path = archive.quarantine(b"DICM-ish", reason="bad things", status=0xA900, calling_aet="MOD",
                              sop_uid="1.2/../../etc")
    assert path.parent == archive.quarantine_dir and ".." not in path.name
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["reason"] == "bad things" and meta["status"] == "0xA900"
    assert meta["sop_instance_uid"] == "1.2/../../etc" and meta["file"] == path.name


def test_init_sweeps_temp_files_and_they_are_never_indexed(tmp_path):
    a = Archive(tmp_path / "node").init()
    leftover = a.archive_dir / "1.2" / "3.4" / ".5.6.dcm.123.456.abcd.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    a.close()
    a = Archive(tmp_path / "node").init()
    assert not leftover.exists()
    assert a.instance_count() == 0
    a.close()


def test_write_durable_replaces_atomically(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    write_durable(target, b"one")
    write_durable(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_disk_reserve(tmp_path):
    a = Archive(tmp_path / "node", disk_reserve_mb=2**40).init()
    raw, info = _raw_info(make_us())
    with pytest.raises(OutOfResourcesError):
        a.store(raw, info, calling_aet="MOD", transfer_syntax="1.2.840.10008.1.2.1")
    assert a.instance_count() == 0
    a.close()
    Archive(tmp_path / "node2", disk_reserve_mb=1).init().check_disk(1000)
