"""Seeded mutations of synthetic DICOM objects, for fuzzing anything that receives DICOM.

:func:`generate` yields :class:`Case` objects: the complete Part 10 file bytes of one mutated
object plus the request it should travel in (SOP class, transfer syntax from its file meta).
The same ``seed`` and ``n`` always give the same cases, so a failing case can be replayed by
its index. Mutations are grouped by what they attack (geometry, lengths, transfer syntaxes, VRs,
UIDs, sequences, person names, Type 1/2 attributes, raw bytes); about one case in twelve is an
unmutated control, so "every valid object is stored" is checked in the same run.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from pydicom import Dataset, config, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from tests.builders import make_seg, make_us

EXPLICIT, IMPLICIT, BIG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
DEFLATED, JPEG_XL = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.112"


@dataclass(frozen=True)
class Case:
    """One fuzz case: ``data`` is a Part 10 file; ``name`` says which mutations made it."""

    index: int
    name: str
    data: bytes


@contextmanager
def lenient_pydicom() -> Iterator[None]:
    """Let pydicom write the invalid values the mutations create, without warning about each."""
    old = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    config.settings.reading_validation_mode = config.IGNORE
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = old
        pydicom_log.setLevel(level)


# ---------------------------------------------------------------- synthetic originals


def _jpeg(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def _rgb(seed: int) -> Dataset:
    ds = make_us(seed=seed, size=48)
    rgb = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    return ds


def _multiframe(seed: int) -> Dataset:
    ds = make_us(seed=seed, size=32)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.NumberOfFrames, ds.FrameIncrementPointer, ds.FrameTime = 4, 0x00181063, 33.3
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 255, (4, 32, 32), dtype=np.uint8).tobytes()
    return ds


def _sixteen_bit(seed: int) -> Dataset:
    ds = make_us(seed=seed, size=32)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4095, (32, 32), dtype=np.uint16).tobytes()
    return ds


def _sc(seed: int) -> Dataset:
    ds = make_us(seed=seed, size=32)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Modality, ds.ConversionType = "OT", "WSD"
    return ds


def _compressed(seed: int, syntax: str) -> Dataset:
    ds = make_us(seed=seed, size=32)
    if syntax == JPEGBaseline8Bit:
        return _jpeg(ds)
    ds.compress(syntax)
    return ds


@lru_cache(maxsize=1)
def _originals() -> tuple[tuple[str, Dataset], ...]:
    """The unmutated objects of two small synthetic studies (built once, copied per case)."""
    us = make_us(seed=1)
    return (
        ("us", us), ("us-rgb", _rgb(2)), ("us-multiframe", _multiframe(3)),
        ("us-16bit", _sixteen_bit(4)), ("sc", _sc(5)), ("seg", make_seg(us)),
        ("us-jpeg", _compressed(6, JPEGBaseline8Bit)), ("us-rle", _compressed(7, RLELossless)),
        ("us-j2k", _compressed(8, JPEG2000Lossless)), ("us-jls", _compressed(9, JPEGLSLossless)),
    )


def _fresh(ds: Dataset, rng: random.Random) -> Dataset:
    """A copy with new instance/series/study UIDs so cases never collide in the archive."""
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[str(rng.random())])
    out.StudyInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    out.SeriesInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    return out


# ---------------------------------------------------------------- mutations on datasets
# Each takes (rng, ds), changes ds in place and returns a short label.

Mutation = Callable[[random.Random, Dataset], str]


def _set(ds: Dataset, keyword_or_tag: str | int, vr: str, value: object) -> None:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword_or_tag) if isinstance(keyword_or_tag, str) else keyword_or_tag
    ds[tag] = DataElement(tag, vr, value)


def geometry(rng: random.Random, ds: Dataset) -> str:
    choice = rng.choice(["rows", "columns", "huge", "frames", "samples", "bits", "stored",
                         "photometric", "planar", "representation"])
    if choice == "rows":
        ds.Rows = rng.choice([0, 1, ds.Rows + 1, ds.Rows * 2, 65535])
    elif choice == "columns":
        ds.Columns = rng.choice([0, 3, ds.Columns - 1, 65535])
    elif choice == "huge":
        ds.Rows = ds.Columns = 65535
    elif choice == "frames":
        _set(ds, "NumberOfFrames", "IS", rng.choice(["0", "-3", "2", "1000000", "x", "1.5", ""]))
    elif choice == "samples":
        ds.SamplesPerPixel = rng.choice([0, 2, 3, 4, 1])
    elif choice == "bits":
        ds.BitsAllocated = rng.choice([0, 1, 7, 12, 16, 24, 32, 64])
    elif choice == "stored":
        ds.BitsStored = rng.choice([0, 9, 17, 33])
    elif choice == "photometric":
        _set(ds, "PhotometricInterpretation", "CS",
             rng.choice(["GARBAGE", "", "RGB", "MONOCHROME2", "YBR_FULL_422", "PALETTE COLOR",
                         "HSV"]))
    elif choice == "planar":
        ds.PlanarConfiguration = rng.choice([1, 2, 7])
    else:
        ds.PixelRepresentation = rng.choice([1, 5])
    return f"geometry/{choice}"


def lengths(rng: random.Random, ds: Dataset) -> str:
    data = bytes(ds.PixelData)
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
    choice = rng.choice(["truncate", "extend", "empty", "delete", "odd"]
                        + (["drop-frame", "corrupt-frame", "bad-item", "split"]
                           if encapsulated else []))
    if choice == "truncate":
        ds.PixelData = data[: rng.randrange(0, max(len(data), 1))]
    elif choice == "extend":
        extra = rng.choice([2, 64, len(data)])
        ds.PixelData = data + bytes(rng.randrange(0, 256) for _ in range(extra))
    elif choice == "empty":
        ds.PixelData = b""
    elif choice == "delete":
        del ds.PixelData
    elif choice == "odd":
        ds.PixelData = data[:-1] if len(data) % 2 == 0 else data + b"\x00"
    elif choice in ("drop-frame", "corrupt-frame", "split"):
        frames = list(generate_frames(data, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
        if choice == "drop-frame":
            frames = frames[:-1] or [b""]
        elif choice == "corrupt-frame":
            f = bytearray(frames[0])
            for _ in range(rng.randrange(1, 8)):
                f[rng.randrange(0, min(len(f), 64))] = rng.randrange(256)
            frames[0] = bytes(f)
        else:
            f = frames[0]
            frames = [f[: len(f) // 2], f[len(f) // 2 :]] + frames[1:]
        ds.PixelData = encapsulate([fr + b"\x00" * (len(fr) % 2) for fr in frames])
    else:  # bad item tag somewhere after the offset table
        b = bytearray(data)
        at = rng.randrange(8, max(len(b) - 4, 9))
        b[at : at + 4] = rng.choice([b"\xfe\xff\x00\xe0", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"])
        ds.PixelData = bytes(b)
    return f"lengths/{choice}"


def syntaxes(rng: random.Random, ds: Dataset) -> str:
    ts = rng.choice([EXPLICIT, IMPLICIT, BIG, DEFLATED, JPEGBaseline8Bit, RLELossless,
                     JPEG2000Lossless, JPEGLSLossless, JPEG_XL, "1.2.840.10008.1.2.4.51",
                     "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.100"])
    ds.file_meta.TransferSyntaxUID = ts  # the body keeps its real encoding: the meta lies
    return f"syntax/{ts.rsplit('.', 2)[-2]}.{ts.rsplit('.', 1)[-1]}"


def vrs(rng: random.Random, ds: Dataset) -> str:
    choice = rng.choice(["rows-SS", "rows-UL", "is-text", "ds-inf", "date", "time", "age",
                         "un", "long-lo", "cs-lower"])
    if choice == "rows-SS":
        _set(ds, "Rows", "SS", -ds.Rows)
    elif choice == "rows-UL":
        _set(ds, "Rows", "UL", 2**31)
    elif choice == "is-text":
        _set(ds, "InstanceNumber", "IS", "abc")
    elif choice == "ds-inf":
        _set(ds, "FrameTime", "DS", rng.choice(["1e999", "NaN", "-0", "12345678901234567"]))
    elif choice == "date":
        _set(ds, "StudyDate", "DA", rng.choice(["20261399", "2026", "yesterday", "2026-01-01"]))
    elif choice == "time":
        _set(ds, "StudyTime", "TM", rng.choice(["12:00:00.1234567890", "256060", "noon"]))
    elif choice == "age":
        _set(ds, "PatientAge", "AS", rng.choice(["999Y", "-1Y", "old"]))
    elif choice == "un":
        _set(ds, "BodyPartExamined", "UN", b"\xff\xfe" * rng.randrange(1, 50))
    elif choice == "long-lo":
        _set(ds, "StudyDescription", "LO", "x" * rng.choice([65, 1000, 70000]))
    else:
        _set(ds, "Modality", "CS", "us\\ct")
    return f"vr/{choice}"


def _long_uid(n: int) -> str:
    return ("1.2.826.0.1.3680043.8.498." + "1" * n)[:n]


def uids(rng: random.Random, ds: Dataset) -> str:
    keyword = rng.choice(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
    choice = rng.choice(["leading-zero", "padding", "65", "74", "200", "traversal", "control-chars",
                         "empty", "letters", "mismatch", "class-mismatch", "unknown-class"])
    base = str(ds[keyword].value)
    value = {
        "leading-zero": base + ".0123", "padding": base + " ", "65": _long_uid(65),
        "74": _long_uid(74), "200": _long_uid(200), "traversal": "1.2/../../../etc",
        "control-chars": base[:20] + "\x01\x7f\n", "empty": "", "letters": "1.2.abc.4",
    }.get(choice)
    if choice == "mismatch":
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    elif choice == "class-mismatch":
        _set(ds, "SOPClassUID", "UI", rng.choice([SecondaryCaptureImageStorage,
                                                   UltrasoundMultiFrameImageStorage]))
    elif choice == "unknown-class":
        _set(ds, "SOPClassUID", "UI", "1.2.3.4.5")
    else:
        _set(ds, keyword, "UI", value)
        if keyword == "SOPInstanceUID" and value and rng.random() < 0.7:
            _set(ds.file_meta, "MediaStorageSOPInstanceUID", "UI", value)
    return f"uid/{choice}"


def sequences(rng: random.Random, ds: Dataset) -> str:
    choice = rng.choice(["deep", "empty-items", "many-items", "junk-references", "regions"])
    if choice == "deep":
        inner = Dataset()
        inner.CodeValue = "1"
        for _ in range(rng.choice([10, 50, 120])):
            outer = Dataset()
            outer.ContentSequence = Sequence([inner])
            inner = outer
        ds.ContentSequence = Sequence([inner])
    elif choice == "empty-items":
        ds.ReferencedSeriesSequence = Sequence([Dataset() for _ in range(3)])
    elif choice == "many-items":
        ds.SourceImageSequence = Sequence(
            [Dataset() for _ in range(rng.choice([100, 2000]))])
    elif choice == "junk-references":
        item = Dataset()
        _set(item, "ReferencedSOPInstanceUID", "UI", rng.choice(["../..", "", "1" * 200, "\x00"]))
        series = Dataset()
        series.ReferencedInstanceSequence = Sequence([item])
        ds.ReferencedSeriesSequence = Sequence([series])
    else:
        region = Dataset()
        _set(region, "RegionLocationMinX0", "UL", rng.choice([0, 2**32 - 1]))
        _set(region, "PhysicalDeltaX", "FD", rng.choice([0.0, -1.0, float("nan"), 1e308]))
        ds.SequenceOfUltrasoundRegions = Sequence([region, Dataset()])
    return f"sequence/{choice}"


#: The label of an unmutated case (the last word of its name).
CONTROL = "unmutated"

FORGED_LINE = "2026-01-01 00:00:00,000 INFO    dicom_node.scp: study 1.2.3: stored instance 1.2.3.4"


def names(rng: random.Random, ds: Dataset) -> str:
    choice = rng.choice(["control-chars", "newline", "forged", "long", "single", "groups", "latin1",
                         "charset"])
    value = {
        "control-chars": "Doe\x00\x01\x7f^Jane", "newline": "Doe^Jane\nSecond^Line\r",
        "forged": "Doe^Jane\n" + FORGED_LINE, "long": "A" * 5000 + "^B",
        "single": "DOEJANE", "groups": "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "latin1": "Müller^Jürgen",
    }.get(choice)
    if choice == "charset":
        _set(ds, "SpecificCharacterSet", "CS",
             rng.choice(["ISO_IR 999", "GARBAGE", "ISO 2022 IR 87"]))
        _set(ds, "PatientName", "PN", "Doe^Jane")
    elif choice == "latin1":
        _set(ds, "PatientName", "PN", value.encode("latin-1"))  # bytes without a character set
    else:
        _set(ds, "PatientName", "PN", value)
    if rng.random() < 0.3:
        _set(ds, "ReferringPhysicianName", "PN", value or "X")
    return f"name/{choice}"


def attributes(rng: random.Random, ds: Dataset) -> str:
    choice = rng.choice(["pid-empty", "pid-missing", "study-date-empty", "modality-empty",
                         "no-study-uid", "no-sop-class", "no-rows", "no-photometric"])
    if choice == "pid-empty":
        ds.PatientID = ""
    elif choice == "pid-missing":
        del ds.PatientID
    elif choice == "study-date-empty":
        ds.StudyDate = ""
    elif choice == "modality-empty":
        ds.Modality = ""
    else:
        keyword = {"no-study-uid": "StudyInstanceUID", "no-sop-class": "SOPClassUID",
                   "no-rows": "Rows", "no-photometric": "PhotometricInterpretation"}[choice]
        if keyword in ds:
            del ds[keyword]
    return f"attribute/{choice}"


MUTATIONS: tuple[Mutation, ...] = (geometry, lengths, syntaxes, vrs, uids, sequences, names,
                                   attributes)


# ---------------------------------------------------------------- raw byte mutations


def _encode(ds: Dataset, real_ts: str) -> bytes:
    """Part 10 bytes with the body in ``real_ts`` and the meta saying what the mutation chose."""
    declared = str(ds.file_meta.TransferSyntaxUID)
    ds.file_meta.TransferSyntaxUID = real_ts
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    with lenient_pydicom():
        try:
            dcmwrite(buf, ds, enforce_file_format=True)
        except ValueError:  # damaged encapsulated pixel data: written with a defined length
            ds.file_meta.TransferSyntaxUID = real_ts = EXPLICIT
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = declared
    data = buf.getvalue()
    return data if declared == real_ts else _patch_meta_ts(data, declared)


def _patch_meta_ts(data: bytes, declared: str) -> bytes:
    """Replace the (0002,0010) value in explicit-VR meta bytes and fix the group length."""
    at = data.index(b"\x02\x00\x10\x00UI", 132)
    old_len = int.from_bytes(data[at + 6 : at + 8], "little")
    raw = declared.encode()
    raw += b"\x00" * (len(raw) % 2)
    out = data[: at + 6] + len(raw).to_bytes(2, "little") + raw + data[at + 8 + old_len :]
    group = int.from_bytes(out[140:144], "little") + len(raw) - old_len
    return out[:140] + group.to_bytes(4, "little") + out[144:]


def _body_start(data: bytes) -> int:
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def raw_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Byte-level damage to the body (after the file meta), which pydicom cannot produce."""
    start = _body_start(data)
    body = bytearray(data[start:])
    choice = rng.choice(["flip", "truncate", "huge-length", "undefined-length", "garbage-tail"])
    if choice == "flip":
        for _ in range(rng.randrange(1, 16)):
            at = rng.randrange(0, min(len(body), 1024))
            body[at] ^= 1 << rng.randrange(8)
    elif choice == "truncate":
        body = body[: rng.randrange(0, len(body))]
    elif choice in ("huge-length", "undefined-length"):
        at = data.rfind(b"\xe0\x7f\x10\x00") - start  # (7FE0,0010) Pixel Data
        if at >= 0:
            length_at = at + (8 if body[at + 4 : at + 6] in (b"OB", b"OW") else 4)
            body[length_at : length_at + 4] = (b"\xf0\xff\xff\xff" if choice == "huge-length"
                                               else b"\xff\xff\xff\xff")
    else:
        body += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    return f"raw/{choice}", bytes(data[:start]) + bytes(body)


# ---------------------------------------------------------------- the generator


def generate(n: int, seed: int = 0) -> Iterator[Case]:
    """``n`` cases from ``seed``: ~1/12 controls, the rest 1-2 mutations (+ raw damage 1/6)."""
    rng = random.Random(seed)
    originals = _originals()
    for index in range(n):
        label, original = originals[rng.randrange(len(originals))]
        ds = _fresh(original, rng)
        parts = [label]
        with lenient_pydicom():
            if index % 12 != 0:
                for mutate in rng.sample(MUTATIONS, k=rng.choice([1, 1, 2])):
                    try:
                        parts.append(mutate(rng, ds))
                    except Exception as exc:  # noqa: BLE001 - a mutation that does not apply
                        parts.append(f"skipped:{mutate.__name__}:{type(exc).__name__}")
            else:
                parts.append(CONTROL)
        real_ts = str(original.file_meta.TransferSyntaxUID)
        try:
            data = _encode(ds, real_ts)
        except Exception as exc:  # noqa: BLE001 - pydicom cannot write it: send the original
            data = _encode(_fresh(original, rng), real_ts)
            parts.append(f"encode-failed:{type(exc).__name__}")
        if index % 12 != 0 and rng.random() < 1 / 6:
            what, data = raw_bytes(rng, data)
            parts.append(what)
        yield Case(index, " ".join(parts), data)
