"""`dicom-node compare`: matching of cases, paired/unpaired DeLong through the real CLI."""

from __future__ import annotations

import json

import pytest

from dicom_node.cli import main
from dicom_node.errors import TrainingError
from tests.training.test_report import synthetic_oof
from training import metrics as M
from training.compare import compare_runs
from training.oof import OOFTable, write_oof


@pytest.fixture(autouse=True)
def _no_config_file(tmp_path, monkeypatch):
    """Run the CLI where no config.toml exists: compare must work without one (defaults)."""
    monkeypatch.chdir(tmp_path)


def test_paired_compare_cli(tmp_path, capsys):
    a = synthetic_oof(seed=1, combos=("image",))
    b = synthetic_oof(seed=2, combos=("image",))
    # B misses two participants: they are left out of the paired test
    b = OOFTable([r for r in b.records if r.participant_id not in ("P000", "P001")])
    write_oof(tmp_path / "A", a)
    write_oof(tmp_path / "B", b)
    assert main(["compare", str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    out = capsys.readouterr().out
    ga, gb = M.aggregate(a), M.aggregate(b)
    keep = [i for i, k in enumerate(ga.keys) if k in gb.keys]
    order = [gb.keys.index(ga.keys[i]) for i in keep]
    t = M.delong_test_paired(ga.labels[keep], ga.scores[keep], gb.scores[order])
    assert f"p = {t.p_value:.4g}" in out
    assert "paired DeLong on 38 matched participants" in out
    assert "2 only in A, 0 only in B" in out
    ca = M.delong_auc(ga.labels[keep], ga.scores[keep])
    assert f"AUC {ca.auc:.3f} (95% CI {ca.ci_low:.3f}-{ca.ci_high:.3f})" in out


def test_two_combinations_of_one_run_json(tmp_path, capsys):
    write_oof(tmp_path, synthetic_oof())
    assert main(["compare", str(tmp_path), str(tmp_path / "oof.csv"), "--a-combination",
                 "image", "--b-combination", "image+clinical+lab", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 1 and res[0]["test"]["paired"] and res[0]["n_matched"] == 40
    assert res[0]["combination_b"] == "image+clinical+lab"


def test_disjoint_cohorts_use_unpaired_test():
    a = synthetic_oof(n_part=30, combos=("image",), seed=3)
    b = OOFTable.from_records(
        [{**vars(r), "participant_id": "X" + r.participant_id} for r in
         synthetic_oof(n_part=30, combos=("image",), seed=4).records])
    (r,) = compare_runs(a, b)
    assert not r.test.paired and r.n_matched == 0
    ga, gb = M.aggregate(a), M.aggregate(b)
    t = M.delong_test_unpaired(ga.labels, ga.scores, gb.labels, gb.scores)
    assert r.test.p_value == pytest.approx(t.p_value)


def test_conflicting_labels_and_missing_combination_are_errors(tmp_path):
    a = synthetic_oof(combos=("image",))
    b = OOFTable.from_records([{**vars(r), "label": 1 - r.label} for r in a.records])
    with pytest.raises(TrainingError, match="labels differ"):
        compare_runs(a, b)
    with pytest.raises(TrainingError, match="no combination 'lab'"):
        compare_runs(a, a, combination_a="lab")
    assert main(["compare", str(tmp_path / "nothing"), str(tmp_path)]) == 1
