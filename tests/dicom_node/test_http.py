"""The status server: probes, Prometheus metrics that match the archive and the PACS, the page.

The fast test runs the listener in-process with an archive-only worker; the slow one runs a real
``dicom-node serve`` with the tiny trained model, delivering to a real Orthanc, and renders the
status page in headless Chromium (the screenshot in docs/img comes from this test:
``DICOM_NODE_STATUS_SCREENSHOT=docs/img/status-page.png pytest -k status_page``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.ops.http import start_status_server
from dicom_node.scu import store_files
from tests.builders import make_us
from tests.conftest import free_port, make_config, require_tool
from tests.dicom_node.node_harness import running_node, wait_for

CHROMIUM = "/usr/bin/chromium"


def get(url: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, bytes, str]:
    """Status, body and content type of a GET (HTTP errors are returned, not raised)."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from a Prometheus exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: dict, name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.network
def test_probes_metrics_token_and_page(tmp_path: Path) -> None:
    token = "s3cret-token"
    cfg = make_config(tmp_path / "data", http={"enabled": True, "port": 0, "token": token},
                      node={"allow_any_calling_aet": True})
    base_snap: dict = {}
    datasets = [make_us(patient_id="PID-SECRET-77", seed=i, instance_number=i + 1) for i in range(3)]
    study = datasets[0].StudyInstanceUID
    for ds in datasets:
        ds.StudyInstanceUID = study
        ds.PatientName = "Zyxwvuq^Qwertzu"
    with running_node(cfg, completion=True) as archive:
        server = start_status_server(cfg)
        assert server is not None
        url = f"http://127.0.0.1:{server.port}"
        try:
            assert get(url + "/healthz")[0] == 200
            code, body, _ = get(url + "/readyz")
            ready = json.loads(body)
            assert code == 200, ready
            assert ready["checks"]["listener"]["ok"] and ready["checks"]["index"]["ok"]
            assert "model" not in ready["checks"]  # archive-only: no model to wait for
            assert get(url + "/metrics")[0] == 401 and get(url + "/")[0] == 401
            assert get(url + "/metrics", token="wrong")[0] == 401
            base_snap = samples(get(url + "/metrics", token)[1].decode())

            results = store_files("127.0.0.1", cfg.node.port, datasets, calling_aet="MODALITY1",
                                  called_aet=cfg.node.ae_title)
            assert [s for _, s in results] == [0, 0, 0]
            wait_for(lambda: archive.query("SELECT state FROM studies")[0]["state"] == "scored",
                     timeout=30)
            code, body, ctype = get(url + "/metrics", token)
            assert code == 200 and ctype.startswith("text/plain")
            snap = samples(body.decode())
            stored = archive.query("SELECT count(*) AS n, sum(size) AS b FROM instances")[0]
            delta = (value(snap, "dicom_node_instances_received_total", status="0x0000",
                           calling_aet="MODALITY1")
                     - value(base_snap, "dicom_node_instances_received_total", status="0x0000",
                             calling_aet="MODALITY1"))
            assert delta == stored["n"] == 3
            delta_b = (value(snap, "dicom_node_received_bytes_total", calling_aet="MODALITY1")
                       - value(base_snap, "dicom_node_received_bytes_total",
                               calling_aet="MODALITY1"))
            assert delta_b == stored["b"]
            assert value(snap, "dicom_node_studies", state="scored") == 1
            assert value(snap, "dicom_node_queue_depth", queue="jobs") == 0

            code, page, ctype = get(url + "/", token)
            html = page.decode()
            assert code == 200 and ctype.startswith("text/html")
            assert study[-12:] in html and "scored" in html
            assert "PID-SECRET-77" not in html and "Zyxwvuq" not in html
        finally:
            server.stop()
        # the listener stops: not ready any more (a fresh server on the same config)
    server = start_status_server(cfg)
    assert server is not None
    try:
        code, body, _ = get(f"http://127.0.0.1:{server.port}/readyz")
        assert code == 503 and not json.loads(body)["checks"]["listener"]["ok"]
    finally:
        server.stop()


def _config(tmp_path: Path, node_port: int, http_port: int, pacs_port: int, model: Path) -> Path:
    text = f"""
[node]
port = {node_port}
data_dir = "{tmp_path / 'node-data'}"
allowed_calling_aets = ["STORESCU"]
disk_reserve_mb = 0
[completion]
idle_seconds = 2
max_wait_seconds = 30
poll_seconds = 0.5
[worker]
poll_seconds = 0.5
[scoring]
model_dir = "{model}"
torch_threads = 1
device = "cpu"
[http]
enabled = true
port = {http_port}
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
[delivery]
retry_initial_seconds = 1
retry_max_seconds = 2
poll_seconds = 0.5
timeout_seconds = 10
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def screenshot(url: str, out: Path, profile: Path) -> None:
    """Render ``url`` in Debian's headless Chromium into ``out`` (PNG)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
           "--window-size=1500,620", f"--screenshot={out}", url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.network
def test_status_page_metrics_match_orthanc(synth_cohort, tiny_model_dir, tmp_path: Path,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """Serve with a model: /readyz waits for it; a scored study shows up everywhere it should."""
    from tests.fixtures.orthanc import orthanc_binary, start_orthanc, stop_orthanc

    require_tool(orthanc_binary() is not None, "Orthanc")
    require_tool(Path(CHROMIUM).exists(), "Debian chromium")
    manifest = json.loads(synth_cohort.manifest.read_text())
    study = next(s for s in manifest["studies"]
                 if any(f["kind"] == "seg" for f in s["files"])
                 and not any(f["send_late"] for f in s["files"]))
    files = [synth_cohort.out_dir / f["path"] for f in study["files"]]
    node_port, http_port, pacs_port = free_port(), free_port(), free_port()
    config = _config(tmp_path, node_port, http_port, pacs_port, tiny_model_dir)
    url = f"http://127.0.0.1:{http_port}"
    pacs_dir = tmp_path_factory.mktemp("orthanc-http")
    pacs = start_orthanc(pacs_dir, free_port(), pacs_port)
    log_path = tmp_path / "node.log"
    with log_path.open("ab") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "--log-format", "json", "serve", "--config",
             str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
    try:
        def ready() -> dict[str, Any] | None:
            assert node.poll() is None, log_path.read_text()[-3000:]
            try:
                code, body, _ = get(url + "/readyz", timeout=3)
            except OSError:
                return None
            return json.loads(body) if code == 200 else None

        body = wait_for(ready, timeout=180, interval=0.5)
        assert body["checks"]["model"] == {"ok": True, "detail": "loaded"}  # type: ignore[index]
        results = store_files("127.0.0.1", node_port, files, calling_aet="STORESCU",
                              called_aet="DICOMNODE")
        assert all(s == 0 for _, s in results)

        def delivered() -> bool:
            snap = samples(get(url + "/metrics")[1].decode())
            return (value(snap, "dicom_node_queue_depth", queue="outbox") == 0
                    and value(snap, "dicom_node_studies", state="scored") == 1
                    and value(snap, "dicom_node_deliveries_total", destination="pacs",
                              outcome="delivered") > 0)

        wait_for(delivered, timeout=300, interval=1.0)
        snap = samples(get(url + "/metrics")[1].decode())
        at_pacs = pacs.instance_uids_in_study(study["study_uid"])
        results_at_pacs = len(at_pacs)
        assert value(snap, "dicom_node_deliveries_total", destination="pacs",
                     outcome="delivered") == results_at_pacs >= 2  # SR + heat map(s)
        assert value(snap, "dicom_node_instances_received_total", status="0x0000",
                     calling_aet="STORESCU") == len(files)
        for stage in ("decode", "ensemble", "sr_build", "send"):
            assert value(snap, "dicom_node_stage_seconds_count", stage=stage) >= 1, stage
        model_json = json.loads((tiny_model_dir / "model.json").read_text())
        info = [k for k in snap if k[0] == "dicom_node_model_info"]
        assert info and ("model_uid", model_json["model_uid"]) in info[0][1]

        code, page, _ = get(url + "/")
        html = page.decode()
        assert code == 200 and ("positive" in html or "negative" in html)
        assert f"/heatmap/{study['study_uid']}/0.png" in html
        assert study["patient_id"] not in html
        code, png, ctype = get(url + f"/heatmap/{study['study_uid']}/0.png")
        assert code == 200 and ctype == "image/png" and png.startswith(b"\x89PNG")

        shot = tmp_path / "status-page.png"
        screenshot(url + "/", shot, tmp_path / "chromium-profile")
        from PIL import Image

        img = Image.open(shot).convert("RGB")
        colours = img.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200  # text, table and a heat map drawn
        target = os.environ.get("DICOM_NODE_STATUS_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        stop_orthanc(pacs_dir)
    # --log-format json: every line of the whole run is one JSON object
    for line in log_path.read_text().splitlines():
        json.loads(line)


def test_page_shows_failures_escaped_and_no_patient_data(tmp_path: Path) -> None:
    """A failed study's reason is on the page, as text: study data never becomes markup."""
    from dicom_node.ops.http import StatusContext, render_page
    from dicom_node.store.archive import Archive

    archive = Archive(tmp_path / "data").init()
    try:
        with archive.transaction() as conn:
            conn.execute(
                "INSERT INTO studies (study_uid, patient_id, state, first_received, "
                "last_received, note) VALUES (?, ?, 'failed', 1.0, 2.0, ?)",
                ("1.2.3.4.5.6.7.8.9.10.11", "PID-SECRET-77", "reader: <script>alert(1)</script>"),
            )
            conn.execute(
                "INSERT INTO jobs (study_uid, kind, state, attempts, max_attempts, last_error, "
                "created_at, updated_at) VALUES (?, 'score', 'failed', 3, 3, ?, 1.0, 2.0)",
                ("1.2.3.4.5.6.7.8.9.10.11", "ScoringError: <img src=x onerror=alert(2)>"),
            )
        ctx = StatusContext(db_path=tmp_path / "data" / "index.sqlite",
                            results_dir=tmp_path / "data" / "results", checks={})
        html = render_page(ctx)
    finally:
        archive.close()
    assert "ScoringError: &lt;img src=x onerror=alert(2)&gt;" in html
    assert "<img src=x" not in html and "<script>" not in html
    assert "PID-SECRET-77" not in html and "failed (3)" in html
