"""Durable archive: instance files under ``archive/`` plus their rows in the index.

A C-STORE is acknowledged only after both the file and its index row are durable: the bytes go
through :func:`inference.durable.write_durable` (temp file, fsync, rename, folder fsync); then the
row is committed (``synchronous=FULL``). A crash at any point leaves either no trace of the
instance or a complete one; temp files (``.*.tmp``) are never indexed and are swept at start-up.

File names never contain a UID the sender chose: folders and files are named by
:func:`uid_name` (a hash), so no UID can reach outside the data folder. The index stores each
file's path relative to ``data_dir``, so archives written with the older UID-named layout keep
working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dicom_node.errors import OutOfResourcesError
from dicom_node.store.db import Index
from dicom_node.validate import InstanceInfo
from inference.durable import write_durable

log = logging.getLogger(__name__)


def uid_name(uid: str) -> str:
    """A file-system name for a UID: 32 hex digits of its SHA-256 (never the UID itself)."""
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


StoreKind = Literal["stored", "duplicate", "replaced"]


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`Archive.store` did: a new file, an identical re-send, or newer content."""

    kind: StoreKind
    path: Path
    sha256: str
    reopened: bool = False


class Archive(Index):
    """The node's archive folder and index database; safe to share between threads."""

    def __init__(self, data_dir: Path, *, disk_reserve_mb: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.archive_dir = self.data_dir / "archive"
        self.quarantine_dir = self.data_dir / "quarantine"
        self.results_dir = self.data_dir / "results"
        self.disk_reserve_bytes = int(disk_reserve_mb) * 1024 * 1024
        super().__init__(self.data_dir / "index.sqlite")

    # ---------------------------------------------------------------- connections / schema
    def init(self) -> Archive:
        """Create folders and schema, and sweep temp files a crash left behind."""
        for d in (self.data_dir, self.archive_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.init_schema()
        removed = 0
        for folder in (self.archive_dir, self.quarantine_dir):
            for tmp in folder.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed %d temp files left by an interrupted write", removed)
        return self

    # ---------------------------------------------------------------- storing
    def check_disk(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResourcesError` if ``incoming`` bytes would dip into the reserve."""
        if self.disk_reserve_bytes <= 0:
            return
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming < self.disk_reserve_bytes:
            raise OutOfResourcesError(
                f"free space {free // 2**20} MiB is below node.disk_reserve_mb "
                f"({self.disk_reserve_bytes // 2**20} MiB)"
            )

    def relative_path(self, info: InstanceInfo) -> Path:
        """``archive/<study>/<series>/<instance>.dcm``, each part named by :func:`uid_name`."""
        return (Path("archive") / uid_name(info.study_uid) / uid_name(info.series_uid)
                / f"{uid_name(info.sop_uid)}.dcm")

    def store(self, raw: bytes, info: InstanceInfo, *, calling_aet: str,
              transfer_syntax: str) -> StoreOutcome:
        """File ``raw`` (a complete Part 10 file) and index it; return only once both are durable.

        A re-sent instance with the same hash is acknowledged without a new write or row; with
        different content the newest is kept and the event logged. An instance arriving for a
        study that is no longer ``receiving`` re-opens it (a new scoring job follows), except an
        automatic DICOM-SEG (``info.automatic_seg``), which is archived without re-opening.
        """
        self.check_disk(len(raw))
        digest = hashlib.sha256(raw).hexdigest()
        rel = self.relative_path(info)
        path = self.data_dir / rel
        old = self.query("SELECT path, sha256 FROM instances WHERE sop_uid = ?", (info.sop_uid,))
        if old and old[0]["sha256"] == digest and (self.data_dir / old[0]["path"]).is_file():
            return StoreOutcome("duplicate", self.data_dir / old[0]["path"], digest)
        write_durable(path, raw)
        now = time.time()
        kind: StoreKind = "replaced" if old else "stored"
        with self.transaction() as conn:
            reopened = self._index(conn, info, rel, digest, len(raw), calling_aet,
                                   transfer_syntax, now)
        if old and old[0]["path"] != str(rel):
            (self.data_dir / old[0]["path"]).unlink(missing_ok=True)
        if kind == "replaced":
            log.warning("study %s: instance %s re-sent with different content; newest kept",
                        info.study_uid, info.sop_uid)
        return StoreOutcome(kind, path, digest, reopened)

    def _index(self, conn: sqlite3.Connection, info: InstanceInfo, rel: Path, digest: str,
               size: int, calling_aet: str, transfer_syntax: str, now: float) -> bool:
        conn.execute(
            "INSERT INTO patients (patient_id, first_seen, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(patient_id) DO UPDATE SET last_seen = excluded.last_seen",
            (info.patient_id, now, now),
        )
        row = conn.execute("SELECT state FROM studies WHERE study_uid = ?",
                           (info.study_uid,)).fetchone()
        reopened = False
        if row is None:
            conn.execute(
                "INSERT INTO studies (study_uid, patient_id, state, first_received, last_received, "
                "receiving_since, missing_seg, reopen_count, note) "
                "VALUES (?, ?, 'receiving', ?, ?, ?, 0, 0, '')",
                (info.study_uid, info.patient_id, now, now, now),
            )
        elif row[0] == "receiving":
            conn.execute("UPDATE studies SET last_received = ? WHERE study_uid = ?",
                         (now, info.study_uid))
        elif info.automatic_seg:
            # e.g. the node's own AI SEG routed back by PACS: re-opening would rescore and send
            # another AI SEG, a loop; an automatic outline is no new human input
            log.info("study %s: automatic DICOM-SEG %s archived; not a human ROI, the study stays "
                     "%s (not re-opened)", info.study_uid, info.sop_uid, row[0])
        else:
            reopened = True
            conn.execute(
                "UPDATE studies SET state = 'receiving', last_received = ?, receiving_since = ?, "
                "completed_at = NULL, reopen_count = reopen_count + 1, "
                "note = 're-opened by a new instance after state ' || state WHERE study_uid = ?",
                (now, now, info.study_uid),
            )
            # a job not yet started would score an incomplete view; the next completion queues
            # a new one
            conn.execute(
                "UPDATE jobs SET state = 'done', last_error = 'superseded: study re-opened before "
                "the job ran', updated_at = ? WHERE study_uid = ? AND state = 'queued'",
                (now, info.study_uid),
            )
            log.info("study %s: re-opened (was %s) by instance %s", info.study_uid, row[0],
                     info.sop_uid)
        conn.execute(
            "INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, series_number) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(series_uid) DO UPDATE SET "
            "study_uid = excluded.study_uid, modality = excluded.modality, "
            "sop_class_uid = excluded.sop_class_uid, series_number = excluded.series_number",
            (info.series_uid, info.study_uid, info.modality, info.sop_class_uid,
             info.series_number),
        )
        conn.execute(
            "INSERT OR REPLACE INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, "
            "modality, path, sha256, size, transfer_syntax, calling_aet, received_at, "
            "manufacturer, "
            "model_name, rows, columns, frames, photometric, referenced_sop_uids, automatic_seg) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                info.sop_uid, info.study_uid, info.series_uid, info.sop_class_uid, info.modality,
                str(rel), digest, size, str(transfer_syntax), calling_aet, now, info.manufacturer,
                info.model_name, info.rows, info.columns, info.frames, info.photometric,
                json.dumps(list(info.referenced_sop_uids)), int(info.automatic_seg),
            ),
        )
        return reopened

    def quarantine(self, raw: bytes | None, *, reason: str, status: int, calling_aet: str,
                   sop_class_uid: str = "", sop_uid: str = "", transfer_syntax: str = "") -> Path:
        """Keep a refused dataset in ``quarantine/`` with a ``.json`` reason beside it.

        The file name is generated here; nothing the sender supplied becomes part of a path.
        """
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        dcm = self.quarantine_dir / f"{name}.dcm"
        if raw is not None:
            write_durable(dcm, raw)
        meta = {
            "reason": reason, "status": f"0x{status:04X}", "calling_aet": calling_aet,
            "sop_class_uid": sop_class_uid[:128], "sop_instance_uid": sop_uid[:128],
            "transfer_syntax": transfer_syntax, "received_at": time.time(),
            "file": dcm.name if raw is not None else None,
        }
        write_durable(self.quarantine_dir / f"{name}.json", json.dumps(meta, indent=2).encode())
        return dcm

    # ---------------------------------------------------------------- reading
    def study_files(self, study_uid: str) -> list[tuple[str, Path]]:
        """(SOP Instance UID, absolute path) of a study's instances, in arrival order."""
        rows = self.query("SELECT sop_uid, path FROM instances WHERE study_uid = ? "
                          "ORDER BY received_at, sop_uid", (study_uid,))
        return [(r["sop_uid"], self.data_dir / r["path"]) for r in rows]

    def study_paths(self, study_uid: str) -> list[Path]:
        """Absolute paths of a study's instances, in arrival order."""
        rows = self.query(
            "SELECT path FROM instances WHERE study_uid = ? ORDER BY received_at, sop_uid",
            (study_uid,),
        )
        return [self.data_dir / r["path"] for r in rows]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
        return rows[0] if rows else None

    def instance_count(self) -> int:
        return int(self.query("SELECT count(*) AS n FROM instances")[0]["n"])
