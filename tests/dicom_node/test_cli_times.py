"""``studies`` and ``outbox`` print ISO 8601 times for people; ``--json`` keeps epoch seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.delivery.sender import enqueue
from dicom_node.scu import store_files
from tests.builders import make_us, write
from tests.conftest import free_port
from tests.dicom_node.node_harness import running_node, write_toml

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


@pytest.mark.network
def test_human_and_machine_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.config import load_config

    port = free_port()
    config = write_toml({
        "node": {"data_dir": str(tmp_path / "data"), "port": port, "allow_any_calling_aet": True},
        "scoring": {"enabled": False},
    }, tmp_path / "config.toml")
    cfg = load_config(config)
    ds = make_us()
    with running_node(cfg, processor=None, completion=False):
        assert store_files("127.0.0.1", port, [ds], calling_aet="X", called_aet="DICOMNODE")
    result = write(make_us(study_uid=ds.StudyInstanceUID), cfg.node.results_dir / "r")
    enqueue(cfg.node.db_path, ds.StudyInstanceUID, [result], ["pacs"])
    capsys.readouterr()

    assert main(["studies", "--config", str(config)]) == 0
    assert ISO.search(capsys.readouterr().out)
    assert main(["studies", "--json", "--config", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows[0]["last_received"], float)

    assert main(["outbox", "--config", str(config)]) == 0
    assert ISO.search(capsys.readouterr().out)
    assert main(["outbox", "--json", "--config", str(config)]) == 0
    items = json.loads(capsys.readouterr().out)
    assert isinstance(items[0]["next_attempt_at"], float) and items[0]["state"] == "pending"
