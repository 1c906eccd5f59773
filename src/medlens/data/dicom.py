"""DICOM to the medlens image convention: a 2-D float32 array in [0, 1], bright = dense.

The pixel pipeline follows the DICOM standard's grayscale pipeline, using pydicom's own LUT code:
stored values (masked to Bits Stored by pydicom) -> modality LUT (Rescale Slope/Intercept or a Modality LUT
Sequence) -> VOI LUT or window -> scaled to [0, 1] over the range the VOI transform can output, so the
radiologist's chosen window maps to the full display range (not over the image's own min/max, which would
make brightness depend on the patient and the collimation) -> MONOCHROME1 inverted, because in MONOCHROME1
the smallest value is displayed white. Only a file with no window at all is scaled over its own data range.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

try:  # pydicom >= 3
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut

from medlens.errors import DataError

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's convert("L")
#: values per strip when pixels are converted a strip of rows at a time (the LUTs make ~25 bytes of float64
#: temporaries a value: ~6 MB a strip)
STRIP_VALUES = 1 << 18


def first_line(exc: BaseException) -> str:
    """A library exception as one short line (messages end up on the CLI's single error line)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def read_dicom(path: str | os.PathLike | BinaryIO, *, name: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM file's first frame as a float32 [0, 1] display image plus its metadata. ``path`` may be an
    open binary file (the service decodes uploads from memory); ``name`` is what error messages call it."""
    name = name or str(path)
    ds = _dcmread(path if hasattr(path, "read") else name, name)
    return read_dicom_dataset(ds, name)


def read_dicom_dataset(ds: pydicom.Dataset, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_dicom` for a dataset already parsed (the DICOM node receives datasets, not files)."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise DataError(
            f"{name}: has no pixel data (PixelData element missing) — it may be a structured report or "
            "presentation state",
            hint="point medlens at the DICOM image files (CR/DX/CT/MR ...), not at reports or other objects",
        )
    ts = _transfer_syntax(ds)
    raw = _decode(ds, name, ts)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:  # pydicom puts frames first: (F, R, C) or (F, R, C, S)
        raw = raw[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    meta: dict[str, Any] = {
        "format": "dicom",
        "shape": (int(ds.Rows), int(ds.Columns)),
        "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
        "photometric": photometric,
        "transfer_syntax": str(ts),
        "transfer_syntax_name": ts.name,
        "window": _window(ds),
    }
    for key, keyword in (
        ("patient_id", "PatientID"),
        ("modality", "Modality"),
        ("study_uid", "StudyInstanceUID"),
        ("body_part", "BodyPartExamined"),
        ("view_position", "ViewPosition"),
    ):
        if ds.get(keyword):
            meta[key] = str(ds.get(keyword))
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        if spacing:
            meta["pixel_spacing"] = [float(v) for v in spacing][:2]
    except (TypeError, ValueError):
        meta["pixel_spacing_raw"] = str(spacing)
    if frames > 1:
        meta["frames"] = frames
        meta["note"] = f"multi-frame ({frames} frames): frame 0 was read"
    try:
        image = _to_display(raw, ds, photometric, meta)
    except (ValueError, IndexError, KeyError, TypeError) as exc:  # inconsistent LUT/window attributes
        raise DataError(
            f"{name}: pixel values cannot be mapped to grey ({first_line(exc)})",
            hint="check the file's LUT / window attributes, or re-export it",
        ) from exc
    return image, meta


def _dcmread(source: str | BinaryIO, name: str) -> pydicom.Dataset:
    """Parse the file; files without the 128-byte preamble + 'DICM' are retried with force=True."""
    try:
        return pydicom.dcmread(source)
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - truncated headers raise EOFError, struct.error, ...
        raise DataError(
            f"{name}: is not a readable DICOM file ({first_line(exc)})",
            hint="the file is truncated or corrupt: re-export or re-download it",
        ) from exc
    try:
        with warnings.catch_warnings():  # forced parsing of a non-DICOM file warns about every junk element
            warnings.simplefilter("ignore")
            if hasattr(source, "seek"):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(
            f"{name}: is not a DICOM file ({first_line(exc)})",
            hint="check the file's type, or rename it to its real extension",
        ) from exc
    if "SOPClassUID" not in ds and not any(tag in ds for tag in PIXEL_TAGS):
        raise DataError(
            f"{name}: is not a DICOM file (no 'DICM' marker at byte 128 and no DICOM elements)",
            hint="check the file's type, or rename it to its real extension",
        )
    return ds


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The file's transfer syntax; for preamble-less files without one, the encoding pydicom parsed with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return UID(meta.TransferSyntaxUID)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _decode(ds: pydicom.Dataset, name: str, ts: UID) -> np.ndarray:
    """ds.pixel_array, with a missing decoder told apart from broken pixel data."""
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises RuntimeError/NotImplementedError/ValueError
        if ts.is_compressed and not _decoder_available(ts, exc):
            raise DataError(
                f"{name}: cannot decode pixel data: no installed decoder for transfer syntax "
                f"'{ts.name}' ({ts})",
                hint=f"pip install {_decoder_packages(ts)}",
            ) from exc
        raise DataError(
            f"{name}: pixel data cannot be decoded ({first_line(exc)})",
            hint="the file is truncated or corrupt: re-export or re-download it",
        ) from exc


def _decoder_available(ts: UID, exc: Exception) -> bool:
    try:  # pydicom >= 3 can say so directly
        from pydicom.pixels import get_decoder

        return get_decoder(ts).is_available
    except NotImplementedError:  # no decoder exists at all for this transfer syntax
        return False
    except ImportError:  # pydicom 2.x: only the exception text tells
        text = str(exc).lower()
        return not ("missing" in text or "no pixel data handlers" in text)


def _decoder_packages(ts: UID) -> str:
    """The pip packages that add a decoder for `ts` (pylibjpeg's plugins; GDCM covers the rest)."""
    label = ts.name.upper()
    if "2000" in label:
        return "pylibjpeg pylibjpeg-openjpeg"
    if "JPEG" in label:
        return "pylibjpeg pylibjpeg-libjpeg"
    if "RLE" in label:
        return "pylibjpeg pylibjpeg-rle"
    return "python-gdcm"


def _window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (center, width) pair, as stored; None if the file has no window."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    def first(value: Any) -> float:
        return float(value[0] if isinstance(value, MultiValue) else value)

    try:
        return first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None


def _to_display(raw: np.ndarray, ds: pydicom.Dataset, photometric: str, meta: dict[str, Any]) -> np.ndarray:
    """The stored values as float32 [0, 1] grey, a strip of rows at a time (every step is per pixel), so the
    float64 LUT outputs never exist at full size: the float32 image is the only full-size array made."""
    out = np.empty(raw.shape[:2], dtype=np.float32)
    step = max(1, STRIP_VALUES // max(1, raw[0].size))
    strips = [slice(top, top + step) for top in range(0, raw.shape[0], step)]
    if photometric == "PALETTE COLOR":
        for s in strips:
            rgb = apply_color_lut(raw[s], ds)
            out[s] = _luma(rgb) / float(np.iinfo(rgb.dtype).max)
        return out
    if raw.ndim == 3:  # RGB; pydicom has already converted YBR to RGB
        for s in strips:
            out[s] = _luma(raw[s]) / float(2 ** int(ds.get("BitsStored", 8)) - 1)
        return out

    voi = False

    def values(s: slice) -> np.ndarray:
        modality = apply_modality_lut(raw[s], ds)
        return apply_voi_lut(modality, ds) if voi else modality

    has_voi = "VOILUTSequence" in ds or meta["window"] is not None
    if has_voi:
        try:
            apply_voi_lut(values(strips[0]), ds)  # a bad window or LUT fails here (it depends on the header only)
            voi = True
            lo, hi = _voi_output_range(ds)
            meta["voi"] = "lut" if "VOILUTSequence" in ds else "window"
        except ValueError as exc:  # e.g. a window width < 1: fall back to the data range, say so
            has_voi = False
            meta["note"] = f"window ignored ({first_line(exc)}); scaled over the data range"
    if not has_voi:
        lo = min(float(np.min(values(s))) for s in strips)
        hi = max(float(np.max(values(s))) for s in strips)
        meta.setdefault("voi", "none")
    for s in strips:
        out[s] = _scale(values(s), lo, hi)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    return out


def _voi_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range the modality + VOI transform can output, found by pushing every storable value through it.

    pydicom's windowing output range depends on Bits Stored, signedness and the modality LUT, and a VOI LUT's
    on its entries; probing asks pydicom instead of re-deriving its rules here.
    """
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    probe = np.unique(np.linspace(lo, hi, num=min(hi - lo + 1, 65536)).round().astype(np.int64))
    out = apply_voi_lut(apply_modality_lut(probe, ds), ds)
    return float(np.min(out)), float(np.max(out))


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # a constant image: all black rather than NaN
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float32) @ LUMA


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """True if the file has the DICOM preamble: 128 bytes, then b'DICM'."""
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"
