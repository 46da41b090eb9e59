"""Push held-out studies to the node as a modality would: DCMTK storescu, else the node's SCU."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_node.demo.node import MODALITY_AET, NodeProcess
from dicom_node.demo.study import DemoError, DemoStudy

# inside a venv with pynetdicom, `storescu` on PATH is pynetdicom's script: call DCMTK's by path
DCMTK_STORESCU = Path("/usr/bin/storescu")

# storescu proposes uncompressed syntaxes plus at most one compressed family (-x option): files
# are sent in runs of the same transfer syntax, each run with the option that proposes it.
_STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


def storescu(files: Sequence[Path], port: int, aec: str, aet: str = MODALITY_AET,
             timeout: float = 600.0, extra: Sequence[str] = ("-pdu", "131072")) -> float:
    """Send ``files`` in one association with DCMTK storescu (TCP_NODELAY=1); return seconds.

    Raises RuntimeError with storescu's last output when it fails or times out.
    """
    cmd = [str(DCMTK_STORESCU), "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "TCP_NODELAY": "1"})
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"storescu to port {port} timed out after {timeout:.0f} s") from None
    elapsed = time.perf_counter() - t0
    if r.returncode != 0 or "E:" in r.stderr:
        raise RuntimeError(f"storescu to port {port} failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout)[-800:]}")
    return elapsed


def ts_runs(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Consecutive runs of files that one storescu -x option can send (order kept)."""
    import pydicom

    runs: list[tuple[str, list[Path]]] = []
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        opt = _STORESCU_TS_OPTION.get(ts, "-x=")
        if runs and runs[-1][0] == opt:
            runs[-1][1].append(f)
        else:
            runs.append((opt, [f]))
    return runs


def push_study(study: DemoStudy, node: NodeProcess, profile: Path | None = None) -> None:
    """Send one study as a modality: DCMTK storescu when installed, else the node's own SCU.

    With the cohort's storescu profile (every SOP class/transfer syntax it wrote) the study goes
    in one association, as a modality sends it; without it, one association per syntax run.
    """
    if DCMTK_STORESCU.exists():
        if profile is not None and profile.exists():
            storescu(study.files, node.port, node.ae_title, timeout=120,
                     extra=("-xf", str(profile), "Synth", "-pdu", "131072"))
            return
        for opt, files in ts_runs(study.files):
            storescu(files, node.port, node.ae_title, timeout=120,
                     extra=("-R", opt, "-pdu", "131072"))
        return
    from dicom_node.scu import store_files

    results = store_files("127.0.0.1", node.port, study.files, calling_aet="PYNETDICOM",
                          called_aet=node.ae_title, timeout=60)
    bad = [(uid, s) for uid, s in results if s not in (0,) and not 0xB000 <= s <= 0xB007]
    if bad:
        raise DemoError(f"study {study.study_uid}: the node refused {bad}")
