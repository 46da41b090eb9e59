"""DICOM-SEG round trip: highdicom-built SEGs matched to their source images and frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.errors import SegmentationError
from inference.reader import read_study
from inference.roi import choose_segment, load_segmentation, masks_for_sources, referenced_frames
from tests.builders import (
    TISSUE, base_us, build, make_cine_seg, make_seg, phantom, region_item, rf_mask, save, set_jpeg,
)


def _study(tmp_path: Path, n: int = 3) -> tuple[list[pydicom.Dataset], list[Path]]:
    images, paths = [], []
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for i in range(n):
        ds, _ = build("RGB", "jpeg" if i % 2 else "rle", seed=i)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series_uid, i + 1
        images.append(ds)
        paths.append(save(ds, tmp_path / f"us{i}.dcm"))
    return images, paths


def test_round_trip_masks_align_with_cropped_images(tmp_path: Path) -> None:
    images, paths = _study(tmp_path)
    truths = []
    for i, ds in enumerate(images):
        truth = rf_mask(center=(48 + 3 * i, 60 + 5 * i))
        truths.append(truth)
        seg = make_seg([ds], truth[None])
        paths.append(save(seg, tmp_path / f"seg{i}.dcm"))
    study = read_study(paths)
    assert study.problems == []
    assert len(study.frames) == 3
    r0, c0, r1, c1 = TISSUE
    for frame, ds, truth in zip(sorted(study.frames, key=lambda f: f.sop_instance_uid),
                                sorted(images, key=lambda d: d.SOPInstanceUID),
                                [t for _, t in sorted(zip([d.SOPInstanceUID for d in images],
                                                          truths))]):
        assert frame.sop_instance_uid == ds.SOPInstanceUID
        assert frame.mask is not None and frame.mask.shape == frame.image.shape
        np.testing.assert_array_equal(frame.mask, truth[r0:r1, c0:c1])
        assert frame.segment_number == 1 and frame.seg_sop_instance_uid
    assert set(study.datasets) == {d.SOPInstanceUID for d in images}


def test_rectus_femoris_segment_preferred(tmp_path: Path) -> None:
    ds, _ = build()
    seg = make_seg([ds], rf_mask()[None], extra_segment=True)
    assert choose_segment(load_segmentation(seg)) == 2
    study = read_study([save(ds, tmp_path / "a.dcm"), save(seg, tmp_path / "s.dcm")])
    assert study.frames[0].segment_number == 2
    assert study.frames[0].mask.sum() == rf_mask()[TISSUE[0]:TISSUE[2], TISSUE[1]:TISSUE[3]].sum()
    # Without a rectus femoris label the skeletal-muscle typed segment still wins over fat.
    seg = make_seg([ds], rf_mask()[None], label="Muscle ROI", extra_segment=True)
    assert choose_segment(load_segmentation(seg)) == 2


def test_unmatched_seg_and_image_without_seg_are_reported(tmp_path: Path) -> None:
    images, paths = _study(tmp_path, 2)
    other, _ = build()  # an image of another study, not sent
    seg_other = make_seg([other], rf_mask()[None])
    seg_first = make_seg([images[0]], rf_mask()[None])
    paths += [save(seg_other, tmp_path / "seg_other.dcm"), save(seg_first, tmp_path / "s1.dcm")]
    study = read_study(paths)
    problems = dict(study.problems)
    assert "references none of the images" in problems[seg_other.SOPInstanceUID]
    assert problems[images[1].SOPInstanceUID] == "no DICOM-SEG references this image"
    assert images[0].SOPInstanceUID not in problems
    masked = {f.sop_instance_uid: f.mask is not None for f in study.frames}
    assert masked == {images[0].SOPInstanceUID: True, images[1].SOPInstanceUID: False}


def test_cine_seg_matches_referenced_frame(tmp_path: Path) -> None:
    ds = base_us(frames=5, regions=[region_item(TISSUE)])
    rgb = np.stack([phantom(seed=i, shift=2 * i) for i in range(5)])
    set_jpeg(ds, rgb, fragments_per_frame=2, has_bot=False)
    truth = rf_mask(center=(50, 70))
    seg = make_cine_seg(ds, truth, frame_number=2)
    assert referenced_frames(seg) == {ds.SOPInstanceUID: {2}}
    paths = [save(ds, tmp_path / "cine.dcm"), save(seg, tmp_path / "seg.dcm")]
    # "middle" would be frame 3; the annotated frame 2 is read instead of guessing a mask.
    study = read_study(paths)
    assert [(f.frame_number, f.mask is not None) for f in study.frames] == [(2, True)]
    r0, c0, r1, c1 = TISSUE
    np.testing.assert_array_equal(study.frames[0].mask, truth[r0:r1, c0:c1])
    assert study.problems == []
    every = read_study(paths, frame_policy="all")
    assert [(f.frame_number, f.mask is not None) for f in every.frames] == [
        (1, False), (2, True), (3, False), (4, False), (5, False)]
    assert every.problems == [(ds.SOPInstanceUID, "no DICOM-SEG mask for frame(s) [1, 3, 4, 5]")]


def test_cine_seg_without_frame_number_is_not_guessed(tmp_path: Path) -> None:
    ds = base_us(frames=3, regions=[region_item(TISSUE)])
    set_jpeg(ds, np.stack([phantom(seed=i) for i in range(3)]))
    seg = make_cine_seg(ds, rf_mask(), frame_number=1)
    for fg in seg.PerFrameFunctionalGroupsSequence:
        for der in fg.DerivationImageSequence:
            for item in der.SourceImageSequence:
                del item.ReferencedFrameNumber
    for item in seg.SourceImageSequence:
        del item.ReferencedFrameNumber
    with pytest.raises(SegmentationError, match="without Referenced Frame Number"):
        masks_for_sources(load_segmentation(seg), {ds.SOPInstanceUID: (3, 96, 128)})
    study = read_study([save(ds, tmp_path / "c.dcm"), save(seg, tmp_path / "s.dcm")])
    problems = dict(study.problems)
    assert "without Referenced Frame Number" in problems[seg.SOPInstanceUID]
    assert problems[ds.SOPInstanceUID] == "no DICOM-SEG references this image"


def test_seg_with_other_geometry_is_unsupported(tmp_path: Path) -> None:
    ds, _ = build()
    small, _ = build(rows=48, cols=64)
    seg = make_seg([small], rf_mask(48, 64, (24, 32), (8, 12))[None])
    # Point it at ds: a SEG whose frames do not have the source's size.
    for fg in seg.PerFrameFunctionalGroupsSequence:
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = (
            ds.SOPInstanceUID)
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = (
        ds.SOPInstanceUID)
    seg.SourceImageSequence[0].ReferencedSOPInstanceUID = ds.SOPInstanceUID
    study = read_study([save(ds, tmp_path / "a.dcm"), save(seg, tmp_path / "s.dcm")])
    assert "48x64" in dict(study.problems)[seg.SOPInstanceUID]
    assert study.frames[0].mask is None


def test_later_seg_supersedes_earlier(tmp_path: Path) -> None:
    ds, _ = build()
    first = make_seg([ds], rf_mask(center=(40, 50))[None])
    first.ContentDate, first.ContentTime = "20250101", "100000"
    second = make_seg([ds], rf_mask(center=(60, 80))[None])
    second.ContentDate, second.ContentTime = "20250101", "110000"
    study = read_study([save(ds, tmp_path / "a.dcm"), save(second, tmp_path / "s2.dcm"),
                        save(first, tmp_path / "s1.dcm")])
    assert study.frames[0].seg_sop_instance_uid == second.SOPInstanceUID
    assert "superseded" in dict(study.problems)[first.SOPInstanceUID]


def test_side_by_side_views_each_get_their_mask_crop(tmp_path: Path) -> None:
    left, right = (20, 4, 84, 60), (20, 66, 84, 126)
    ds, _ = build(regions=[region_item(left), region_item(right)])
    truth = rf_mask(center=(50, 95), radii=(12, 20))
    seg = make_seg([ds], truth[None])
    study = read_study([save(ds, tmp_path / "a.dcm"), save(seg, tmp_path / "s.dcm")],
                       region_policy="all")
    by_box = {f.crop_box: f for f in study.frames}
    assert set(by_box) == {left, right}
    assert by_box[left].mask.sum() == 0
    np.testing.assert_array_equal(by_box[right].mask, truth[20:84, 66:126])


@pytest.mark.parametrize("kind", ["FRACTIONAL", "LABELMAP"])
def test_fractional_and_labelmap_segs(tmp_path: Path, kind: str) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ds, _ = build()
    truth = rf_mask()
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Rectus femoris",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SkeletalMuscle,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    pixels = truth[None].astype(np.float32) * 0.8 if kind == "FRACTIONAL" else truth[None].astype(
        np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[ds], pixel_array=pixels, segmentation_type=kind,
        segment_descriptions=[desc], series_instance_uid=pydicom.uid.generate_uid(),
        series_number=5, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
        manufacturer="t", manufacturer_model_name="t", software_versions="1",
        device_serial_number="1", **({"fractional_type": "PROBABILITY"}
                                     if kind == "FRACTIONAL" else {}))
    study = read_study([save(ds, tmp_path / "a.dcm"), save(seg, tmp_path / "s.dcm")])
    assert study.problems == []
    r0, c0, r1, c1 = TISSUE
    np.testing.assert_array_equal(study.frames[0].mask, truth[r0:r1, c0:c1])


def test_cine_without_regions_uses_content_crop_for_mask(tmp_path: Path) -> None:
    ds = base_us(frames=3, regions=None)
    set_jpeg(ds, np.stack([phantom(seed=i) for i in range(3)]))
    truth = rf_mask()
    seg = make_cine_seg(ds, truth, frame_number=3)
    study = read_study([save(ds, tmp_path / "c.dcm"), save(seg, tmp_path / "s.dcm")])
    assert study.problems == []
    (frame,) = study.frames
    assert frame.frame_number == 3 and frame.spacing_cm is None
    assert np.abs(np.subtract(frame.crop_box, TISSUE)).max() <= 3
    r0, c0, r1, c1 = frame.crop_box
    np.testing.assert_array_equal(frame.mask, truth[r0:r1, c0:c1])
