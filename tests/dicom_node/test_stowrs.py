"""STOW-RS delivery: config per kind; results reach a real Orthanc with its DICOMweb plugin."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from dicom_node.delivery import make_destination
from dicom_node.delivery import sender as S
from dicom_node.delivery.stowrs import multipart_body, outcome_from_response, stow_url
from dicom_node.errors import ConfigError
from dicom_node.ops.metrics import exposition
from dicom_node.store.db import Index
from dicom_node.store.outbox import outbox_summary
from testing.peers import TEST_CALLERS, OrthancServer, orthanc_binary
from tests.conftest import make_config, require_tool
from tests.dicom_node.test_sender import _results

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


# ------------------------------------------------------------------------------------------
# Config: kind-specific keys are checked per kind, secrets come from files or the environment
# ------------------------------------------------------------------------------------------


def _dest_config(tmp_path: Path, **dest) -> object:
    return make_config(tmp_path / "node", destinations=[{"name": "web", **dest}])


@pytest.mark.parametrize(("dest", "key"), [
    ({"kind": "stowrs"}, "destinations[0].url"),
    ({"kind": "stowrs", "url": "ftp://x/dicom-web"}, "destinations[0].url"),
    ({"kind": "dimse", "ae_title": "PACS", "port": 104}, "destinations[0].host"),
    ({"kind": "dimse", "host": "pacs", "port": 104}, "destinations[0].ae_title"),
    ({"kind": "dimse", "ae_title": "PACS", "host": "pacs"}, "destinations[0].port"),
    ({"ae_title": "PACS", "host": "pacs", "port": 104, "url": "http://x"}, "destinations[0].url"),
    ({"kind": "stowrs", "url": "http://x", "host": "pacs"}, "destinations[0].host"),
    ({"kind": "stowrs", "url": "http://x", "storage_commitment": True},
     "destinations[0].storage_commitment"),
    ({"kind": "stowrs", "url": "http://x", "auth": "basic", "password": "p"},
     "destinations[0].username"),
    ({"kind": "stowrs", "url": "http://x", "auth": "basic", "username": "u"},
     "destinations[0].password"),
    ({"kind": "stowrs", "url": "http://x", "auth": "bearer"}, "destinations[0].token"),
    ({"kind": "stowrs", "url": "http://x", "auth": "bearer", "token": "t", "secret_env": "X"},
     "destinations[0].secret_env"),
    ({"kind": "stowrs", "url": "http://x", "auth": "bearer", "secret_env": "DN_UNSET_SECRET"},
     "destinations[0].secret_env"),
    ({"kind": "stowrs", "url": "http://x", "auth": "oauth"}, "destinations[0].auth"),
])
def test_destination_keys_checked_per_kind(dest: dict, key: str, tmp_path: Path) -> None:
    os.environ.pop("DN_UNSET_SECRET", None)
    with pytest.raises(ConfigError) as err:
        _dest_config(tmp_path, **dest)
    assert err.value.key == key


def test_secret_from_file_or_environment_never_in_repr(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "stow.secret"
    secret.write_text("s3cret-from-file\n")
    cfg = _dest_config(tmp_path, kind="stowrs", url="http://pacs/dicom-web", auth="basic",
                       username="node", secret_file=str(secret))
    d = cfg.destinations[0]  # type: ignore[attr-defined]
    assert d.password == "s3cret-from-file" and "s3cret" not in repr(cfg)
    monkeypatch.setenv("DN_STOW_TOKEN", "tok-from-env")
    cfg = _dest_config(tmp_path, kind="stowrs", url="http://pacs/dicom-web/", auth="bearer",
                       secret_env="DN_STOW_TOKEN")
    d = cfg.destinations[0]  # type: ignore[attr-defined]
    assert d.token == "tok-from-env" and "tok-from-env" not in repr(d)
    assert stow_url(d.url) == "http://pacs/dicom-web/studies"
    assert stow_url("http://pacs/dicom-web/studies") == "http://pacs/dicom-web/studies"


def test_response_mapping_without_a_server() -> None:
    """HTTP statuses without a body: 200 stores all (not committed), 401 names the auth keys,
    503 is retryable, a 3xx is never followed."""
    uids = ["1.2.3", "1.2.4"]
    ok = outcome_from_response(200, "", b"", uids, "w")
    assert ok.stored("1.2.3") and ok.stored("1.2.4") and not ok.committed and ok.error is None
    denied = outcome_from_response(401, "text/plain", b"Unauthorized", uids, "w")
    assert not denied.stored("1.2.3") and not denied.retryable
    assert "authentication rejected" in (denied.error or "")
    busy = outcome_from_response(503, "text/html", b"<html>busy</html>", uids, "w")
    assert busy.retryable and "HTTP 503" in (busy.error or "") and not busy.stored("1.2.4")
    moved = outcome_from_response(302, "", b"", uids, "w")
    assert "redirect" in (moved.error or "")


def test_native_dicom_xml_response() -> None:
    """A server answering in PS3.19 XML: one stored with a warning, one failed, one unnamed."""
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel>
 <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence"><Item number="1">
  <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3</Value></DicomAttribute>
  <DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value></DicomAttribute>
 </Item></DicomAttribute>
 <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">
  <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.4</Value></DicomAttribute>
  <DicomAttribute tag="00081197" vr="US"><Value number="1">not-a-number</Value></DicomAttribute>
 </Item></DicomAttribute>
</NativeDicomModel>"""
    out = outcome_from_response(202, "application/dicom+xml", xml, ["1.2.3", "1.2.4", "1.2.5"],
                                "w")
    assert out.statuses == {"1.2.3": 0xB000, "1.2.4": 0xC000, "1.2.5": 0x0110}
    assert out.committed == frozenset({"1.2.3"}) and "2 of 3" in (out.error or "")


# ------------------------------------------------------------------------------------------
# A real Orthanc with its DICOMweb plugin (loopback, basic auth on)
# ------------------------------------------------------------------------------------------


def start_orthanc_dicomweb(d: Path, callers: Sequence[str] = TEST_CALLERS,
                           extra: Mapping[str, Any] | None = None) -> OrthancServer:
    """A loopback Orthanc with its DICOMweb plugin at ``<url>/dicom-web`` (REST basic auth)."""
    server = OrthancServer(d, callers=callers, extra_config={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(extra or {})})
    if "dicom-web" not in server.get_json("/plugins"):
        server.stop()
        raise RuntimeError(f"Orthanc did not load {DICOMWEB_PLUGIN}")
    return server


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory: pytest.TempPathFactory):
    require_tool(orthanc_binary() is not None and DICOMWEB_PLUGIN.exists(),
                 "Orthanc with its DICOMweb plugin (orthanc-dicomweb)")
    server = start_orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-dicomweb"))
    try:
        yield server
    finally:
        server.stop()


def _stow_config(tmp_path: Path, server: OrthancServer, password: str | None):
    auth = ({"auth": "basic", "username": server.user, "password": password}
            if password is not None else {})
    return make_config(
        tmp_path / "node",
        destinations=[{"name": "web", "kind": "stowrs", "url": f"{server.url}/dicom-web",
                       **auth}],
        delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0, "poll_seconds": 0.1,
                  "timeout_seconds": 20},
    )


@pytest.mark.network
@pytest.mark.slow
def test_study_delivered_by_stowrs_is_committed(dicomweb: OrthancServer, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    cfg = _stow_config(tmp_path, dicomweb, dicomweb.password)
    score, rs, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["web"])
    counts = S.DeliveryLoop(cfg).run_once()
    assert counts == {"sent": 3, "failed": 0, "expired": 0}
    held = dicomweb.instance_uids_in_study(score.study_instance_uid)
    assert {ds.SOPInstanceUID for ds in rs.datasets} <= held
    # Orthanc named every instance in its ReferencedSOPSequence: committed, not just sent
    rows = S.outbox_rows(cfg.node.db_path, ("committed",))
    assert len(rows) == 3 and all(r["committed_at"] and r["destination"] == "web" for r in rows)
    index = Index(cfg.node.db_path)
    try:
        assert outbox_summary(index)[score.study_instance_uid] == {"committed": 3}
    finally:
        index.close()
    assert S.outbox_command(None, cfg) == 0
    assert "3 committed" in capsys.readouterr().out
    scrape = exposition(cfg.node.db_path).decode()
    assert 'dicom_node_outbox_items{destination="web",state="committed"} 3.0' in scrape


@pytest.mark.network
@pytest.mark.slow
def test_wrong_password_fails_loudly_then_delivers_once_fixed(
        dicomweb: OrthancServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _stow_config(tmp_path, dicomweb, "not-the-password")
    score, rs, paths = _results(bad)
    S.enqueue(bad.node.db_path, score.study_instance_uid, paths, ["web"])
    with caplog.at_level(logging.WARNING):
        counts = S.DeliveryLoop(bad).run_once()
    assert counts == {"sent": 0, "failed": 3, "expired": 0}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "HTTP 401" in errors[0].getMessage()
    assert "not-the-password" not in caplog.text
    pending = S.outbox_rows(bad.node.db_path)
    assert len(pending) == 3 and all(r["state"] == "pending" for r in pending)
    assert all("authentication rejected" in r["last_error"] for r in pending)
    assert dicomweb.instance_uids_in_study(score.study_instance_uid) == set()
    # the operator fixes the password; the same durable rows go out on the next try
    good = _stow_config(tmp_path, dicomweb, dicomweb.password)
    loop = S.DeliveryLoop(good)
    counts = loop.run_once(now=time.time() + 5)
    assert counts["sent"] == 3
    assert {ds.SOPInstanceUID for ds in rs.datasets} <= dicomweb.instance_uids_in_study(
        score.study_instance_uid)


@pytest.mark.network
def test_orthanc_conflict_answer_maps_to_a_failure_reason(dicomweb: OrthancServer,
                                                          tmp_path: Path) -> None:
    """A real 409 from Orthanc (instance posted under another study's URL) carries a
    FailedSOPSequence; its FailureReason becomes the instance's status."""
    cfg = _stow_config(tmp_path, dicomweb, dicomweb.password)
    _, _rs, paths = _results(cfg)
    boundary = "b0undary"
    req = urllib.request.Request(f"{dicomweb.url}/dicom-web/studies/1.2.3.4",
                                 data=multipart_body([paths[0].read_bytes()], boundary),
                                 method="POST")
    req.add_header("Content-Type", f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}")
    req.add_header("Accept", "application/dicom+json")
    dest = make_destination(cfg.destinations[0], cfg)
    req.add_header("Authorization", dest._auth_header() or "")  # type: ignore[attr-defined]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=20)
    body = err.value.read()
    from pydicom import dcmread

    sop = str(dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID)
    out = outcome_from_response(err.value.code, "application/dicom+json", body, [sop], "w")
    assert err.value.code == 409
    assert out.statuses[sop] == 0x0110 and not out.stored(sop) and not out.committed


class _TlsTerminator(socketserver.ThreadingTCPServer):
    """A real TLS endpoint (stdlib ``ssl``) relaying bytes to Orthanc's plain HTTP port.

    Orthanc 1.10 from Debian 12 crashes when its own ``SslEnabled`` is on, so HTTPS is put in
    front of it the way a hospital's reverse proxy would.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: tuple[str, int], cert: Path, key: Path) -> None:
        self.target = target
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert), str(key))
        super().__init__(("127.0.0.1", 0), _Relay)


class _Relay(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _TlsTerminator = self.server  # type: ignore[assignment]
        try:
            tls = server.ctx.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate: nothing to relay
        with tls, socket.create_connection(server.target, timeout=30) as up:
            def pump(src: socket.socket, dst: socket.socket) -> None:
                try:
                    while data := src.recv(65536):
                        dst.sendall(data)
                except OSError:
                    pass
                finally:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

            back = threading.Thread(target=pump, args=(up, tls), daemon=True)
            back.start()
            pump(tls, up)
            back.join(30)


@pytest.fixture(scope="module")
def dicomweb_tls(dicomweb: OrthancServer, tmp_path_factory: pytest.TempPathFactory):
    """Orthanc's DICOMweb behind HTTPS with a self-signed certificate for 127.0.0.1."""
    from tests.builders import make_tls_files

    cert, key = make_tls_files(tmp_path_factory.mktemp("stow-tls"))
    port = int(dicomweb.url.rsplit(":", 1)[1])
    proxy = _TlsTerminator(("127.0.0.1", port), cert, key)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{proxy.server_address[1]}", cert
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.network
@pytest.mark.parametrize(("verify", "with_ca", "stored"), [
    (True, True, True),  # private CA given: verified and delivered
    (True, False, False),  # self-signed, no CA: refused, with the reason
    (False, False, True),  # verification off (logged): delivered
])
def test_https_certificate_checks(dicomweb: OrthancServer, dicomweb_tls, tmp_path: Path,
                                  verify: bool, with_ca: bool, stored: bool) -> None:
    url, cert = dicomweb_tls
    cfg = make_config(tmp_path / "node", destinations=[{
        "name": "web", "kind": "stowrs", "url": f"{url}/dicom-web", "auth": "basic",
        "username": dicomweb.user, "password": dicomweb.password, "tls_verify": verify,
        **({"ca_file": str(cert)} if with_ca else {})}])
    _, rs, paths = _results(cfg)
    out = make_destination(cfg.destinations[0], cfg).send(paths)
    uids = [str(ds.SOPInstanceUID) for ds in rs.datasets]
    assert all(out.stored(u) for u in uids) is stored
    if stored:
        assert out.committed == frozenset(uids) and out.error is None
        assert set(uids) <= dicomweb.instance_uids_in_study(str(rs.sr.StudyInstanceUID))
    else:
        assert not any(out.stored(u) for u in uids) and out.retryable
        assert "CERTIFICATE_VERIFY_FAILED" in (out.error or "")
