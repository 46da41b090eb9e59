"""Generated DICOM: decodes for every syntax, geometry matches the truth, SEGs are valid."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.cli import main
from testing.validate import validate_files
from tests.conftest import require_tool
from training.synth_cohort import LABEL_COLUMNS
from training.synthetic import generate_cohort


def _files(summary, kind: str):
    manifest = json.loads(summary.manifest.read_text())
    for study in manifest["studies"]:
        for f in study["files"]:
            if f["kind"] == kind:
                yield study, f


def _truth(summary, sop: str):
    return np.load(summary.truth_dir / f"{sop}.npz")


def test_every_us_object_decodes_and_matches_its_truth(synth_cohort) -> None:
    syntaxes = set()
    for study, f in _files(synth_cohort, "us"):
        ds = pydicom.dcmread(synth_cohort.out_dir / f["path"])
        syntaxes.add((ds.file_meta.TransferSyntaxUID.name, ds.PhotometricInterpretation))
        pixels = ds.pixel_array
        frames = pixels if f["frames"] > 1 else pixels[None]
        truth = _truth(synth_cohort, f["sop_instance_uid"])
        assert frames.shape[:3] == truth["mask"].shape
        assert ds.Manufacturer and ds.ManufacturerModelName == study["model"]
        assert ds.PatientSex in ("M", "F") and ds.PatientAge.endswith("Y")
        assert float(ds.PatientWeight) > 30 and 1.3 < float(ds.PatientSize) < 2.1
        assert ds.BodyPartExamined == "THIGH" and ds.ImageLaterality == study["laterality"]
        # exactly one 2D tissue region; its box and |deltas| are the truth
        tissue = [r for r in ds.SequenceOfUltrasoundRegions
                  if r.RegionSpatialFormat == 1 and r.RegionDataType == 1]
        assert len(tissue) == 1
        r = tissue[0]
        box = (r.RegionLocationMinY0, r.RegionLocationMinX0, r.RegionLocationMaxY1 + 1,
               r.RegionLocationMaxX1 + 1)
        assert box == tuple(truth["tissue_box"])
        assert r.PhysicalUnitsXDirection == 3 and r.PhysicalUnitsYDirection == 3
        assert np.allclose((abs(r.PhysicalDeltaY), abs(r.PhysicalDeltaX)), truth["spacing_cm"])
        if study["vendor"] == "mindray":
            assert r.PhysicalDeltaX < 0  # a real-world quirk the reader must survive
        # the mask lies inside the tissue region and the RF is brighter than nothing
        r0, c0, r1, c1 = box
        outside = truth["mask"].copy()
        outside[:, r0:r1, c0:c1] = False
        assert truth["mask"].any() and not outside.any()
        # burned-in UI exists outside the imaging area
        grey = frames[..., 0] if frames.ndim == 4 else frames
        assert grey[:, : r0].max() > 100
    assert {s for s, _ in syntaxes} == {"JPEG Baseline (Process 1)", "RLE Lossless",
                                        "Explicit VR Little Endian"}
    assert {p for _, p in syntaxes} == {"YBR_FULL_422", "MONOCHROME2", "RGB", "PALETTE COLOR"}


def test_jpeg_cine_has_fragmented_frames_and_an_empty_offset_table(synth_cohort) -> None:
    from pydicom.encaps import generate_fragments, parse_basic_offsets

    cines = [f for s, f in _files(synth_cohort, "us")
             if s["vendor"] == "supersonic" and f["frames"] > 1]
    assert cines
    ds = pydicom.dcmread(synth_cohort.out_dir / cines[0]["path"])
    buffer = ds.PixelData
    assert parse_basic_offsets(buffer) == []
    n_fragments = sum(1 for _ in generate_fragments(buffer)) - 1  # minus the (empty) BOT item
    assert n_fragments == 2 * ds.NumberOfFrames
    assert ds.pixel_array.shape[0] == ds.NumberOfFrames


def test_seg_masks_codes_and_references(synth_cohort) -> None:
    n = 0
    for study, f in _files(synth_cohort, "seg"):
        seg = pydicom.dcmread(synth_cohort.out_dir / f["path"])
        (src_sop,) = f["references"]
        truth = _truth(synth_cohort, src_sop)
        frame = int(truth["seg_frames"][0])
        assert f["referenced_frames"] == [frame]
        ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0] \
            .SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src_sop
        source = pydicom.dcmread(synth_cohort.out_dir / f["path"].replace("SEG_", "US_"),
                                 stop_before_pixels=True)
        if int(getattr(source, "NumberOfFrames", 1)) > 1:
            assert int(ref.ReferencedFrameNumber) == frame
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert np.array_equal(seg.pixel_array.astype(bool), truth["mask"][frame - 1])
        item = seg.SegmentSequence[0]
        assert item.SegmentLabel == "Rectus femoris"

        def code(c):
            return (c.CodeValue, c.CodingSchemeDesignator)

        assert code(item.SegmentedPropertyCategoryCodeSequence[0]) == (
            codes.SCT.Tissue.value, codes.SCT.Tissue.scheme_designator)
        assert code(item.SegmentedPropertyTypeCodeSequence[0]) == (
            codes.SCT.SkeletalMuscle.value, "SCT")
        region = item.AnatomicRegionSequence[0]
        assert code(region) == (codes.SCT.Thigh.value, "SCT")
        side = codes.SCT.Right if study["laterality"] == "R" else codes.SCT.Left
        assert code(region.AnatomicRegionModifierSequence[0]) == (side.value, "SCT")
        n += 1
    assert n > 10


def test_labels_csv_follows_the_contract(synth_cohort) -> None:
    with synth_cohort.labels_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == LABEL_COLUMNS
    manifest = json.loads(synth_cohort.manifest.read_text())
    assert [r["study_instance_uid"] for r in rows] == [s["study_uid"] for s in manifest["studies"]]
    assert {r["vendor"] for r in rows} == {"supersonic", "mindray", "samsung"}
    for r, s in zip(rows, manifest["studies"]):
        assert r["patient_id"] == s["patient_id"] and int(r["label"]) == s["label"]
    assert manifest["oracle_auc"] == synth_cohort.oracle_auc


def test_dciodvfy_accepts_one_image_and_one_seg_per_vendor(synth_cohort) -> None:
    require_tool(shutil.which("dciodvfy") is not None, "dicom3tools (dciodvfy)")
    chosen: dict[tuple[str, str, str], Path] = {}
    for study, f in [*_files(synth_cohort, "us"), *_files(synth_cohort, "seg")]:
        key = (study["vendor"], f["kind"], f.get("quirk", "") + str(f["frames"] > 1))
        chosen.setdefault(key, synth_cohort.out_dir / f["path"])
    assert {v for v, _, _ in chosen} == {"supersonic", "mindray", "samsung"}
    status, report = validate_files(list(chosen.values()))
    assert status == 0, report
    assert "FAIL" not in report


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    a = generate_cohort(tmp_path / "a", 4, seed=21, image_scale=0.25, workers=1, follow_up=True)
    b = generate_cohort(tmp_path / "b", 4, seed=21, image_scale=0.25, workers=2, follow_up=True)
    files_a = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    for rel in files_a:
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    c = generate_cohort(tmp_path / "c", 1, seed=22, image_scale=0.25, workers=1)
    assert (c.out_dir / "labels.csv").read_bytes() != (a.out_dir / "labels.csv").read_bytes()


def test_cli_synth_writes_a_cohort(tmp_path: Path, capsys) -> None:
    rc = main(["synth", "--out", str(tmp_path / "cli"), "--participants", "2", "--seed", "3",
               "--vendors", "mindray", "--image-scale", "0.3", "--workers", "1", "--oracle"])
    assert rc == 0
    assert "oracle" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert {s["vendor"] for s in manifest["studies"]} == {"mindray"}
    assert main(["synth", "--out", str(tmp_path / "x"), "--vendors", "philips"]) == 2


@pytest.mark.network
def test_whole_cohort_goes_through_dcmtk_storescu_in_one_run(synth_cohort, tmp_path: Path) -> None:
    require_tool(Path("/usr/bin/storescp").exists(), "DCMTK (storescp)")
    from tests.conftest import free_port

    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(["/usr/bin/storescp", "--accept-all", "-od", str(received),
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(50):  # wait until it listens (bounded: 5 s)
            echo = subprocess.run(["/usr/bin/echoscu", "127.0.0.1", str(port)],
                                  capture_output=True)
            if echo.returncode == 0 or scp.poll() is not None:
                break
            time.sleep(0.1)
        push = subprocess.run(
            ["/usr/bin/storescu", "-xf", "storescu.cfg", "Synth", "+sd", "+r", "127.0.0.1",
             str(port), "dicom"], cwd=synth_cohort.out_dir, capture_output=True, text=True,
            timeout=180)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert push.returncode == 0, push.stderr[-2000:]
    sent = {f["sop_instance_uid"] for kind in ("us", "seg") for _, f in _files(synth_cohort, kind)}
    # storescp names each file <modality prefix>.<SOP Instance UID>
    got = {p.name.split(".", 1)[1] for p in received.iterdir()}
    assert got == sent and len(sent) == synth_cohort.us_objects + synth_cohort.seg_objects
