"""Write the model artifact the node serves: ``fold_<k>.safetensors`` + ``model.json``, atomically.

Everything is written into a staging directory beside the target and swapped in with
``os.replace`` at the end (as timm's checkpoint saver does), so a crash mid-run never leaves a
half-written model where the scorer would load it. ``inference.model.load_artifact`` is the reader.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from inference.model import SCHEMA_VERSION, ModelSpec

log = logging.getLogger(__name__)

_PACKAGES = ("dicom-node", "torch", "timm", "monai", "numpy", "scikit-learn", "safetensors",
             "pydicom", "highdicom")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape training, for provenance."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def data_fingerprint(sop_uids: Sequence[str]) -> dict[str, Any]:
    """The SOP Instance UIDs used, plus their SHA-256 (sorted, newline-joined) for quick compare."""
    uids = sorted(set(sop_uids))
    digest = hashlib.sha256("\n".join(uids).encode("ascii", "replace")).hexdigest()
    return {"n_instances": len(uids), "sha256": digest, "sop_instance_uids": uids}


def save_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save a state dict as safetensors (contiguous CPU copies; never pickle)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out_dir``; on success it atomically becomes ``out_dir``.

    An existing ``out_dir`` is moved aside first and deleted only after the swap, so at every
    instant either the old or the new complete model is in place. On error the staging dir is
    removed and ``out_dir`` is untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    log.info("model artifact written to %s", out_dir)


def build_model_json(
    *,
    spec: ModelSpec,
    fold_files: Sequence[str],
    fold_meta: Sequence[Mapping[str, Any]],
    threshold: float,
    model_uid: str,
    version: str,
    name: str = "dicom-node SARCO",
    cv_metrics: Mapping[str, Any] | None = None,
    feature_scaling: Mapping[str, Any] | None = None,
    sop_uids: Sequence[str] = (),
    train_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the ``model.json`` dict (schema documented in docs/contracts.md)."""
    spec_d = spec.to_dict()
    spec_d["threshold"] = float(threshold)
    folds = []
    for k, (f, meta) in enumerate(zip(fold_files, fold_meta, strict=True)):
        folds.append({"fold": k, "file": f, **dict(meta)})
    raw: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "model_uid": model_uid,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec_d,
        "threshold": float(threshold),
        "threshold_method": "youden_j_oof" if spec.target == "binary" else "none",
        "preprocessing": {
            "input_size": spec.input_size,
            "in_chans": spec.in_chans,
            "roi_margin": spec.roi_margin,
            "intensity": "0..1 (clipped); outside ROI zeroed; crop to ROI box + margin",
            "frame_policy": spec.frame_policy,
        },
        "folds": folds,
        "feature_scaling": dict(feature_scaling or {}),
        "cv_metrics": dict(cv_metrics or {}),
        "data_fingerprint": data_fingerprint(sop_uids),
        "package_versions": package_versions(),
        "train_config": dict(train_config or {}),
    }
    if extra:
        raw.update(extra)
    return raw


def write_artifact(
    out_dir: Path,
    *,
    fold_states: Sequence[Mapping[str, torch.Tensor]],
    model_json: dict[str, Any],
    extra_files: Mapping[str, bytes | str] | None = None,
    populate: Callable[[Path], None] | None = None,
) -> Path:
    """Write fold weights, ``model.json`` and extras atomically.

    Args:
        extra_files: relative path -> content, written beside model.json.
        populate: called with the staging dir after model.json is written (oof.csv, the report),
            so everything appears in ``out_dir`` at once.
    """
    files = [f["file"] for f in model_json["folds"]]
    if len(files) != len(fold_states):
        raise ValueError("one fold file name per fold state is required")
    with staging_dir(out_dir) as tmp:
        for f, state in zip(files, fold_states, strict=True):
            save_weights(state, tmp / f)
        for rel, content in (extra_files or {}).items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content, encoding="utf-8")
        (tmp / "model.json").write_text(json.dumps(model_json, indent=2, default=str),
                                        encoding="utf-8")
        if populate is not None:
            populate(tmp)
    return Path(out_dir)
