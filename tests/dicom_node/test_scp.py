"""The listener against real peers on 127.0.0.1: DCMTK storescu/echoscu and pynetdicom."""

from __future__ import annotations

import hashlib
import io
import json
import ssl
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import SecondaryCaptureImageStorage, UltrasoundImageStorage

from dicom_node.errors import DeliveryError
from dicom_node.scu import echo, store_files
from dicom_node.store.archive import uid_name
from tests.builders import (
    encapsulated_pdf,
    make_seg,
    make_tls_files,
    make_us,
    set_raw,
    study_companions,
    write,
    write_study,
)
from tests.conftest import make_config
from tests.dicom_node.node_harness import running_node

pytestmark = pytest.mark.network

DCMTK_STORESCU = "/usr/bin/storescu"
DCMTK_ECHOSCU = "/usr/bin/echoscu"


def _send(cfg, items, aet="PYNETDICOM", **kw):
    return store_files("127.0.0.1", cfg.node.port, items, calling_aet=aet, called_aet="DICOMNODE",
                       **kw)


def _assert_archived(archive, sop_uids):
    """Every SOP UID has a row, its file exists and hashes to the indexed sha256."""
    for uid in sop_uids:
        rows = archive.query("SELECT path, sha256 FROM instances WHERE sop_uid = ?", (uid,))
        assert rows, f"{uid} not indexed"
        path = archive.data_dir / rows[0]["path"]
        assert path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rows[0]["sha256"]
        assert dcmread(path).SOPInstanceUID == uid


@pytest.fixture
def node(tmp_path):
    cfg = make_config(tmp_path / "node", completion={"idle_seconds": 60, "max_wait_seconds": 120})
    with running_node(cfg, completion=False) as archive:
        yield cfg, archive


def test_dcmtk_echoscu_and_storescu(node, tmp_path):
    cfg, archive = node
    port = str(cfg.node.port)
    r = subprocess.run([DCMTK_ECHOSCU, "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1", port],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    files = write_study(tmp_path / "in", 6)
    # -xd: propose deflated explicit VR little endian, as some modalities do
    r = subprocess.run([DCMTK_STORESCU, "-xd", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                        port, *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    uids = [dcmread(f).SOPInstanceUID for f in files]
    _assert_archived(archive, uids)
    rows = archive.query("SELECT DISTINCT calling_aet, transfer_syntax FROM instances")
    assert rows == [{"calling_aet": "STORESCU", "transfer_syntax": "1.2.840.10008.1.2.1.99"}]
    study = archive.query("SELECT * FROM studies")
    assert len(study) == 1 and study[0]["state"] == "receiving" and study[0]["patient_id"] == "P001"
    assert archive.query("SELECT count(*) AS n FROM series")[0]["n"] == 1


def test_pynetdicom_push_us_and_seg_indexed(node, tmp_path):
    cfg, archive = node
    us = make_us()
    seg = make_seg(us)
    results = _send(cfg, [us, seg])
    assert [s for _, s in results] == [0, 0]
    _assert_archived(archive, [us.SOPInstanceUID, seg.SOPInstanceUID])
    row = archive.query("SELECT * FROM instances WHERE sop_uid = ?", (seg.SOPInstanceUID,))[0]
    assert row["modality"] == "SEG"
    assert json.loads(row["referenced_sop_uids"]) == [us.SOPInstanceUID]
    row = archive.query("SELECT * FROM instances WHERE sop_uid = ?", (us.SOPInstanceUID,))[0]
    geometry = (row["rows"], row["columns"], row["frames"], row["photometric"])
    assert geometry == (64, 64, 1, "MONOCHROME2")
    assert row["path"] == (f"archive/{uid_name(us.StudyInstanceUID)}/"
                           f"{uid_name(us.SeriesInstanceUID)}/{uid_name(us.SOPInstanceUID)}.dcm")
    # re-send: idempotent (same hash -> no new row, still success)
    assert _send(cfg, [us]) == [(us.SOPInstanceUID, 0)]
    assert archive.instance_count() == 2


def _jpeg_baseline(ds):
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.LossyImageCompression = "01"
    return ds


@pytest.mark.parametrize("syntax",
                         [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit])
def test_compressed_transfer_syntaxes_are_accepted_and_decodable(node, tmp_path, syntax):
    cfg, archive = node
    ds = make_us(seed=3)
    original = ds.pixel_array.copy()
    if syntax == JPEGBaseline8Bit:
        _jpeg_baseline(ds)
    else:
        ds.compress(syntax)
    path = write(ds, tmp_path / "in")
    assert _send(cfg, [path]) == [(ds.SOPInstanceUID, 0)]
    row = archive.query("SELECT path, transfer_syntax FROM instances")[0]
    assert row["transfer_syntax"] == syntax
    arr = dcmread(archive.data_dir / row["path"]).pixel_array
    assert arr.shape == original.shape
    if syntax != JPEGBaseline8Bit:
        np.testing.assert_array_equal(arr, original)


def _bad_store(cfg, ds):
    return _send(cfg, [ds])[0][1]


def _quarantine_reasons(archive):
    return [json.loads(p.read_text()) for p in sorted(archive.quarantine_dir.glob("*.json"))]


@pytest.mark.lenient_pydicom
def test_bad_inputs_get_specific_status_and_quarantine(node, tmp_path):
    cfg, archive = node
    cases = []
    ds = make_us()
    del ds.SeriesInstanceUID
    cases.append(("no series uid", ds, 0xA900))
    ds = make_us()
    del ds.Rows
    cases.append(("US image without Rows", ds, 0xA900))
    cases.append(("traversal study", set_raw(make_us(), "StudyInstanceUID", "1.2/../.."), 0xC210))
    cases.append(("traversal series", set_raw(make_us(), "SeriesInstanceUID", "../../../../tmp"),
                  0xC210))
    cases.append(("not a uid", set_raw(make_us(), "StudyInstanceUID", "1.02.abc"), 0xC210))
    ds = make_us()
    ds.PixelData = ds.PixelData[:1000]
    cases.append(("truncated native pixels", ds, 0xC210))
    ds = make_us()
    ds.compress(RLELossless)
    ds.PixelData = ds.PixelData[:-20]
    cases.append(("truncated encapsulated pixels", ds, 0xC210))
    for name, ds, status in cases:
        assert _bad_store(cfg, ds) == status, name
    assert archive.instance_count() == 0
    reasons = _quarantine_reasons(archive)
    assert len(reasons) == len(cases)
    assert sorted(r["status"] for r in reasons) == sorted(f"0x{c[2]:04X}" for c in cases)
    assert all(r["reason"] and r["calling_aet"] == "PYNETDICOM" for r in reasons)
    assert len(list(archive.quarantine_dir.glob("*.dcm"))) == len(cases)
    # nothing escaped the data dir, and the archive holds no files
    assert not any(p.is_file() for p in archive.archive_dir.rglob("*"))
    assert not (tmp_path / "tmp").exists()
    # a traversal SOP Instance UID (also in the request) never becomes a path either
    ds = make_us()
    set_raw(ds, "SOPInstanceUID", "1.2/../../x")
    set_raw(ds.file_meta, "MediaStorageSOPInstanceUID", "1.2/../../x")
    assert _bad_store(cfg, ds) == 0xC210
    assert not any(p.is_file() for p in archive.archive_dir.rglob("*"))
    # the server keeps serving
    good = make_us()
    assert _send(cfg, [good]) == [(good.SOPInstanceUID, 0)]


def test_dataset_not_matching_its_sop_class_is_0xA900(node, tmp_path):
    """A modality announcing US Image Storage for what is a Secondary Capture dataset."""
    cfg, archive = node
    ds = make_us()
    ds.SOPClassUID = SecondaryCaptureImageStorage  # the data says SC, the file meta says US
    ds.preamble = b"\x00" * 128
    path = tmp_path / "mislabelled.dcm"
    ds.save_as(path, enforce_file_format=False)
    assert dcmread(path).file_meta.MediaStorageSOPClassUID == UltrasoundImageStorage
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(UltrasoundImageStorage)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as is: request class from file meta
    try:
        assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status.Status == 0xA900
    assert _quarantine_reasons(archive)[0]["status"] == "0xA900"
    assert archive.instance_count() == 0


def test_unknown_calling_and_wrong_called_ae_are_rejected(node, tmp_path):
    cfg, archive = node
    with pytest.raises(DeliveryError, match="rejected"):
        _send(cfg, [make_us()], aet="INTRUDER")
    with pytest.raises(DeliveryError, match="rejected"):
        store_files("127.0.0.1", cfg.node.port, [make_us()], calling_aet="PYNETDICOM",
                    called_aet="SOMEONEELSE")
    r = subprocess.run([DCMTK_ECHOSCU, "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1",
                        str(cfg.node.port)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert archive.instance_count() == 0
    assert echo("127.0.0.1", cfg.node.port, calling_aet="ECHOSCU", called_aet="DICOMNODE") == 0


def test_disk_reserve_exceeded_is_0xA700(tmp_path):
    cfg = make_config(tmp_path / "node", node={"disk_reserve_mb": 2**40})
    with running_node(cfg, completion=False) as archive:
        ds = make_us()
        assert _send(cfg, [ds]) == [(ds.SOPInstanceUID, 0xA700)]
        assert archive.instance_count() == 0
        assert echo("127.0.0.1", cfg.node.port, calling_aet="ECHOSCU", called_aet="DICOMNODE") == 0


def test_tls_required_plain_connection_fails(tmp_path):
    cert, key = make_tls_files(tmp_path / "tls")
    cfg = make_config(tmp_path / "node", node={
        "tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)},
        "acse_timeout_seconds": 5, "network_timeout_seconds": 5,
    })
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with running_node(cfg, completion=False) as archive:
        with pytest.raises(DeliveryError):
            echo("127.0.0.1", cfg.node.port, calling_aet="ECHOSCU", called_aet="DICOMNODE",
                 timeout=5)
        with pytest.raises(DeliveryError):
            _send(cfg, [make_us()], timeout=5)
        assert archive.instance_count() == 0
        ds = make_us()
        assert _send(cfg, [ds], tls_context=client) == [(ds.SOPInstanceUID, 0)]
        assert echo("127.0.0.1", cfg.node.port, calling_aet="ECHOSCU", called_aet="DICOMNODE",
                    tls_context=client) == 0
        _assert_archived(archive, [ds.SOPInstanceUID])


def test_concurrent_senders_lose_nothing(node, tmp_path):
    """4 senders x 50 instances at once (2 DCMTK storescu + 2 pynetdicom) -> 200 indexed."""
    cfg, archive = node
    folders = [write_study(tmp_path / f"s{i}", 50, patient_id=f"P{i}", seed=100 * i)
               for i in range(4)]
    errors: list[BaseException] = []
    results: list[list[tuple[str, int]]] = []

    def py_sender(files):
        try:
            results.append(_send(cfg, files))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    procs = [
        subprocess.Popen([DCMTK_STORESCU, "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                          str(cfg.node.port), *map(str, files)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for files in folders[:2]
    ]
    threads = [threading.Thread(target=py_sender, args=(f,)) for f in folders[2:]]
    for t in threads:
        t.start()
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    for t in threads:
        t.join(180)
    assert not errors
    assert all(s == 0 for r in results for _, s in r) and sum(map(len, results)) == 100
    assert archive.instance_count() == 200
    uids = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for fs in folders for f in fs]
    _assert_archived(archive, uids)
    assert archive.query("SELECT count(*) AS n FROM studies")[0]["n"] == 4
    assert not list(archive.archive_dir.rglob("*.tmp"))


def test_resend_with_different_content_keeps_newest(node):
    cfg, archive = node
    ds = make_us(seed=1)
    assert _send(cfg, [ds]) == [(ds.SOPInstanceUID, 0)]
    first = archive.query("SELECT sha256 FROM instances")[0]["sha256"]
    ds.PixelData = make_us(seed=2).PixelData
    assert _send(cfg, [ds]) == [(ds.SOPInstanceUID, 0)]
    rows = archive.query("SELECT sha256, path FROM instances")
    assert len(rows) == 1 and rows[0]["sha256"] != first
    assert dcmread(archive.data_dir / rows[0]["path"]).PixelData == ds.PixelData


def test_multiframe_us_accepted_and_short_multiframe_refused(node):
    from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage

    cfg, archive = node
    ds = make_us(seed=8)
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.NumberOfFrames = 3
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 33.3
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8).tobytes()
    assert _send(cfg, [ds]) == [(ds.SOPInstanceUID, 0)]
    assert archive.query("SELECT frames FROM instances")[0]["frames"] == 3
    short = make_us(seed=9)
    short.SOPClassUID = UltrasoundMultiFrameImageStorage
    short.NumberOfFrames = 3  # but only one frame of pixel data
    assert _send(cfg, [short]) == [(short.SOPInstanceUID, 0xC210)]


def test_mutual_tls_requires_a_client_certificate(tmp_path):
    cert, key = make_tls_files(tmp_path / "tls")
    ccert, ckey = make_tls_files(tmp_path / "client")
    cfg = make_config(tmp_path / "node", node={
        "tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key),
                "ca_file": str(ccert), "require_client_cert": True},
        "acse_timeout_seconds": 5, "network_timeout_seconds": 5,
    })
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    known = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    known.load_cert_chain(str(ccert), str(ckey))
    with running_node(cfg, completion=False) as archive:
        with pytest.raises(DeliveryError):
            _send(cfg, [make_us()], tls_context=anonymous, timeout=5)
        ds = make_us()
        assert _send(cfg, [ds], tls_context=known) == [(ds.SOPInstanceUID, 0)]
        assert archive.instance_count() == 1


def _send_file_as_is(cfg, path, contexts):
    """Send a file's bytes unchanged (pynetdicom's chunked mode: request from its file meta)."""
    ae = AE(ae_title="PYNETDICOM")
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return int(status.Status)


def _jpeg_sof_dims(frame: bytes, rows: int, cols: int) -> bytes:
    at = frame.index(b"\xff\xc0")
    return frame[: at + 5] + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + frame[at + 9 :]


def test_undecodable_pixel_data_refused_before_acknowledging(node, tmp_path):
    """Issue 10 item 5: each of these was acknowledged and then crashed or confused the decoder."""
    from pydicom.encaps import generate_frames

    cfg, archive = node
    cases = []
    ds = make_us()
    ds.Rows = 0
    cases.append(("Rows 0", ds, 0xC210))
    ds = make_us()
    ds.PhotometricInterpretation = "GARBAGE"
    cases.append(("unknown photometric", ds, 0xC210))
    ds = make_us()
    ds.SamplesPerPixel = 2
    cases.append(("2 samples", ds, 0xC210))
    ds = make_us()
    ds.BitsAllocated = 12
    cases.append(("BitsAllocated 12", ds, 0xC210))
    ds = _jpeg_baseline(make_us())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    cases.append(("JPEG baseline claiming 32 bits", ds, 0xC210))
    ds = _jpeg_baseline(make_us())
    frag = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([_jpeg_sof_dims(frag, 128, 64)])
    cases.append(("JPEG SOF disagrees with Rows", ds, 0xC210))
    ds = _jpeg_baseline(make_us())
    ds.PixelData = encapsulate([b"\x00" * 200])
    cases.append(("JPEG without SOI", ds, 0xC210))
    ds = make_us()
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 65535
    cases.append(("RLE 65535 x 65535", ds, 0xA700))
    ds = make_us()
    ds.compress(RLELossless)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    cases.append(("RLE segment count disagrees with BitsAllocated", ds, 0xC210))
    ds = make_us()
    ds.compress(JPEG2000Lossless)
    ds.Columns = 32
    cases.append(("JPEG 2000 SIZ disagrees with Columns", ds, 0xC210))
    ds = make_us()
    ds.PixelData = ds.PixelData * 3
    cases.append(("native pixel data 3x too long", ds, 0xC210))
    ds = make_us()
    ds.NumberOfFrames = "0"
    cases.append(("NumberOfFrames 0", ds, 0xC210))
    for name, ds, status in cases:
        assert _bad_store(cfg, ds) == status, name
    reasons = _quarantine_reasons(archive)
    assert len(reasons) == len(cases)
    assert all(r["reason"] for r in reasons)
    assert archive.instance_count() == 0
    ds = make_us()
    ds.PixelData = ds.PixelData + b"\x00" * 2  # vendor padding within a frame: tolerated
    ds2 = make_us()
    ds2.Rows = 63  # odd length 4032 -> 4032, and one pad byte on an odd length is normal
    ds2.PixelData = ds2.PixelData[: 63 * 64]
    assert _send(cfg, [ds, ds2]) == [(ds.SOPInstanceUID, 0), (ds2.SOPInstanceUID, 0)]


def test_body_in_the_wrong_vr_encoding_is_0xC210(node, tmp_path):
    """An explicit VR body in a file (and a context) that says implicit VR."""
    from pydicom.uid import ImplicitVRLittleEndian

    cfg, archive = node
    ds = make_us()
    path = write(ds, tmp_path / "in")
    raw = path.read_bytes()
    explicit, implicit = b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00\x00\x00"
    assert raw.count(explicit) == 1
    path.write_bytes(raw.replace(explicit, implicit))
    status = _send_file_as_is(cfg, path, [(UltrasoundImageStorage, [ImplicitVRLittleEndian])])
    assert status == 0xC210
    assert "explicit VR" in _quarantine_reasons(archive)[0]["reason"]
    assert archive.instance_count() == 0


@pytest.mark.lenient_pydicom
def test_74_character_affected_sop_instance_uid_gets_a_status(node, tmp_path):
    """pynetdicom used to abort while decoding such a command set; now the handler answers."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_node.scp import _lenient_uid

    cfg, archive = node
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * 48
    assert len(long_uid) == 74
    ds = make_us()
    set_raw(ds, "SOPInstanceUID", long_uid)
    set_raw(ds.file_meta, "MediaStorageSOPInstanceUID", long_uid)
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    old = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = _lenient_uid  # let our SCU send it at all
    try:
        status = _send_file_as_is(cfg, path, [(UltrasoundImageStorage, [ExplicitVRLittleEndian])])
    finally:
        _config.VALIDATORS["UI"] = old
    assert status == 0xC210
    assert "74 characters" in _quarantine_reasons(archive)[0]["reason"]
    good = make_us()
    assert _send(cfg, [good]) == [(good.SOPInstanceUID, 0)]


@pytest.mark.lenient_pydicom
def test_imperfect_but_unambiguous_identifiers_are_accepted(node):
    """Issue 11: empty/missing Patient ID (Type 2), leading-zero UID components, UID padding."""
    cfg, archive = node
    empty_pid = make_us(patient_id="")
    no_pid = make_us()
    del no_pid.PatientID
    leading_zero = set_raw(make_us(), "SOPInstanceUID", "1.2.826.0.1.3680043.8.498.0123")
    set_raw(leading_zero.file_meta, "MediaStorageSOPInstanceUID", "1.2.826.0.1.3680043.8.498.0123")
    padded = make_us()
    set_raw(padded, "StudyInstanceUID", padded.StudyInstanceUID + " ")
    results = _send(cfg, [empty_pid, no_pid, leading_zero, padded])
    assert [s for _, s in results] == [0, 0, 0, 0]
    assert archive.instance_count() == 4
    assert archive.query("SELECT sop_uid FROM instances WHERE sop_uid = ?",
                         ("1.2.826.0.1.3680043.8.498.0123",))
    assert archive.query("SELECT study_uid FROM instances WHERE study_uid = ?",
                         (padded.StudyInstanceUID.strip(),))


def test_every_storage_class_a_study_may_carry_is_archived_and_indexed(node):
    """Issue 11: SR of every kind, KOS, GSPS, label-map SEG, PDF are negotiated and stored."""
    cfg, archive = node
    us = make_us()
    others = study_companions(us) + [encapsulated_pdf(us)]
    results = _send(cfg, [us, *others])
    assert [s for _, s in results] == [0] * (1 + len(others)), results
    rows = archive.query("SELECT sop_class_uid, modality FROM instances")
    assert len(rows) == 1 + len(others)
    assert {r["modality"] for r in rows} >= {"US", "SR", "KO", "PR", "SEG", "DOC"}


def test_jpeg_xl_is_refused_at_association_by_name(node, tmp_path):
    """No installed decoder reads JPEG-XL: its context is not accepted; the node lists syntaxes."""
    from dicom_node.scp import storage_transfer_syntaxes

    cfg, _ = node
    jxl = "1.2.840.10008.1.2.4.112"
    assert jxl not in storage_transfer_syntaxes()
    assert "1.2.840.10008.1.2.4.201" in storage_transfer_syntaxes()  # HTJ2K: openjpeg decodes it
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(UltrasoundImageStorage, [jxl])
    ae.add_requested_context(UltrasoundImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {"1.2.840.10008.1.2.1"}


def test_idle_sockets_do_not_hold_up_a_real_storescu(tmp_path):
    """Issue 10 item 7: 20 idle TCP connections, then DCMTK storescu stores one file."""
    import socket

    cfg = make_config(tmp_path / "node")
    with running_node(cfg, completion=False) as archive:
        idle = [socket.create_connection(("127.0.0.1", cfg.node.port), timeout=5)
                for _ in range(20)]
        try:
            files = write_study(tmp_path / "in", 1)
            r = subprocess.run([DCMTK_STORESCU, "-aet", "STORESCU", "-aec", "DICOMNODE",
                                "127.0.0.1", str(cfg.node.port), str(files[0])],
                               check=False, capture_output=True, text=True, timeout=4)
            assert r.returncode == 0, r.stderr
            _assert_archived(archive, [dcmread(files[0]).SOPInstanceUID])
        finally:
            for s in idle:
                s.close()


def test_silent_connection_is_closed_after_the_pending_timeout(tmp_path):
    """A socket that never sends A-ASSOCIATE-RQ is closed by the node (ARTIM), not kept for 30 s."""
    import socket

    cfg = make_config(tmp_path / "node", node={"pending_timeout_seconds": 0.5})
    with running_node(cfg, completion=False):
        s = socket.create_connection(("127.0.0.1", cfg.node.port), timeout=20)
        try:
            try:
                assert s.recv(1) == b""  # closed by the node, long before our 20 s timeout
            except ConnectionResetError:
                pass
        finally:
            s.close()
        assert echo("127.0.0.1", cfg.node.port, calling_aet="ECHOSCU", called_aet="DICOMNODE") == 0


def test_peer_at_its_limit_with_only_busy_associations_gets_no_new_connection():
    """The limiter closes the oldest idle connection first, and refuses only when none is idle."""
    import socket

    from dicom_node.scp import PeerLimiter

    limiter = PeerLimiter(2)
    a, b, c = (socket.socket() for _ in range(3))
    done = threading.Event()
    assoc_a, assoc_d = (threading.Thread(target=done.wait) for _ in range(2))  # association threads
    assoc_a.start()
    assoc_d.start()
    try:
        assert limiter.admit(a, "10.0.0.1") and limiter.admit(b, "10.0.0.1")
        assert limiter.admit(c, "10.0.0.2")  # another peer is not affected
        limiter.opened(assoc_a, a)
        limiter.requested(assoc_a)
        d = socket.socket()
        assert limiter.admit(d, "10.0.0.1")  # b was idle: closed to make room
        limiter.opened(assoc_d, d)
        limiter.requested(assoc_d)
        e = socket.socket()
        assert not limiter.admit(e, "10.0.0.1")  # a and d are associated: no room
        for s in (d, e):
            s.close()
    finally:
        done.set()
        for s in (a, b, c):
            s.close()


def test_headers_the_decoder_rejects_are_refused_at_the_door(node):
    """Found by the fuzz suite with scoring on: accepted, then undecodable in the worker."""
    cfg, archive = node
    rep = make_us()
    rep.PixelRepresentation = 5
    stored0 = make_us()
    stored0.BitsStored = 0
    palette = make_us()
    palette.PhotometricInterpretation = "PALETTE COLOR"
    results = _send(cfg, [rep, stored0, palette])
    assert [s for _, s in results] == [0xC210, 0xC210, 0xA900]
    assert archive.instance_count() == 0
