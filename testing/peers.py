"""DICOM peers on 127.0.0.1 for tests and benchmarks, and the node as a child process.

The demo's peers (Orthanc, the pynetdicom SCP, ``dicom-node serve``, DCMTK storescu) are
re-exported from :mod:`dicom_node.demo` so there is one implementation of each; what only tests
and benchmarks need lives here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.demo.node import NodeProcess
from dicom_node.demo.pacs import OrthancPeer, Peer, PynetdicomPeer, orthanc_binary
from dicom_node.demo.processes import free_port, start_process, stop_process, wait_for_port
from dicom_node.demo.push import DCMTK_STORESCU, storescu

__all__ = [
    "DCMTK_STORESCP", "DCMTK_STORESCU", "NodeProcess", "OrthancPeer", "OrthancServer", "Peer",
    "PynetdicomPeer", "StorescpPeer", "free_port", "orthanc_binary", "storescu",
]

DCMTK_STORESCP = Path("/usr/bin/storescp")


class StorescpPeer:
    """DCMTK ``storescp`` with TCP_NODELAY and a 128 KiB PDU: the tuned reference receiver."""

    def __init__(self, workdir: Path, ae_title: str = "STORESCP", port: int | None = None,
                 ignore: bool = False) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.out_dir = workdir / "storescp"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "storescp.log"
        cmd = [str(DCMTK_STORESCP), "-aet", ae_title, "-pdu", "131072", "-od", str(self.out_dir)]
        if ignore:
            cmd.append("--ignore")
        cmd.append(str(self.port))
        self.proc = start_process(cmd, self.log_path, env={"TCP_NODELAY": "1"})
        wait_for_port(self.port, 15, self.proc, "storescp", self.log_path)

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_process(self.proc)


# Calling AE titles the tests' Orthanc accepts C-STORE from.
TEST_CALLERS = ("DICOMNODE", "STORESCU", "PYNETDICOM")


class OrthancServer(OrthancPeer):
    """The loopback Orthanc plus the REST queries tests use to check what arrived."""

    def __init__(self, workdir: Path, callers: Sequence[str] = TEST_CALLERS,
                 ae_title: str = "ORTHANC", port: int | None = None,
                 http_port: int | None = None, start_timeout: float = 60.0,
                 extra_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(workdir, callers, ae_title=ae_title, port=port, http_port=http_port,
                         start_timeout=start_timeout, extra_config=extra_config)

    @property
    def url(self) -> str:
        """The REST (and DICOMweb plugin) root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicom_port(self) -> int:
        return self.port

    @property
    def aet(self) -> str:
        return self.ae_title

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """/tools/lookup: which Orthanc resources carry this DICOM UID."""
        hits: list[dict[str, Any]] = json.loads(self.request("POST", "/tools/lookup",
                                                             uid.encode()))
        return hits

    def instance_uids_in_study(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs Orthanc holds in the study with this Study Instance UID."""
        hits = [h for h in self.lookup(study_uid) if h["Type"] == "Study"]
        if not hits:
            return set()
        instances = self.get_json(f"/studies/{hits[0]['ID']}/instances")
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}

    def instance_file(self, sop_uid: str) -> bytes:
        """The stored DICOM file of an instance (to read back with pydicom/highdicom)."""
        hits = [h for h in self.lookup(sop_uid) if h["Type"] == "Instance"]
        if not hits:
            raise KeyError(sop_uid)
        return self.request("GET", f"/instances/{hits[0]['ID']}/file")

    def clear(self) -> None:
        """Delete every patient (tests share one server per session)."""
        for pid in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{pid}")
