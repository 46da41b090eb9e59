"""The studies table's short per-image form (``studies --json`` carries the full reasons)."""

from __future__ import annotations

from dicom_node.store.studies import images_summary, short_reason


def test_short_form_counts_scored_and_names_each_reason():
    images = [
        {"sop_uid": "1", "scored": True, "reason": "scored (seg): B-mode image of a linear probe"},
        {"sop_uid": "2", "scored": False,
         "reason": "not scored by the input gate: colour-flow: 12% of the tissue region"},
        {"sop_uid": "3", "scored": False,
         "reason": "not scored by the input gate: colour-flow: 30% of the tissue region"},
        {"sop_uid": "4", "scored": False, "reason": "no DICOM-SEG references this image"},
    ]
    assert images_summary(images) == (
        "1 scored; 3 not: colour-flow x2, no DICOM-SEG references this image")
    assert images_summary([]) == "-"
    assert short_reason("not scored by the input gate: out-of-distribution: score 9 above 4") \
        == "out-of-distribution"
