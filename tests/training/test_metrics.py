"""DeLong, thresholds, bootstrap and aggregation against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from training import metrics as M
from training.oof import OOFTable, read_oof, write_oof


def _structural_components(y, s):
    """Direct O(n*m) DeLong (1988): V10 per positive, V01 per negative, psi = 1, 1/2, 0."""
    y = np.asarray(y)
    x, z = np.asarray(s)[y == 1], np.asarray(s)[y == 0]
    psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
    return psi.mean(axis=1), psi.mean(axis=0), psi.mean()


def _direct_cov(y, sa, sb):
    v10a, v01a, auc_a = _structural_components(y, sa)
    v10b, v01b, auc_b = _structural_components(y, sb)
    m, n = len(v10a), len(v01a)
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    return auc_a, auc_b, s10 / m + s01 / n


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 150)
    a = y * 0.8 + rng.normal(size=150)
    b = 0.5 * a + y * 0.2 + rng.normal(size=150)
    # ties on purpose: rounded scores
    return y, np.round(a, 1), np.round(b, 1)


def test_delong_auc_matches_sklearn_and_direct_variance(data):
    y, a, _ = data
    r = M.delong_auc(y, a)
    assert r.auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    _, _, cov = _direct_cov(y, a, a)
    assert r.variance == pytest.approx(cov[0, 0], rel=1e-10)
    half = 1.959963984540054 * np.sqrt(cov[0, 0])
    assert r.ci_low == pytest.approx(r.auc - half) and r.ci_high == pytest.approx(r.auc + half)
    assert (r.n_pos, r.n_neg) == (int(y.sum()), int((1 - y).sum()))


def test_delong_variance_close_to_bootstrap(data):
    y, a, _ = data
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = []
    for _ in range(2000):  # stratified bootstrap: the DeLong variance is conditional on m, n
        xp, xn = a[rng.choice(pos, len(pos))], a[rng.choice(neg, len(neg))]
        # Mann-Whitney AUC by counting (what roc_auc_score computes, ~20x faster here)
        boots.append(((xp[:, None] > xn).sum() + 0.5 * (xp[:, None] == xn).sum())
                     / (len(xp) * len(xn)))
    assert M.delong_auc(y, a).variance == pytest.approx(np.var(boots), rel=0.2)


def test_paired_test_matches_direct_computation(data):
    y, a, b = data
    t = M.delong_test_paired(y, a, b)
    auc_a, auc_b, cov = _direct_cov(y, a, b)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (auc_a - auc_b) / np.sqrt(var)
    assert t.auc_a == pytest.approx(auc_a) and t.auc_b == pytest.approx(auc_b)
    assert t.variance == pytest.approx(var, rel=1e-10)
    assert t.z == pytest.approx(z, rel=1e-10)
    assert t.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-10)
    assert t.paired


def test_paired_test_hand_worked_example():
    # 3 positives, 3 negatives.  A: pos 0.9 0.8 0.4, neg 0.5 0.3 0.2;  B: pos 0.6 0.7 0.2, neg 0.5 0.4 0.3
    y = [1, 1, 1, 0, 0, 0]
    a = [0.9, 0.8, 0.4, 0.5, 0.3, 0.2]
    b = [0.6, 0.7, 0.2, 0.5, 0.4, 0.3]
    # A: V10 = (1, 1, 2/3), V01 = (2/3, 1, 1), AUC = 8/9
    # B: V10 = (1, 1, 0),   V01 = (2/3, 2/3, 2/3), AUC = 6/9
    # S10: var_A = 1/27, var_B = 1/3, cov = 1/9;  S01: var_A = 1/27, var_B = 0, cov = 0
    # var(A-B) = (1/27 + 1/3 - 2/9)/3 + (1/27)/3 = (4/27)/3 + (1/27)/3 = 5/81
    t = M.delong_test_paired(y, a, b)
    assert t.auc_a == pytest.approx(8 / 9) and t.auc_b == pytest.approx(6 / 9)
    assert t.variance == pytest.approx(5 / 81)
    z = (2 / 9) / np.sqrt(5 / 81)  # = 2/sqrt(5) = 0.894
    assert t.z == pytest.approx(z)
    assert t.p_value == pytest.approx(0.371093, abs=1e-5)  # 2*(1-Phi(0.8944))


def test_unpaired_test_adds_variances(data):
    y, a, b = data
    t = M.delong_test_unpaired(y[:80], a[:80], y[80:], b[80:])
    va, vb = M.delong_auc(y[:80], a[:80]), M.delong_auc(y[80:], b[80:])
    assert t.variance == pytest.approx(va.variance + vb.variance)
    assert t.p_value == pytest.approx(2 * stats.norm.sf(abs(va.auc - vb.auc) / np.sqrt(t.variance)))
    assert not t.paired


def test_identical_models_p_is_one(data):
    y, a, _ = data
    assert M.delong_test_paired(y, a, a).p_value == 1.0


def test_one_class_rejected():
    with pytest.raises(ValueError, match="positive and one negative"):
        M.delong_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_youden_and_binary_metrics_recompute(data):
    y, a, _ = data
    thr = M.youden_threshold(y, a)
    fpr, tpr, t = roc_curve(y, a)
    assert thr in t and (tpr - fpr)[list(t).index(thr)] == pytest.approx(np.max(tpr - fpr))
    bm = M.binary_metrics(y, a, thr)
    pred = a >= thr
    assert bm.tp == int((pred & (y == 1)).sum()) and bm.tn == int((~pred & (y == 0)).sum())
    assert bm.sensitivity == pytest.approx(bm.tp / (y == 1).sum())
    assert bm.specificity == pytest.approx(bm.tn / (y == 0).sum())
    assert bm.accuracy == pytest.approx((pred == y).mean())
    assert bm.f1 == pytest.approx(f1_score(y, pred))
    assert bm.sensitivity + bm.specificity - 1 == pytest.approx(np.max(tpr - fpr))


def test_bootstrap_seeded_and_covers_point_estimate(data):
    y, a, _ = data
    groups = [f"p{i // 2}" for i in range(len(y))]
    ci1 = M.bootstrap_ci(y, a, 0.4, groups, n_boot=300, seed=3)
    ci2 = M.bootstrap_ci(y, a, 0.4, groups, n_boot=300, seed=3)
    ci3 = M.bootstrap_ci(y, a, 0.4, groups, n_boot=300, seed=4)
    assert ci1 == ci2 and ci1 != ci3
    bm = M.binary_metrics(y, a, 0.4)
    auc = roc_auc_score(y, a)
    assert ci1["auc"][0] < auc < ci1["auc"][1]
    for k in ("sensitivity", "specificity", "accuracy", "f1"):
        assert ci1[k][0] <= getattr(bm, k) <= ci1[k][1], k


def _oof_rows():
    rows = []
    rng = np.random.default_rng(1)
    for p in range(30):
        lab = p % 2
        for img in range(3):
            rows.append(dict(participant_id=f"P{p}", study_instance_uid=f"1.2.{p}",
                             sop_instance_uid=f"1.2.{p}.{img}", frame_number=1, fold=p % 5,
                             label=lab, probability=float(np.clip(0.3 + 0.3 * lab
                                                                  + rng.normal(0, 0.2), 0, 1)),
                             vendor="A" if p < 15 else "B", modalities="image"))
    return rows


def test_aggregation_and_oof_roundtrip(tmp_path):
    table = OOFTable.from_records(_oof_rows())
    path = write_oof(tmp_path, table)
    back = read_oof(tmp_path)
    assert path.name == "oof.csv" and len(back) == 90
    y0, p0 = table.arrays()
    y1, p1 = back.arrays()
    assert np.array_equal(y0, y1) and np.array_equal(p0, p1)  # repr() keeps full precision
    img = M.aggregate(back, "image")
    part = M.aggregate(back, "participant")
    assert len(img.keys) == 90 and len(part.keys) == 30
    i = part.keys.index("P4")
    assert part.scores[i] == pytest.approx(np.mean([r["probability"] for r in _oof_rows()
                                                    if r["participant_id"] == "P4"]))
    # the stored predictions reproduce the summary exactly
    s = M.evaluate_oof(back, level="participant", n_boot=50)["image"]
    thr = M.youden_threshold(part.labels, part.scores)
    assert s.at_threshold.threshold == thr
    assert s.auc.auc == pytest.approx(roc_auc_score(part.labels, part.scores))


def test_participant_with_changed_label_is_split():
    rows = _oof_rows()
    rows[0] = {**rows[0], "study_instance_uid": "follow", "label": 1}
    agg = M.aggregate(OOFTable.from_records(rows), "participant")
    assert len(agg.keys) == 31 and "P0/label=1" in agg.keys


def test_metrics_table_has_paper_rows():
    table = OOFTable.from_records(_oof_rows())
    s = M.evaluate_oof(table, n_boot=20)
    rows = M.metrics_table(s)
    assert [r[0] for r in rows[1:7]] == list(M.TABLE_ROWS)
    assert rows[0] == ["Metric", "image"]
    md = M.metrics_table_markdown(s)
    assert md.startswith("| Metric | image |") and "AUC (95% CI)" in md


def test_regression_metrics():
    y = np.array([5.0, 6.0, 7.0, 8.0])
    assert M.mape(y, y * 1.1) == pytest.approx(10.0)
    assert M.lins_ccc(y, y) == pytest.approx(1.0)
    # CCC penalises a shift that Pearson ignores: 2*var/(2*var + 1) with var = 1.25
    assert M.lins_ccc(y, y + 1) == pytest.approx(2.5 / 3.5)
    with pytest.raises(ValueError):
        M.mape([0.0, 1.0], [1.0, 1.0])
    r = M.regression_metrics(y, y + 0.5)
    assert r["mae"] == pytest.approx(0.5) and r["pearson_r"] == pytest.approx(1.0)


def test_macro_f1_and_fold_mean_sd_by_hand():
    y = np.array([1, 1, 0, 0, 0, 1])
    p = np.array([0.9, 0.4, 0.2, 0.6, 0.1, 0.7])
    b = M.binary_metrics(y, p, 0.5)
    assert b.macro_f1 == pytest.approx(f1_score(y, p >= 0.5, average="macro"))
    assert b.f1 == pytest.approx(f1_score(y, p >= 0.5))
    agg = M.aggregate(OOFTable.from_records(_oof_rows()), "participant")
    fs = M.fold_summary(agg, 0.45)
    aucs = [roc_auc_score(agg.labels[agg.folds == k], agg.scores[agg.folds == k])
            for k in range(5)]
    assert fs["auc"][0] == pytest.approx(np.mean(aucs))
    assert fs["auc"][1] == pytest.approx(np.std(aucs, ddof=1)) and fs["auc"][2] == 5


def test_image_level_auc_ci_resamples_participants():
    """Three near-identical images per participant: a cluster CI is wider than DeLong's."""
    table = OOFTable.from_records(_oof_rows())
    img = M.aggregate(table, "image")
    s = M.evaluate(img.labels, img.scores, 0.45, img.participant_ids, 300, 0, "image")
    d = M.delong_auc(img.labels, img.scores)
    assert s.auc.ci_method == "participant-cluster bootstrap"
    assert (s.auc.ci_low, s.auc.ci_high) == pytest.approx(s.boot_ci["auc"])
    assert s.auc.auc == pytest.approx(d.auc)
    part = M.evaluate(img.labels, img.scores, 0.45, img.participant_ids, 0, 0, "participant")
    assert part.auc.ci_method == "delong"


def test_delong_between_combinations_on_common_participants():
    rows = _oof_rows()
    other = [{**r, "modalities": "clinical",
              "probability": 1 - r["probability"] if r["participant_id"] != "P0" else 0.5}
             for r in rows if r["participant_id"] != "P1"]
    table = OOFTable.from_records(rows + other)
    out = M.delong_between(table, ["image", "clinical"])
    assert len(out) == 1 and out[0]["n"] == 29  # P1 only in the image run
    a = M.aggregate(table.select(modalities="image"), "participant")
    keep = [i for i, k in enumerate(a.keys) if k != "P1"]
    assert out[0]["auc_a"] == pytest.approx(roc_auc_score(a.labels[keep], a.scores[keep]))
    assert out[0]["p_value"] < 0.05
