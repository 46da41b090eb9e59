"""Turn a :class:`StudyScore` into DICOM a PACS accepts: a TID 1500 SR and Grad-CAM heat maps.

The SR is a highdicom ``ComprehensiveSR`` holding a TID 1500 Measurement Report. The observer is
the algorithm as a device (IHE AI Results), each scored image gets a measurement group with the
ensemble probability, its spread across folds and the muscle measurements, and one study-level
group carries the coded "Sarcopenia present/absent" evaluation. Heat maps are Secondary Capture
images (one per scored image, own series) with the overlay, a colour bar, the probability and a
research-use warning burned in, because a viewer may show them without any other context.

Codes: standard codes come from pydicom's code dictionary (DCM, SCT, LN, UCUM). Sarcopenia is
ICD-10-CM M62.84, whose DICOM coding scheme designator is "I10C" (PS3.16 Table 8-1; "I10" is WHO
ICD-10, which has no sarcopenia code). Concepts without a standard code use the private scheme
``99DICOMNODE``; no code is ever invented in a standard scheme.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicom_node.config import ResultsConfig
from dicom_node.errors import PermanentJobError, ResultsError
from dicom_node.results.sanitize import ResultsInputError, sanitize_source  # noqa: F401 - re-exported
from inference.durable import fsync_dir, write_durable
from inference.gate import GateVerdict
from inference.types import ImageScore, ModelInfo, StudyScore

if TYPE_CHECKING:
    from dicom_node.config import Config

    # what the SR's imaging measurements hold: per-image ROI groups and plain groups
    _MeasurementGroup = (hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                         | hd.sr.MeasurementsAndQualitativeEvaluations)

log = logging.getLogger(__name__)

PRIVATE_SCHEME = "99DICOMNODE"

# Standard concepts (each checked against pydicom.sr.codedict).
SARCOPENIA = Code("M62.84", "I10C", "Sarcopenia")  # ICD-10-CM; designator per PS3.16 Table 8-1
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
PROBABILITY = codes.DCM.Probability  # 122157
AREA = codes.SCT.Area  # 42798000
THICKNESS = codes.LN.Thickness  # 59089-3
MEAN = codes.SCT.Mean  # 373098007
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # 386136009
THIGH = codes.SCT.Thigh  # 68367000
# Private concepts: no standard code exists for these.
ECHO_INTENSITY = Code("EI", PRIVATE_SCHEME, "Echo intensity (0-255 grey level)")
DECISION_THRESHOLD = Code("THR", PRIVATE_SCHEME, "Decision threshold of the model")
EXPECTED_SENSITIVITY = Code("SENS-CV", PRIVATE_SCHEME, "Sensitivity at threshold (CV)")
EXPECTED_SPECIFICITY = Code("SPEC-CV", PRIVATE_SCHEME, "Specificity at threshold (CV)")
ROI_SOURCE_WHOLE = Code("ROI-WHOLE", PRIVATE_SCHEME, "ROI: whole tissue region, no SEG")
ROI_SOURCE_AUTO = Code("ROI-AUTO", PRIVATE_SCHEME, "ROI: automatic segmentation (AI SEG)")
SEGMENTATION_METHOD = codes.DCM.SegmentationMethod  # 122554
AUTOMATED = codes.SCT.Automated  # 8359006
GATE_VERDICT = Code("GATE", PRIVATE_SCHEME, "Input gate verdict")
IMAGE_NOT_SCORED = Code("NOT-SCORED", PRIVATE_SCHEME, "Image not scored")
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # when a header lacks its SOP Class UID
NOT_SCORED_REASON = Code("WHY-NOT-SCORED", PRIVATE_SCHEME, "Reason the image was not scored")
NO_CM = Code("NO-CM", PRIVATE_SCHEME, "No cm values: calibration absent or implausible")
NOT_ASSESSABLE = codes.SCT.Undetermined  # 373068000: no sarcopenia verdict for this study

UNIT_PROBABILITY = Code("{probability}", "UCUM", "probability")
UNIT_CM2 = Code("cm2", "UCUM", "square centimeter")
UNIT_CM = Code("cm", "UCUM", "centimeter")
UNIT_ECHO = Code("{echo intensity}", "UCUM", "echo intensity")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PAIRED = {"R", "L"}


@dataclass
class ResultSet:
    """What one scoring run writes: the SR, its heat maps and the AI SEGs of the automatic ROIs
    (all in the source's study)."""

    sr: Dataset | None
    heatmaps: list[Dataset] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # objects that could not be built, and why
    segmentations: list[Dataset] = field(default_factory=list)

    @property
    def datasets(self) -> list[Dataset]:
        return [d for d in (self.sr, *self.heatmaps, *self.segmentations) if d is not None]


UidFactory = Callable[[str], str]


def _new_uid(role: str) -> str:
    """A fresh random UID (``role`` only matters to factories that derive UIDs)."""
    return str(generate_uid())


def _model_uid(model: ModelInfo) -> str:
    """The model UID if valid, else a UID derived from it deterministically."""
    uid = str(model.model_uid or "")
    if _UID_RE.match(uid) and len(uid) <= 64:
        return uid
    return str(generate_uid(entropy_srcs=[uid, model.name, model.version]))


def _algorithm(model: ModelInfo, cfg: ResultsConfig) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=cfg.algorithm_name[:64],
        version=str(model.version)[:64] or "unknown",
        manufacturer=cfg.manufacturer[:64] or None,
        parameters=[f"backbone={model.backbone}", f"folds={model.n_folds}",
                    f"threshold={model.threshold:.4f}"],
    )


def _contributing_equipment(model: ModelInfo, cfg: ResultsConfig) -> hd.ContributingEquipment:
    """The model as processing equipment, so the PACS shows who made the object."""
    return hd.ContributingEquipment(
        manufacturer=cfg.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{model.name}"[:64],
        software_versions=[str(model.version)[:64], _model_uid(model)],
        institution_name=cfg.institution_name or None,
        contribution_description=(
            f"{model.backbone} {model.n_folds}-fold ensemble, research use only"
        )[:64],
    )


def _laterality(src: Dataset) -> str | None:
    for kw in ("Laterality", "ImageLaterality"):
        value = str(src.get(kw, "") or "").upper()
        if value in _PAIRED:
            return value
    return None


def _orientation(src: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation if it has two valid values (free-hand US usually not)."""
    value = src.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    try:
        return tuple(hd.enum.PatientOrientationValuesBiped(v).value for v in value)  # type: ignore
    except ValueError:
        return None


def _seg_stub(score: ImageScore, study_uid: str) -> Dataset:
    """Evidence entry for the SEG (highdicom needs every referenced instance as evidence)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = score.frame.seg_sop_instance_uid
    ds.SeriesInstanceUID = score.frame.seg_series_instance_uid
    ds.StudyInstanceUID = study_uid
    return ds


def _measurement(name: Code, value: float, unit: Code, derivation: Code | None = None
                 ) -> hd.sr.Measurement | None:
    """A NUM item, or None for a non-finite value (DS cannot encode NaN/inf)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, derivation=derivation)


def _image_measurements(score: ImageScore) -> list[hd.sr.Measurement]:
    items = [
        _measurement(PROBABILITY, score.probability, UNIT_PROBABILITY),
        _measurement(PROBABILITY, score.fold_spread, UNIT_PROBABILITY, STANDARD_DEVIATION),
    ]
    m = score.measurements
    if m is not None:
        if m.csa_cm2 is not None:
            items.append(_measurement(AREA, m.csa_cm2, UNIT_CM2))
        if m.thickness_cm is not None:
            items.append(_measurement(THICKNESS, m.thickness_cm, UNIT_CM))
        items.append(_measurement(ECHO_INTENSITY, m.echo_intensity_mean, UNIT_ECHO, MEAN))
        items.append(
            _measurement(ECHO_INTENSITY, m.echo_intensity_sd, UNIT_ECHO, STANDARD_DEVIATION)
        )
    return [i for i in items if i is not None]


def _image_group(
    index: int,
    score: ImageScore,
    src: Dataset,
    seg: Dataset | None,
    algorithm: hd.sr.AlgorithmIdentification,
    finding_site: hd.sr.FindingSite | None,
    evidence: list[Dataset],
    study_uid: str,
) -> (hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
      | hd.sr.MeasurementsAndQualitativeEvaluations):
    """Per-image group: ROI-based (pointing at the SEG segment) when a SEG gave the ROI, else
    referencing the source image only."""
    frame = score.frame
    tracking = hd.sr.TrackingIdentifier(
        uid=generate_uid(entropy_srcs=[study_uid, frame.sop_instance_uid, str(frame.frame_number)]),
        identifier=f"RF image {index} frame {frame.frame_number}",
    )
    measurements = _image_measurements(score)
    multi = int(src.get("NumberOfFrames", 1) or 1) > 1
    frames = [frame.frame_number] if multi else None
    seg_known = seg is not None or bool(frame.seg_series_instance_uid)
    seg_uid, segment = frame.seg_sop_instance_uid, frame.segment_number
    auto = score.roi_source == "auto"
    if auto:  # the AI SEG this node built from the automatic mask (None if it failed)
        seg_uid, segment = (str(seg.SOPInstanceUID), 1) if seg is not None else (None, None)
    if (score.roi_source in ("seg", "auto") and seg_uid and segment
            and (seg_known if not auto else seg is not None)):
        # highdicom requires a SEG frame number here; it is removed again below.
        evidence.append(seg if seg is not None else _seg_stub(score, study_uid))
        ref = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=(seg.SOPClassUID if seg is not None else "1.2.840.10008.5.1.4.1.1.66.4"),
            sop_instance_uid=seg_uid,
            frame_number=1,
            segment_number=int(segment),
            source_image=hd.sr.SourceImageForSegmentation(
                src.SOPClassUID, src.SOPInstanceUID, frames
            ),
        )
        # highdicom writes both Referenced Frame Number and Referenced Segment Number into the
        # SEG IMAGE item; PS3.3 C.10.4 forbids both (dciodvfy error, dsrdump warning). The
        # segment number alone identifies the ROI, so drop the frame number.
        for item in ref:
            for sop_ref in item.get("ReferencedSOPSequence", []):
                if sop_ref.ReferencedSOPInstanceUID == seg_uid:
                    if "ReferencedFrameNumber" in sop_ref:
                        del sop_ref.ReferencedFrameNumber
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=ref,
            finding_type=codes.SCT.SkeletalMuscle,
            method=ROI_SOURCE_AUTO if auto else None,
            algorithm_id=algorithm,
            finding_sites=[finding_site] if finding_site else None,
            measurements=measurements,
            qualitative_evaluations=_image_evaluations(score),
        )
    method = {"whole-region": ROI_SOURCE_WHOLE, "auto": ROI_SOURCE_AUTO}.get(
        str(score.roi_source))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.SCT.SkeletalMuscle,
        method=method,
        algorithm_id=algorithm,
        finding_sites=[finding_site] if finding_site else None,
        measurements=measurements,
        qualitative_evaluations=_image_evaluations(score),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(src.SOPClassUID, src.SOPInstanceUID, frames)
        ],
    )


def build_sr(
    score: StudyScore,
    sources: dict[str, Dataset],
    cfg: ResultsConfig,
    predecessor: Dataset | None = None,
    uid: UidFactory = _new_uid,
    auto_segs: dict[tuple[str, int], Dataset] | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 SR for a scored study (see the module docstring for the tree).

    ``auto_segs``: the AI SEG of each automatically segmented frame, (SOP Instance UID, frame
    number) -> SEG; the frame's measurement group references it.
    """
    sources = {uid: sanitize_source(ds) for uid, ds in sources.items()}
    us_sources = _us_sources(score, sources)
    if not us_sources:
        raise ResultsError(
            f"study {score.study_instance_uid}: no source header for any scored image"
        )
    first = us_sources[0]
    algorithm = _algorithm(score.model, cfg)
    model_uid = _model_uid(score.model)
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=model_uid,
                name=cfg.algorithm_name[:64],
                manufacturer_name=cfg.manufacturer[:64] or None,
                model_name=f"{score.model.name} {score.model.version}"[:64],
            ),
        )
    )
    evidence: list[Dataset] = list(us_sources)
    groups: list[_MeasurementGroup] = []
    for i, img in enumerate(score.images, start=1):
        src = sources.get(img.frame.sop_instance_uid)
        if src is None:
            log.warning("study %s: no header for scored image %s; left out of SR",
                        score.study_instance_uid, img.frame.sop_instance_uid)
            continue
        seg = sources.get(img.frame.seg_sop_instance_uid or "")
        if img.roi_source == "auto":
            seg = (auto_segs or {}).get((img.frame.sop_instance_uid, img.frame.frame_number))
        site = None
        if img.site_established:  # never claim the thigh unless the header/rules say so
            site = hd.sr.FindingSite(
                anatomic_location=THIGH,
                laterality={"R": codes.SCT.Right, "L": codes.SCT.Left}.get(
                    _laterality(src) or ""),
            )
        groups.append(_image_group(i, img, src, seg, algorithm, site, evidence,
                                   score.study_instance_uid))
    groups.extend(_not_scored_groups(score, algorithm, evidence))
    groups.extend(_skipped_image_groups(score, algorithm, evidence, sources))
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid("sr-tracking"), identifier=f"study ({score.rule} of {len(score.images)} images)"
        ),
        finding_type=SARCOPENIA,
        algorithm_id=algorithm,
        measurements=[m for m in (
            _measurement(PROBABILITY, score.probability, UNIT_PROBABILITY),
            _measurement(PROBABILITY, score.fold_spread, UNIT_PROBABILITY, STANDARD_DEVIATION)
            if score.fold_spread is not None else None,
            _measurement(DECISION_THRESHOLD, score.model.threshold, UNIT_PROBABILITY),
            _measurement(EXPECTED_SENSITIVITY, score.model.expected_sensitivity, UNIT_PROBABILITY)
            if score.model.expected_sensitivity is not None else None,
            _measurement(EXPECTED_SPECIFICITY, score.model.expected_specificity, UNIT_PROBABILITY)
            if score.model.expected_specificity is not None else None,
        ) if m is not None],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(SARCOPENIA, PRESENT if score.positive else ABSENT)
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=codes.SCT.Ultrasonography,
        imaging_measurements=[*groups, study_group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    unique = _dedupe(evidence)  # the same SEG may cover several images
    sr = hd.sr.ComprehensiveSR(
        evidence=unique,
        content=report[0],
        series_instance_uid=uid("sr-series"),
        series_number=cfg.sr_series_number,
        sop_instance_uid=uid("sr"),
        instance_number=1,
        manufacturer=cfg.manufacturer[:64],
        # COMPLETE only when every object of the study could be scored; never verified by a human.
        is_complete=bool(score.images) and not score.skipped and len(groups) == len(score.images),
        is_final=False,
        is_verified=False,
        institution_name=cfg.institution_name or None,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[_contributing_equipment(m, cfg)
                                for m in (score.model, score.roi_model) if m is not None],
    )
    sr.SeriesDescription = cfg.sr_series_description[:64]
    if "StudyDescription" not in first:
        sr.StudyDescription = ""
    return sr


def _gate_evaluation(verdict: GateVerdict | None) -> list[hd.sr.QualitativeEvaluation] | None:
    """The gate's verdict as a coded item (private scheme; the meaning carries the reason)."""
    if verdict is None:
        return None
    text = "passed" if verdict.passed else f"{verdict.reason}: {verdict.detail}"
    return [hd.sr.QualitativeEvaluation(GATE_VERDICT,
                                        Code(verdict.reason[:16], PRIVATE_SCHEME, text[:64]))]


def _image_evaluations(score: ImageScore) -> list[hd.sr.QualitativeEvaluation] | None:
    """Why this image was scored (gate verdict) and, when so, why it has no cm values."""
    items = list(_gate_evaluation(score.gate) or [])
    if score.roi_source == "auto":  # the ROI was drawn by the segmentation model, not a person
        items.append(hd.sr.QualitativeEvaluation(SEGMENTATION_METHOD, AUTOMATED))
    if score.frame.spacing_cm is None:
        items.append(hd.sr.QualitativeEvaluation(NO_CM, codes.SCT.Undetermined))
    return items or None


def _verdict_stub(v: GateVerdict, study_uid: str) -> Dataset:
    """Evidence entry for an image that was not scored (its header is not needed)."""
    ds = Dataset()
    ds.SOPClassUID = v.sop_class_uid or US_IMAGE_STORAGE
    ds.SOPInstanceUID = v.sop_instance_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, v.sop_instance_uid])
    ds.StudyInstanceUID = study_uid
    return ds


def _not_scored_groups(score: StudyScore, algorithm: hd.sr.AlgorithmIdentification,
                       evidence: list[Dataset], sources: dict[str, Dataset] | None = None
                       ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per image the gate stopped: which image, and why it was not scored."""
    out = []
    scored = {im.frame.sop_instance_uid for im in score.images}
    for v in score.gate:
        if v.passed or v.sop_instance_uid in scored:
            continue
        src = (sources or {}).get(v.sop_instance_uid)
        evidence.append(src if src is not None else _verdict_stub(v, score.study_instance_uid))
        out.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[score.study_instance_uid, v.sop_instance_uid]),
                identifier=f"not scored: {v.reason}"[:64]),
            finding_type=IMAGE_NOT_SCORED,
            algorithm_id=algorithm,
            qualitative_evaluations=_gate_evaluation(v),
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                v.sop_class_uid or US_IMAGE_STORAGE, v.sop_instance_uid)],
        ))
    return out


def _skip_key(reason: str) -> str:
    """A short stable code value for a skip reason (the full text is the code meaning)."""
    if "quality control" in reason:
        return "ROI-QC"
    if "DICOM-SEG" in reason or "no ROI" in reason:
        return "NO-ROI"
    return "NOT-USABLE"


def _skipped_image_groups(score: StudyScore, algorithm: hd.sr.AlgorithmIdentification,
                          evidence: list[Dataset], sources: dict[str, Dataset]
                          ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per US image of the study that the gate passed but that was still not scored.

    Why: an automatic ROI that failed quality control (or an image without any usable ROI) is
    neither measured nor scored; the report must say which image and why instead of silently
    leaving it out. Images the gate stopped have their own groups; a cine loop with at least one
    scored frame is in the report already (its skipped frames are in the study note).
    """
    scored = {im.frame.sop_instance_uid for im in score.images}
    gated = {v.sop_instance_uid for v in score.gate if not v.passed}
    reasons: dict[str, list[str]] = {}
    for sop_uid, reason in score.skipped:
        if sop_uid in scored or sop_uid in gated:
            continue
        src = sources.get(sop_uid)
        if src is None or str(src.get("Modality", "")).upper() != "US":
            continue  # not an image of this study (a SEG, a foreign object): note and log only
        reasons.setdefault(sop_uid, []).append(reason)
    out = []
    for sop_uid, why in reasons.items():
        src = sources[sop_uid]
        evidence.append(src)
        text = "; ".join(dict.fromkeys(why))
        out.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[score.study_instance_uid, sop_uid, "skipped"]),
                identifier=f"not scored: {_skip_key(text).lower()}"[:64]),
            finding_type=IMAGE_NOT_SCORED,
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                NOT_SCORED_REASON, Code(_skip_key(text), PRIVATE_SCHEME, text[:64]))],
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                str(src.get("SOPClassUID") or US_IMAGE_STORAGE), sop_uid)],
        ))
    return out


def build_not_assessable_sr(
    study_uid: str,
    reason: str,
    verdicts: list[GateVerdict],
    sources: dict[str, Dataset],
    model: ModelInfo,
    cfg: ResultsConfig,
    uid: UidFactory = _new_uid,
) -> hd.sr.ComprehensiveSR:
    """An SR saying the study is "not assessable" for sarcopenia, with the reason per image.

    Raises:
        ResultsError: no source header to take the patient and study from.
    """
    headers = [sanitize_source(ds) for ds in sources.values()
               if str(ds.get("StudyInstanceUID", "")) == study_uid]
    if not headers:
        raise ResultsError(f"study {study_uid}: no source header for a not-assessable SR")
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    algorithm = _algorithm(model, cfg)
    score = StudyScore(study_instance_uid=study_uid, patient_id=str(headers[0].PatientID),
                       probability=float("nan"), positive=False, rule="none", images=[],
                       model=model, gate=list(verdicts))
    evidence: list[Dataset] = []
    groups = _not_scored_groups(score, algorithm, evidence, by_uid)
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[study_uid, "not-assessable"]),
            identifier="study: not assessable"),
        finding_type=SARCOPENIA,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(SARCOPENIA, NOT_ASSESSABLE),
            hd.sr.QualitativeEvaluation(
                GATE_VERDICT, Code("NOT-ASSESSABLE", PRIVATE_SCHEME, reason[:64] or "no reason")),
        ],
    ))
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_model_uid(model), name=cfg.algorithm_name[:64])))
    report = hd.sr.MeasurementReport(
        observation_context=observer, procedure_reported=codes.SCT.Ultrasonography,
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    if not evidence:
        evidence = headers[:1]
    elif str(evidence[0].SOPInstanceUID) not in by_uid:
        evidence.insert(0, headers[0])
    unique = _dedupe(evidence)
    sr = hd.sr.ComprehensiveSR(
        evidence=unique, content=report[0], series_instance_uid=uid("sr-series"),
        series_number=cfg.sr_series_number, sop_instance_uid=uid("sr"), instance_number=1,
        manufacturer=cfg.manufacturer[:64], is_complete=True, is_final=False, is_verified=False,
        institution_name=cfg.institution_name or None,
        contributing_equipment=[_contributing_equipment(model, cfg)])
    sr.SeriesDescription = cfg.sr_series_description[:64]
    return sr


def _dedupe(evidence: list[Dataset]) -> list[Dataset]:
    """Evidence without repeats; the first occurrence wins (the first entry defines patient and
    study of the SR)."""
    seen: set[str] = set()
    out: list[Dataset] = []
    for e in evidence:
        if str(e.SOPInstanceUID) not in seen:
            seen.add(str(e.SOPInstanceUID))
            out.append(e)
    return out


def _us_sources(score: StudyScore, sources: dict[str, Dataset]) -> list[Dataset]:
    """Source headers of the scored images in score order, first one defines patient/study."""
    out: list[Dataset] = []
    seen: set[str] = set()
    for img in score.images:
        uid = img.frame.sop_instance_uid
        if uid in sources and uid not in seen:
            seen.add(uid)
            out.append(sources[uid])
    return out


# ------------------------------------------------------------------------------------------
# Heat maps
# ------------------------------------------------------------------------------------------


def _jet(values: np.ndarray) -> np.ndarray:
    """Jet colour map (the usual Grad-CAM palette), values 0..1 -> uint8 RGB."""
    from matplotlib import colormaps

    rgb: np.ndarray = (colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)
    return rgb


def render_heatmap(img: ImageScore, burn_in_text: str, threshold: float | None) -> np.ndarray:
    """RGB image: overlay on the cropped grayscale source, colour bar, probability and warning.

    The crop is scaled up to at least 384 pixels wide so the burned-in text stays legible.
    """
    gray = np.clip(np.asarray(img.frame.image, dtype=np.float32), 0, 1)
    heat = np.clip(np.asarray(img.heatmap, dtype=np.float32), 0, 1)
    if heat.shape != gray.shape:
        heat = np.asarray(
            Image.fromarray(heat).resize((gray.shape[1], gray.shape[0]), Image.Resampling.BILINEAR)
        )
    base = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
    blended = (0.55 * base + 0.45 * _jet(heat).astype(np.float32)).astype(np.uint8)
    h, w = gray.shape
    scale = max(1.0, 384.0 / w)
    ow, oh = int(round(w * scale)), int(round(h * scale))
    overlay = Image.fromarray(blended).resize((ow, oh), Image.Resampling.BILINEAR)
    bar_w, margin, text_h = 16, 8, 52
    canvas = Image.new("RGB", (ow + bar_w + 5 * margin, oh + text_h), (0, 0, 0))
    canvas.paste(overlay, (0, 0))
    ramp = np.linspace(1.0, 0.0, oh, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(_jet(ramp)), (ow + margin, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((ow + margin + bar_w + 2, 0), "1", fill=(255, 255, 255), font=font)
    draw.text((ow + margin + bar_w + 2, oh - 12), "0", fill=(255, 255, 255), font=font)
    # a per-image verdict only when the model has an image-level threshold
    verdict = "" if threshold is None else (
        ", positive" if img.probability >= threshold else ", negative")
    draw.text(
        (4, oh + 4),
        f"Sarcopenia p={img.probability:.2f} (+/-{img.fold_spread:.2f}{verdict})",
        fill=(255, 255, 255), font=font,
    )
    draw.text((4, oh + 20), "Grad-CAM, fold average", fill=(200, 200, 200), font=font)
    draw.text((4, oh + 36), burn_in_text, fill=(255, 255, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_heatmaps(
    score: StudyScore, sources: dict[str, Dataset], cfg: ResultsConfig,
    uid: UidFactory = _new_uid,
) -> list[hd.sc.SCImage]:
    """One Secondary Capture per scored image that has a heat map, all in one new series."""
    series_uid = uid("sc-series")
    out: list[hd.sc.SCImage] = []
    for img in score.images:
        if img.heatmap is None:
            continue
        src = sources.get(img.frame.sop_instance_uid)
        if src is None:
            continue
        src = sanitize_source(src)
        rgb = render_heatmap(img, cfg.burn_in_text, score.model.image_threshold)
        kwargs: dict[str, Any] = {}
        photometric = "RGB"
        if cfg.heatmap_jpeg:
            kwargs["transfer_syntax_uid"] = JPEGBaseline8Bit
            photometric = "YBR_FULL_422"
        else:
            kwargs["transfer_syntax_uid"] = "1.2.840.10008.1.2.1"
        laterality = _laterality(src)
        orientation = _orientation(src)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=src,
            pixel_array=rgb,
            photometric_interpretation=photometric,
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=cfg.sc_series_number,
            # named by its source frame: the same whether built alone or with the others
            sop_instance_uid=uid(f"sc-{img.frame.sop_instance_uid}-{img.frame.frame_number}"),
            instance_number=len(out) + 1,
            manufacturer=cfg.manufacturer[:64],
            patient_orientation=orientation or ("A", "F"),
            laterality=laterality,
            contributing_equipment=[_contributing_equipment(score.model, cfg)],
            **kwargs,
        )
        if orientation is None:  # unknown for a free-hand US probe: Type 2, left empty
            sc.PatientOrientation = ""  # type: ignore[assignment]
        if img.site_established:
            # dciodvfy: THIGH is a paired body part, so Laterality (Type 2C) must be present.
            sc.BodyPartExamined = "THIGH"
            if laterality is None:
                sc.Laterality = ""
        elif "BodyPartExamined" in sc:
            del sc.BodyPartExamined  # never claim a site the gate did not establish
        sc.StudyDescription = str(src.get("StudyDescription", "") or "")
        sc.SeriesDescription = cfg.sc_series_description[:64]
        sc.ImageComments = f"{cfg.burn_in_text}; p={img.probability:.3f}"[:10240]
        sc.BurnedInAnnotation = "YES"
        sc.DerivationDescription = (
            f"Grad-CAM of {score.model.name} {score.model.version} on "
            f"{img.frame.sop_instance_uid} frame {img.frame.frame_number}"
        )[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        out.append(sc)
    return out


def build_results(
    score: StudyScore,
    sources: dict[str, Dataset],
    cfg: ResultsConfig,
    predecessor: Dataset | None = None,
    uid: UidFactory = _new_uid,
) -> ResultSet:
    """SR + heat maps for one scored study.

    Args:
        score: the ensemble's verdict.
        sources: headers of the scored US images by SOP Instance UID (SEG datasets may be included
            too; then the SR points at the exact SEG frame).
        cfg: identity of the algorithm and series numbering.
        predecessor: the SR of an earlier scoring of this study; the new SR lists it in
            PredecessorDocumentsSequence so a PACS can tell the rescore supersedes it.
        uid: the UID of each new object by role (``sr``, ``sr-series``, ``sr-tracking``,
            ``sc-series``, ``sc-<source SOP UID>-<frame>``); the node derives them from the job's
            result key so a re-run rebuilds the same objects.

    A failure to build one object (the SR, or one heat map) is recorded in ``errors`` and the
    others are still returned: a finished score is never lost to one bad object.

    Raises:
        ResultsInputError: a Type 1 attribute of a source is invalid (permanent).
        ResultsError: not a single object could be built.
    """
    errors: list[str] = []
    auto_segs = build_ai_segs(score, sources, cfg, errors, uid)
    sr = None
    try:
        sr = build_sr(score, sources, cfg, predecessor, uid, auto_segs)
    except PermanentJobError:
        raise
    except (ValueError, TypeError, AttributeError, ResultsError) as exc:
        errors.append(f"SR: {exc}")
        log.error("study %s: SR could not be built: %s", score.study_instance_uid, exc)
    heatmaps: list[Dataset] = []
    for img in score.images:
        one = StudyScore(**{**score.__dict__, "images": [img]})
        try:
            built = build_heatmaps(one, sources, cfg, uid)
        except PermanentJobError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:
            errors.append(f"heat map of {img.frame.sop_instance_uid}: {exc}")
            log.error("study %s: heat map of %s could not be built: %s",
                      score.study_instance_uid, img.frame.sop_instance_uid, exc)
            continue
        for sc in built:  # one series for all of them, numbered in order
            if heatmaps:
                sc.SeriesInstanceUID = heatmaps[0].SeriesInstanceUID
            sc.InstanceNumber = len(heatmaps) + 1
            heatmaps.append(sc)
    segmentations = list(auto_segs.values())
    if sr is None and not heatmaps:
        raise ResultsError(f"study {score.study_instance_uid}: no result object could be built "
                           f"({'; '.join(errors)})")
    log.info("study %s: built %s, %d heat map(s) and %d AI SEG(s)%s", score.study_instance_uid,
             f"SR {sr.SOPInstanceUID}" if sr is not None else "no SR", len(heatmaps),
             len(segmentations), f"; {len(errors)} object(s) failed" if errors else "")
    return ResultSet(sr=sr, heatmaps=heatmaps, errors=errors, segmentations=segmentations)


def build_ai_segs(score: StudyScore, sources: dict[str, Dataset], cfg: ResultsConfig,
                  errors: list[str], uid: UidFactory = _new_uid
                  ) -> dict[tuple[str, int], Dataset]:
    """One AI DICOM-SEG per frame scored on the automatic ROI, all in one new series.

    Returns (SOP Instance UID, frame number) -> SEG; a SEG that cannot be built is recorded in
    ``errors`` (its measurement group then references the source image only).
    """
    from dicom_node.results.seg import SegmentationModelId, build_ai_seg, full_frame_mask

    model = score.roi_model
    out: dict[tuple[str, int], Dataset] = {}
    if model is None:
        return out
    ident = SegmentationModelId(name=model.name, version=model.version,
                                model_uid=_model_uid(model), manufacturer=cfg.manufacturer)
    series_uid = uid("seg-series")
    for img in score.images:
        fr = img.frame
        src = sources.get(fr.sop_instance_uid)
        if img.roi_source != "auto" or fr.mask is None or src is None:
            continue
        try:
            src = sanitize_source(src)
            full = full_frame_mask(fr.mask, fr.crop_box, int(src.Rows), int(src.Columns))
            seg = build_ai_seg(src, full, fr.frame_number, ident,
                               series_instance_uid=series_uid, series_number=cfg.seg_series_number,
                               sop_instance_uid=uid(
                                   f"seg-{fr.sop_instance_uid}-{fr.frame_number}"),
                               instance_number=len(out) + 1)
        except PermanentJobError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:
            errors.append(f"AI SEG of {fr.sop_instance_uid}: {exc}")
            log.error("study %s: AI SEG of %s could not be built: %s",
                      score.study_instance_uid, fr.sop_instance_uid, exc)
            continue
        out[(fr.sop_instance_uid, fr.frame_number)] = seg
    return out


def write_results(result_set: ResultSet, cfg: Config) -> list[Path]:
    """Write SR and heat maps durably under ``results_dir/<StudyUID>/`` before they are queued.

    Each file is written to a temporary name, fsynced and renamed, so a crash never leaves a
    half-written object that the sender would then deliver.
    """
    study_uid = result_set.datasets[0].StudyInstanceUID
    folder = cfg.node.results_dir / study_uid
    paths: list[Path] = []
    for ds in result_set.datasets:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        final = folder / f"{ds.SOPInstanceUID}.dcm"
        write_durable(final, buffer.getvalue(), sync_dir=False)
        paths.append(final)
    fsync_dir(folder)
    log.info("study %s: wrote %d result file(s) to %s", study_uid, len(paths), folder)
    return paths
