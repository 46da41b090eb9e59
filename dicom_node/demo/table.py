"""Step 6: the result table, one row per held-out study, and where the metrics reports are."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.demo.study import DemoStudy

_ROI_LABEL = {"auto": "automatic", "seg": "SEG", "whole": "whole region",
              "not scored": "not scored"}


def _mean(values: list[float], digits: int = 2) -> str:
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


def roi_text(roi: list[str], pushed: int) -> str:
    """The ROI sources of a study's SR groups out of the US objects pushed, e.g.
    ``automatic 3/5`` (the other 2 failed the segmenter's QC or the input gate)."""
    if not roi:
        return f"none/{pushed}"
    counts = Counter(roi)
    return ", ".join(f"{_ROI_LABEL.get(k, k)} {n}/{max(pushed, len(roi))}"
                     for k, n in counts.most_common())


def _check(errors: int | None) -> str:
    return "n/a" if errors is None else ("ok" if errors == 0 else f"{errors} errors")


def print_table(studies: list[DemoStudy], workdir: Path, console: Any) -> None:
    """Print the table and how many decisions match the synthetic truth."""
    from rich.table import Table

    table = Table(title="Held-out studies scored by dicom-node (research use only)")
    for col in ("patient", "vendor", "P(sarcopenia) ± fold SD", "decision", "truth", "ROI",
                "Dice vs truth", "RF CSA cm²", "RF thickness cm", "echo int.",
                "dciodvfy SR / AI SEG", "results"):
        table.add_column(col, no_wrap=col in ("patient", "decision", "truth"))
    correct = 0
    for st in studies:
        s = st.summary
        prob = "-" if s is None or s.probability is None else f"{s.probability:.2f}"
        positive = s.positive if s is not None else None
        decision = ("?" if positive is None else "sarcopenia" if positive else "no sarcopenia")
        correct += decision == st.truth
        dice = f"{float(np.median(st.dice)):.3f}" if st.dice else "-"
        seg_check = _check(st.seg_errors) if st.segs else "no SEG"
        folder = st.folder or workdir
        table.add_row(st.patient_id, st.vendor, f"{prob} ± {_mean(s.spread if s else [])}",
                      decision, st.truth, roi_text(s.roi if s else [], len(st.files)), dice,
                      _mean(s.csa if s else []), _mean(s.thickness if s else []),
                      _mean(s.echo if s else [], 0), f"{_check(st.sr_errors)} / {seg_check}",
                      f"{os.path.relpath(folder, workdir)}/ (SR, {len(st.segs)} SEG, "
                      f"{len(st.heatmaps)} PNG)")
    console.print(table)
    console.print(
        f"{correct}/{len(studies)} decisions match the synthetic truth. The studies were pushed "
        "without DICOM-SEGs: ROI 'automatic' = the node's segmenter outlined the rectus femoris "
        "and sent it to the PACS as an AI DICOM-SEG; 'Dice vs truth' = median Dice of those AI "
        "SEGs (read back from the PACS) against the generator's true outline; 'automatic n/m' = "
        "n of the m US objects pushed were scored on it, the others failed the segmenter's "
        "quality control or the input gate (reasons in the node log). RF CSA, thickness and "
        "mean echo intensity are measured inside that ROI ('-' where no image had one). "
        f"Paths are under {workdir}.")


def report_path(model_dir: Path) -> Path:
    """The training report the trainer wrote (HTML or Markdown), else the model folder."""
    for pattern in ("report.html", "report.md", "report*", "*.html", "*.md"):
        found = sorted(model_dir.glob(pattern))
        if found:
            return found[0]
    return model_dir
