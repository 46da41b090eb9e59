"""The session cohort fixture builds and has what other tests rely on."""

from __future__ import annotations

import json

import numpy as np
import pydicom


def test_fixture_cohort_has_every_vendor_and_seg_mode(synth_cohort) -> None:
    manifest = json.loads(synth_cohort.manifest.read_text())
    studies = manifest["studies"]
    assert {s["vendor"] for s in studies} == {"supersonic", "mindray", "samsung"}
    assert {s["seg"] for s in studies} == {"normal", "late", "none"}
    quirks = {f["quirk"] for s in studies for f in s["files"] if f["kind"] == "us"}
    assert {"side-by-side", "m-mode", "palette"} <= quirks
    assert any(f["frames"] > 1 for s in studies for f in s["files"] if f["kind"] == "us")
    # per-vendor metrics downstream need both classes from every vendor
    for vendor in ("supersonic", "mindray", "samsung"):
        assert {s["label"] for s in studies if s["vendor"] == vendor} == {0, 1}
    for s in studies:
        for f in s["files"]:
            ds = pydicom.dcmread(synth_cohort.out_dir / f["path"])
            assert ds.SOPInstanceUID == f["sop_instance_uid"]
            assert ds.StudyInstanceUID == s["study_uid"]
            if f["kind"] == "us":
                truth = np.load(synth_cohort.truth_dir / f"{f['sop_instance_uid']}.npz")
                assert truth["mask"].shape == (f["frames"], ds.Rows, ds.Columns)
                r0, c0, r1, c1 = truth["tissue_box"]
                assert truth["mask"][:, :r0].sum() == 0 and truth["mask"][:, r1:].sum() == 0
