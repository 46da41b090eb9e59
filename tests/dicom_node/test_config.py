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
        ({"scoring": {"study_rule": "mode"}}, "scoring.study_rule"),
        ({"reader": {"frame_policy": "first"}}, "reader.frame_policy"),
        ({"train": {"folds": 1}}, "train.folds"),
        ({"train": {"in_chans": 2}}, "train.in_chans"),
        ({"train": {"modalities": []}}, "train.modalities"),
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


def test_policies_the_model_owns_default_to_the_model(tmp_path: Path) -> None:
    """Unset frame/region policy and study rule mean "the model's" (None); set ones are kept."""
    base = {"node": {"allow_any_calling_aet": True}, "scoring": {"enabled": False}}
    cfg = config_from_dict(base, base_dir=tmp_path)
    assert cfg.reader.frame_policy is None and cfg.reader.region_policy is None
    assert cfg.scoring.study_rule is None
    pinned = config_from_dict({**base, "reader": {"frame_policy": "all"},
                               "scoring": {"enabled": False, "study_rule": "max"}},
                              base_dir=tmp_path)
    assert pinned.reader.frame_policy == "all" and pinned.scoring.study_rule == "max"
    shipped = load_config(REPO / "config.toml")
    assert shipped.reader.frame_policy is None and shipped.scoring.study_rule is None


def test_library_configs_are_the_libraries_own() -> None:
    """The node composes the libraries' dataclasses; old import paths keep working."""
    import dicom_node.config as node_config
    import inference.config
    import training.config

    assert node_config.ReaderConfig is inference.config.ReaderConfig
    assert node_config.ScoringConfig is inference.config.ScoringConfig
    assert node_config.TrainConfig is training.config.TrainConfig


def test_on_missing_seg_is_auto_by_default_only_with_a_segmentation_model(tmp_path: Path) -> None:
    from dicom_node.config import config_from_dict

    base = {"node": {"allow_any_calling_aet": True}}
    plain = config_from_dict({**base, "scoring": {"model_dir": "m"}}, tmp_path)
    assert plain.completion.on_missing_seg == "score-whole-region"
    seg = config_from_dict({**base, "scoring": {"model_dir": "m",
                                                "segmentation_model_dir": "s"}}, tmp_path)
    assert seg.completion.on_missing_seg == "auto"
    assert seg.scoring.segmentation_model_dir == tmp_path.resolve() / "s"
    with pytest.raises(ConfigError, match="segmentation_model_dir"):
        config_from_dict({**base, "scoring": {"model_dir": "m"},
                          "completion": {"on_missing_seg": "auto"}}, tmp_path)
