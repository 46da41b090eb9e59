"""report.html / report.md: written, self-contained, holding the tables and figures."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training import metrics as M
from training.oof import OOFTable
from training.report import ReportData, write_report


def synthetic_oof(n_part=40, combos=("image", "image+clinical+lab"), seed=0, target="binary"):
    rng = np.random.default_rng(seed)
    rows = []
    for c_i, combo in enumerate(combos):
        for p in range(n_part):
            lab = p % 2 if target == "binary" else 6.0 + rng.normal()
            for img in range(2 if combo.startswith("image") else 1):
                signal = (0.25 + 0.1 * c_i) * (lab if target == "binary" else 0)
                prob = float(np.clip(0.35 + signal + rng.normal(0, 0.15), 0, 1)) \
                    if target == "binary" else float(lab + rng.normal(0, 0.3))
                rows.append(dict(participant_id=f"P{p:03d}", study_instance_uid=f"1.2.{p}",
                                 sop_instance_uid=f"1.2.{p}.{img}" if combo.startswith("image")
                                 else "", frame_number=1, fold=p % 5, label=lab,
                                 probability=prob, vendor=["alpha", "beta"][p % 4 // 2],
                                 modalities=combo))
    return OOFTable.from_records(rows)


def test_report_written_self_contained_with_tables(tmp_path):
    from training.shap_analysis import ShapResult

    oof = synthetic_oof()
    shap = ShapResult({"image": 0.6, "clinical": 0.3, "lab": 0.1},
                      {"image": 0.6, "clinical": 0.3, "lab": 0.1}, ["i0", "age", "tc"],
                      np.array([0.6, 0.3, 0.1]), np.zeros((2, 3)), 0.0, "deep",
                      {"image": (0, 1), "clinical": (1, 2), "lab": (2, 3)})
    cam = np.zeros((32, 48, 3), dtype=np.uint8)
    cam[..., 0] = 200
    data = ReportData(oof=oof, run_info={"backbone": "convnext_tiny", "epochs": 3, "folds": 5},
                      thresholds={"image": 0.5}, excluded=[("1.2.999", "no usable ROI (no SEG)")],
                      shap=shap, cam_images=[("P001 Grad-CAM", cam)], n_boot=100,
                      fold_info=[{"fold": 0, "best_epoch": 2, "val_auc": 0.8}])
    out = write_report(tmp_path, data)
    page = out.html.read_text()
    md = out.markdown.read_text()
    # self-contained: every src is a data URI, no external stylesheet or script
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "<script" not in page and "http" not in page
    for text in (*M.TABLE_ROWS, "image+clinical+lab", "convnext_tiny", "1.2.999",
                 "no usable ROI (no SEG)", "Per-vendor breakdown", "alpha", "beta",
                 "SHAP contribution per modality", "P001 Grad-CAM", "Reliability diagram",
                 "Mean ± SD over folds", "Between-combination DeLong", "Precision-recall"):
        assert text in page, text
        assert text in md, text
    assert "| image | 0.6000 | 60.0% |" in md and "Mean \\|SHAP\\|" in md  # pipes escaped
    # markdown links to PNGs that exist
    for link in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (tmp_path / link).is_file()
    # the table shows the summaries that the report returns, recomputable from the OOF table
    s = out.summaries["image"]
    assert s.at_threshold.threshold == 0.5
    again = M.evaluate_oof(oof.select(modalities="image"), threshold=0.5, n_boot=0)["image"]
    assert again.auc.auc == pytest.approx(s.auc.auc)
    assert f"{s.auc.auc:.3f} ({s.auc.ci_low:.3f}-{s.auc.ci_high:.3f})" in page
    youden = out.summaries["image+clinical+lab"].at_threshold.threshold
    agg = M.aggregate(oof.select(modalities="image+clinical+lab"))
    assert youden == M.youden_threshold(agg.labels, agg.scores)
    assert set(out.image_summaries) == {"image", "image+clinical+lab"}


def test_regression_report(tmp_path):
    oof = synthetic_oof(combos=("image",), target="regression")
    out = write_report(tmp_path, ReportData(oof=oof, target="regression", n_boot=0))
    page = out.html.read_text()
    assert "Lin&#x27;s CCC" in page or "Lin's CCC" in page
    assert out.regression["image"]["ccc"] > 0.5
    assert "Excluded studies (0)" in page


def test_report_with_one_class_only(tmp_path):
    rows = [dict(participant_id=f"P{i}", study_instance_uid=f"1.{i}", fold=0, label=0,
                 probability=0.2) for i in range(5)]
    out = write_report(tmp_path, ReportData(oof=OOFTable.from_records(rows), n_boot=0))
    assert "one class only" in out.html.read_text() and out.summaries == {}


def test_optimistic_selection_small_vendors_and_learning_curves_are_shown(tmp_path) -> None:  # noqa: ANN001
    from tests.training.test_metrics import _oof_rows
    from training.oof import OOFTable
    from training.report import ReportData, write_report

    hist = [[{"epoch": e, "train_loss": 1.0 / (e + 1), "val_score": 0.5 + 0.1 * e}
             for e in range(3)] for _ in range(5)]
    out = write_report(tmp_path, ReportData(oof=OOFTable.from_records(_oof_rows()), n_boot=0,
                                            selection="optimistic", histories={"image": hist}))
    md = out.markdown.read_text()
    assert "Optimistic cross-validation" in md
    assert "Learning curves (image)" in md
    # each vendor holds 7-8 positive participants: flagged
    assert md.count("positives (< 10), not interpretable") == 2
