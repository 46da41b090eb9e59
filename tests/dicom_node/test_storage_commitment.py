"""Storage Commitment for DIMSE destinations: against a real Orthanc (its SCP reports on a new
association to the node's listener) and a pynetdicom peer that reports on the sending one."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicom_node.config import Config
from dicom_node.delivery import sender as S
from dicom_node.delivery.dimse import STORAGE_COMMITMENT_INSTANCE, commitment_request
from dicom_node.ops.metrics import exposition
from dicom_node.scp import start_scp
from dicom_node.store.archive import Archive
from dicom_node.store.outbox import outbox_summary, record_sent
from testing.peers import TEST_CALLERS, OrthancServer, orthanc_binary
from tests.conftest import free_port, make_config, require_tool
from tests.dicom_node.test_sender import _results

pytestmark = pytest.mark.network


def _wait(cond, timeout: float = 60.0) -> None:
    """Poll until ``cond()``; the bound only turns a hang into a failure."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _knows_node(node_port: int) -> dict:
    """Orthanc config: the node (AE DICOMNODE) as the modality its commitment reports go to."""
    return {"DicomModalities": {"node": ["DICOMNODE", "127.0.0.1", node_port]}}


# the node's AE is registered with its real port instead of the peers' default entry
CALLERS = tuple(a for a in TEST_CALLERS if a != "DICOMNODE")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[OrthancServer, int]]:
    """Orthanc that knows the node (AE DICOMNODE on ``node_port``) as a modality to report to."""
    require_tool(orthanc_binary() is not None, "Orthanc")
    node_port = free_port()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-commit"), callers=CALLERS,
                           extra_config=_knows_node(node_port))
    try:
        yield server, node_port
    finally:
        server.stop()


def _config(tmp_path: Path, node_port: int, host_port: int, aet: str, **dest) -> Config:
    return make_config(
        tmp_path / "node",
        node={"port": node_port, "allowed_calling_aets": [aet]},
        destinations=[{"name": "pacs", "ae_title": aet, "host": "127.0.0.1", "port": host_port,
                       "storage_commitment": True, **dest}],
        delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0, "poll_seconds": 0.1,
                  "timeout_seconds": 20},
    )


@pytest.fixture
def listener(pacs, tmp_path: Path):
    """The node's real listener (where Orthanc sends its N-EVENT-REPORT) and its config."""
    server, node_port = pacs
    cfg = _config(tmp_path, node_port, server.dicom_port, server.aet)
    archive = Archive(cfg.node.data_dir, disk_reserve_mb=0).init()
    scp = start_scp(cfg.node, archive)
    try:
        yield cfg, archive
    finally:
        scp.shutdown()
        archive.close()


def _states(cfg: Config) -> dict[str, int]:
    got: dict[str, int] = {}
    for r in S.outbox_rows(cfg.node.db_path, ("pending", "sent", "committed", "expired")):
        got[r["state"]] = got.get(r["state"], 0) + 1
    return got


@pytest.mark.slow
def test_cstore_with_commitment_is_committed_by_orthanc(pacs, listener, capsys) -> None:
    server, _ = pacs
    cfg, archive = listener
    score, rs, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
    loop = S.DeliveryLoop(cfg)
    assert loop.run_once() == {"sent": 3, "failed": 0, "expired": 0}
    sent = S.outbox_rows(cfg.node.db_path, ("sent",))
    assert len(sent) == 3 and len({r["transaction_uid"] for r in sent}) == 1
    assert sent[0]["transaction_uid"]
    # stored but not yet confirmed: the outbox lists them as waiting
    held = server.instance_uids_in_study(score.study_instance_uid)
    assert {ds.SOPInstanceUID for ds in rs.datasets} <= held
    # Orthanc reports on a new association to the listener; the loop applies the report
    _wait(lambda: bool(archive.query("SELECT id FROM commitment_reports")))
    loop.run_once()
    assert _states(cfg) == {"committed": 3}
    assert outbox_summary(archive)[score.study_instance_uid] == {"committed": 3}
    report = archive.query("SELECT * FROM commitment_reports")[0]
    assert report["calling_aet"] == server.aet and report["transaction_uid"] == sent[0][
        "transaction_uid"]
    assert S.outbox_command(None, cfg) == 0
    assert "3 committed" in capsys.readouterr().out
    scrape = exposition(cfg.node.db_path).decode()
    assert 'dicom_node_outbox_items{destination="pacs",state="committed"} 3.0' in scrape


@pytest.mark.slow
def test_orthanc_failed_sop_sends_the_item_again(pacs, listener) -> None:
    """Orthanc answers a commitment request for an instance it does not hold with a
    FailedSOPSequence; the row goes back to pending with that reason."""
    server, _ = pacs
    cfg, archive = listener
    score, _rs, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths[:1], ["pacs"])
    rows = S.outbox_rows(cfg.node.db_path)
    txn = generate_uid()
    record_sent(archive, rows, now=time.time(), transaction_uid=txn)  # as if C-STOREd
    ds = dcmread(paths[0], stop_before_pixels=True)
    ae = AE(ae_title=cfg.node.ae_title)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(
            commitment_request(txn, [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))]), 1,
            StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    _wait(lambda: bool(archive.query("SELECT id FROM commitment_reports")))
    S.DeliveryLoop(cfg)._commitments(time.time())
    (row,) = S.outbox_rows(cfg.node.db_path)
    assert row["state"] == "pending" and row["transaction_uid"] is None
    assert "storage commitment refused by ORTHANC: failure reason 0x" in row["last_error"]
    # sent again for real: stored and this time committed
    loop = S.DeliveryLoop(cfg)
    assert loop.run_once(now=time.time() + 5)["sent"] == 1
    _wait(lambda: len(archive.query("SELECT id FROM commitment_reports")) == 2)
    loop.run_once()
    assert _states(cfg) == {"committed": 1}


def test_missing_report_times_out_and_is_sent_again(pacs, tmp_path: Path) -> None:
    """No listener for Orthanc to report to: after the timeout the stored rows are pending
    again (not silently 'sent' for ever), with the reason."""
    server, _ = pacs
    cfg = _config(tmp_path, free_port(), server.dicom_port, server.aet,
                  storage_commitment_timeout_seconds=60)
    score, _, paths = _results(cfg)
    S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
    loop = S.DeliveryLoop(cfg)
    t0 = time.time()
    assert loop.run_once(now=t0)["sent"] == 3
    loop.run_once(now=t0 + 30)
    assert _states(cfg) == {"sent": 3}
    loop._commitments(t0 + 120)
    rows = S.outbox_rows(cfg.node.db_path)
    assert len(rows) == 3 and all(r["state"] == "pending" for r in rows)
    assert all("no storage commitment report within 60 s" in r["last_error"] for r in rows)
    assert all(r["attempts"] == 1 for r in rows)


def test_report_on_the_sending_association(tmp_path: Path) -> None:
    """A peer that reports on the same association (PS3.4 J.3.3 allows both): one instance
    committed at once, one refused and queued again with the peer's reason."""
    actions: list[Dataset] = []
    ae = AE(ae_title="COMMITSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(StorageCommitmentPushModel)

    def on_action(event):
        info = event.action_information
        actions.append(info)
        refs = list(info.ReferencedSOPSequence)

        def report() -> None:
            time.sleep(0.2)  # after the N-ACTION response, as a PACS would
            ds = Dataset()
            ds.TransactionUID = info.TransactionUID
            ds.ReferencedSOPSequence = refs[:-1]
            failed = Dataset()
            failed.ReferencedSOPClassUID = refs[-1].ReferencedSOPClassUID
            failed.ReferencedSOPInstanceUID = refs[-1].ReferencedSOPInstanceUID
            failed.FailureReason = 0x0112
            ds.FailedSOPSequence = [failed]
            event.assoc.send_n_event_report(ds, 2, StorageCommitmentPushModel,
                                            STORAGE_COMMITMENT_INSTANCE)

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000),
                                           (evt.EVT_N_ACTION, on_action)])
    try:
        cfg = _config(tmp_path, free_port(), port, "COMMITSCP",
                      storage_commitment_wait_seconds=20)
        score, _rs, paths = _results(cfg)
        S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
        counts = S.DeliveryLoop(cfg).run_once()
    finally:
        server.shutdown()
    assert len(actions) == 1 and len(actions[0].ReferencedSOPSequence) == 3
    assert counts == {"sent": 2, "failed": 1, "expired": 0}
    assert _states(cfg) == {"committed": 2, "pending": 1}
    (pending,) = S.outbox_rows(cfg.node.db_path)
    assert "0x0112" in pending["last_error"]


@pytest.mark.slow
def test_serve_delivers_by_stowrs_and_committed_cstore(synth_cohort, tiny_model_dir, tmp_path,
                                                       tmp_path_factory) -> None:
    """The whole node: storescu -> ``dicom-node serve`` (tiny model) -> one Orthanc reached two
    ways, DICOMweb STOW-RS (basic auth, password from a file) and C-STORE with storage
    commitment; every outbox row ends ``committed`` and Orthanc holds every result."""
    import json
    import os
    import subprocess

    from dicom_node.config import load_config
    from tests.dicom_node.test_delivery_e2e import (
        PUSHABLE,
        STORESCU,
        _node_ready,
        _start_node,
        _stop_node,
    )
    from tests.dicom_node.test_delivery_e2e import _wait as wait_node
    from tests.dicom_node.test_stowrs import DICOMWEB_PLUGIN, start_orthanc_dicomweb

    require_tool(Path(STORESCU).exists(), "DCMTK (storescu)")
    require_tool(orthanc_binary() is not None and DICOMWEB_PLUGIN.exists(),
                 "Orthanc with its DICOMweb plugin")
    manifest = json.loads(synth_cohort.manifest.read_text())
    study = next(s for s in manifest["studies"]
                 if any(f["kind"] == "seg" for f in s["files"])
                 and not any(f["send_late"] for f in s["files"])
                 and {f.get("transfer_syntax") for f in s["files"]} <= PUSHABLE)
    files = [synth_cohort.out_dir / f["path"] for f in study["files"]]
    node_port = free_port()
    pacs = start_orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-both"), CALLERS,
                                  _knows_node(node_port))
    secret = tmp_path / "stow.secret"
    secret.write_text(pacs.password + "\n")
    config = tmp_path / "config.toml"
    config.write_text(f"""
[node]
ae_title = "DICOMNODE"
port = {node_port}
data_dir = "{tmp_path / 'node-data'}"
allowed_calling_aets = ["STORESCU", "{pacs.aet}"]
disk_reserve_mb = 0

[completion]
idle_seconds = 2
max_wait_seconds = 30
poll_seconds = 0.5

[worker]
poll_seconds = 0.5

[scoring]
enabled = true
model_dir = "{tiny_model_dir}"
torch_threads = 2
device = "cpu"

[[destinations]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
storage_commitment = true

[[destinations]]
name = "web"
kind = "stowrs"
url = "{pacs.url}/dicom-web"
auth = "basic"
username = "{pacs.user}"
secret_file = "{secret}"

[delivery]
retry_initial_seconds = 1
retry_max_seconds = 2
poll_seconds = 0.5
timeout_seconds = 20
""")
    cfg = load_config(config)
    log_path = tmp_path / "node.log"
    node = _start_node(config, log_path)
    try:
        wait_node(lambda: _node_ready(node_port), 120, "node to answer C-ECHO", node, log_path)
        push = subprocess.run(
            [STORESCU, "-R", "-xy", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
             str(node_port), *map(str, files)],
            check=False, capture_output=True, text=True, timeout=120,
            env={**os.environ, "TCP_NODELAY": "1"})
        assert push.returncode == 0, push.stderr

        def all_committed() -> bool:
            rows = S.outbox_rows(cfg.node.db_path, ("pending", "sent", "committed", "expired"))
            return bool(rows) and all(r["state"] == "committed" for r in rows)

        wait_node(all_committed, 300, "every outbox row committed", node, log_path)
        rows = S.outbox_rows(cfg.node.db_path, ("committed",))
        by_dest: dict[str, set[str]] = {}
        for r in rows:
            by_dest.setdefault(r["destination"], set()).add(r["sop_uid"])
        assert set(by_dest) == {"pacs", "web"} and by_dest["pacs"] == by_dest["web"]
        assert all(r["transaction_uid"] for r in rows if r["destination"] == "pacs")
        assert by_dest["pacs"] <= pacs.instance_uids_in_study(study["study_uid"])
        studies = subprocess.run(
            [sys.executable, "-c", "import sys; from dicom_node.cli import main; sys.exit(main())",
             "studies", "--config", str(config)], check=False, capture_output=True, text=True,
            timeout=120)
        assert f"committed {len(rows)}" in studies.stdout
    finally:
        _stop_node(node)
        pacs.stop()
    assert "Traceback" not in log_path.read_text(errors="replace")


def test_pacs_without_storage_commitment_is_not_counted_delivered(tmp_path: Path) -> None:
    """storage_commitment = true but the peer does not accept the Push Model context: the
    stored instances stay pending with that reason instead of passing as delivered."""
    ae = AE(ae_title="NOCOMMIT")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        cfg = _config(tmp_path, free_port(), port, "NOCOMMIT")
        score, _, paths = _results(cfg)
        S.enqueue(cfg.node.db_path, score.study_instance_uid, paths, ["pacs"])
        counts = S.DeliveryLoop(cfg).run_once()
    finally:
        server.shutdown()
    assert counts == {"sent": 0, "failed": 3, "expired": 0}
    rows = S.outbox_rows(cfg.node.db_path)
    assert len(rows) == 3
    assert all("did not accept Storage Commitment" in r["last_error"] for r in rows)
