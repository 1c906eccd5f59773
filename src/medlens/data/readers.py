"""Read any supported image file into the medlens convention: a 2-D float32 array in [0, 1], grey,
display orientation (bright = dense), plus a small metadata dict.

Everything downstream (cache, training, prediction, serving) starts from `read_image`, so this is the one
place where file formats, bit depths and colour modes are normalised, and where a bad file becomes a
`DataError` that names the file and the problem instead of a library traceback deep inside a DataLoader.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medlens.data.dicom import LUMA, first_line, looks_like_dicom, read_dicom
from medlens.errors import DataError

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})
HAS_NIBABEL = importlib.util.find_spec("nibabel") is not None
# Part of the decoded-image cache key (data.cache): bump it whenever read_image can return different pixels.
READER_VERSION = "r1"
IMAGE_SUFFIXES: frozenset[str] = (
    PILLOW_SUFFIXES | DICOM_SUFFIXES | (NIFTI_SUFFIXES if HAS_NIBABEL else frozenset())
)


def _suffix(path: Path) -> str:
    """Lower-case suffix, treating '.nii.gz' as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _maybe_dicom_name(path: Path) -> bool:
    """DICOM files often have no suffix, or a UID as name ('1.2.840.113619.2.55.3'), whose 'suffix' is digits."""
    suffix = _suffix(path)
    return suffix == "" or suffix[1:].isdigit()


def is_image_file(path: str | os.PathLike) -> bool:
    """True if `read_image` should be tried on `path`: a known suffix, or no suffix and a DICOM preamble.

    macOS resource-fork files ('._x.jpeg', common in zipped data sets such as Kermany's) are not images.
    """
    p = Path(path)
    if p.name.startswith("._"):
        return False
    if _suffix(p) in IMAGE_SUFFIXES:
        return True
    return _maybe_dicom_name(p) and p.is_file() and looks_like_dicom(p)


def read_image(path: str | os.PathLike, *, reduce_to: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one image as a 2-D float32 array in [0, 1] (grey, bright = dense) and a metadata dict.

    ``reduce_to`` (PNG, JPEG and the other Pillow formats; the service passes it): an image whose longest side
    is at least twice this is reduced while it is decoded, by the integer factor that keeps its longest side
    >= ``reduce_to`` (a JPEG by libjpeg's DCT scaling, straight to grey; others by averaging factor x factor
    blocks before the float conversion), so a huge upload never exists as a full-size float image.
    ``meta["shape"]`` stays the stored size; ``meta["reduced"]`` is the factor. Smaller images are read exactly
    as without it.

    meta: 'format' ('png', 'jpeg', 'bmp', 'tiff', 'dicom', 'nifti'), 'shape' (original H, W), 'bits' (stored
    bit depth); DICOM adds 'patient_id', 'modality', 'photometric', 'transfer_syntax', 'window' (center,
    width or None) and 'study_uid' where present; 'frames' / 'note' when only part of the file was read.
    Raises DataError (naming the file, the problem and a fix) for anything that cannot be read.
    """
    p = Path(path)
    _check_file(p)
    suffix = _suffix(p)
    if suffix in DICOM_SUFFIXES or (_maybe_dicom_name(p) and looks_like_dicom(p)):
        return read_dicom(p)
    if suffix in PILLOW_SUFFIXES:
        return _read_pillow(p, str(p), reduce_to, fallback_format=p.suffix[1:])
    if suffix in NIFTI_SUFFIXES:
        if not HAS_NIBABEL:
            raise DataError(
                f"{p}: NIfTI files need nibabel, which is not installed",
                hint="pip install nibabel  (or: pip install 'medlens[nifti]')",
            )
        return _read_nifti(p)
    raise DataError(
        f"{p}: unsupported file type '{suffix or '(no suffix)'}'",
        hint=f"medlens reads {' '.join(sorted(IMAGE_SUFFIXES))}; convert the image to PNG",
    )


def read_image_bytes(data: bytes, kind: str, *, name: str = "the uploaded file",
                     reduce_to: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_image` for an image held in memory (the service's uploads): ``kind`` is 'dicom' or a Pillow
    format ('png', 'jpeg'); errors name the image ``name``. Reading from memory spares the temporary file
    (a folder made, written and removed per request was ~8% of the service's busy time under load)."""
    if not data:
        raise DataError(f"{name}: is empty (0 bytes)", hint="the copy or download failed: fetch the file again")
    if kind == "dicom":
        return read_dicom(io.BytesIO(data), name=name)
    return _read_pillow(io.BytesIO(data), name, reduce_to, fallback_format=kind)


def _check_file(p: Path) -> None:
    """The file-system problems, told apart: these are the commonest mistakes and the easiest to fix."""
    if not p.exists():
        raise DataError(
            f"{p}: file does not exist", hint="check the path (relative paths are from the current folder)"
        )
    if not p.is_file():
        raise DataError(
            f"{p}: is a directory, not an image file",
            hint="pass an image file, or use the folder as a data set",
        )
    if p.stat().st_size == 0:
        raise DataError(f"{p}: is empty (0 bytes)", hint="the copy or download failed: fetch the file again")
    if not os.access(p, os.R_OK):
        raise DataError(f"{p}: cannot be read (permission denied)", hint="check the file's permissions")


def _describe(head: bytes) -> str:
    """What a non-image file probably is, from its first bytes (failed downloads are the usual culprit)."""
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the image (run: git lfs pull)"
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    return f"Pillow cannot identify its format (it starts with {head[:16]!r})"


def reduction(size: tuple[int, ...], reduce_to: int | None) -> int:
    """The integer factor that brings the longest side of ``size`` down to no less than ``reduce_to``; 1 when
    the image is smaller than twice that (or ``reduce_to`` is None)."""
    if not reduce_to or reduce_to < 1:
        return 1
    return max(1, max(size) // int(reduce_to))


def _read_pillow(src: Path | BinaryIO, name: str, reduce_to: int | None = None, *,
                 fallback_format: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with Image.open(src) as img:
            stored = img.size
            factor = reduction(stored, reduce_to)
            if factor > 1 and img.format in ("JPEG", "MPO"):  # DCT scaling: decoded at 1/2, 1/4 or 1/8 size
                img.draft("L" if img.mode == "RGB" else img.mode, (stored[0] // factor, stored[1] // factor))
            img.load()  # force the full decode, so a truncated file fails here and not in a DataLoader
            fmt = (img.format or fallback_format).lower()
            frames = getattr(img, "n_frames", 1)
            bits = _pillow_bits(img)
            decoded = img.size
            ImageOps.exif_transpose(img, in_place=True)  # phone photos of films carry their rotation in EXIF
            swapped = img.size != decoded
            rest = reduction(img.size, reduce_to) if factor > 1 else 1
            image, bits = _pillow_to_grey(img, bits, rest)
    except UnidentifiedImageError as exc:
        raise DataError(
            f"{name}: is not an image: {_describe(_head(src))}",
            hint="check the file; rename it to its real extension if it is another format",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, struct.error ...
        raise DataError(
            f"{name}: is truncated or corrupt ({first_line(exc)})",
            hint="re-export or re-download the file; medlens does not read partial images",
        ) from exc
    meta: dict[str, Any] = {"format": "jpeg" if fmt == "mpo" else fmt, "shape": image.shape, "bits": bits}
    if factor > 1:  # reduced while decoding: the stored size, turned as the image was
        meta["shape"] = (stored[0], stored[1]) if swapped else (stored[1], stored[0])
        meta["reduced"] = round(stored[0] / decoded[0]) * rest
    if frames > 1:
        meta["frames"] = frames
        meta["note"] = f"multi-page ({frames} pages): page 0 was read"
    return image, meta


def _head(src: Path | BinaryIO) -> bytes:
    """The first bytes of a file or an open binary stream."""
    if isinstance(src, Path):
        with src.open("rb") as fh:
            return fh.read(64)
    src.seek(0)
    return src.read(64)


def _pillow_bits(img: Image.Image) -> int:
    """Stored bits per sample: TIFF says so (12-bit detectors store in 16); otherwise from the mode."""
    tiff_bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
    if tiff_bits:
        return int(tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits)
    return {"1": 1, "I": 32, "F": 32}.get(img.mode, 16 if img.mode.startswith("I;16") else 8)


def _pillow_to_grey(img: Image.Image, bits: int, factor: int = 1) -> tuple[np.ndarray, int]:
    """Any Pillow mode to float32 [0, 1] grey. 16-bit is scaled by 2**bits - 1, not by its own maximum.

    ``factor`` > 1 averages factor x factor blocks first (:func:`box_reduce`). Colour is turned to grey in strips
    of rows and the scaling is done in place, so the float image is the only full-size float array made."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # RGBA keeps tRNS transparency from warning; alpha is dropped below
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "LA":
        img = img.getchannel("L")
    arr = np.asarray(img)
    if factor > 1:
        arr = box_reduce(arr[..., :3] if arr.ndim == 3 else arr, factor)
    if arr.ndim == 3:
        rgb = arr[..., :3]
        same = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        arr = rgb[..., 0] if same else _luma_rows(rgb)
        bits = 8
    if img.mode == "1":
        return arr.astype(np.float32), 1
    if img.mode == "F" or (img.mode == "I" and (arr.min() < 0 or arr.max() > 65535)):
        lo, hi = float(arr.min()), float(arr.max())  # no nominal range: scale over the data
        scaled = (arr.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(arr.shape)
        return scaled.astype(np.float32), bits
    if img.mode == "I":
        bits = min(bits, 16)  # 16-bit PNGs open as 'I' in some Pillow versions
    top = float(2 ** min(bits, 16) - 1)
    out = np.require(arr, np.float32, ["C", "W", "O"])  # a copy unless arr is a float32 array made above
    out /= top
    return np.clip(out, 0.0, 1.0, out=out), bits


#: rows per strip in the strip-wise conversions: about 4 M values a strip
_STRIP_VALUES = 1 << 22


def _luma_rows(rgb: np.ndarray) -> np.ndarray:
    """``rgb.astype(float32) @ LUMA`` (the same values), a strip of rows at a time: no full-size float RGB copy."""
    out = np.empty(rgb.shape[:2], dtype=np.float32)
    step = max(1, _STRIP_VALUES // max(1, rgb.shape[1] * rgb.shape[2]))
    for top in range(0, rgb.shape[0], step):
        out[top:top + step] = rgb[top:top + step].astype(np.float32) @ LUMA
    return out


def box_reduce(arr: np.ndarray, factor: int) -> np.ndarray:
    """The mean of each ``factor`` x ``factor`` block (float32; H // factor x W // factor, channels kept; the last
    H % factor rows and W % factor columns are dropped), computed a strip of rows at a time."""
    h, w = arr.shape[0] // factor, arr.shape[1] // factor
    out = np.empty((h, w, *arr.shape[2:]), dtype=np.float32)
    step = max(1, _STRIP_VALUES // max(1, arr.shape[1] * factor * int(np.prod(arr.shape[2:], dtype=np.int64))))
    for top in range(0, h, step):
        rows = min(step, h - top)
        block = arr[top * factor:(top + rows) * factor, :w * factor].astype(np.float32)
        out[top:top + rows] = block.reshape(rows, factor, w, factor, *arr.shape[2:]).mean(axis=(1, 3))
    return out


def _read_nifti(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Middle slice of the last spatial axis (axial for RAS volumes), rotated to radiological display."""
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise DataError(
            f"{p}: is not a readable NIfTI file ({first_line(exc)})", hint="re-export or re-download the file"
        ) from exc
    meta: dict[str, Any] = {"format": "nifti", "bits": int(img.header.get("bitpix", 0))}
    while data.ndim > 3:  # 4-D (time / channels): first volume
        data = data[..., 0]
    if data.ndim == 3:
        k = data.shape[2] // 2
        meta["note"] = f"3-D volume {data.shape}: middle slice {k} of {data.shape[2]} was read"
        data = data[:, :, k]
    if data.ndim != 2:
        raise DataError(
            f"{p}: NIfTI data has shape {data.shape}; expected a 2-D or 3-D image",
            hint="export a 2-D slice as PNG",
        )
    slice_ = np.flipud(data.T)  # voxel (x, y) -> rows top-to-bottom, columns left-to-right
    lo, hi = float(np.nanmin(slice_)), float(np.nanmax(slice_))
    image = np.nan_to_num((slice_ - lo) / (hi - lo) if hi > lo else np.zeros_like(slice_))
    meta["shape"] = image.shape
    return np.ascontiguousarray(image, dtype=np.float32), meta
