"""The training/evaluation report beside the model: self-contained ``report.html`` + ``report.md``.

Why from the out-of-fold table: every number and plot is recomputed from ``oof.csv`` (the same
predictions the threshold was chosen on), so the report cannot drift from the artifact.
``report.html`` embeds its PNGs as base64 data URIs (it can be mailed or archived alone);
``report.md`` links the same PNGs written to ``report_files/``.

Contents: run settings (backbone, epoch budget, ...), the paper's Table 2 per modality combination
(participant and image level), ROC curves per fold and pooled, pooled ROC per combination,
confusion matrix, calibration plot, per-vendor breakdown, SHAP modality contributions (when
given), Grad-CAM samples (caller supplies RGB arrays), the studies excluded with reasons.
Regression runs get MAPE / Lin's CCC and a scatter plot instead of the classification parts.

API::

    data = ReportData(oof=table, run_info={"backbone": "convnext_tiny", "epochs": 3, ...},
                      thresholds={"image": 0.41}, excluded=[("1.2.3", "no SEG")],
                      shap=shap_result, cam_images=[("P001 fold 0", rgb_uint8)])
    out = write_report(model_dir, data) -> ReportOutput(html, markdown, summaries, image_summaries)
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import metrics as M
from training.oof import OOFTable

log = logging.getLogger(__name__)

MIN_SUBGROUP_POSITIVES = 10  # below this a subgroup's sensitivity/AUC is flagged as noise


@dataclass
class ReportData:
    """Everything the report shows; only ``oof`` is required.

    Attributes:
        oof: out-of-fold (or external-validation) predictions, possibly several combinations.
        title: page title.
        run_info: settings shown first (backbone, epoch budget, folds, seed, device, timings...).
        thresholds: combination -> decision threshold (model.json's); missing -> Youden's J.
        primary: combination for the per-fold ROC, confusion matrix, calibration and per-vendor
            parts (default: the last combination, i.e. the richest in the usual order).
        level / rule: unit of analysis (participant by default, as the paper) and pooling rule.
        target: "binary" or "regression".
        n_boot / seed: bootstrap CIs.
        excluded: (study or participant id, reason) for every study left out.
        shap: a ``training.shap_analysis.ShapResult`` or its ``to_dict()``; None if not multimodal.
        cam_images: (caption, RGB uint8 (H, W, 3)) Grad-CAM overlays.
        fold_info: per-fold rows (e.g. {"fold": 0, "best_epoch": 12, "val_auc": 0.81}).
        notes: free paragraphs appended at the end.
        selection: "nested" (epochs selected on inner validation splits: the OOF predictions are
            untouched) or "optimistic" (selected on the reported folds; labelled so); "" for
            external validation.
        histories: combination -> per-fold per-epoch history (learning curves).
        operating_point: model.json's decision (threshold, level, rule, expected sens/spec).
        calibration: model.json's calibration table (method, candidates' Brier/ECE).
    """

    oof: OOFTable
    title: str = "dicom-node SARCO training report"
    run_info: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, float] | None = None
    primary: str | None = None
    level: M.Level = "participant"
    rule: M.Rule = "mean"
    target: str = "binary"
    n_boot: int = 1000
    seed: int = 0
    excluded: Sequence[tuple[str, str]] = ()
    shap: Any = None
    cam_images: Sequence[tuple[str, np.ndarray]] = ()
    fold_info: Sequence[Mapping[str, Any]] = ()
    notes: Sequence[str] = ()
    selection: str = ""
    histories: Mapping[str, Sequence[Sequence[Mapping[str, float]]]] = field(default_factory=dict)
    operating_point: Mapping[str, Any] | None = None
    calibration: Mapping[str, Any] | None = None


@dataclass
class ReportOutput:
    """Paths written and the summaries computed (reuse them for model.json's cv_metrics)."""

    html: Path
    markdown: Path
    summaries: dict[str, M.MetricsSummary]
    image_summaries: dict[str, M.MetricsSummary]
    regression: dict[str, dict[str, float]]


class _Doc:
    """Builds the HTML and markdown bodies side by side."""

    def __init__(self, files_dir: Path) -> None:
        self.html: list[str] = []
        self.md: list[str] = []
        self.files_dir = files_dir
        self.n_fig = 0

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def table(self, rows: Sequence[Sequence[Any]]) -> None:
        head, *body = [[str(c) for c in r] for r in rows]
        t = ["<table><thead><tr>", *(f"<th>{html.escape(c)}</th>" for c in head),
             "</tr></thead><tbody>"]
        for r in body:
            t += ["<tr>", *(f"<td>{html.escape(c)}</td>" for c in r), "</tr>"]
        t.append("</tbody></table>")
        self.html.append("".join(t))
        self.md.append(M.markdown_table([head, *body]) + "\n")

    def figure(self, fig: Any, caption: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        self.png(buf.getvalue(), caption)

    def png(self, data: bytes, caption: str) -> None:
        self.n_fig += 1
        name = f"fig{self.n_fig:02d}.png"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        (self.files_dir / name).write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        self.html.append(f'<figure><img alt="{html.escape(caption)}" '
                         f'src="data:image/png;base64,{b64}"/><figcaption>'
                         f"{html.escape(caption)}</figcaption></figure>")
        self.md.append(f"![{caption}]({self.files_dir.name}/{name})\n")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
        "text-align:left}th{background:#eee}figure{display:inline-block;margin:.5em}"
        "img{max-width:520px}.warn{color:#a00}")


def write_report(run_dir: Path, data: ReportData) -> ReportOutput:
    """Write ``report.html``, ``report.md`` and ``report_files/*.png`` into ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot import
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = _Doc(run_dir / "report_files")
    for old in doc.files_dir.glob("fig*.png"):  # a re-run must not leave stale figures behind
        old.unlink()
    doc.h(1, data.title)
    doc.p("Research use only. Every figure and number below is recomputed from the out-of-fold "
          "predictions stored in oof.csv.")
    if data.selection == "optimistic":
        doc.p("**Optimistic cross-validation**: each fold's epoch was selected on the same "
              "validation fold whose predictions are reported below, and the threshold was tuned "
              "on them; the numbers overstate what a new cohort will show.")
    elif data.selection == "nested":
        doc.p("Nested selection: each fold's epoch was selected, and its calibrator fitted, on an "
              "inner validation split of that fold's training participants; the out-of-fold "
              "predictions below were made once by the selected model and never tuned on. Only "
              "the threshold is chosen on them (Youden's J), so sensitivity/specificity at it are "
              "mildly optimistic.")
    if data.run_info:
        doc.h(2, "Run")
        doc.table([["Setting", "Value"], *([k, _fmt(v)] for k, v in data.run_info.items())])
    if data.fold_info:
        keys = list(dict.fromkeys(k for r in data.fold_info for k in r))
        doc.table([keys, *([_fmt(r.get(k, "")) for k in keys] for r in data.fold_info)])

    combos = data.oof.combinations()
    summaries: dict[str, M.MetricsSummary] = {}
    image_summaries: dict[str, M.MetricsSummary] = {}
    regression: dict[str, dict[str, float]] = {}
    if not combos:
        doc.p("No predictions: nothing to evaluate.")
    elif data.target == "regression":
        regression = _regression_section(doc, data, combos)
    else:
        summaries, image_summaries = _classification_section(doc, data, combos)

    if data.shap is not None:
        _shap_section(doc, data.shap)
    if data.cam_images:
        doc.h(2, "Grad-CAM samples")
        for caption, img in data.cam_images:
            doc.png(_png_bytes(img), caption)
    doc.h(2, f"Excluded studies ({len(data.excluded)})")
    if data.excluded:
        doc.table([["Study / participant", "Reason"], *([a, b] for a, b in data.excluded)])
    else:
        doc.p("None: every study had a usable image and ROI.")
    for n in data.notes:
        doc.p(n)

    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}"
            f"</title><style>{_CSS}</style></head><body>{''.join(doc.html)}</body></html>")
    _atomic_write(html_path, page)
    _atomic_write(md_path, "\n".join(doc.md))
    log.info("report written to %s (%d figures)", html_path, doc.n_fig)
    return ReportOutput(html_path, md_path, summaries, image_summaries, regression)


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _classification_section(doc: _Doc, data: ReportData, combos: list[str]
                            ) -> tuple[dict[str, M.MetricsSummary], dict[str, M.MetricsSummary]]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    thr = dict(data.thresholds or {})
    summaries: dict[str, M.MetricsSummary] = {}
    aggs: dict[str, M.Aggregated] = {}
    skipped: list[str] = []
    for c in combos:
        agg = M.aggregate(data.oof.select(modalities=c), data.level, data.rule)
        if len(set(agg.labels.tolist())) < 2:
            skipped.append(c)
            continue
        aggs[c] = agg
        summaries[c] = M.evaluate(agg.labels, agg.scores, thr.get(c), agg.participant_ids,
                                  data.n_boot, data.seed, data.level)
    image_summaries: dict[str, M.MetricsSummary] = {}
    if data.level != "image":
        for c in aggs:
            img = M.aggregate(data.oof.select(modalities=c), "image")
            image_summaries[c] = M.evaluate(img.labels, img.scores, summaries[c].at_threshold
                                            .threshold, img.participant_ids, data.n_boot,
                                            data.seed, "image")
    if skipped:
        doc.p(f"Not evaluated (one class only): {', '.join(skipped)}")
    if not summaries:
        return summaries, image_summaries

    doc.h(2, f"Metrics per modality combination ({data.level} level)")
    doc.p("AUC with DeLong 95% CI; sensitivity, specificity, accuracy and F1 in % at the model's "
          "threshold (Youden's J on the out-of-fold predictions unless given), bootstrap 95% CI "
          "over participants in brackets.")
    doc.table(M.metrics_table(summaries))
    if image_summaries:
        doc.h(3, "Image level (same thresholds)")
        doc.table(M.metrics_table(image_summaries))

    _paper_conventions(doc, data, aggs, summaries)

    fig, ax = plt.subplots(figsize=(5, 5))
    for c, agg in aggs.items():
        fpr, tpr, _ = roc_curve(agg.labels, agg.scores)
        ax.plot(fpr, tpr, label=f"{c} (AUC {summaries[c].auc.auc:.3f})")
    _roc_axes(ax, "Pooled out-of-fold ROC per combination")
    doc.figure(fig, "Pooled ROC per modality combination")

    primary = data.primary if data.primary in aggs else list(aggs)[-1]
    agg, s = aggs[primary], summaries[primary]
    doc.h(2, f"Model {primary}")
    fig, ax = plt.subplots(figsize=(5, 5))
    for k in sorted(set(agg.folds.tolist())):
        m = agg.folds == k
        if len(set(agg.labels[m].tolist())) == 2:
            fpr, tpr, _ = roc_curve(agg.labels[m], agg.scores[m])
            auc_k = M.delong_auc(agg.labels[m], agg.scores[m]).auc
            ax.plot(fpr, tpr, alpha=0.6, lw=1, label=f"fold {k} (AUC {auc_k:.3f})")
    fpr, tpr, _ = roc_curve(agg.labels, agg.scores)
    ax.plot(fpr, tpr, color="k", lw=2, label=f"pooled (AUC {s.auc.auc:.3f})")
    _roc_axes(ax, f"ROC per fold and pooled: {primary}")
    doc.figure(fig, f"ROC per fold and pooled ({primary})")

    b = s.at_threshold
    fig, ax = plt.subplots(figsize=(4, 4))
    cm = np.array([[b.tn, b.fp], [b.fn, b.tp]])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black", fontsize=14)
    ax.set_xticks([0, 1], ["no sarcopenia", "sarcopenia"])
    ax.set_yticks([0, 1], ["no sarcopenia", "sarcopenia"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix at threshold {b.threshold:.3f}")
    doc.figure(fig, f"Confusion matrix ({primary})")

    from sklearn.metrics import average_precision_score, precision_recall_curve

    prec, rec, _ = precision_recall_curve(agg.labels, agg.scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ap = average_precision_score(agg.labels, agg.scores)
    ax.plot(rec, prec, label=f"{primary} (AP {ap:.3f})")
    ax.axhline(float(agg.labels.mean()), color="k", ls="--", lw=1, label="prevalence")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall (pooled out-of-fold)")
    ax.legend(loc="lower left")
    doc.figure(fig, f"Precision-recall curve ({primary})")

    from training.calibration import brier, expected_calibration_error, reliability_bins

    prob = np.clip(agg.scores, 0, 1)
    n_bins = 10 if len(prob) >= 50 else max(2, len(prob) // 5)
    bins = reliability_bins(agg.labels, prob, n_bins)
    ece = expected_calibration_error(agg.labels, prob, n_bins)
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-",
            label=f"{primary} (ECE {ece:.3f})")
    ax.set_ylabel("observed fraction with sarcopenia")
    ax.set_title(f"Reliability diagram ({len(bins)} equal-count bins)")
    ax.legend(loc="upper left")
    axh.hist(prob, bins=20, range=(0, 1), color="grey")
    axh.set_xlabel("predicted probability")
    axh.set_ylabel("cases")
    doc.figure(fig, f"Reliability diagram ({primary})")
    doc.p(f"Brier score {brier(agg.labels, prob):.4f}; expected calibration error (ECE, "
          f"{len(bins)} equal-count bins) {ece:.4f}; mean probability {prob.mean():.3f} vs "
          f"prevalence {agg.labels.mean():.3f}.")
    if data.calibration:
        cands = data.calibration.get("candidates") or {}
        doc.p(f"Calibration: {data.calibration.get('method')} per fold, fitted on "
              f"{data.calibration.get('fitted_on')}"
              + ("; candidates (study-level Brier / ECE of the calibrated out-of-fold "
                 "predictions): " + ", ".join(f"{k} {v['brier_study']:.4f} / {v['ece_study']:.4f}"
                                              for k, v in cands.items()) if cands else "") + ".")
    op = data.operating_point
    if op and op.get("expected"):
        e = op["expected"]
        doc.p(f"Operating point served by the node: threshold {op['threshold']:.4f} on "
              f"{op.get('level')}-level {op.get('rule')}-pooled calibrated probabilities; "
              f"expected sensitivity {M.fmt_pct(e.get('sensitivity', float('nan')))} %, "
              f"specificity {M.fmt_pct(e.get('specificity', float('nan')))} % "
              f"(out-of-fold, n = {int(e.get('n', 0))}).")

    doc.h(3, "Per-vendor breakdown")
    rows = [["Vendor", "n (pos/neg)", "AUC (95% CI)", "Sensitivity", "Specificity", "Accuracy",
             "Note"]]
    for v in sorted(set(agg.vendors)):
        m = np.array([x == v for x in agg.vendors])
        y, p = agg.labels[m], agg.scores[m]
        npos = int(y.sum())
        auc = "n/a (one class)"
        if 0 < npos < len(y):
            a = M.delong_auc(y, p)
            auc = f"{a.auc:.3f} ({a.ci_low:.3f}-{a.ci_high:.3f})"
        bm = M.binary_metrics(y, p, b.threshold)
        rows.append([v or "(unknown)", f"{len(y)} ({npos}/{len(y) - npos})", auc,
                     M.fmt_pct(bm.sensitivity), M.fmt_pct(bm.specificity),
                     M.fmt_pct(bm.accuracy),
                     f"warning: {npos} positives (< {MIN_SUBGROUP_POSITIVES}), not interpretable"
                     if npos < MIN_SUBGROUP_POSITIVES else ""])
    doc.table(rows)
    _learning_curves(doc, data)
    return summaries, image_summaries


def _paper_conventions(doc: _Doc, data: ReportData, aggs: Mapping[str, M.Aggregated],
                       summaries: Mapping[str, M.MetricsSummary]) -> None:
    """Mean +- SD over folds (the paper's convention) next to the pooled values, and the
    between-combination DeLong tests on common participants."""
    doc.h(3, "Mean ± SD over folds (the paper's convention) vs pooled out-of-fold")
    rows = [["Combination", "Metric", "mean ± SD over folds", "pooled"]]
    for c, agg in aggs.items():
        fs = M.fold_summary(agg, summaries[c].at_threshold.threshold)
        pooled = summaries[c]
        for name in M.FOLD_METRICS:
            mean, sd, n = fs[name]
            pv = pooled.auc.auc if name == "auc" else getattr(pooled.at_threshold, name)
            fmt = (lambda v: f"{v:.3f}") if name == "auc" else M.fmt_pct
            rows.append([c, name, f"{fmt(mean)} ± {fmt(sd) if sd == sd else 'n/a'} ({n} folds)",
                         fmt(pv)])
    doc.table(rows)
    doc.p("F1 (binary) counts sarcopenia as the positive class; F1 (macro) averages both classes' "
          "F1 (the paper's internal-validation F1 values are macro-F1). Image-level AUC CIs "
          "resample participants (cluster bootstrap), since images of one person are not "
          "independent.")
    if len(aggs) > 1:
        tests = M.delong_between(data.oof, list(aggs), data.level, data.rule)
        doc.h(3, "Between-combination DeLong tests (paired, common participants)")
        rows = [["A", "B", "n", "AUC A", "AUC B", "A - B", "P"]]
        rows += [[t["a"], t["b"], str(t["n"]), f"{t['auc_a']:.3f}", f"{t['auc_b']:.3f}",
                  f"{t['difference']:+.3f}", f"{t['p_value']:.3g}"] for t in tests]
        doc.table(rows)


def _learning_curves(doc: _Doc, data: ReportData) -> None:
    """Training loss and selection score per epoch and fold, from the stored history."""
    import matplotlib.pyplot as plt

    if not data.histories:
        return
    doc.h(3, "Learning curves")
    for combo, folds in data.histories.items():
        if not any(folds):
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for k, hist in enumerate(folds):
            ep = [h["epoch"] + 1 for h in hist]
            a1.plot(ep, [h["train_loss"] for h in hist], label=f"fold {k}")
            score = [h["val_score"] if h["val_score"] > -1e8 else np.nan for h in hist]
            a2.plot(ep, score, label=f"fold {k}")
        a1.set_xlabel("epoch")
        a1.set_ylabel("training loss")
        a2.set_xlabel("epoch")
        a2.set_ylabel("selection AUC" + (" (inner validation)" if data.selection == "nested"
                                         else ""))
        a2.legend(fontsize=7)
        fig.suptitle(f"Learning curves: {combo}")
        doc.figure(fig, f"Learning curves ({combo})")


def _regression_section(doc: _Doc, data: ReportData, combos: list[str]
                        ) -> dict[str, dict[str, float]]:
    import matplotlib.pyplot as plt

    out: dict[str, dict[str, float]] = {}
    doc.h(2, f"Regression metrics ({data.level} level)")
    rows = [["Model", "n", "MAPE (%)", "Lin's CCC", "MAE", "Pearson r"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in combos:
        agg = M.aggregate(data.oof.select(modalities=c), data.level, data.rule)
        r = M.regression_metrics(agg.labels, agg.scores)
        out[c] = r
        rows.append([c, str(len(agg.labels)), f"{r['mape']:.2f}", f"{r['ccc']:.3f}",
                     f"{r['mae']:.3f}", f"{r['pearson_r']:.3f}"])
        ax.scatter(agg.labels, agg.scores, s=12, alpha=0.6, label=c)
    lim = [float(ax.get_xlim()[0]), float(ax.get_xlim()[1])]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("measured")
    ax.set_ylabel("predicted")
    ax.legend()
    doc.table(rows)
    doc.figure(fig, "Predicted vs measured")
    return out


def _shap_section(doc: _Doc, shap: Any) -> None:
    import matplotlib.pyplot as plt

    d = shap.to_dict() if hasattr(shap, "to_dict") else dict(shap)
    share, contrib = d.get("share", {}), d.get("contribution", {})
    doc.h(2, "SHAP contribution per modality")
    doc.p(f"Mean over explained cases of the summed |SHAP| of each modality's inputs "
          f"({d.get('method', '?')} explainer, logit units).")
    doc.table([["Modality", "Mean |SHAP| (sum over block)", "Share"],
               *([m, f"{contrib.get(m, float('nan')):.4f}", f"{100 * share.get(m, 0):.1f}%"]
                 for m in contrib)])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.barh(list(share), [100 * v for v in share.values()], color="tab:blue")
    ax.set_xlabel("share of total |SHAP| (%)")
    ax.invert_yaxis()
    doc.figure(fig, "SHAP contribution per modality")
    feats = d.get("features") or {}
    rows = [["Modality", "Feature", "Mean |SHAP|"]]
    for m, fs in feats.items():
        if m == "image":
            continue
        rows += [[m, k, f"{v:.4f}"] for k, v in fs.items()]
    if len(rows) > 1:
        doc.table(rows)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _roc_axes(ax: Any, title: str) -> None:
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _atomic_write(path: Path, text: str) -> None:
    from inference.durable import write_durable

    write_durable(path, text.encode("utf-8"))
