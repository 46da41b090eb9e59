"""Where ``train.pretrained`` points: a local weights file, or a tag timm fetches into its cache.

Why a resolver: the paper fine-tuned ImageNet weights and a ConvNeXt from random init stays at
chance on this task, yet the node must run without internet. A hub tag is resolved to a file in
timm's (Hugging Face) cache once, before training starts; from there on the model is built from a
local file exactly as with a user-given one (``inference.model.create_model``), and model.json
records the tag. Where the hub is unreachable the run stops at once with an error that names the
setting and the offline alternative.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from training.errors import TrainConfigError

log = logging.getLogger(__name__)

HUB_PREFIXES = ("hf-hub:", "timm/")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_TIMEOUT_S = 5.0  # the metadata request; a machine without a route fails well before it


def is_hub_tag(value: str) -> bool:
    """True for "timm" and hub tags ("hf-hub:org/name", "timm/<model>.<tag>")."""
    return value == "timm" or value.startswith(HUB_PREFIXES)


def hub_repo(value: str, backbone: str) -> str:
    """The Hugging Face repository of a tag; "timm" means the backbone's default weights."""
    if value == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(backbone)
        if cfg is None or not cfg.hf_hub_id:
            raise TrainConfigError(
                "pretrained", f"timm has no hub weights for backbone {backbone!r}; give a local "
                "weights file or another tag")
        return str(cfg.hf_hub_id)
    if value.startswith("hf-hub:"):
        return value[len("hf-hub:"):]
    return value


def resolve_pretrained(value: str | Path | None, backbone: str) -> Path | None:
    """The local weights file to initialise ``backbone`` from (None: random init).

    Raises:
        TrainConfigError: the file does not exist, or the tag cannot be fetched (offline); the
            message says how to train offline.
    """
    if value is None or str(value) == "":
        return None
    text = str(value)
    if not is_hub_tag(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise TrainConfigError("pretrained", f"weights file {path} does not exist")
        return path
    repo = hub_repo(text, backbone)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - timm depends on it
        raise TrainConfigError("pretrained", f"{text!r} needs huggingface_hub ({exc})") from exc
    errors = []
    for name in WEIGHT_FILES:  # already in the cache: no network needed
        try:
            return Path(hf_hub_download(repo, name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached under this name
            continue
    reachable = _hub_reachable()
    if reachable is not None:
        errors.append(reachable)
    else:
        for name in WEIGHT_FILES:
            try:
                file = hf_hub_download(repo, name, etag_timeout=HUB_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - missing file or hub error: try the next name
                errors.append(f"{name}: {type(exc).__name__}")
                continue
            log.info("pretrained weights %s resolved to %s", text, file)
            return Path(file)
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    raise TrainConfigError(
        "pretrained",
        f"{text!r} could not be fetched from the Hugging Face hub repository {repo!r}{offline}: "
        f"{'; '.join(errors)}. Offline: on a machine with internet run "
        f"`python -c \"import huggingface_hub as h; print(h.hf_hub_download('{repo}', "
        f"'model.safetensors'))\"`, copy that file here and set train.pretrained to its path",
    )


def _hub_reachable() -> str | None:
    """None when the hub answers a TCP connect within the timeout, else why not.

    huggingface_hub retries an unreachable host for half a minute; this answers in seconds.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "offline mode"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{url.hostname} unreachable ({exc})"
