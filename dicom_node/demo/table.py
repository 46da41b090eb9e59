"""Step 6: the result table, one row per held-out study, and where the metrics report is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dicom_node.demo.study import DemoStudy


def _mean(values: list[float], digits: int = 2) -> str:
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


def print_table(studies: list[DemoStudy], workdir: Path, console: Any) -> None:
    """Print the table and how many decisions match the synthetic truth."""
    from rich.table import Table

    table = Table(title="Held-out studies scored by dicom-node (research use only)")
    for col in ("patient", "vendor", "P(sarcopenia) ± fold SD", "decision", "truth",
                "RF CSA cm²", "RF thickness cm", "SR check", "SR + heat-map PNGs"):
        table.add_column(col, no_wrap=col in ("patient", "decision", "truth"))
    correct = 0
    for st in studies:
        s = st.summary
        prob = "-" if s is None or s.probability is None else f"{s.probability:.2f}"
        positive = s.positive if s is not None else None
        decision = ("?" if positive is None else "sarcopenia" if positive else "no sarcopenia")
        correct += decision == st.truth
        errs = st.sr_errors
        check = "n/a" if errs is None else ("dciodvfy ok" if errs == 0 else f"{errs} errors")
        folder = st.folder or workdir
        table.add_row(st.patient_id, st.vendor, f"{prob} ± {_mean(s.spread if s else [])}",
                      decision, st.truth, _mean(s.csa if s else []),
                      _mean(s.thickness if s else []), check,
                      f"{os.path.relpath(folder, workdir)}/ (sr.dcm + {len(st.heatmaps)} PNG)")
    console.print(table)
    console.print(f"{correct}/{len(studies)} decisions match the synthetic truth. Paths are under "
                  f"{workdir}; RF CSA/thickness are '-' where no DICOM-SEG ROI came with the study "
                  "(scored on the whole tissue region).")


def report_path(model_dir: Path) -> Path:
    """The training report the trainer wrote (HTML or Markdown), else the model folder."""
    for pattern in ("report.html", "report.md", "report*", "*.html", "*.md"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found[0]
    return model_dir
