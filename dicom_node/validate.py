"""Inbound checks for a C-STORE dataset: SOP class, UIDs and pixel data that is safe to decode.

Runs before anything touches the disk, so every refusal maps to a specific DIMSE status
(PS3.4 B.2.3) and a reason for the log:

* 0xA900 (does not match SOP class): the dataset's SOP class or instance differs from the
  request, or a Type 1 attribute of an image (Rows, PixelData, ...) is missing;
* 0xC210 (cannot understand): malformed or hostile UIDs, a transfer syntax without a decoder,
  a body encoded with another VR encoding than its transfer syntax, inconsistent pixel geometry
  (Rows 0, BitsAllocated 32 in a JPEG baseline stream, unknown photometric interpretation),
  native pixel data of the wrong length, encapsulated pixel data whose items or first frame
  header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE header) disagree with the header;
* 0xA700 (out of resources): the decoded pixels would exceed ``node.max_decoded_mb``.

Liberal where real scanners are sloppy: empty Type 2 attributes (Patient ID), UIDs with a
leading-zero component or trailing padding. A UID that passes :func:`is_valid_uid` holds only
digits and dots, so it can never be a path trick.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedUSVolumeStorage,
    LabelMapSegmentationStorage,
    SegmentationStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from dicom_node.errors import ValidationError
from inference.roi import is_automatic_seg, referenced_frames

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Every storage SOP class pynetdicom knows (US, SEG, every SR kind, KOS, presentation states,
#: secondary capture, encapsulated PDF, ...): a modality may send any of them with a study.
#: All are archived and indexed; only US images (and their SEGs) are scored.
SUPPORTED_STORAGE: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)
#: The classes whose instances are "US images" (what a SEG must reference when one is required).
US_SOP_CLASSES = frozenset(
    {UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, EnhancedUSVolumeStorage}
)
SEG_SOP_CLASSES = frozenset({SegmentationStorage, LabelMapSegmentationStorage})
#: Classes that must carry pixel data (Type 1): a dataset of these without it is not its class.
_IMAGE_REQUIRED = US_SOP_CLASSES | SEG_SOP_CLASSES | frozenset(
    {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
     "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"}  # secondary capture family
)
_MODALITY_BY_CLASS = {UltrasoundImageStorage: "US", UltrasoundMultiFrameImageStorage: "US",
                      EnhancedUSVolumeStorage: "US", SegmentationStorage: "SEG",
                      LabelMapSegmentationStorage: "SEG"}

# UID syntax (PS3.5 9.1) relaxed for leading zeros in a component, which scanners do send: still
# only digits and single dots, so the value is unambiguous and safe as a path component.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD

_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                           DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian})
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_JPEG_LOSSLESS = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_JPEG_2000 = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                        "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                        "1.2.840.10008.1.2.4.203"})
_RLE = "1.2.840.10008.1.2.5"
#: Encapsulated syntaxes whose first frame header is checked here and that pydicom's installed
#: plugins (pylibjpeg, openjpeg, pyjpegls, gdcm) decode; anything else (JPEG-XL, MPEG, JPEG 2000
#: Part 2) is not negotiated and refused at C-STORE by name.
DECODABLE_ENCAPSULATED = frozenset({_JPEG_BASELINE, _JPEG_EXTENDED, _RLE}) | _JPEG_LOSSLESS \
    | _JPEG_LS | _JPEG_2000
#: Upper bound of BitsStored per family (JPEG baseline 8, extended 12, lossless/LS/2000 16).
_MAX_PRECISION = {_JPEG_BASELINE: 8, _JPEG_EXTENDED: 12, **{t: 16 for t in _JPEG_LOSSLESS},
                  **{t: 16 for t in _JPEG_LS}, **{t: 16 for t in _JPEG_2000}, _RLE: 64}

_PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
    "YBR_FULL_422": 3, "YBR_PARTIAL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3,
}
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT UV".split())


def normalise_uid(value: Any) -> str:
    """``value`` without the padding scanners leave (trailing NUL/space, surrounding spaces)."""
    return str(value if value is not None else "").strip("\x00 ")


def is_valid_uid(value: Any) -> bool:
    """True for a usable UID: digits and single dots only (never a path trick), <= 64 characters.

    Leading zeros in a component are tolerated (PS3.5 forbids them, but they are unambiguous).
    """
    return (isinstance(value, str) and 0 < len(value) <= UID_MAX_LENGTH
            and bool(_UID_RE.match(value)))


def uid_problem(value: str) -> str | None:
    """Why ``value`` (already normalised) is refused, or None when it is usable."""
    if not value:
        return "is empty"
    if not _UID_RE.match(value):
        return "is not a UID (only digits and single dots are allowed)"
    if len(value) > UID_MAX_LENGTH:
        return f"is {len(value)} characters long (at most {UID_MAX_LENGTH})"
    return None


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
    # a SEG whose segments are all AUTOMATIC: archived, but never a human ROI (no re-open)
    automatic_seg: bool = False

    @property
    def is_us(self) -> bool:
        return self.sop_class_uid in US_SOP_CLASSES

    @property
    def is_seg(self) -> bool:
        return self.sop_class_uid in SEG_SOP_CLASSES


def _cannot(reason: str) -> ValidationError:
    return ValidationError(STATUS_CANNOT_UNDERSTAND, reason)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
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
    value = normalise_uid(ds[keyword].value)
    problem = uid_problem(value)
    if problem:
        raise _cannot(f"{keyword} {problem}")
    return value


def referenced_sop_uids(ds: Dataset) -> tuple[str, ...]:
    """Source images a SEG covers: the same answer the scorer uses (:func:`referenced_frames`)."""
    return tuple(uid for uid in referenced_frames(ds) if is_valid_uid(uid))


def _explicit_chain(body: bytes) -> bool:
    """True when the first two elements of ``body`` parse as explicit VR little endian."""
    if len(body) < 8 or body[4:6] not in _VRS:
        return False
    group = struct.unpack_from("<H", body, 0)[0]
    if body[4:6] in _LONG_VRS:
        nxt = 12 + struct.unpack_from("<I", body, 8)[0] if len(body) >= 12 else len(body) + 1
    else:
        nxt = 8 + struct.unpack_from("<H", body, 6)[0]
    if nxt == len(body):
        return True
    return nxt + 8 <= len(body) and struct.unpack_from("<H", body, nxt)[0] >= group \
        and body[nxt + 4 : nxt + 6] in _VRS


def check_encoding(body: bytes, transfer_syntax: str) -> None:
    """Refuse a body whose first elements are encoded with the other VR encoding.

    pydicom silently switches between implicit and explicit VR when it sees a mismatch; a body
    that contradicts its negotiated syntax is malformed, so it is refused instead of guessed at.
    Only the first elements are read.
    """
    if len(body) < 8 or transfer_syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return
    if transfer_syntax == ImplicitVRLittleEndian:
        if _explicit_chain(body):
            raise _cannot("the body is explicit VR but the transfer syntax is implicit VR "
                          "little endian")
    elif body[4:6] not in _VRS:
        raise _cannot("the body is implicit VR but the transfer syntax is explicit VR "
                      "little endian")


def _fragments(data: bytes) -> list[bytes]:
    """The items of encapsulated pixel data (the basic offset table first); raises if malformed."""
    items: list[bytes] = []
    offset = 0
    while offset + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, offset)
        tag = (group << 16) | elem
        if tag == _SEQ_DELIM:
            offset = len(data)
            break
        if tag != _ITEM:
            raise _cannot("encapsulated pixel data: bad item tag")
        if length == 0xFFFFFFFF or offset + 8 + length > len(data):
            raise _cannot("encapsulated pixel data is truncated")
        items.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    if offset != len(data):
        raise _cannot("encapsulated pixel data is truncated")
    return items


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str


def _frame_header(ts: str, frame: bytes, g: _Geometry) -> None:
    """Compare the first frame's codestream header with the dataset's geometry."""
    name = UID(ts).name
    if ts == _RLE:
        if len(frame) < 64:
            raise _cannot("RLE frame is shorter than its 64-byte header")
        count, *offsets = struct.unpack_from("<16I", frame, 0)
        expected = g.samples * (g.bits_allocated // 8)
        if count != expected:
            raise _cannot(f"RLE header has {count} segments; {g.samples} samples of "
                          f"{g.bits_allocated} bits need {expected}")
        used = offsets[:count]
        if used[0] != 64 or any(b <= a for a, b in pairwise(used)) or used[-1] >= len(frame):
            raise _cannot("RLE segment offsets are inconsistent")
        return
    if ts in _JPEG_2000:
        at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ (also inside a JP2 box)
        if at < 0 or len(frame) < at + 4 + 38 + 3 * g.samples:
            raise _cannot(f"{name}: first frame has no SIZ marker segment")
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frame, at + 8)
        csiz = struct.unpack_from(">H", frame, at + 40)[0]
        precision = (frame[at + 42] & 0x7F) + 1
        width, height = xsiz - xo, ysiz - yo
        _compare(name, width, height, csiz, precision, g)
        return
    # JPEG family: SOI, then walk marker segments to the first SOF (or SOF55 for JPEG-LS).
    if frame[:2] != b"\xff\xd8":
        raise _cannot(f"{name}: first frame does not start with a JPEG SOI marker")
    want = {0xF7} if ts in _JPEG_LS else ({0xC3, 0xC7, 0xCB, 0xCF} if ts in _JPEG_LOSSLESS
                                         else {0xC0, 0xC1} if ts == _JPEG_BASELINE
                                         else {0xC0, 0xC1, 0xC2})
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            raise _cannot(f"{name}: first frame has a malformed marker segment")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", frame, pos + 2)[0]
        is_sof = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7
        if is_sof:
            if marker not in want:
                raise _cannot(f"{name}: first frame is coded with SOF marker 0x{marker:02X}")
            if pos + 10 > len(frame):
                break
            precision, height, width, comps = struct.unpack_from(">BHHB", frame, pos + 4)
            _compare(name, width, height, comps, precision, g, height_may_be_zero=True)
            return
        if marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            break
        pos += 2 + length
    raise _cannot(f"{name}: first frame has no frame header (SOF)")


def _compare(name: str, width: int, height: int, comps: int, precision: int, g: _Geometry, *,
             height_may_be_zero: bool = False) -> None:
    if width != g.columns or (height != g.rows and not (height_may_be_zero and height == 0)):
        raise _cannot(f"{name}: first frame is {width}x{height}, the header says "
                      f"{g.columns}x{g.rows}")
    if comps != g.samples:
        raise _cannot(f"{name}: first frame has {comps} components, SamplesPerPixel is {g.samples}")
    if precision > g.bits_allocated:
        raise _cannot(f"{name}: first frame has {precision}-bit samples, BitsAllocated is "
                      f"{g.bits_allocated}")


def _geometry(ds: Dataset, ts: str) -> _Geometry:
    """Rows, Columns, frames, samples and bits, each in range and consistent with ``ts``."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not columns or not (0 < rows <= 65535 and 0 < columns <= 65535):
        raise _cannot(f"image geometry Rows={ds.get('Rows')} Columns={ds.get('Columns')} "
                      "is not usable")
    frames = 1
    if "NumberOfFrames" in ds and ds.NumberOfFrames not in (None, ""):
        frames = _int(ds, "NumberOfFrames") or 0
        if frames < 1:
            raise _cannot("NumberOfFrames is not a positive integer")
    samples = _int(ds, "SamplesPerPixel")
    if samples not in (1, 3):
        raise _cannot(f"SamplesPerPixel {samples} is not 1 or 3")
    bits = _int(ds, "BitsAllocated")
    if bits not in (1, 8, 16, 32, 64):
        raise _cannot(f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    stored = _int(ds, "BitsStored") if ds.get("BitsStored") not in (None, "") else bits
    if stored is None or not 0 < stored <= bits:
        raise _cannot(f"BitsStored {ds.get('BitsStored')} does not fit BitsAllocated {bits}")
    if _int(ds, "PixelRepresentation") not in (None, 0, 1):
        raise _cannot("PixelRepresentation is not 0 or 1")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric not in _PHOTOMETRIC_SAMPLES:
        raise _cannot(f"unknown PhotometricInterpretation {photometric[:20]!r}")
    if _PHOTOMETRIC_SAMPLES[photometric] != samples:
        raise _cannot(f"PhotometricInterpretation {photometric} needs "
                      f"{_PHOTOMETRIC_SAMPLES[photometric]} samples, SamplesPerPixel is {samples}")
    if photometric == "PALETTE COLOR" and not all(
            f"{c}PaletteColorLookupTableDescriptor" in ds for c in ("Red", "Green", "Blue")):
        raise ValidationError(STATUS_DOES_NOT_MATCH, "PALETTE COLOR image without its palette "
                              "color lookup tables")
    if samples == 3 and _int(ds, "PlanarConfiguration") not in (None, 0, 1):
        raise _cannot("PlanarConfiguration is not 0 or 1")
    if ts in DECODABLE_ENCAPSULATED:
        if ts == _RLE:
            if bits == 1 or samples * bits // 8 > 15:
                raise _cannot(f"RLE cannot hold {samples} samples of {bits} bits")
        elif bits not in (8, 16) or stored > _MAX_PRECISION[ts]:
            raise _cannot(f"{UID(ts).name} cannot hold BitsAllocated {bits} / BitsStored {stored}")
        if ts == _JPEG_BASELINE and bits != 8:
            raise _cannot(f"JPEG baseline is 8-bit, BitsAllocated is {bits}")
    return _Geometry(rows, columns, frames, samples, bits, stored, photometric)


def decoded_size(g: _Geometry) -> int:
    """Bytes the decoded pixel data occupies (what a decoder will allocate)."""
    return (g.rows * g.columns * g.frames * g.samples * g.bits_allocated + 7) // 8


def check_pixel_data(ds: Dataset, transfer_syntax: str, *, max_decoded_bytes: int) -> None:
    """Raise unless the pixel data can be decoded safely (see the module docstring)."""
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                    "PhotometricInterpretation"):
        if keyword not in ds:
            raise ValidationError(STATUS_DOES_NOT_MATCH, f"required attribute {keyword} is missing")
    if "PixelData" not in ds:
        raise ValidationError(STATUS_DOES_NOT_MATCH, "required attribute PixelData is missing")
    g = _geometry(ds, transfer_syntax)
    size = decoded_size(g)
    if size > max_decoded_bytes:
        raise ValidationError(
            STATUS_OUT_OF_RESOURCES,
            f"decoded pixel data would be {size / 2**20:.0f} MiB ({g.columns}x{g.rows}, {g.frames} "
            f"frames, {g.samples} samples of {g.bits_allocated} bits), over node.max_decoded_mb",
        )
    data = ds.PixelData
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise _cannot("PixelData is empty")
    if UID(transfer_syntax).is_encapsulated:
        items = _fragments(bytes(data))
        if len(items) - 1 < g.frames:  # a fragment never holds more than one frame
            raise _cannot(f"encapsulated pixel data has {max(len(items) - 1, 0)} fragments for "
                          f"{g.frames} frames")
        _frame_header(transfer_syntax, items[1], g)
        return
    expected = get_expected_length(ds, "bytes")
    if len(data) < expected:
        raise _cannot(f"pixel data is truncated: {len(data)} bytes, {expected} expected")
    # one trailing pad byte is normal; a few bytes of vendor padding are tolerated, a whole
    # frame more means the geometry is wrong
    frame_bytes = max(expected // g.frames, 2)
    if len(data) - expected >= frame_bytes:
        raise _cannot(f"pixel data is {len(data)} bytes, {expected} expected for the geometry")


def validate(
    ds: Dataset,
    *,
    affected_sop_class: str,
    affected_sop_instance: str,
    transfer_syntax: str,
    max_decoded_mb: int = 512,
) -> InstanceInfo:
    """Check one inbound dataset and return what the archive needs to file and index it.

    Args:
        ds: the decoded dataset (may still raise on first access if malformed).
        affected_sop_class: the SOP class the C-STORE request (and its presentation context)
            announced; the dataset must be of the same class.
        affected_sop_instance: the request's Affected SOP Instance UID.
        transfer_syntax: the presentation context's transfer syntax.
        max_decoded_mb: ``node.max_decoded_mb``.

    Raises:
        ValidationError: with the DIMSE status to answer (0xA700, 0xA900 or 0xC210).
    """
    if affected_sop_class not in SUPPORTED_STORAGE:
        raise ValidationError(STATUS_DOES_NOT_MATCH,
                              f"SOP class {affected_sop_class[:64]!r} is not a storage class")
    ts = str(transfer_syntax)
    if ts not in _UNCOMPRESSED and ts not in DECODABLE_ENCAPSULATED:
        raise _cannot(f"transfer syntax {ts} ({UID(ts).name or 'unknown'}) cannot be decoded here")
    request_uid = normalise_uid(affected_sop_instance)
    problem = uid_problem(request_uid)
    if problem:
        raise _cannot(f"Affected SOP Instance UID {problem}")
    try:
        sop_class = _uid(ds, "SOPClassUID")
        if sop_class != affected_sop_class:
            raise ValidationError(
                STATUS_DOES_NOT_MATCH,
                f"dataset SOP class {sop_class} does not match the request's {affected_sop_class}",
            )
        sop_uid = _uid(ds, "SOPInstanceUID")
        if sop_uid != request_uid:
            raise ValidationError(
                STATUS_DOES_NOT_MATCH,
                "SOP Instance UID differs from the request's Affected SOP Instance UID",
            )
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        if sop_class in _IMAGE_REQUIRED or "PixelData" in ds:
            check_pixel_data(ds, ts, max_decoded_bytes=max_decoded_mb * 2**20)
        refs = referenced_sop_uids(ds) if sop_class in SEG_SOP_CLASSES else ()
        return InstanceInfo(
            sop_uid=sop_uid,
            sop_class_uid=sop_class,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=_text(ds, "PatientID"),  # Type 2: may be empty
            modality=_text(ds, "Modality").split("\\")[0].strip().upper()[:16]
            or _MODALITY_BY_CLASS.get(sop_class, "OT"),
            series_number=_int(ds, "SeriesNumber"),
            manufacturer=_text(ds, "Manufacturer"),
            model_name=_text(ds, "ManufacturerModelName"),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            frames=_int(ds, "NumberOfFrames") or 1,
            photometric=_text(ds, "PhotometricInterpretation"),
            referenced_sop_uids=refs,
            automatic_seg=sop_class in SEG_SOP_CLASSES and is_automatic_seg(ds),
        )
    except ValidationError:
        raise
    except Exception as exc:  # lazily decoded elements raise on first access when malformed
        kind = type(exc).__name__ if type(exc).__module__ == "builtins" else \
            f"{type(exc).__module__}.{type(exc).__name__}"
        raise _cannot(f"dataset cannot be decoded: {kind}") from exc
