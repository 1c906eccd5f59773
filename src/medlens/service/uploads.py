"""Upload checks: read the multipart body with a hard size limit, tell the format from the content, refuse
decompression bombs from the header, and decode into the network input.

In order: ``Content-Length`` or the body itself over ``max_upload_bytes`` is 413 (the body is counted as it
arrives, never buffered past the limit); anything but multipart/form-data is 415; :func:`sniff` names the
format from the magic bytes (PNG, JPEG, DICOM Part 10; anything else 415, described by :func:`describe`
without echoing it); the header's pixel count over ``max_image_pixels`` is 413 before a pixel is decoded; an
unreadable image or a DICOM file without pixel data is 422. DICOM header fields are kept on the request's
context for the audit row, which de-identifies them (:mod:`medlens.service.deid`).
"""

from __future__ import annotations

import hashlib
import io
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from medlens.service.context import ApiError, RequestContext
from medlens.service.settings import ServiceSettings

#: the image a heat map is drawn over: the upload, scaled down so its longest side is at most this
DISPLAY_MAX_SIDE = 512
#: multipart framing allowed on top of settings.max_upload_bytes (boundaries, part headers, small fields)
MULTIPART_SLACK = 64 * 1024


class _UploadTooLarge(Exception):
    pass


async def read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The ``file`` part of a multipart body and the ``uncertainty`` form field, read with a hard size limit.

    The body is counted as it arrives: past ``limit`` (+ framing slack) the read stops with a 413, so a huge
    or endless body is never buffered. ``Content-Length`` over the limit is refused before reading at all.
    """
    too_large = ApiError(413, f"the upload is larger than the limit of {limit:,} bytes; send a smaller image "
                              "(or raise max_upload_bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise too_large
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data with the image in a field named 'file' "
                            f"(got content type '{content_type[:80] or 'none'}')")
    received = 0
    receive = request.receive

    async def counted_receive() -> dict[str, Any]:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + MULTIPART_SLACK:
                raise _UploadTooLarge
        return message

    body = Request(request.scope, counted_receive)
    try:
        form = await body.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except _UploadTooLarge:
        raise too_large from None
    except HTTPException as exc:  # Starlette's multipart errors (too many files, bad part headers ...)
        raise ApiError(400, f"the request body is not valid multipart/form-data ({exc.detail})") from None
    except Exception as exc:  # noqa: BLE001 - the multipart parser's own errors for garbage bodies
        raise ApiError(400, f"the request body is not valid multipart/form-data ({type(exc).__name__})") from None
    try:
        upload = form.get("file")
        if upload is None:
            raise ApiError(422, "the multipart field 'file' is missing: send the image in a field named 'file'")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "the multipart field 'file' must be a file upload, not a text value")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise too_large
        uncertainty = form.get("uncertainty")
        if uncertainty is not None and not isinstance(uncertainty, str):
            raise ApiError(422, "the form field 'uncertainty' must be text (softmax, mc, tta or ensemble)")
        return data, uncertainty
    finally:
        await form.close()


def sniff(data: bytes) -> str | None:
    """The upload's format from its content (never its name): ``png``, ``jpeg``, ``dicom`` or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def describe(data: bytes) -> str:
    """What an unsupported upload looks like, in words (its content is never echoed back)."""
    head = data[:1024]
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    for magic, what in ((b"%PDF", "a PDF document"), (b"GIF8", "a GIF image"), (b"BM", "a BMP image"),
                        (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"PK\x03\x04", "a ZIP archive"),
                        (b"\x1f\x8b", "a gzip archive"), (b"RIFF", "a RIFF (WebP / AVI / WAV) file")):
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    return "text" if all(c.isprintable() or c in "\r\n\t" for c in text) else "binary data of an unknown format"


def _bomb(width: int, height: int, frames: int, limit: int) -> ApiError:
    many = f" x {frames} frames" if frames > 1 else ""
    return ApiError(413, f"the image header declares {width} x {height}{many} = {width * height * frames:,} pixels, "
                         f"over the limit of {limit:,} (decompression-bomb guard); send a downscaled image")


def _check_pillow_header(data: bytes, kind: str, limit: int) -> None:
    """Refuse an image whose header declares more than ``limit`` pixels, before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ApiError(422, "the uploaded PNG is truncated or corrupt (no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        if width * height > limit:
            raise _bomb(width, height, 1, limit)
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"the image header declares more pixels than Pillow decodes safely (the limit is "
                            f"{limit:,}; decompression-bomb guard); send a downscaled image") from None
    except UnidentifiedImageError:
        raise ApiError(422, f"the uploaded {kind.upper()} is truncated or corrupt (its header cannot be read)") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for a broken header
        raise ApiError(422, f"the uploaded {kind.upper()} is truncated or corrupt (its header cannot be read)") from None
    if width * height > limit:
        raise _bomb(width, height, 1, limit)


def _check_dicom_header(data: bytes, ctx: RequestContext, limit: int) -> None:
    """Parse the DICOM header: keep its fields for the audit row (de-identified there), refuse files without
    pixel data (422) and pixel counts over ``limit`` (413)."""
    import pydicom

    from medlens.data.dicom import PIXEL_TAGS
    from medlens.service.deid import dicom_fields

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the message may quote element values: never passed on
        raise ApiError(422, "the uploaded DICOM file cannot be parsed (truncated or corrupt); re-export it") from None
    try:
        ctx.dicom = dicom_fields(ds)
    except Exception:  # noqa: BLE001
        ctx.dicom = None
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise ApiError(422, "the uploaded DICOM file has no pixel data (PixelData element missing): it may be a "
                            "structured report or presentation state; send a DICOM image (CR, DX, CT, MR ...)")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ApiError(422, "the uploaded DICOM file has invalid Rows / Columns / NumberOfFrames") from None
    if rows <= 0 or cols <= 0:
        raise ApiError(422, "the uploaded DICOM file has no image size (Rows / Columns missing)")
    if rows * cols * max(frames, 1) > limit:
        raise _bomb(cols, rows, max(frames, 1), limit)


@dataclass
class DecodedUpload:
    kind: str
    width: int
    height: int
    image: torch.Tensor  # uint8 (1, 1, S, S)
    display: np.ndarray  # uint8 (H, W)
    #: why the DICOM metadata or content gate refuses the input (``medlens.domain``); None: it passes them
    domain_reason: str | None = None


def display_copy(image: np.ndarray) -> np.ndarray:
    """The image as uint8, scaled down so its longest side is at most DISPLAY_MAX_SIDE (aspect kept)."""
    from PIL import Image

    grey = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    h, w = grey.shape
    scale = DISPLAY_MAX_SIDE / max(h, w)
    if scale >= 1:
        return grey
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey, mode="L").resize(size, Image.BILINEAR))


def decode_upload(data: bytes, ctx: RequestContext, settings: ServiceSettings, predictor: Any) -> DecodedUpload:
    """Check and decode an upload into the network input (runs on a worker thread)."""
    from medlens.data.readers import read_image
    from medlens.domain import DomainGate
    from medlens.errors import DataError

    if not data:
        raise ApiError(422, "the uploaded file is empty (0 bytes)")
    kind = sniff(data)
    if kind is None:
        raise ApiError(415, f"the uploaded file is not a PNG, JPEG or DICOM image: it looks like {describe(data)} "
                            "(the type is read from the content, not the file name)")
    if kind == "dicom":
        _check_dicom_header(data, ctx, settings.max_image_pixels)
    else:
        _check_pillow_header(data, kind, settings.max_image_pixels)
    suffix = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}[kind]
    with tempfile.TemporaryDirectory(prefix="medlens-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            image, meta = read_image(path)
        except DataError as exc:
            message = exc.message.replace(f"{path}: ", "the uploaded file ").replace(str(path), "the uploaded file")
            raise ApiError(422, message + (f" ({exc.hint})" if exc.hint else "")) from None
    try:
        tensor = predictor.prepare(image)
    except ValueError as exc:
        raise ApiError(422, f"the uploaded image cannot be prepared for the model ({exc})") from None
    height, width = (int(s) for s in meta.get("shape", image.shape)[:2])
    gate = getattr(predictor, "gate", None) or DomainGate(getattr(predictor.card, "domain", {}))
    return DecodedUpload(kind, width, height, tensor, display_copy(image), gate.gate_reason(image, meta))


def sha256(data: bytes) -> str:
    """The SHA-256 hex digest of ``data`` (the upload's identity in responses and audit rows)."""
    return hashlib.sha256(data).hexdigest()
