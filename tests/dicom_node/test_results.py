"""Results: SR/SC built from synthetic US sources pass dciodvfy/dsrdump and read back right."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from inference.gate import GateVerdict
from inference.types import ImageScore, ModelInfo, MuscleMeasurements, StudyScore, USFrame


def make_score(sources: list[Dataset], *, probs=(0.8, 0.6), heatmap=True, seg=True,
               site=True) -> StudyScore:
    images = []
    for ds, p in zip(sources, probs, strict=False):  # one source may take the first prob
        rng = np.random.default_rng(int(p * 100))
        frame = USFrame(
            sop_instance_uid=ds.SOPInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            study_instance_uid=ds.StudyInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            frame_number=1,
            image=rng.random((64, 80), dtype=np.float32),
            crop_box=(10, 20, 74, 100),
            spacing_cm=(0.01, 0.01),
            mask=np.ones((64, 80), bool),
            seg_sop_instance_uid=generate_uid() if seg else None,
            seg_series_instance_uid=generate_uid() if seg else None,
            segment_number=1 if seg else None,
            patient_id=ds.PatientID,
            source_rows=96,
            source_cols=128,
        )
        images.append(ImageScore(
            frame=frame,
            probability=p,
            fold_probabilities=[p - 0.05, p, p + 0.05],
            fold_spread=0.0408,
            heatmap=rng.random((64, 80), dtype=np.float32) if heatmap else None,
            measurements=MuscleMeasurements(csa_cm2=3.21, thickness_cm=1.23,
                                            echo_intensity_mean=87.5, echo_intensity_sd=21.25),
            roi_source="seg" if seg else "whole-region",
            gate=GateVerdict(ds.SOPInstanceUID, True, "passed", "B-mode", {}, site, True,
                             ds.SOPClassUID),
        ))
    prob = float(np.mean(probs[: len(images)]))
    return StudyScore(
        study_instance_uid=sources[0].StudyInstanceUID,
        patient_id=sources[0].PatientID,
        probability=prob,
        positive=prob >= 0.5,
        rule="mean",
        images=images,
        model=ModelInfo(name="sarco-test", version="0.1", model_uid=str(generate_uid()),
                        backbone="convnext_atto", threshold=0.5, n_folds=3),
    )


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402
import pytest  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402

from dicom_node import results as R  # noqa: E402
from dicom_node.config import ResultsConfig  # noqa: E402
from testing.validate import validate_files  # noqa: E402
from tests.builders import us_series  # noqa: E402
from tests.conftest import make_config  # noqa: E402


def validate(paths: list[Path]) -> str:
    """Run dcmdump + dciodvfy + dsrdump (testing.validate); fail the test on any error."""
    status, report = validate_files(paths, verbose=True)
    assert status == 0, report
    assert "dciodvfy: not installed" not in report, "dciodvfy missing: IOD rules unchecked"
    return report


def groups_by_source(sr: Dataset) -> tuple[dict[str, object], object]:
    """Per-image measurement groups keyed by source SOP UID, and the study-level group."""
    content = sr.content
    per_image: dict[str, object] = {}
    study = None
    for g in content.get_planar_roi_measurement_groups():
        for item in g[0].ContentSequence:
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121233":
                per_image[item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = g
    for g in content.get_image_measurement_groups():
        if g.source_images:
            per_image[g.source_images[0].referenced_sop_instance_uid] = g
        elif g.finding_type == R.SARCOPENIA:
            study = g
    return per_image, study


def measurement(group, name, derivation=None) -> float:
    found = [m for m in group.get_measurements(name=name)
             if (m.derivation is None if derivation is None
                 else m.derivation is not None and m.derivation == derivation)]
    assert len(found) == 1, (name, derivation, found)
    return found[0].value


@pytest.fixture
def study(tmp_path):
    sources = us_series(2, patient_id="SYN0001", rows=96, cols=128)
    return sources, {s.SOPInstanceUID: s for s in sources}


def test_sr_and_heatmaps_pass_dciodvfy_and_dsrdump(study, tmp_path):
    sources, by_uid = study
    score = make_score(sources)
    cfg = make_config(tmp_path / "node")
    rs = R.build_results(score, by_uid, cfg.results)
    paths = R.write_results(rs, cfg)
    assert len(paths) == 3 and all(p.parent == cfg.node.results_dir / score.study_instance_uid
                                   for p in paths)
    report = validate(paths)
    assert report.count("PASS") == 3, report
    dump = subprocess.run(["dsrdump", str(paths[0])], capture_output=True, text=True, check=True)
    assert '(M62.84,I10C,"Sarcopenia")' in dump.stdout
    assert '(52101004,SCT,"Present")' in dump.stdout
    assert "Device Observer UID" in dump.stdout


def test_sr_reads_back_with_highdicom_and_matches_scores(study, tmp_path):
    sources, by_uid = study
    score = make_score(sources, probs=(0.3, 0.2))  # negative study
    cfg = make_config(tmp_path / "node")
    paths = R.write_results(R.build_results(score, by_uid, cfg.results), cfg)
    sr = hd.sr.srread(paths[0])
    src = sources[0]
    # same patient and study, its own series; honest flags
    assert (sr.PatientID, sr.StudyInstanceUID) == (src.PatientID, src.StudyInstanceUID)
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.SeriesNumber == cfg.results.sr_series_number
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "PredecessorDocumentsSequence" not in sr
    # the algorithm as a device observer
    (obs,) = sr.content.get_observer_contexts()
    assert obs.observer_type == codes.DCM.Device
    assert obs.observer_identifying_attributes.uid == score.model.model_uid
    # model as contributing equipment
    assert any(e.ManufacturerModelName == score.model.name
               for e in sr.ContributingEquipmentSequence)
    per_image, study_group = groups_by_source(sr)
    assert set(per_image) == {s.SOPInstanceUID for s in sources}
    for img in score.images:
        g = per_image[img.frame.sop_instance_uid]
        assert measurement(g, R.PROBABILITY) == pytest.approx(img.probability)
        assert measurement(g, R.PROBABILITY, R.STANDARD_DEVIATION) == pytest.approx(img.fold_spread)
        assert measurement(g, R.AREA) == pytest.approx(img.measurements.csa_cm2)
        assert measurement(g, R.THICKNESS) == pytest.approx(img.measurements.thickness_cm)
        assert measurement(g, R.ECHO_INTENSITY, R.MEAN) == pytest.approx(87.5)
        assert measurement(g, R.ECHO_INTENSITY, R.STANDARD_DEVIATION) == pytest.approx(21.25)
        area = g.get_measurements(name=R.AREA)[0]
        assert area.unit.value == "cm2"
    assert measurement(study_group, R.PROBABILITY) == pytest.approx(score.probability)
    (evaluation,) = study_group.get_qualitative_evaluations(name=R.SARCOPENIA)
    assert evaluation.value == codes.SCT.Absent
    # heat maps: one SC per image, own series, same study
    scs = [pydicom.dcmread(p) for p in paths[1:]]
    assert {s.StudyInstanceUID for s in scs} == {src.StudyInstanceUID}
    assert len({s.SeriesInstanceUID for s in scs}) == 1
    assert scs[0].SeriesInstanceUID not in (sr.SeriesInstanceUID, src.SeriesInstanceUID)
    assert scs[0].BodyPartExamined == "THIGH" and scs[0].Laterality == "R"
    assert scs[0].pixel_array.ndim == 3 and scs[0].pixel_array.shape[2] == 3


def test_rescore_references_predecessor(study, tmp_path):
    sources, by_uid = study
    cfg = make_config(tmp_path / "node")
    first = R.build_results(make_score(sources), by_uid, cfg.results).sr
    second = R.build_results(make_score(sources, probs=(0.1, 0.2)), by_uid, cfg.results,
                             predecessor=first).sr
    paths = R.write_results(R.ResultSet(sr=second), cfg)
    validate(paths)
    back = hd.sr.srread(paths[0])
    refs = [
        inst.ReferencedSOPInstanceUID
        for st in back.PredecessorDocumentsSequence
        for se in st.ReferencedSeriesSequence
        for inst in se.ReferencedSOPSequence
    ]
    assert refs == [first.SOPInstanceUID]
    assert back.StudyInstanceUID == first.StudyInstanceUID


def test_whole_region_no_heatmap_partial_and_jpeg(study, tmp_path):
    """No SEG -> group references the source image; no heat map -> no SC; skipped -> PARTIAL."""
    sources, by_uid = study
    score = make_score(sources, seg=False)
    score.images[1].heatmap = None
    score.skipped.append((generate_uid(), "no tissue region"))
    cfg = make_config(tmp_path / "node", results={"heatmap_jpeg": True})
    rs = R.build_results(score, by_uid, cfg.results)
    assert len(rs.heatmaps) == 1
    assert rs.heatmaps[0].file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    paths = R.write_results(rs, cfg)
    validate(paths)
    sr = hd.sr.srread(paths[0])
    assert sr.CompletionFlag == "PARTIAL"
    per_image, study_group = groups_by_source(sr)
    assert set(per_image) == {s.SOPInstanceUID for s in sources}
    assert not sr.content.get_planar_roi_measurement_groups()
    assert pydicom.dcmread(paths[1]).pixel_array.shape[2] == 3


def test_results_from_synthetic_cohort_headers_validate(synth_cohort, tmp_path):
    """Real reader output (every vendor, cine, palette, late/missing SEG) -> valid SR and SC."""
    import json

    from inference.reader import read_study

    manifest = json.loads(synth_cohort.manifest.read_text())
    cfg = make_config(tmp_path / "node")
    seen_vendors: set[str] = set()
    written: list[Path] = []
    n_seg_groups = 0
    for st in manifest["studies"]:
        if st["vendor"] in seen_vendors:
            continue
        seen_vendors.add(st["vendor"])
        read = read_study([synth_cohort.out_dir / f["path"] for f in st["files"]])
        assert read.frames, st["study_uid"]
        images = [
            ImageScore(
                frame=f, probability=0.4, fold_probabilities=[0.35, 0.45], fold_spread=0.05,
                heatmap=np.linspace(0, 1, f.image.size, dtype=np.float32).reshape(f.image.shape),
                measurements=(MuscleMeasurements(2.5, 1.1, 90.0, 18.0) if f.mask is not None
                              else None),
                roi_source="seg" if f.mask is not None else "whole-region",
                gate=GateVerdict(f.sop_instance_uid, True, "passed", "B-mode", {}, True, True),
            )
            for f in read.frames
        ]
        n_seg_groups += sum(f.mask is not None for f in read.frames)
        score = StudyScore(st["study_uid"], st["patient_id"], 0.4, False, "mean", images,
                           ModelInfo("sarco-test", "0.1", str(generate_uid()), "convnext_atto",
                                     0.5, 2))
        rs = R.build_results(score, read.datasets, cfg.results)
        assert rs.sr.StudyInstanceUID == st["study_uid"] and len(rs.heatmaps) == len(images)
        written += R.write_results(rs, cfg)
    assert len(seen_vendors) == 3 and n_seg_groups > 0
    report = validate(written)
    assert report.count("PASS") == len(written), report


def test_no_source_header_is_a_results_error(study):
    from dicom_node.errors import ResultsError

    sources, _ = study
    with pytest.raises(ResultsError, match=sources[0].StudyInstanceUID):
        R.build_results(make_score(sources), {}, ResultsConfig())


def _quirky(ds: Dataset) -> Dataset:
    """Real-header quirks: over-precise TM, bad DA, PN with a control character, no birth date."""
    from pydicom.dataelem import DataElement

    q = ds.copy()
    del q.PatientBirthDate
    q["StudyTime"] = DataElement(0x00080030, "TM", "120000.1234567890")
    q["ContentTime"] = DataElement(0x00080033, "TM", "99:99")
    q["StudyDate"] = DataElement(0x00080020, "DA", "2025-13-45")
    q["PatientName"] = DataElement(0x00100010, "PN", "Doe^Jane\x07")
    return q


@pytest.mark.lenient_pydicom
def test_header_quirks_do_not_lose_the_score(study, tmp_path):
    from dicom_node.results.sanitize import sanitize_source

    sources, _ = study
    quirky = [_quirky(ds) for ds in sources]
    clean = sanitize_source(quirky[0])
    assert clean.StudyTime == "120000.123456" and clean.StudyDate == ""
    assert clean.PatientBirthDate == "" and "\x07" not in str(clean.PatientName)
    assert "ContentTime" not in clean or clean.ContentTime == ""
    assert quirky[0].StudyTime == "120000.1234567890"  # the source is never modified
    rs = R.build_results(make_score(quirky), {d.SOPInstanceUID: d for d in quirky},
                         ResultsConfig())
    assert rs.sr is not None and len(rs.heatmaps) == 2 and not rs.errors
    report = validate(R.write_results(rs, make_config(tmp_path / "node")))
    assert report.count("PASS") == 3, report


@pytest.mark.lenient_pydicom
def test_bad_type1_uid_fails_clearly(study):
    from dicom_node.errors import PermanentJobError

    sources, _ = study
    bad = sources[0].copy()
    bad.StudyInstanceUID = "not-a-uid"
    with pytest.raises(PermanentJobError, match="StudyInstanceUID"):
        R.build_sr(make_score([bad]), {bad.SOPInstanceUID: bad}, ResultsConfig())


def test_one_failing_heatmap_keeps_sr_and_other_heatmap(study):
    sources, _ = study
    score = make_score(sources)
    score.images[1].heatmap = np.zeros((2, 2, 2, 2), np.float32)  # cannot be rendered
    rs = R.build_results(score, {d.SOPInstanceUID: d for d in sources}, ResultsConfig())
    assert rs.sr is not None and len(rs.heatmaps) == 1
    assert len(rs.errors) == 1 and sources[1].SOPInstanceUID in rs.errors[0]


def test_no_finding_site_without_established_site(study):
    sources, _ = study
    rs = R.build_results(make_score(sources, site=False),
                         {d.SOPInstanceUID: d for d in sources}, ResultsConfig())
    assert "Thigh" not in str(rs.sr) and "68367000" not in str(rs.sr)
    assert "Input gate verdict" in str(rs.sr) and "No cm values" not in str(rs.sr)
    assert all("BodyPartExamined" not in sc for sc in rs.heatmaps)


def test_not_assessable_sr_says_why_per_image(study, tmp_path):
    from inference import gate as g

    sources, _ = study
    verdicts = [
        GateVerdict(sources[0].SOPInstanceUID, False, g.COLOUR, "12% colour-flow", {}, False,
                    False, sources[0].SOPClassUID),
        GateVerdict(sources[1].SOPInstanceUID, False, g.SECTOR, "sector field of view", {},
                    False, False, sources[1].SOPClassUID),
    ]
    model = ModelInfo("sarco-test", "0.1", str(generate_uid()), "convnext_atto", 0.5, 2)
    sr = R.build_not_assessable_sr(sources[0].StudyInstanceUID, "no image passed the gate",
                                   verdicts, {d.SOPInstanceUID: d for d in sources}, model,
                                   ResultsConfig())
    text = str(sr)
    assert "colour-flow" in text and "sector-geometry" in text and "Undetermined" in text
    assert "Thigh" not in text and "Present" not in text and "Absent" not in text
    path = tmp_path / "na.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = validate([path])
    assert report.count("PASS") == 1, report


def test_uncalibrated_image_says_no_cm_values(study):
    sources, _ = study
    score = make_score(sources)
    for im in score.images:
        im.frame.spacing_cm = None
        im.measurements = MuscleMeasurements(None, None, 80.0, 20.0)
    rs = R.build_results(score, {d.SOPInstanceUID: d for d in sources}, ResultsConfig())
    assert str(rs.sr).count("No cm values") == 2 and "square centimeter" not in str(rs.sr)


def test_nothing_to_score_error_survives_a_process_boundary():
    import pickle

    from dicom_node.errors import NothingToScoreError

    v = GateVerdict("1.2.3", False, "colour-flow", "5% colour", {"colour_fraction": 0.05})
    err = pickle.loads(pickle.dumps(NothingToScoreError("1.2", [("1.2.3", "colour-flow")], [v])))
    assert err.state == "not-applicable: colour-flow"
    assert err.verdicts[0].measured["colour_fraction"] == 0.05


def test_image_whose_automatic_roi_failed_qc_is_listed_with_its_reason(study, tmp_path):
    # three images: two scored, the third's automatic ROI failed quality control; an unrelated
    # SEG problem in the skipped list is not an image and gets no group
    sources = us_series(3, patient_id="SYN0002", rows=96, cols=128)
    by_uid = {s.SOPInstanceUID: s for s in sources}
    score = make_score(sources[:2])
    failed = sources[2].SOPInstanceUID
    score.skipped = [(failed, "frame 1: automatic ROI failed quality control (low confidence "
                              "0.62 < 0.80); not measured, not scored"),
                     (str(generate_uid()), "automatic DICOM-SEG, not a human ROI")]
    cfg = make_config(tmp_path / "node")
    paths = R.write_results(R.build_results(score, by_uid, cfg.results), cfg)
    sr = hd.sr.srread(paths[0])
    per_image, _ = groups_by_source(sr)
    assert set(per_image) == {s.SOPInstanceUID for s in sources}
    group = per_image[failed]
    assert group.finding_type == R.IMAGE_NOT_SCORED
    why = [e for e in group.get_qualitative_evaluations(name=R.NOT_SCORED_REASON)]
    assert len(why) == 1 and why[0].value.value == "ROI-QC"
    assert "quality control (low confidence" in why[0].value.meaning
    assert not group.get_measurements() and sr.CompletionFlag == "PARTIAL"
    assert validate([paths[0]]).count("PASS") == 1
