"""A user mistake ends with one line naming it and exit code 2; runtime failures name the cause."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicom_node.cli import main
from tests.conftest import free_port
from tests.dicom_node.node_harness import write_toml


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of ``dicom-node ARGV`` run in-process."""
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def node_toml(tmp_path: Path, **node: object) -> Path:
    base = {"node": {"data_dir": str(tmp_path / "data"), "allow_any_calling_aet": True,
                     "port": free_port(), **node},
            "scoring": {"enabled": False}, "worker": {"enabled": False}}
    return write_toml(base, tmp_path / "config.toml")


def test_bogus_log_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["--log-level", "BOGUS", "studies", "--config", str(node_toml(tmp_path))],
                    capsys)
    assert code == 2 and len(err) == 1 and "--log-level 'BOGUS'" in err[0], err


def test_config_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["studies", "--config", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "Is a directory" in err[0] and str(tmp_path) in err[0]


def test_data_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").write_text("not a folder")
    code, err = run(["serve", "--config", str(node_toml(tmp_path))], capsys)
    assert code == 2 and len(err) == 1, err
    assert "node.data_dir" in err[0] and "not a directory" in err[0]


@pytest.mark.parametrize("argv, needle", [
    (["echo", "127.0.0.1", "99999"], "port 99999"),
    (["echo", "127.0.0.1", "104", "--aet", "A" * 17], "--aet"),
    (["push", "x", "--to", "127.0.0.1:104", "--aec", "BAD\\AE"], "--aec"),
])
def test_bad_arguments(argv: list[str], needle: str, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.toml: the defaults are used
    code, err = run(argv, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("dicom-node ")


@pytest.mark.network
@pytest.mark.parametrize("which", ["dicom", "http"])
def test_port_in_use(which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = node_toml(tmp_path, port=port) if which == "dicom" else node_toml(tmp_path)
        if which == "http":
            config.write_text(config.read_text() + f"\n[http]\nenabled = true\nport = {port}\n")
        code, err = run(["serve", "--config", str(config)], capsys)
    assert code == 2, err
    assert "Traceback" not in "\n".join(err)
    where = f"127.0.0.1:{port}" + (" (http)" if which == "http" else "")
    assert err[-1].endswith(f"cannot listen on {where}: address already in use "
                            "(is another node running?)"), err
    assert sum("address already in use" in ln for ln in err) == 1  # printed once


@pytest.mark.network
@pytest.mark.parametrize("command", ["echo", "push"])
def test_closed_port_names_the_socket_error(command: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.builders import make_us, write

    monkeypatch.chdir(tmp_path)
    port = free_port()  # nothing listens there
    if command == "echo":
        argv = ["echo", "127.0.0.1", str(port)]
    else:
        write(make_us(), tmp_path / "in")
        argv = ["push", str(tmp_path / "in"), "--to", f"127.0.0.1:{port}"]
    code, err = run(argv, capsys)
    assert code == 1, err
    assert len(err) == 1 and err[0].endswith("failed: connection refused"), err
    assert "aborted" not in err[0]
