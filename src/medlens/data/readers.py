"""Read any supported image file into the medlens convention: a 2-D float32 array in [0, 1], grey,
display orientation (bright = dense), plus a small metadata dict.

Everything downstream (cache, training, prediction, serving) starts from `read_image`, so this is the one
place where file formats, bit depths and colour modes are normalised, and where a bad file becomes a
`DataError` that names the file and the problem instead of a library traceback deep inside a DataLoader.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

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


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one image as a 2-D float32 array in [0, 1] (grey, bright = dense) and a metadata dict.

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
        return _read_pillow(p)
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


def _read_pillow(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with Image.open(p) as img:
            img.load()  # force the full decode, so a truncated file fails here and not in a DataLoader
            fmt = (img.format or p.suffix[1:]).lower()
            frames = getattr(img, "n_frames", 1)
            bits = _pillow_bits(img)
            ImageOps.exif_transpose(img, in_place=True)  # phone photos of films carry their rotation in EXIF
            image, bits = _pillow_to_grey(img, bits)
    except UnidentifiedImageError as exc:
        with p.open("rb") as fh:
            head = fh.read(64)
        raise DataError(
            f"{p}: is not an image: {_describe(head)}",
            hint="check the file; rename it to its real extension if it is another format",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, struct.error ...
        raise DataError(
            f"{p}: is truncated or corrupt ({first_line(exc)})",
            hint="re-export or re-download the file; medlens does not read partial images",
        ) from exc
    meta: dict[str, Any] = {"format": "jpeg" if fmt == "mpo" else fmt, "shape": image.shape, "bits": bits}
    if frames > 1:
        meta["frames"] = frames
        meta["note"] = f"multi-page ({frames} pages): page 0 was read"
    return image, meta


def _pillow_bits(img: Image.Image) -> int:
    """Stored bits per sample: TIFF says so (12-bit detectors store in 16); otherwise from the mode."""
    tiff_bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
    if tiff_bits:
        return int(tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits)
    return {"1": 1, "I": 32, "F": 32}.get(img.mode, 16 if img.mode.startswith("I;16") else 8)


def _pillow_to_grey(img: Image.Image, bits: int) -> tuple[np.ndarray, int]:
    """Any Pillow mode to float32 [0, 1] grey. 16-bit is scaled by 2**bits - 1, not by its own maximum."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # RGBA keeps tRNS transparency from warning; alpha is dropped below
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "LA":
        img = img.getchannel("L")
    arr = np.asarray(img)
    if arr.ndim == 3:
        rgb = arr[..., :3]
        same = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        arr = rgb[..., 0] if same else rgb.astype(np.float32) @ LUMA
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
    return np.clip(arr.astype(np.float32) / top, 0.0, 1.0), bits


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
