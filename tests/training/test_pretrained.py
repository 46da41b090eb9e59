"""train.pretrained: a local file is used as given; a hub tag offline fails fast, naming the key
and the offline alternative (no network in tests: the hub is unreachable here by design)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.errors import TrainConfigError
from training.pretrained import hub_repo, is_hub_tag, resolve_pretrained


def test_local_file_and_empty(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert resolve_pretrained(str(f), "resnet10t") == f
    assert resolve_pretrained(None, "resnet10t") is None
    assert resolve_pretrained("", "resnet10t") is None
    with pytest.raises(TrainConfigError, match=r"train\.pretrained.*does not exist"):
        resolve_pretrained(str(tmp_path / "missing.safetensors"), "resnet10t")


def test_tags_name_the_hub_repository() -> None:
    assert is_hub_tag("timm") and is_hub_tag("hf-hub:org/net") and is_hub_tag("timm/x.y")
    assert not is_hub_tag("./timm.safetensors")
    assert hub_repo("timm", "resnet10t").startswith("timm/resnet10t.")
    assert hub_repo("hf-hub:org/net", "resnet10t") == "org/net"
    with pytest.raises(TrainConfigError, match="no hub weights"):
        hub_repo("timm", "test_convnext_no_such_model")


def test_offline_hub_tag_fails_naming_the_setting_and_the_alternative(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty cache: nothing to fall back on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TrainConfigError) as err:
        resolve_pretrained("timm", "resnet10t")
    msg = str(err.value)
    assert "train.pretrained" in msg and "timm/resnet10t" in msg
    assert "set train.pretrained to its path" in msg


def test_cached_hub_weights_are_used_offline(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A tag already in the Hugging Face cache resolves without the network."""
    import huggingface_hub

    cache = tmp_path / "hub"
    snap = cache / "models--org--net" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"weights")
    (cache / "models--org--net" / "refs").mkdir()
    (cache / "models--org--net" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    got = resolve_pretrained("hf-hub:org/net", "resnet10t")
    assert got is not None and got.read_bytes() == b"weights"
