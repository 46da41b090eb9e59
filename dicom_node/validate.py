"""Inbound checks for a C-STORE dataset: SOP class, UIDs, Patient ID and pixel data integrity.

Runs before anything touches the disk, so every rejection maps to a specific DIMSE status
(PS3.4 B.2.3): 0xA900 the dataset does not match its SOP class (wrong class, a required
attribute missing), 0xC210 the dataset cannot be understood (malformed UIDs, truncated or
unparseable pixel data). A UID that passes :func:`is_valid_uid` contains only digits and dots,
so it is safe to use as a path component.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID
from pynetdicom.sop_class import (
    EnhancedUSVolumeStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from dicom_node.errors import ValidationError
from inference.roi import referenced_frames

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Storage SOP classes the node accepts, with the modality they normally carry.
SUPPORTED_STORAGE: dict[str, str] = {
    UltrasoundImageStorage: "US",
    UltrasoundMultiFrameImageStorage: "US",
    EnhancedUSVolumeStorage: "US",
    SegmentationStorage: "SEG",
    SecondaryCaptureImageStorage: "OT",
}
#: The classes whose instances are "US images" (what a SEG must reference when one is required).
US_SOP_CLASSES = frozenset(
    {UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, EnhancedUSVolumeStorage}
)
SEG_SOP_CLASSES = frozenset({SegmentationStorage})

# PS3.5 9.1: components of digits without leading zeros, separated by single dots, <= 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD


def is_valid_uid(value: Any) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots only, so never a path trick)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


@dataclass(frozen=True)
class InstanceInfo:
    """The header values the archive indexes; every UID here passed :func:`is_valid_uid`."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    series_number: int | None
    manufacturer: str
    model_name: str
    rows: int | None
    columns: int | None
    frames: int | None
    photometric: str
    referenced_sop_uids: tuple[str, ...]

    @property
    def is_us(self) -> bool:
        return self.sop_class_uid in US_SOP_CLASSES

    @property
    def is_seg(self) -> bool:
        return self.sop_class_uid in SEG_SOP_CLASSES


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    if keyword not in ds or ds[keyword].value in (None, ""):
        raise ValidationError(STATUS_DOES_NOT_MATCH, f"required attribute {keyword} is missing")
    value = str(ds[keyword].value).strip("\x00 ")
    if not is_valid_uid(value):
        raise ValidationError(STATUS_CANNOT_UNDERSTAND, f"{keyword} is not a valid UID: {value[:80]!r}")
    return value


def referenced_sop_uids(ds: Dataset) -> tuple[str, ...]:
    """Source images a SEG covers: the same answer the scorer uses (:func:`referenced_frames`)."""
    return tuple(uid for uid in referenced_frames(ds) if is_valid_uid(uid))


def _check_encapsulated(data: bytes, frames: int) -> None:
    """Walk the item headers: each must fit in the buffer, and there must be a fragment per frame."""
    offset, items = 0, 0
    while offset + 8 <= len(data):
        tag_group, tag_elem, length = struct.unpack_from("<HHI", data, offset)
        tag = (tag_group << 16) | tag_elem
        if tag == _SEQ_DELIM:
            offset = len(data)
            break
        if tag != _ITEM:
            raise ValidationError(STATUS_CANNOT_UNDERSTAND, "encapsulated pixel data: bad item tag")
        offset += 8 + length
        if offset > len(data):
            raise ValidationError(STATUS_CANNOT_UNDERSTAND, "encapsulated pixel data is truncated")
        items += 1
    if offset != len(data):
        raise ValidationError(STATUS_CANNOT_UNDERSTAND, "encapsulated pixel data is truncated")
    if items - 1 < max(frames, 1):  # first item is the basic offset table
        raise ValidationError(
            STATUS_CANNOT_UNDERSTAND, f"encapsulated pixel data has {max(items - 1, 0)} fragments "
            f"for {frames} frames"
        )


def check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Raise unless the pixel data is present and as long as Rows x Columns x frames requires."""
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword not in ds:
            raise ValidationError(STATUS_DOES_NOT_MATCH, f"required attribute {keyword} is missing")
    if "PixelData" not in ds:
        raise ValidationError(STATUS_DOES_NOT_MATCH, "required attribute PixelData is missing")
    data = ds.PixelData
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValidationError(STATUS_CANNOT_UNDERSTAND, "PixelData is empty")
    frames = _int(ds, "NumberOfFrames") or 1
    if UID(transfer_syntax).is_encapsulated:
        _check_encapsulated(bytes(data), frames)
        return
    expected = get_expected_length(ds, "bytes")
    if len(data) < expected:
        raise ValidationError(
            STATUS_CANNOT_UNDERSTAND,
            f"pixel data is truncated: {len(data)} bytes, {expected} expected",
        )


def validate(
    ds: Dataset,
    *,
    affected_sop_class: str,
    affected_sop_instance: str,
    transfer_syntax: str,
) -> InstanceInfo:
    """Check one inbound dataset and return what the archive needs to file and index it.

    Args:
        ds: the decoded dataset (may still raise on first access if malformed).
        affected_sop_class: the SOP class the C-STORE request (and its presentation context)
            announced; the dataset must be of the same class.
        affected_sop_instance: the request's Affected SOP Instance UID.
        transfer_syntax: the presentation context's transfer syntax.

    Raises:
        ValidationError: with the DIMSE status to answer (0xA900 or 0xC210).
    """
    if affected_sop_class not in SUPPORTED_STORAGE:
        raise ValidationError(STATUS_DOES_NOT_MATCH, f"SOP class {affected_sop_class} not supported")
    try:
        sop_class = _uid(ds, "SOPClassUID")
        if sop_class != affected_sop_class:
            raise ValidationError(
                STATUS_DOES_NOT_MATCH,
                f"dataset SOP class {sop_class} does not match the request's {affected_sop_class}",
            )
        sop_uid = _uid(ds, "SOPInstanceUID")
        if sop_uid != str(affected_sop_instance).strip("\x00 "):
            raise ValidationError(
                STATUS_DOES_NOT_MATCH, "SOP Instance UID differs from the request's Affected SOP Instance UID"
            )
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        patient_id = _text(ds, "PatientID")
        if not patient_id:
            raise ValidationError(STATUS_DOES_NOT_MATCH, "required attribute PatientID is missing or empty")
        check_pixel_data(ds, transfer_syntax)
        refs = referenced_sop_uids(ds) if sop_class in SEG_SOP_CLASSES else ()
        return InstanceInfo(
            sop_uid=sop_uid,
            sop_class_uid=sop_class,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            modality=_text(ds, "Modality") or SUPPORTED_STORAGE[sop_class],
            series_number=_int(ds, "SeriesNumber"),
            manufacturer=_text(ds, "Manufacturer"),
            model_name=_text(ds, "ManufacturerModelName"),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            frames=_int(ds, "NumberOfFrames") or 1,
            photometric=_text(ds, "PhotometricInterpretation"),
            referenced_sop_uids=refs,
        )
    except ValidationError:
        raise
    except Exception as exc:  # lazily decoded elements raise on first access when malformed
        raise ValidationError(
            STATUS_CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(exc).__name__}: {exc}"
        ) from exc
