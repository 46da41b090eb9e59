"""Step 5: sort what the PACS received into each study's SR, heat maps and AI SEGs; read them.

The SR is read with highdicom (``srread`` -> ``ComprehensiveSR`` -> TID 1500 measurement groups),
with the codes the node writes (``dicom_node.results``), so the demo checks what a PACS user would
get rather than re-parsing the content tree by hand. The node's AI DICOM-SEGs are decoded with
pydicom and compared with the synthetic generator's truth mask of the frame they reference.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dicom_node.demo.pacs import Peer
from dicom_node.demo.study import DemoError, DemoStudy, SrSummary

SR_MODALITY = "SR"
SEG_MODALITY = "SEG"


def collect(pacs: Peer, studies: dict[str, DemoStudy], seen: dict[Path, tuple[str, str]]) -> None:
    """Assign the PACS's new objects to the studies (headers are read once, cached in ``seen``)."""
    import pydicom

    for path in pacs.received():
        if path not in seen:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            seen[path] = (str(ds.get("StudyInstanceUID", "")), str(ds.get("Modality", "")))
        study_uid, modality = seen[path]
        st = studies.get(study_uid)
        if st is None:
            continue
        if modality == SR_MODALITY:
            if st.sr is None:
                st.sr = path
        elif modality == SEG_MODALITY:
            if path not in st.segs:
                st.segs.append(path)
        elif path not in st.heatmaps:
            st.heatmaps.append(path)


def _values(group: Any, name: Any, derivation: Any = None) -> list[float]:
    """Values of the group's measurements named ``name`` with exactly this derivation."""
    return [float(m.value) for m in group.get_measurements(name=name)
            if (m.derivation is None if derivation is None
                else m.derivation is not None and m.derivation == derivation)]


def roi_source(group: Any) -> str:
    """Where a per-image group's ROI came from, as the node codes it in the SR.

    ``auto`` when the group's measurement method is ROI-AUTO or a Segmentation method
    "Automated" evaluation is present (either alone is enough), ``whole`` for ROI-WHOLE,
    ``not scored`` for an image the gate or QC stopped, else ``seg`` (a DICOM-SEG drawn by a
    person came with the study).
    """
    from dicom_node import results as R

    if group.finding_type == R.IMAGE_NOT_SCORED:
        return "not scored"
    method = getattr(group, "method", None)
    code = str(getattr(method, "value", "") or "")
    automated = any(
        str(getattr(e.value, "value", "")) == R.AUTOMATED.value
        for e in group.get_qualitative_evaluations(name=R.SEGMENTATION_METHOD))
    if code == R.ROI_SOURCE_AUTO.value or automated:
        return "auto"
    if code == R.ROI_SOURCE_WHOLE.value:
        return "whole"
    return "seg"


def summarize_sr(path: Path | None) -> SrSummary:
    """Study probability and decision, per-image fold SD, CSA, thickness, echo intensity and ROI
    source of a TID 1500 SR."""
    import highdicom as hd

    from dicom_node import results as R

    if path is None:
        raise DemoError("internal: SR path missing")
    content = hd.sr.srread(path).content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise DemoError(f"{path} is not a TID 1500 measurement report")
    images: list[Any] = list(content.get_planar_roi_measurement_groups())
    probability: float | None = None
    positive: bool | None = None
    for group in content.get_image_measurement_groups():
        if group.finding_type != R.SARCOPENIA:
            images.append(group)
            continue
        probs = _values(group, R.PROBABILITY)
        probability = probs[0] if probs else None
        for evaluation in group.get_qualitative_evaluations(name=R.SARCOPENIA):
            positive = (True if evaluation.value == R.PRESENT
                        else False if evaluation.value == R.ABSENT else None)
    return SrSummary(
        probability=probability, positive=positive,
        spread=[v for g in images for v in _values(g, R.PROBABILITY, R.STANDARD_DEVIATION)],
        csa=[v for g in images for v in _values(g, R.AREA)],
        thickness=[v for g in images for v in _values(g, R.THICKNESS)],
        echo=[v for g in images for v in _values(g, R.ECHO_INTENSITY, R.MEAN)],
        images=len(images), roi=[roi_source(g) for g in images])


def seg_frames(path: Path) -> list[tuple[str, int, Any]]:
    """(source SOP Instance UID, source frame number, bool mask) of each frame of a DICOM-SEG."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array).astype(bool)
    if pixels.ndim == 2:
        pixels = pixels[None]
    out: list[tuple[str, int, Any]] = []
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        refs = [src for der in item.get("DerivationImageSequence", [])
                for src in der.get("SourceImageSequence", [])]
        refs = refs or list(ds.get("SourceImageSequence", []))
        if not refs:
            raise DemoError(f"{path}: SEG frame {i + 1} references no source image")
        frame = int(refs[0].get("ReferencedFrameNumber", 1) or 1)
        out.append((str(refs[0].ReferencedSOPInstanceUID), frame, pixels[i]))
    return out


def dice_vs_truth(path: Path, truth_dir: Path) -> list[float]:
    """Dice of each frame of an AI SEG against the generator's truth mask of that source frame.

    The generator stores ``truth/<SOP Instance UID>.npz`` with ``mask`` (frames, Rows, Columns):
    the same pixel grid as the US object, so no resampling is involved.
    """
    import numpy as np

    out = []
    for sop, frame, mask in seg_frames(path):
        truth_path = truth_dir / f"{sop}.npz"
        if not truth_path.exists():
            raise DemoError(f"{path} references {sop}, which has no generator truth in "
                            f"{truth_dir}")
        with np.load(truth_path) as npz:
            truth = np.asarray(npz["mask"])[frame - 1].astype(bool)
        if truth.shape != mask.shape:
            raise DemoError(f"{path}: SEG frame {mask.shape} is not the source image grid "
                            f"{truth.shape}")
        total = int(mask.sum() + truth.sum())
        out.append(2.0 * int((mask & truth).sum()) / total if total else 1.0)
    return out


def dciodvfy_errors(path: Path) -> int | None:
    """Number of errors dciodvfy reports for ``path``; None when dciodvfy is not installed."""
    exe = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists()
                                       else None)
    if exe is None:
        return None
    r = subprocess.run([exe, str(path)], check=False, capture_output=True, text=True, timeout=60)
    return sum(1 for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error"))


def export(st: DemoStudy, out: Path) -> Path:
    """Copy the SR and the AI SEGs, and write PNG previews of the heat maps into
    ``out/<patient>``."""
    import numpy as np
    import pydicom
    from PIL import Image

    folder = out / re.sub(r"[^A-Za-z0-9_.-]", "_", st.patient_id or st.study_uid[-12:])
    folder.mkdir(parents=True, exist_ok=True)
    if st.sr is not None:
        shutil.copy2(st.sr, folder / "sr.dcm")
    for i, path in enumerate(sorted(st.segs), start=1):
        shutil.copy2(path, folder / f"ai_seg_{i}.dcm")
    for i, path in enumerate(sorted(st.heatmaps), start=1):
        arr = np.asarray(pydicom.dcmread(path).pixel_array)
        if arr.ndim == 4:
            arr = arr[0]
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-6)).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"heatmap_{i}.png")
    return folder
