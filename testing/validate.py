"""Check DICOM files with third-party validators: one verdict line per file.

``PASS|WARN|FAIL  <file>  <IOD (SOP class)>  <summary>``, from

* ``dcmdump`` (DCMTK): the file must parse without warnings or errors;
* ``dciodvfy`` (dicom3tools): IOD, module and attribute rules, for SR also value types and
  relationships; skipped with a note when not installed;
* ``dsrdump`` (DCMTK), SR documents only: the content tree must parse.

FAIL is any dciodvfy ``Error``/``Abort``, a dcmdump parse error or a dsrdump failure; WARN is any
other validator message. Known noise is counted as ignored: private coding schemes (the ``99``
prefix the standard reserves for them, which dicom3tools does not know) and DICOMDIR hints.
Validators are called by absolute path where a venv could shadow DCMTK's names.

    python -m testing.validate [-v] FILE...
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

NOISE = re.compile(r"Unrecognized defined term <99[^>]*> for value [0-9]+ of attribute "
                   r"<Coding Scheme Designator>|would be needed to build DICOMDIR")
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _tool(name: str) -> str | None:
    path = Path("/usr/bin") / name
    return str(path) if path.exists() else shutil.which(name)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=120)


def _sop_class_uid(dcmdump: str, path: Path) -> str:
    out = _run([dcmdump, "-q", "-s", "-Un", "+P", "0008,0016", str(path)]).stdout
    match = re.search(r"\[([0-9.]+)\]", out)
    return match.group(1) if match else ""


def validate_file(path: Path, verbose: bool = False) -> tuple[str, list[str]]:
    """The verdict line for one file, and (verbose) every validator message under it."""
    dcmdump, dciodvfy, dsrdump = _tool("dcmdump"), _tool("dciodvfy"), _tool("dsrdump")
    if dcmdump is None:
        raise RuntimeError("dcmdump not found: apt-get install dcmtk")
    if not path.is_file():
        return f"FAIL  {path}  -  not a file", []
    errors = warnings = ignored = 0
    notes: list[str] = []
    details: list[str] = []
    parsed = _run([dcmdump, "-q", str(path)])
    first_err = (parsed.stderr.strip().splitlines() or [""])[0]
    if parsed.returncode != 0:
        errors += 1
        notes.append(f"dcmdump: {first_err}")
    elif parsed.stderr.strip():
        warnings += 1
        notes.append(f"dcmdump: {first_err}")
    sop_uid = _sop_class_uid(dcmdump, path)
    label = sop_uid or "unknown-SOP-class"
    if dciodvfy is not None:
        r = _run([dciodvfy, str(path)])
        lines = (r.stdout + r.stderr).splitlines()
        iod = next((ln for ln in lines if ln and not re.match(r"^(Error|Warning|Abort)", ln)), "")
        if iod:
            label = f"{iod} ({label})"
        errs = [ln for ln in lines if re.match(r"^(Error|Abort)", ln)]
        all_warns = [ln for ln in lines if ln.startswith("Warning")]
        warns = [ln for ln in all_warns if not NOISE.search(ln)]
        ignored += len(all_warns) - len(warns)
        errors += len(errs)
        warnings += len(warns)
        if errs:
            notes.append(f"dciodvfy: {len(errs)} error(s), first: {errs[0]}")
        if warns:
            notes.append(f"dciodvfy: {len(warns)} warning(s), first: {warns[0]}")
        if not errs and not warns:
            notes.append("dciodvfy: clean")
        details += [f"    dciodvfy: {ln}" for ln in errs + all_warns]
    else:
        notes.append("dciodvfy: not installed, IOD rules NOT checked")
    if sop_uid.startswith(SR_PREFIX) and dsrdump is not None:
        r = _run([dsrdump, str(path)])
        messages = [ln for ln in r.stderr.splitlines() if re.match(r"^[WEF]:", ln)]
        if r.returncode != 0:
            errors += 1
            notes.append(f"dsrdump: {messages[0] if messages else f'exit {r.returncode}'}")
        else:
            if messages:
                warnings += 1
                notes.append(f"dsrdump: {messages[0]}")
            items = sum(1 for ln in r.stdout.splitlines() if ln.lstrip().startswith("<"))
            notes.append(f"dsrdump: {items} content items")
        details += [f"    dsrdump: {ln}" for ln in r.stderr.splitlines()]
    verdict = "FAIL" if errors else "WARN" if warnings else "PASS"
    if ignored:
        notes.append(f"{ignored} known-noise warning(s) ignored")
    return f"{verdict}  {path}  {label}  {'; '.join(notes)}", details if verbose else []


def validate_files(paths: Sequence[Path], verbose: bool = False) -> tuple[int, str]:
    """Exit status (0: no file has errors, 1: some file has) and the report text."""
    lines: list[str] = []
    status = 0
    for path in paths:
        verdict, details = validate_file(Path(path), verbose)
        status |= verdict.startswith("FAIL")
        lines += [verdict, *details]
    return status, "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate DICOM files (dcmdump, dciodvfy, dsrdump).")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every validator message")
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args(argv)
    status, report = validate_files(args.files, args.verbose)
    sys.stdout.write(report)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
