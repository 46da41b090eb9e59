"""Logs carry no patient name and no control byte, whatever a modality puts in Patient Name.

Fuzzed names go through the real paths that used to leak them: highdicom's SR build (it warns
about single-component person names and prints the name) and the C-STORE listener. The log is
captured from the handler the CLI installs (dicom_node.ops.logs.setup_logging).
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.ops import logs
from tests.conftest import make_config

FORGED = "2026-01-01 00:00:00,000 ERROR   dicom_node.scp: FORGED LINE"


def fuzzed_names(seed: int = 7, n: int = 12) -> list[str]:
    """Single-component names, control bytes, newlines, quotes and forged log lines."""
    rng = random.Random(seed)
    base = ["Zyxwvuq", "Qwertzu", "Mnbvcxy", "Plokijuh"]
    names = [
        "Zyxwvuq",                                # single component (highdicom warns with it)
        "Qwertzu\x00\x01\x7fMnbvc",               # raw control bytes
        f"Plokijuh\n{FORGED}",                    # a forged log line
        "Mnbvcxy\r\nSecondline",
        'Quo"tedqx\'name',                        # quotes that could end a redaction early
        "Tabbed\tNamezz\x1b[31m",                 # tab and an ANSI escape
    ]
    while len(names) < n:
        word = rng.choice(base) + "".join(rng.choice("abcdefghij") for _ in range(4))
        ctrl = "".join(chr(rng.choice([0, 1, 7, 8, 10, 13, 27, 31, 127])) for _ in range(3))
        names.append(word + ctrl if rng.random() < 0.5 else ctrl + word)
    return names


def name_tokens(name: str) -> list[str]:
    """The parts of a name that must never appear in the log (runs of 5+ letters)."""
    return [t for t in re.findall(r"[A-Za-z]{5,}", name) if t not in FORGED]


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The CLI's logging set-up writing into a buffer; restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    logs.setup_logging("DEBUG", "text", stream=buf)
    try:
        yield buf
    finally:
        logging.captureWarnings(False)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for name in logs.QUIET_BELOW_WARNING:
            logging.getLogger(name).setLevel(logging.NOTSET)


def assert_clean(text: str, names: list[str]) -> None:
    """No name token, no control byte other than the record separators, no forged record."""
    assert text, "nothing was logged: the test would prove nothing"
    for name in names:
        for token in name_tokens(name):
            assert token not in text, f"name part {token!r} reached the log"
    for line in text.splitlines():
        assert not re.search(r"[\x00-\x1f\x7f]", line), repr(line)
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line), f"not a record: {line!r}"
    assert "FORGED LINE" not in [ln.split(": ", 1)[-1] for ln in text.splitlines()]


def test_escape_and_redact_units() -> None:
    assert logs.escape_control("a\nb\x00c\x7f\td") == "a\\nb\\x00c\\x7f\\td"
    assert "Zyxwvuq" not in logs.redact_library_message('Invalid value for VR PN: \'Zyx"wvuq\'.')
    assert "Smith" not in logs.redact_library_message('The string "Smith" is unlikely to represent '
                                                      "the intended person name since ...")
    # an unbalanced quote redacts to the end of the message
    assert "Doe" not in logs.redact_library_message("value 'Doe")
    # a dataset dump line naming the attribute keeps only the attribute's name
    out = logs.redact_library_message("(0010,0010) Patient's Name  PN: Doe^John")
    assert "Doe" not in out


def test_node_messages_are_escaped_one_record_per_line(captured: io.StringIO) -> None:
    log = logging.getLogger("dicom_node.test")
    log.info("study %s: got %s", "1.2.3", f"x\n{FORGED}\x00\x01")
    try:
        raise ValueError(f"bad\n{FORGED}")
    except ValueError:
        log.exception("failure in %s", "job 4")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "\\n" + FORGED in lines[0] and "\\x00\\x01" in lines[0]
    assert lines[1].count("Traceback") == 1 and "ValueError" in lines[1]


def test_json_format_carries_ids_and_nothing_else() -> None:
    buf = io.StringIO()
    handler = logs.make_handler("json", buf)
    log = logging.getLogger("dicom_node.jsontest")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        log.info("study %s: stored\n%s", "1.2.3", FORGED,
                 extra={"study_uid": "1.2.3", "job_id": 7, "instance_uid": "1.2.3.4",
                        "patient_name": "Zyxwvuq^Qwertzu"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["study_uid"] == "1.2.3" and obj["job_id"] == 7 and obj["instance_uid"] == "1.2.3.4"
    assert obj["level"] == "INFO" and obj["ts"].endswith("Z")
    assert "Zyxwvuq" not in lines[0] and "patient_name" not in obj
    assert FORGED in obj["msg"].replace("\\n", "\n")  # escaped inside one record


def test_json_ids_from_the_node_message() -> None:
    buf = io.StringIO()
    handler = logs.make_handler("json", buf)
    log = logging.getLogger("dicom_node.jsontest2")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("job %s (study %s): attempt 2 failed", 12, "1.2.840.99")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    obj = json.loads(buf.getvalue())
    assert obj["job_id"] == 12 and obj["study_uid"] == "1.2.840.99"


def test_library_chatter_silenced_below_warning() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    try:
        logs.setup_logging("INFO", "text", stream=buf)
        logging.getLogger("highdicom.sr.sop").info("building SR content")
        logging.getLogger("pynetdicom.assoc").info("Requesting Association")
        logging.getLogger("PIL.PngImagePlugin").info("STREAM b'IHDR'")
        logging.getLogger("highdicom.sr.sop").warning("something worth a look")
        text = buf.getvalue()
        assert "building SR content" not in text and "Requesting Association" not in text
        assert "STREAM" not in text and "something worth a look" in text
        buf.truncate(0)
        logs.setup_logging("DEBUG", "text", stream=buf)
        logging.getLogger("pynetdicom.assoc").info("Requesting Association")
        assert "Requesting Association" in buf.getvalue()
    finally:
        logging.captureWarnings(False)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for name in logs.QUIET_BELOW_WARNING:
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.lenient_pydicom
def test_sr_build_with_fuzzed_names_logs_no_name(captured: io.StringIO) -> None:
    """The real results build (highdicom SR + SC) on sources with hostile Patient Names."""
    from dicom_node import results as R
    from tests.builders import us_series
    from tests.dicom_node.test_results import make_score

    names = fuzzed_names()
    cfg = make_config(Path("/nonexistent-data"))
    built = 0
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every warning, not once per location
        for i, name in enumerate(names):
            study = generate_uid()
            sources = us_series(2, study_uid=study, rows=96, cols=128)
            for ds in sources:
                ds.PatientName = name
            score = make_score(sources)
            try:
                R.build_results(score, {ds.SOPInstanceUID: ds for ds in sources}, cfg.results)
                built += 1
            except Exception as exc:  # noqa: BLE001 - a refused name is fine; log it like the worker
                logging.getLogger("dicom_node.worker").error("job %d: %s: %s", i,
                                                             type(exc).__name__, exc)
    text = captured.getvalue()
    assert built >= 1, text
    assert "person name has a single component" in text  # highdicom's warning did arrive
    assert_clean(text, names)


@pytest.mark.network
@pytest.mark.lenient_pydicom
def test_scp_with_fuzzed_names_logs_no_name(captured: io.StringIO, tmp_path) -> None:
    """Instances with hostile Patient Names pushed over C-STORE to a real listener."""
    from dicom_node.scu import store_files
    from tests.builders import make_us
    from tests.conftest import free_port
    from tests.dicom_node.node_harness import running_node

    names = fuzzed_names(seed=11)
    port = free_port()
    cfg = make_config(tmp_path / "data", node={"port": port, "allow_any_calling_aet": True})
    datasets = []
    for i, name in enumerate(names):
        ds = make_us(patient_id=f"P{i:03d}", seed=i)
        ds.PatientName = name
        datasets.append(ds)
    with running_node(cfg, processor=None, completion=False) as archive:
        results = store_files("127.0.0.1", port, datasets, calling_aet="FUZZ",
                              called_aet=cfg.node.ae_title)
        assert len(results) == len(names)
        assert archive.instance_count() >= 1
    assert_clean(captured.getvalue(), names)
