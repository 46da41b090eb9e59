"""Model registry and artifact loading: round trip, and clear errors for broken artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dicom_node.errors import ModelArtifactError
from inference.artifact import build_model_json, load_artifact, write_artifact
from inference.model import ModelSpec, create_model, default_cam_layer

SPEC = ModelSpec(backbone="test_convnext", input_size=32, in_chans=3)


def _write(tmp: Path, spec: ModelSpec = SPEC, n: int = 2) -> tuple[Path, list[torch.nn.Module]]:
    torch.manual_seed(0)
    models = [create_model(spec) for _ in range(n)]
    raw = build_model_json(
        spec=spec, fold_files=[f"fold_{k}.safetensors" for k in range(n)],
        fold_meta=[{"val_auc": 0.5}] * n, threshold=0.4, model_uid="1.2.3.4", version="1",
        sop_uids=["1.2.3", "1.2.4"],
    )
    out = tmp / "model"
    write_artifact(out, fold_states=[m.state_dict() for m in models], model_json=raw)
    return out, models


@pytest.mark.parametrize("mods", [("image",), ("image", "clinical"), ("clinical",), ("lab",),
                                  ("image", "clinical", "lab")])
def test_create_model_all_modality_sets(mods: tuple[str, ...]) -> None:
    spec = ModelSpec(backbone="test_convnext", input_size=32, modalities=mods, mlp_hidden=16)
    model = create_model(spec).eval()
    kw = {"image": torch.rand(2, 3, 32, 32), "clinical": torch.rand(2, 8), "lab": torch.rand(2, 14)}
    out = model(**{k: v for k, v in kw.items() if k in mods})
    assert out.shape == (2, 1)
    if "image" in mods:
        assert default_cam_layer(model) == "backbone.stages.3"
        with pytest.raises(ValueError):
            model(**{k: v for k, v in kw.items() if k in mods and k != "image"})


def test_unknown_names_fail_loudly() -> None:
    with pytest.raises(ModelArtifactError, match="no_such_net"):
        create_model(ModelSpec(backbone="no_such_net"))
    with pytest.raises(ModelArtifactError, match="unknown architecture"):
        create_model(ModelSpec(arch="nope"))
    with pytest.raises(ModelArtifactError, match="does not exist"):
        create_model(SPEC, pretrained=Path("/nonexistent/weights.safetensors"))


def test_local_pretrained_weights_load(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_model(SPEC, pretrained=path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)


def test_artifact_round_trip(tmp_path: Path) -> None:
    out, models = _write(tmp_path)
    art = load_artifact(out)
    assert art.info.n_folds == 2 and art.info.threshold == pytest.approx(0.4)
    assert art.info.model_uid == "1.2.3.4" and art.info.backbone == "test_convnext"
    assert art.spec.input_size == 32 and art.raw["data_fingerprint"]["n_instances"] == 2
    x = torch.rand(1, 3, 32, 32)
    for m, ref in zip(art.models, models):
        assert not m.training
        assert torch.allclose(m(x), ref.eval()(x))
    assert not list(tmp_path.glob(".model.*"))  # no staging leftovers


def test_rewrite_is_atomic_swap(tmp_path: Path) -> None:
    out, _ = _write(tmp_path)
    uid1 = json.loads((out / "model.json").read_text())["model_uid"]
    out2, _ = _write(tmp_path, n=3)
    assert out2 == out and load_artifact(out).info.n_folds == 3 and uid1 == "1.2.3.4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _edit(out: Path, fn) -> None:
    raw = json.loads((out / "model.json").read_text())
    fn(raw)
    (out / "model.json").write_text(json.dumps(raw))


def test_bad_artifacts_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelArtifactError, match="does not exist"):
        load_artifact(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelArtifactError, match="model.json is missing"):
        load_artifact(tmp_path / "empty")
    out, _ = _write(tmp_path)
    (out / "model.json").write_text("{not json")
    with pytest.raises(ModelArtifactError, match="not valid JSON"):
        load_artifact(out)

    out, _ = _write(tmp_path)
    _edit(out, lambda r: r.update(schema_version=99))
    with pytest.raises(ModelArtifactError, match="schema_version 99"):
        load_artifact(out)

    out, _ = _write(tmp_path)
    _edit(out, lambda r: r.pop("model_uid"))
    with pytest.raises(ModelArtifactError, match="model_uid"):
        load_artifact(out)

    out, _ = _write(tmp_path)
    (out / "fold_1.safetensors").unlink()
    with pytest.raises(ModelArtifactError, match="fold_1.safetensors"):
        load_artifact(out)

    out, _ = _write(tmp_path)
    (out / "fold_0.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelArtifactError, match="fold_0.safetensors.*safetensors"):
        load_artifact(out)

    out, _ = _write(tmp_path)  # weights of an image model, spec claims image+clinical
    _edit(out, lambda r: r["spec"].update(modalities=["image", "clinical"], arch=""))
    with pytest.raises(ModelArtifactError, match="missing"):
        load_artifact(out)

    out, _ = _write(tmp_path)  # same tensor names, other shapes
    _edit(out, lambda r: r["spec"].update(in_chans=1))
    with pytest.raises(ModelArtifactError, match="shape"):
        load_artifact(out)

    out, _ = _write(tmp_path)
    _edit(out, lambda r: r.update(threshold=3.0))
    with pytest.raises(ModelArtifactError, match="threshold"):
        load_artifact(out)
