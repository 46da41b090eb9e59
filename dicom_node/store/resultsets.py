"""Result sets written exactly once: keyed by (study, input instances, model), published whole.

The key of a job's results is a hash of the study UID, the sorted SOP Instance UIDs it scored and
the model UID; the SR/SC Series and SOP Instance UIDs derive from it (:func:`uid_for`), so a
re-run of the same study version with the same model produces the same objects. A set is
written into a hidden temp folder, every file fsynced, a ``manifest.json`` last, and the folder
renamed into ``results/<study>/<key>/``: the rename is the commit point. A crash leaves either
no folder (the temp one is swept at start-up) or the complete set; a job that finds the complete
set re-queues those files instead of scoring again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_node.store.archive import uid_name
from inference.durable import fsync_dir, makedirs_durable, publish_dir, write_durable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP_SUFFIX = ".partial"


def result_key(study_uid: str, input_sop_uids: Iterable[str], model_uid: str) -> str:
    """The exactly-once key of a job's results (64 hex digits)."""
    h = hashlib.sha256()
    for part in (study_uid, *sorted(set(input_sop_uids)), model_uid):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def uid_for(key: str, name: str, prefix: str | None = None) -> str:
    """A UID derived from the result key and the object's role (``sr``, ``sc-series``, ...).

    ``prefix`` is the node's UID root; None uses pydicom's.
    """
    if prefix is None:
        return str(generate_uid(entropy_srcs=[key, name]))
    return str(generate_uid(prefix=prefix, entropy_srcs=[key, name]))


@dataclass(frozen=True)
class ResultSet:
    """A published result set: its folder and the files in it (SOP UID and path)."""

    key: str
    study_uid: str
    folder: Path
    files: tuple[tuple[str, Path], ...]
    note: str
    created_at: float


def study_folder(results_dir: Path, study_uid: str) -> Path:
    return Path(results_dir) / uid_name(study_uid)


def _read(folder: Path) -> ResultSet | None:
    try:
        meta = json.loads((folder / MANIFEST).read_text())
        files = tuple((str(f["sop_uid"]), folder / str(f["file"])) for f in meta["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(p.is_file() for _, p in files):
        return None
    return ResultSet(key=str(meta["key"]), study_uid=str(meta["study_uid"]), folder=folder,
                     files=files, note=str(meta.get("note", "")),
                     created_at=float(meta.get("created_at", 0.0)))


def find(results_dir: Path, study_uid: str, key: str) -> ResultSet | None:
    """The complete result set with this key, or None."""
    folder = study_folder(results_dir, study_uid) / key
    return _read(folder) if folder.is_dir() else None


def sets_of(results_dir: Path, study_uid: str) -> list[ResultSet]:
    """Every complete result set of a study, oldest first."""
    base = study_folder(results_dir, study_uid)
    if not base.is_dir():
        return []
    out = [rs for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
           for rs in [_read(d)] if rs is not None]
    return sorted(out, key=lambda rs: rs.created_at)


def publish(results_dir: Path, study_uid: str, key: str, datasets: Sequence[Dataset], *,
            note: str = "", extra: dict[str, Any] | None = None) -> ResultSet:
    """Write ``datasets`` as the result set ``key`` (all or nothing); return the published set.

    If the same key was published meanwhile, the existing set wins and is returned.
    """
    base = study_folder(results_dir, study_uid)
    makedirs_durable(base)
    tmp = base / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    tmp.mkdir()
    try:
        files = []
        for ds in datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            name = f"{uid_name(str(ds.SOPInstanceUID))}.dcm"
            write_durable(tmp / name, buf.getvalue(), sync_dir=False)
            files.append({"file": name, "sop_uid": str(ds.SOPInstanceUID),
                          "modality": str(ds.get("Modality", ""))})
        manifest = {"key": key, "study_uid": study_uid, "files": files, "note": note,
                    "created_at": time.time(), **(extra or {})}
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=2).encode(), sync_dir=False)
        fsync_dir(tmp)
        publish_dir(tmp, base / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rs = find(results_dir, study_uid, key)
    if rs is None:
        raise OSError(f"study {study_uid}: result set {key[:12]} not readable after publishing")
    log.info("study %s: result set %s published (%d file(s))", study_uid, key[:12], len(rs.files))
    return rs


def sweep_temp(results_dir: Path) -> int:
    """Remove temp folders an interrupted :func:`publish` left (at start-up, no writer running)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return 0
    n = 0
    for tmp in results_dir.glob(f"*/.*{_TMP_SUFFIX}"):
        shutil.rmtree(tmp, ignore_errors=True)
        n += 1
    if n:
        log.warning("removed %d unpublished result folder(s) left by an interrupted job", n)
    return n
