"""The participant table follows the paper's Table 1 and ranks its signals as the paper did."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training.awgs import derive_awgs
from training.synth_cohort import (
    DEFAULT_PREVALENCE,
    PAPER_MISSING_FRACTION,
    PAPER_PREVALENCE,
    PAPER_RATES,
    PAPER_TABLE1,
    draw_cohort,
    draw_participant,
    feature_vectors,
)


@pytest.fixture(scope="module")
def cohort():
    return draw_cohort(seed=11, participants=600)


@pytest.fixture(scope="module")
def large():
    return draw_cohort(seed=23, participants=4000)


def _median(cohort, name: str, label: int) -> float:
    return float(np.median([p.values[name] for p in cohort
                            if p.label == label and p.values[name] is not None]))


def test_prevalence_and_missing_fraction(large) -> None:
    labels = np.array([p.label for p in large])
    assert abs(labels.mean() - PAPER_PREVALENCE) <= 0.1 * PAPER_PREVALENCE
    # every prefix holds the prevalence within one participant (small cohorts: both classes)
    for n in (5, 12, 40):
        assert abs(labels[:n].sum() - DEFAULT_PREVALENCE * n) <= 1.0
    incomplete = np.mean([any(v is None for v in p.values.values()) for p in large])
    assert abs(incomplete - PAPER_MISSING_FRACTION) <= 0.1 * PAPER_MISSING_FRACTION


@pytest.mark.parametrize("name", sorted(PAPER_TABLE1))
def test_class_medians_within_ten_percent_of_table_1(large, name: str) -> None:
    for label in (0, 1):
        paper = PAPER_TABLE1[name][label][0]
        assert abs(_median(large, name, label) - paper) <= 0.1 * paper, (name, label)


@pytest.mark.parametrize("name", sorted(PAPER_RATES))
def test_rates_within_ten_percent_of_table_1(large, name: str) -> None:
    for label in (0, 1):
        people = [p for p in large if p.label == label]
        if name == "male":
            got = np.mean([p.values["sex"] == "M" for p in people])
        else:
            got = np.mean([p.values[name] for p in people if p.values[name] is not None])
        paper = PAPER_RATES[name][label]
        assert abs(got - paper) <= 0.1 * paper, (name, label, got)


def _cv_auc(X: np.ndarray, y: np.ndarray) -> float:
    model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                          LogisticRegression(max_iter=2000))
    prob = cross_val_predict(model, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                             method="predict_proba")[:, 1]
    return float(roc_auc_score(y, prob))


def test_signals_rank_as_in_the_paper() -> None:
    """On 2,000 participants: image oracle > clinical (0.78 +- 0.04) > laboratory (0.65 +- 0.04)."""
    people = draw_cohort(seed=2025, participants=2000)
    y = np.array([p.label for p in people])
    vectors = [feature_vectors(p) for p in people]
    clinical = np.array([[np.nan if v is None else v for v in c] for c, _ in vectors])
    lab = np.array([[np.nan if v is None else v for v in m] for _, m in vectors])
    auc_clinical, auc_lab = _cv_auc(clinical, y), _cv_auc(lab, y)
    auc_image = float(roc_auc_score(y, [p.latent for p in people]))
    assert 0.74 <= auc_clinical <= 0.82, auc_clinical
    assert 0.61 <= auc_lab <= 0.69, auc_lab
    assert 0.83 <= auc_image <= 0.86, auc_image
    assert auc_image > auc_clinical > auc_lab


def test_awgs_measurements_reproduce_the_label(cohort) -> None:
    for p in cohort:
        assert derive_awgs(p.values, p.participant_id).label == p.label


def test_feature_vectors_have_the_papers_dimensions(cohort) -> None:
    clinical, lab = feature_vectors(cohort[0])
    assert len(clinical) == 8 and len(lab) == 14
    assert clinical[3] in (0.0, 1.0)  # sex


def test_participants_are_deterministic_per_seed() -> None:
    assert draw_participant(3, 17) == draw_participant(3, 17)
    assert draw_participant(3, 17).values != draw_participant(4, 17).values
