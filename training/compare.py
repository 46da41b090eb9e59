"""DeLong test between two runs' out-of-fold predictions.

Why paired by participant: two models evaluated on the same participants give correlated ROC
curves; the paired DeLong test uses that correlation (ignoring it overstates the variance of the
difference). Cases are matched by participant (or study/image with ``--level``); when the runs
share no case, the test falls back to the unpaired (independent samples) form and says so.

A run is a model dir holding ``oof.csv`` (see training/oof.py) or the csv itself. With several
modality combinations in one file, every combination present in both runs is compared, or pick
them with ``--a-combination`` / ``--b-combination`` (the same run may be given twice to compare
two combinations of one run, e.g. image vs image+clinical+lab).

API::

    compare_runs(oof_a, oof_b, combination_a=None, combination_b=None, level="participant",
                 alpha=0.95) -> list[Comparison]
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from training import metrics as M
from training.errors import TrainingError
from training.oof import OOFTable

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """One A-vs-B comparison: the two AUCs with CIs (on the cases used) and the DeLong test."""

    combination_a: str
    combination_b: str
    level: str
    auc_a: M.AUCResult
    auc_b: M.AUCResult
    test: M.DeLongTest
    n_matched: int
    n_only_a: int
    n_only_b: int

    def to_dict(self) -> dict:
        return asdict(self)


def _pairs(a: OOFTable, b: OOFTable, ca: str | None, cb: str | None) -> list[tuple[str, str]]:
    combos_a, combos_b = a.combinations(), b.combinations()
    for name, c, combos in (("A", ca, combos_a), ("B", cb, combos_b)):
        if c is not None and c not in combos:
            raise TrainingError(f"run {name} has no combination {c!r} (has {', '.join(combos)})")
    if ca or cb:
        ca = ca or (cb if cb in combos_a else combos_a[0] if len(combos_a) == 1 else None)
        cb = cb or (ca if ca in combos_b else combos_b[0] if len(combos_b) == 1 else None)
        if ca is None or cb is None:
            raise TrainingError("name both --a-combination and --b-combination")
        return [(ca, cb)]
    common = [c for c in combos_a if c in combos_b]
    if common:
        return [(c, c) for c in common]
    if len(combos_a) == 1 and len(combos_b) == 1:
        return [(combos_a[0], combos_b[0])]
    raise TrainingError(f"no common modality combination (A: {combos_a}, B: {combos_b}); "
                        "choose with --a-combination/--b-combination")


def compare_runs(oof_a: OOFTable, oof_b: OOFTable, combination_a: str | None = None,
                 combination_b: str | None = None, level: M.Level = "participant",
                 alpha: float = 0.95) -> list[Comparison]:
    """Paired DeLong test on the matched cases of two OOF tables (unpaired when none match)."""
    out = []
    for ca, cb in _pairs(oof_a, oof_b, combination_a, combination_b):
        ga = M.aggregate(oof_a.select(modalities=ca), level)
        gb = M.aggregate(oof_b.select(modalities=cb), level)
        ia = {k: i for i, k in enumerate(ga.keys)}
        ib = {k: i for i, k in enumerate(gb.keys)}
        common = [k for k in ga.keys if k in ib]
        if common:
            xa = np.array([ia[k] for k in common])
            xb = np.array([ib[k] for k in common])
            y = ga.labels[xa]
            if not np.array_equal(y, gb.labels[xb]):
                bad = [k for k, i, j in zip(common, xa, xb) if ga.labels[i] != gb.labels[j]]
                raise TrainingError(f"labels differ between the runs for {len(bad)} {level}(s), "
                                    f"e.g. {bad[0]}: not the same reference standard")
            test = M.delong_test_paired(y, ga.scores[xa], gb.scores[xb])
            auc_a = M.delong_auc(y, ga.scores[xa], alpha)
            auc_b = M.delong_auc(y, gb.scores[xb], alpha)
        else:
            log.warning("runs share no %s: unpaired DeLong test (independent samples)", level)
            test = M.delong_test_unpaired(ga.labels, ga.scores, gb.labels, gb.scores)
            auc_a = M.delong_auc(ga.labels, ga.scores, alpha)
            auc_b = M.delong_auc(gb.labels, gb.scores, alpha)
        out.append(Comparison(ca, cb, level, auc_a, auc_b, test, len(common),
                              len(ga.keys) - len(common), len(gb.keys) - len(common)))
    return out


def format_line(name: str, combo: str, a: M.AUCResult) -> str:
    return (f"  {name} [{combo}]: AUC {a.auc:.3f} (95% CI {a.ci_low:.3f}-{a.ci_high:.3f}), "
            f"n={a.n_pos + a.n_neg} ({a.n_pos} pos / {a.n_neg} neg)")
