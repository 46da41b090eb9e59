"""Push fuzz cases to a DICOM listener one association each and record what came back."""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.fuzz.mutations import Case, lenient_pydicom

#: Outcomes that mean the listener did not answer the case with a DIMSE status.
NO_STATUS = ("no-response", "association-aborted", "association-not-established")


@dataclass
class FuzzReport:
    """Outcome per case ("0xC210", "no-context", ...) and the histogram over all cases."""

    outcomes: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def histogram(self) -> dict[str, int]:
        return dict(collections.Counter(o for o, _ in self.outcomes.values()).most_common())

    def unanswered(self) -> list[tuple[int, str, str]]:
        return [(i, o, n) for i, (o, n) in self.outcomes.items() if o in NO_STATUS]


@contextmanager
def raw_sending() -> Iterator[None]:
    """pynetdicom sends files byte for byte and lets any UID through (so the peer judges)."""
    old = _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"]
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        with lenient_pydicom():
            yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET, _config.VALIDATORS["UI"] = old


def send_case(path: Path, port: int, *, calling_aet: str = "PYNETDICOM",
              called_aet: str = "DICOMNODE", timeout: float = 30.0) -> str:
    """Send one file unchanged over its own association; returns the status or what went wrong."""
    meta = read_file_meta_info(str(path))
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    sop_class = str(meta.MediaStorageSOPClassUID)
    ae.add_requested_context(sop_class, [str(meta.TransferSyntaxUID)])
    ae.add_requested_context(Verification)  # so a refused storage context still associates
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return "association-aborted" if assoc.is_aborted else "association-not-established"
    try:
        if not [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]:
            return "no-context"
        try:
            status = assoc.send_c_store(path)
        except Exception as exc:  # noqa: BLE001 - our side could not send: not the peer's fault
            return f"not-sent:{type(exc).__name__}"
        if not status or "Status" not in status:
            return "no-response"
        return f"0x{int(status.Status):04X}"
    finally:
        if assoc.is_established:
            assoc.release()


def run(cases: Iterable[Case], port: int, *, every: int = 50,
        alive: object = None) -> FuzzReport:
    """Send every case; ``alive()`` (if given) is asserted every ``every`` cases."""
    report = FuzzReport()
    with tempfile.TemporaryDirectory() as tmp, raw_sending():
        path = Path(tmp) / "case.dcm"
        for case in cases:
            path.write_bytes(case.data)
            report.outcomes[case.index] = (send_case(path, port), case.name)
            if alive is not None and case.index % every == every - 1:
                assert alive(), f"the node died at or before case {case.index}: {case.name}"  # type: ignore[operator]
    return report
