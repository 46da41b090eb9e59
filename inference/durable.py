"""Crash-safe file writes: temp file, fsync, atomic rename, fsync of the directory.

A DICOM peer is told 0x0000 (or a result is queued for delivery) only after its bytes are on
stable storage, so every file the node keeps goes through :func:`write_durable`. A rename is only
durable once the directory entry is, hence the directory fsyncs.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry we created (a rename is only durable then)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)


def write_durable(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp + fsync + replace + dir fsync).

    ``sync_dir=False`` lets a caller writing several files into one folder fsync it once at the
    end with :func:`fsync_dir`.
    """
    makedirs_durable(path.parent)
    unique = f"{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.{unique}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename a fully written (and fsynced) folder into place; the rename is the commit point.

    Returns False (and removes ``tmp``) when ``final`` already exists: another writer published
    the same content first, and the existing folder is kept unchanged.
    """
    fsync_dir(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(final.parent)
    return True
