"""Shared fixtures: strict pydicom like highdicom's own tests, free ports, temp node configs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config as pydicom_config

from dicom_node.config import Config, config_from_dict

# Cross-package session fixtures live in tests/fixtures/; each module registers itself here.
pytest_plugins: list[str] = ["tests.fixtures.orthanc", "tests.fixtures.cohort",
                             "tests.fixtures.model"]


@pytest.fixture(autouse=True)
def strict_pydicom(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test reads and writes DICOM values with pydicom's validation set to RAISE.

    Why: a builder that writes an invalid value, or code that relies on one being tolerated,
    fails here instead of passing silently. Tests that feed the node deliberately hostile input
    carry ``@pytest.mark.lenient_pydicom`` and run with pydicom's defaults, as the node does in
    production; ``tests.builders.set_raw`` writes one invalid value on purpose.
    """
    settings = pydicom_config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    if request.node.get_closest_marker("lenient_pydicom") is None:
        settings.reading_validation_mode = pydicom_config.RAISE
        settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


def require_tool(present: bool, what: str) -> None:
    """Skip when a system tool is missing on a developer machine; fail in CI.

    `.ci/run` installs DCMTK, dicom3tools and Orthanc, so in CI (``CI`` set) a missing tool is a
    broken set-up that must not hide behind a skipped test.
    """
    if present:
        return
    message = f"{what} is not installed (apt-get install dcmtk dicom3tools orthanc)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def make_config(data_dir: Path, **sections: dict) -> Config:
    """A node config rooted in ``data_dir``; ``sections`` override/extend TOML tables."""
    base: dict = {
        "node": {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "data_dir": str(data_dir),
            "allowed_calling_aets": ["STORESCU", "PYNETDICOM", "ECHOSCU", "SENDER"],
            "disk_reserve_mb": 0,
        },
        "completion": {"idle_seconds": 1, "max_wait_seconds": 5, "poll_seconds": 0.2},
        "scoring": {"enabled": False},
    }
    for name, table in sections.items():
        if isinstance(table, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **table}
        else:
            base[name] = table
    return config_from_dict(base, base_dir=data_dir)


@pytest.fixture
def node_config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "node")
