"""Feature preprocessing: paper's steps, fitted on training rows only, header fallbacks."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from dicom_node.errors import TrainingError
from training.features import (
    CLINICAL_FEATURES,
    LAB_FEATURES,
    FeaturePreprocessor,
    complete_cases,
    fill_from_header,
    header_clinical,
    parse_patient_age,
)


def _rows(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append({
            "diabetes": str(int(rng.random() < 0.3)), "osteoporosis": "",
            "age": f"{70 + 8 * rng.normal() + shift:.1f}", "sex": "M" if i % 2 else "F",
            "height_cm": f"{160 + 8 * rng.normal() + shift:.1f}",
            "weight_kg": f"{60 + 10 * rng.normal() + shift:.1f}", "bmi": "",
            "calf_circumference_cm": f"{33 + 3 * rng.normal():.1f}",
        })
    return rows


def test_contract_order_matches_inference():
    from inference.model import CLINICAL_FEATURES as C
    from inference.model import LAB_FEATURES as L
    assert CLINICAL_FEATURES == C and LAB_FEATURES == L
    assert len(CLINICAL_FEATURES) == 8 and len(LAB_FEATURES) == 14


def test_steps_by_hand():
    rows = [{"age": "60"}, {"age": "70"}, {"age": ""}, {"age": "80"}] + [{"age": "70"}] * 6
    pre = FeaturePreprocessor(("age",), clip_z=3.0).fit(rows)
    assert pre.mean == [70.0]  # observed values only; the missing one is imputed with it
    x = pre.transform([{"age": ""}, {"age": "60"}, {"age": "80"}, {"age": "200"}])[:, 0]
    assert x[0] == pytest.approx(0.5) and x[1] == 0.0 and x[2] == 1.0
    assert x[3] == 1.0  # outlier clipped to mean + 3 SD, then into [0, 1]
    # an extreme training outlier is clipped before min-max, so it does not squash the others
    pre2 = FeaturePreprocessor(("age",)).fit([{"age": str(a)} for a in [70] * 30 + [60, 80, 500]])
    assert pre2.vmax[0] < 500 and pre2.vmax[0] == pytest.approx(pre2.hi[0])


def test_one_hot_sex_and_shape():
    pre = FeaturePreprocessor(CLINICAL_FEATURES).fit(_rows(40, 0))
    assert pre.n_out == 9 and pre.output_names[3:5] == ["sex_M", "sex_F"]
    x = pre.transform([{"sex": "M"}, {"sex": "female"}, {"sex": ""}])
    assert x.dtype == np.float32 and x.shape == (3, 9)
    assert list(x[0, 3:5]) == [1, 0] and list(x[1, 3:5]) == [0, 1]
    assert x[2, 3] == pytest.approx(0.5) and x[2, 3] + x[2, 4] == pytest.approx(1.0)
    # osteoporosis missing everywhere in training -> constant 0, no NaN anywhere
    assert np.all(x[:, 1] == 0) and np.isfinite(x).all()
    with pytest.raises(TrainingError, match="not M or F"):
        pre.transform([{"sex": "X"}])


def test_fitted_on_train_only_no_leakage():
    train, val = _rows(50, 1), _rows(20, 2, shift=25.0)
    a = FeaturePreprocessor(CLINICAL_FEATURES).fit(train)
    b = FeaturePreprocessor(CLINICAL_FEATURES).fit(train)
    b.transform(val)  # transforming validation rows must not change any parameter
    assert a.to_dict() == b.to_dict()
    c = FeaturePreprocessor(CLINICAL_FEATURES).fit(train + val)
    assert c.to_dict()["mean"] != a.to_dict()["mean"]  # the val rows would have changed them
    xv = a.transform(val)
    assert xv.min() >= 0 and xv.max() <= 1


def test_to_dict_roundtrip_through_json():
    pre = FeaturePreprocessor(CLINICAL_FEATURES).fit(_rows(30, 3))
    back = FeaturePreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    rows = _rows(10, 4)
    assert np.array_equal(pre.transform(rows), back.transform(rows))
    lab = FeaturePreprocessor(LAB_FEATURES).fit([{"tc": "5"}, {"tc": "6"}])
    assert lab.n_out == 14


def test_parse_patient_age():
    assert parse_patient_age("072Y") == 72.0
    assert parse_patient_age("006M") == pytest.approx(0.5)
    assert parse_patient_age("") is None and parse_patient_age("72") is None
    assert parse_patient_age(None) is None


def test_header_values_fill_only_what_is_missing():
    ds = pydicom.Dataset()
    ds.PatientAge = "081Y"
    ds.PatientSex = "F"
    ds.PatientSize = "1.55"
    ds.PatientWeight = "50"
    h = header_clinical(ds)
    assert h == {"age": 81.0, "sex": "F", "height_cm": pytest.approx(155.0), "weight_kg": 50.0}
    row, filled = fill_from_header({"age": "79", "sex": "", "height_cm": None}, h)
    assert row["age"] == "79" and row["sex"] == "F" and row["height_cm"] == pytest.approx(155)
    assert row["bmi"] == pytest.approx(50 / 1.55 ** 2)
    assert filled == ["sex", "height_cm", "weight_kg", "bmi"]
    ds2 = pydicom.Dataset()
    ds2.PatientBirthDate = "19450610"
    ds2.StudyDate = "20250609"
    ds2.PatientSex = "O"
    assert header_clinical(ds2) == {"age": 79.0}


def test_complete_cases():
    rows = [{"a": "1", "b": "2"}, {"a": "", "b": "2"}, {"a": "1", "b": None}]
    kept, dropped = complete_cases(rows, ("a", "b"), ids=["P1", "P2", "P3"])
    assert kept == [0]
    assert dropped == [("P2", "complete cases: missing a"), ("P3", "complete cases: missing b")]
