"""config.toml -> dataclasses: the shipped file loads, bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import config_from_dict, load_config
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads() -> None:
    cfg = load_config(REPO / "config.toml")
    assert cfg.node.ae_title == "DICOMNODE"
    assert cfg.train.folds == 5 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 48 and cfg.train.epochs == 150
    assert cfg.destinations[0].ae_title == "ORTHANC"
    assert cfg.node.data_dir == REPO / "node-data"


@pytest.mark.parametrize(
    "table,key",
    [
        ({"node": {"ae_title": "THIS_AE_TITLE_IS_TOO_LONG"}}, "node.ae_title"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title"),
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": "11112"}}, "node.port"),
        ({"node": {"allowed_calling_aets": ["OK", ""]}}, "node.allowed_calling_aets[1]"),
        ({"completion": {"idle_seconds": -1}}, "completion.idle_seconds"),
        ({"completion": {"on_missing_seg": "guess"}}, "completion.on_missing_seg"),
        ({"node": {"tls": {"enabled": True}}}, "node.tls.cert_file"),
        ({"node": {"colour": "blue"}}, "node.colour"),
        ({"scoring": {"enabled": True}}, "scoring.model_dir"),
        ({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 0}]},
         "destinations[0].port"),
    ],
)
def test_bad_values_name_the_key(table: dict, key: str, tmp_path: Path) -> None:
    base = {"node": {"allow_any_calling_aet": True}, "scoring": {"enabled": False}}
    for k, v in table.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(ConfigError) as exc:
        config_from_dict(base, base_dir=tmp_path)
    assert exc.value.key == key, str(exc.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_empty_allow_list_requires_explicit_opt_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed_calling_aets"):
        config_from_dict({"scoring": {"enabled": False}}, base_dir=tmp_path)
