"""The suite's own guard: a missing system tool may skip locally but must fail in CI."""

from __future__ import annotations

import pytest

from tests.conftest import require_tool


def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_tool(False, "some tool")


def test_missing_tool_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool(False, "some tool")
    require_tool(True, "some tool")  # present: neither
