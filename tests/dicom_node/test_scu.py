"""The node as SCU: echo/push/store_files against DCMTK storescp; context planning."""

from __future__ import annotations

import subprocess
import time

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicom_node.cli import main
from dicom_node.errors import DeliveryError
from dicom_node.scu import plan_contexts, store_files
from tests.builders import make_seg, make_us, write, write_study
from tests.conftest import free_port

pytestmark = pytest.mark.network


@pytest.fixture
def storescp(tmp_path, request):
    """DCMTK storescp on a free port writing into tmp_path/out; yields (port, out_dir).

    Accepts every transfer syntax it knows (+xa) unless the test is parametrized with "plain".
    """
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    accept = [] if getattr(request, "param", "") == "plain" else ["+xa"]
    proc = subprocess.Popen(["/usr/bin/storescp", *accept, "-od", str(out), "+B", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["/usr/bin/echoscu", "127.0.0.1", str(port)],
                             capture_output=True, timeout=20).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_echo_and_push_commands_against_dcmtk_storescp(storescp, tmp_path, capsys):
    port, out = storescp
    assert main(["echo", "127.0.0.1", str(port), "--aec", "STORESCP"]) == 0
    files = write_study(tmp_path / "in" / "study", 4)
    us = dcmread(files[0])
    files.append(write(make_seg(us), tmp_path / "in" / "seg"))
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    argv = ["push", str(tmp_path / "in"), "--to", f"127.0.0.1:{port}", "--aec", "STORESCP"]
    assert main(argv) == 0
    assert "5/5 stored" in capsys.readouterr().out
    received = {dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert received == {dcmread(f).SOPInstanceUID for f in files}


def test_store_files_returns_statuses_and_sends_compressed(storescp, tmp_path):
    port, out = storescp
    ds = make_us(seed=4)
    ds.compress(RLELossless)
    plain = make_us(seed=5)
    res = store_files("127.0.0.1", port, [ds, plain], calling_aet="DICOMNODE",
                      called_aet="STORESCP")
    assert res == [(ds.SOPInstanceUID, 0), (plain.SOPInstanceUID, 0)]
    by_uid = {dcmread(p).SOPInstanceUID: dcmread(p) for p in out.iterdir()}
    assert by_uid[ds.SOPInstanceUID].file_meta.TransferSyntaxUID == RLELossless


@pytest.mark.parametrize("storescp", ["plain"], indirect=True)
def test_store_files_context_not_accepted_raises_with_partial(storescp):
    port, _ = storescp
    plain = make_us(seed=6)
    ds = make_us(seed=7)
    ds.compress(RLELossless)
    with pytest.raises(DeliveryError, match="RLE") as info:
        store_files("127.0.0.1", port, [plain, ds], calling_aet="DICOMNODE", called_aet="STORESCP")
    assert info.value.partial == [(plain.SOPInstanceUID, 0)]


def test_store_files_nobody_listening_raises():
    with pytest.raises(DeliveryError):
        store_files("127.0.0.1", free_port(), [make_us()], calling_aet="A", called_aet="B",
                    timeout=3)


def test_plan_contexts_minimal():
    a, b = make_us(), make_us()
    c = make_us()
    c.compress(RLELossless)
    plan = plan_contexts([a, b, c])
    assert plan == [
        (a.SOPClassUID, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        (a.SOPClassUID, (RLELossless,)),
    ]


def test_push_of_a_folder_sends_what_the_peer_accepts_and_reports_the_rest(tmp_path, capsys):
    """Issue 11: a refused file and a syntax the peer does not accept never stop the push."""
    from pydicom.encaps import encapsulate

    from tests.conftest import make_config
    from tests.dicom_node.node_harness import running_node

    cfg = make_config(tmp_path / "node")
    folder = tmp_path / "in"
    good = write_study(folder / "a", 3)
    bad = make_us(seed=5)
    bad.Rows = 0
    refused = write(bad, folder / "b", "refused.dcm")
    jxl = make_us(seed=6)
    jxl.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.112"  # JPEG-XL: no decoder here
    jxl.PixelData = encapsulate([b"\xff\x0a" + b"\x00" * 30])
    jxl["PixelData"].VR = "OB"
    unsupported = write(jxl, folder / "b", "jpegxl.dcm")
    good += write_study(folder / "c", 2)
    with running_node(cfg, completion=False) as archive:
        rc = main(["push", str(folder), "--to", f"127.0.0.1:{cfg.node.port}", "--aec", "DICOMNODE"])
        out = capsys.readouterr().out
        assert rc == 1
        assert "5/7 stored" in out
        assert f"{refused}: status 0xC210" in out
        assert f"{unsupported}: peer accepted no presentation context" in out and "JPEG XL" in out
        stored = {r["sop_uid"] for r in archive.query("SELECT sop_uid FROM instances")}
    assert stored == {dcmread(f).SOPInstanceUID for f in good}


@pytest.mark.parametrize("argv, message", [
    (["push", ".", "--to", "127.0.0.1:104", "--aet", "A" * 17], "--aet"),
    (["push", ".", "--to", "127.0.0.1:99999"], "--to port"),
    (["push", ".", "--to", "nohostport"], "HOST:PORT"),
    (["echo", "127.0.0.1", "99999"], "port 99999"),
    (["echo", "127.0.0.1", "104", "--aec", "BAD\\AE"], "--aec"),
])
def test_user_mistakes_end_with_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
