"""Delivery: outbox rows reach a real Orthanc, survive PACS outages and restarts, expire visibly."""

from __future__ import annotations

import random
import time
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node import results as R
from dicom_node.config import DeliveryConfig, load_config
from dicom_node.delivery import sender as S
from tests.builders import us_series
from tests.conftest import free_port, make_config, require_tool
from tests.dicom_node.test_results import make_score
from tests.fixtures.orthanc import start_orthanc, stop_orthanc

pytestmark = pytest.mark.network


def _results(cfg, probs=(0.8, 0.6)):
    """Write a scored synthetic study's SR + heat maps into cfg's results dir."""
    sources = us_series(2, patient_id="SYN0001", rows=96, cols=128)
    score = make_score(sources, probs=probs)
    rs = R.build_results(score, {s.SOPInstanceUID: s for s in sources}, cfg.results)
    return score, rs, R.write_results(rs, cfg)


def _config(tmp_path: Path, port: int, aet: str = "ORTHANC", **delivery):
    return make_config(
        tmp_path / "node",
        destinations=[{"name": "pacs", "ae_title": aet, "host": "127.0.0.1", "port": port}],
        delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0, "poll_seconds": 0.1,
                  "timeout_seconds": 10, **delivery},
    )


def _wait(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_retry_delay_grows_to_ceiling_within_jitter_bounds():
    cfg = DeliveryConfig(retry_initial_seconds=30, retry_max_seconds=900, jitter_fraction=0.2)
    rng = random.Random(1)
    bases = [min(30 * 2 ** (a - 1), 900) for a in range(1, 12)]
    assert bases == sorted(bases) and bases[0] == 30 and bases[-1] == 900
    for attempt, base in enumerate(bases, start=1):
        delays = [S.retry_delay(attempt, cfg, rng) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert max(delays) - min(delays) > 0.2 * base  # jitter really spreads the retries
    no_jitter = DeliveryConfig(retry_initial_seconds=30, retry_max_seconds=900, jitter_fraction=0)
    seq = [S.retry_delay(a, no_jitter) for a in range(1, 12)]
    assert seq == bases


def test_delivered_to_orthanc_in_source_study(orthanc, tmp_path):
    cfg = _config(tmp_path, orthanc.dicom_port, orthanc.aet)
    score, rs, paths = _results(cfg)
    ids = S.enqueue(cfg.node.db_path, score.study_instance_uid, paths)  # all destinations
    assert len(ids) == 3
    counts = S.DeliveryLoop(cfg).run_once()
    assert counts == {"sent": 3, "failed": 0, "expired": 0}
    held = orthanc.instance_uids_in_study(score.study_instance_uid)
    assert {ds.SOPInstanceUID for ds in rs.datasets} <= held
    # the SR Orthanc stored reads back with highdicom and carries the study probability
    sr = hd.sr.srread(DicomBytesIO(orthanc.instance_file(rs.sr.SOPInstanceUID)))
    (study_group,) = [g for g in sr.content.get_image_measurement_groups()
                      if g.finding_type == R.SARCOPENIA]
    (prob,) = [m for m in study_group.get_measurements(name=R.PROBABILITY)]
    assert prob.value == pytest.approx(score.probability)
    rows = S.outbox_rows(cfg.node.db_path, ("sent",))
    assert len(rows) == 3 and all(r["destination"] == "pacs" and r["sent_at"] for r in rows)
    assert S.outbox_rows(cfg.node.db_path) == []


def test_one_association_per_study(tmp_path):
    """A real pynetdicom SCP counts associations: the SR and both heat maps share one."""
    opened: list[str] = []
    stored: list[str] = []
    ae = AE(ae_title="COUNTER")
    ae.supported_contexts = AllStoragePresentationContexts

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store),
                      (evt.EVT_ACCEPTED, lambda e: opened.append(e.assoc.requestor.ae_title))],
    )
    try:
        cfg = _config(tmp_path, port, "COUNTER")
        score, rs, paths = _results(cfg)
        S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
        assert S.DeliveryLoop(cfg).run_once()["sent"] == 3
    finally:
        server.shutdown()
    assert opened == ["DICOMNODE"]
    assert sorted(stored) == sorted(ds.SOPInstanceUID for ds in rs.datasets)


def test_pacs_down_then_delivered_after_restart(tmp_path, tmp_path_factory):
    """PACS down: rows stay pending with the error; a NEW loop on the same DB delivers later."""
    from tests.fixtures.orthanc import orthanc_binary

    require_tool(orthanc_binary() is not None, "Orthanc")
    dicom_port, http_port = free_port(), free_port()
    cfg = _config(tmp_path, dicom_port)
    score, rs, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
    loop = S.DeliveryLoop(cfg)
    loop.start()
    _wait(lambda: all(r["attempts"] >= 2 for r in S.outbox_rows(cfg.node.db_path)))
    loop.stop()
    rows = S.outbox_rows(cfg.node.db_path)
    assert len(rows) == 3 and {r["state"] for r in rows} == {"pending"}
    assert all("association" in r["last_error"] for r in rows), rows[0]["last_error"]
    assert all(r["next_attempt_at"] > r["created_at"] for r in rows)

    pacs_dir = tmp_path_factory.mktemp("orthanc-late")
    pacs = start_orthanc(pacs_dir, http_port, dicom_port)
    try:
        loop2 = S.DeliveryLoop(cfg)  # node restarted: nothing but the DB carries over
        loop2.start()
        try:
            _wait(lambda: not S.outbox_rows(cfg.node.db_path))
        finally:
            loop2.stop()
        held = pacs.instance_uids_in_study(score.study_instance_uid)
        assert {ds.SOPInstanceUID for ds in rs.datasets} <= held
    finally:
        stop_orthanc(pacs_dir)


def test_expired_after_horizon_is_listed_and_resend_delivers(orthanc, tmp_path, capsys):
    dead = free_port()
    cfg = _config(tmp_path, dead, retry_horizon_hours=0.0003)  # ~1 s
    score, rs, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
    loop = S.DeliveryLoop(cfg)
    assert loop.run_once()["failed"] == 3
    time.sleep(1.2)
    assert loop.run_once(now=time.time() + 3600)["expired"] == 3
    rows = S.outbox_rows(cfg.node.db_path)
    assert {r["state"] for r in rows} == {"expired"} and len(rows) == 3
    # still listed, with its last error, by `dicom-node outbox`
    assert S.outbox_command(None, cfg) == 0
    out = capsys.readouterr().out
    assert "expired" in out and "last error" in out and score.study_instance_uid in out
    # an expired item is never picked up again by the loop on its own
    assert loop.run_once(now=time.time() + 10**6) == {"sent": 0, "failed": 0, "expired": 0}
    # the PACS moved/came back: resend --id for one item, then all
    fixed = _config(tmp_path, orthanc.dicom_port, orthanc.aet)
    one = rows[0]["id"]
    args = type("Args", (), {"id": one})()
    assert S.resend_command(args, fixed) == 0
    left = S.outbox_rows(fixed.node.db_path)
    assert len(left) == 2 and one not in {r["id"] for r in left}
    assert S.resend_command(type("Args", (), {"id": None})(), fixed) == 0
    assert S.outbox_rows(fixed.node.db_path) == []
    held = orthanc.instance_uids_in_study(score.study_instance_uid)
    assert {ds.SOPInstanceUID for ds in rs.datasets} <= held


def test_enqueue_survives_reopen_and_does_not_duplicate(tmp_path):
    cfg = _config(tmp_path, free_port())
    score, rs, paths = _results(cfg)
    first = S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
    again = S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
    assert first == again
    rows = S.outbox_rows(cfg.node.db_path)
    assert {r["path"] for r in rows} == {str(p.relative_to(cfg.node.data_dir.resolve()))
                                         for p in (q.resolve() for q in paths)}
    assert {r["sop_uid"] for r in rows} == {ds.SOPInstanceUID for ds in rs.datasets}


def test_tls_destination(tmp_path):
    """A destination with TLS verifies the PACS certificate and delivers; plain TCP does not."""
    import ssl

    from tests.builders import make_tls_files

    cert, key = make_tls_files(tmp_path / "tls")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    stored: list[str] = []
    ae = AE(ae_title="TLSPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.acse_timeout = ae.network_timeout = 5
    port = free_port()

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = {"name": "pacs", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": port}
        plain = make_config(tmp_path / "node", destinations=[dest],
                            delivery={"timeout_seconds": 5})
        score, rs, paths = _results(plain)
        S.enqueue(plain.node.db_path, score.study_instance_uid, paths, ["pacs"])
        assert S.DeliveryLoop(plain).run_once()["failed"] == 3
        assert stored == []
        tls = make_config(tmp_path / "node", destinations=[
            {**dest, "tls": {"enabled": True, "ca_file": str(cert)}}],
            delivery={"timeout_seconds": 5})
        assert S.resend_command(type("Args", (), {"id": None})(), tls) == 0
    finally:
        server.shutdown()
    assert sorted(stored) == sorted(ds.SOPInstanceUID for ds in rs.datasets)


def test_outbox_and_resend_through_the_cli(tmp_path, capsys):
    from dicom_node import cli

    dead = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[node]
data_dir = "node"
allow_any_calling_aet = true
[scoring]
enabled = false
[[destinations]]
name = "pacs"
ae_title = "NOBODY"
host = "127.0.0.1"
port = {dead}
[delivery]
timeout_seconds = 5
""")
    cfg = load_config(config)
    score, rs, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths)  # "*": every destination
    assert cli.main(["resend", "--config", str(config)]) == 1
    capsys.readouterr()
    assert cli.main(["outbox", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("pending") >= 3 and "last error" in out and f"127.0.0.1:{dead}" in out
    assert {r["destination"] for r in S.outbox_rows(cfg.node.db_path)} == {"pacs"}
