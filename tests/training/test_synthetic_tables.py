"""The participant table follows its targets (no images: fast)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.awgs import derive_awgs
from training.synth_cohort import (
    CLINICAL_TARGETS,
    LAB_TARGETS,
    draw_cohort,
    draw_participant,
    feature_vectors,
)


@pytest.fixture(scope="module")
def cohort():
    return draw_cohort(seed=11, participants=600)


def _median(cohort, name: str, label: int) -> float:
    return float(np.median([p.values[name] for p in cohort
                            if p.label == label and p.values[name] is not None]))


def test_prevalence_and_missing_fraction(cohort) -> None:
    labels = np.array([p.label for p in cohort])
    assert 0.22 <= labels.mean() <= 0.34
    # every prefix holds the prevalence within one participant (small cohorts: both classes)
    for n in (5, 12, 40):
        assert abs(labels[:n].sum() - 0.28 * n) <= 1.0
    incomplete = np.mean([any(v is None for v in p.values.values()) for p in cohort])
    assert 0.18 <= incomplete <= 0.32


@pytest.mark.parametrize("name,tol", [("age", 1.5), ("bmi", 0.8), ("calf_circumference_cm", 1.0),
                                      ("albumin", 0.8), ("hemoglobin", 5.0), ("tsh", 0.4)])
def test_class_medians_follow_table_1(cohort, name: str, tol: float) -> None:
    targets = CLINICAL_TARGETS.get(name) or LAB_TARGETS[name][:2]
    for label in (0, 1):
        assert abs(_median(cohort, name, label) - targets[label][0]) <= tol, (name, label)
    # the direction of the class difference is the paper's (where it is larger than noise)
    if abs(targets[1][0] - targets[0][0]) > tol:
        assert np.sign(_median(cohort, name, 1) - _median(cohort, name, 0)) == np.sign(
            targets[1][0] - targets[0][0])


def test_awgs_measurements_reproduce_the_label(cohort) -> None:
    for p in cohort:
        assert derive_awgs(p.values, p.participant_id).label == p.label


def test_feature_vectors_have_the_papers_dimensions(cohort) -> None:
    clinical, lab = feature_vectors(cohort[0])
    assert len(clinical) == 8 and len(lab) == 14
    assert clinical[3] in (0.0, 1.0)  # sex


def test_oracle_auc_is_in_the_papers_range() -> None:
    people = draw_cohort(seed=5, participants=200)
    auc = roc_auc_score([p.label for p in people], [p.latent for p in people])
    assert 0.75 <= auc <= 0.95


def test_participants_are_deterministic_per_seed() -> None:
    assert draw_participant(3, 17) == draw_participant(3, 17)
    assert draw_participant(3, 17).values != draw_participant(4, 17).values
