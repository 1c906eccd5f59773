"""Upload checks: read the multipart body with a hard size limit, tell the format from the content, refuse
decompression bombs from the header, and decode into the network input.

In order: ``Content-Length`` or the body itself over ``max_upload_bytes`` is 413 (the body is counted as it
arrives, never buffered past the limit); anything but multipart/form-data is 415; :func:`sniff` names the
format from the magic bytes (PNG, JPEG, DICOM Part 10; anything else 415, described by :func:`describe`
without echoing it); the header's pixel count over ``max_image_pixels`` is 413 before a pixel is decoded; an
unreadable image or a DICOM file without pixel data is 422. DICOM header fields are kept on the request's
context for the audit row, which de-identifies them (:mod:`medlens.service.deid`).

Memory: :func:`plan_decode` estimates from the header what decoding will take (pixels x channels x bytes per
sample, plus the float working copies; :class:`DecodePlan`) and refuses an image over ``max_decode_bytes``
(413) before a pixel is decoded. Decodes then run under one :class:`DecodeGate` per server process: they start
while their estimates together fit ``max_decode_bytes`` and fewer than ``max_concurrent_decodes`` run, so N
parallel uploads cannot multiply the peak. Images at least twice :data:`DECODE_SIDE` on their longest side are
reduced while they are decoded (JPEG by DCT scaling, straight to grey; the rest by block averaging), and a
multi-frame upload (animated PNG, stereo / panorama MPO JPEG, multi-frame DICOM) is refused (422) rather than
silently read as its first frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import io
import math
import struct
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
#: images whose longest side is at least twice this are reduced while decoding, to no less than this (the
#: network input and the display copy are at most 512 px; smaller images are read exactly as `medlens predict`)
DECODE_SIDE = 2048
#: bytes per pixel of the float stage after the decode (the float32 image with, at most, the network input's float
#: copy or the content gate's float64 deviations: ~13 measured) and a fixed allowance per decode
FLOAT_STAGE_BYTES = 16
DECODE_OVERHEAD = 8 * 1024 * 1024
#: Pillow's bytes per pixel in memory by mode (every multi-band 8-bit mode takes 4), and the extra 4 of the
#: modes ``read_image`` converts to RGB(A) first
_PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_CONVERTED = frozenset({"P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
#: PNG colour type -> samples per pixel (a palette index is one sample, expanded to RGBA when decoded)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


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


@dataclass(frozen=True)
class DecodePlan:
    """What the header says decoding an upload will take (:func:`plan_decode`), before a pixel is decoded."""

    kind: str  # png, jpeg, dicom
    width: int  # as stored
    height: int
    channels: int  # samples per pixel, as stored
    bits: int  # bits per sample, as stored
    estimate: int  # bytes the decode may take at its peak: what it reserves from the decode budget

    def describe(self) -> str:
        return (f"{self.width} x {self.height} px, {self.channels} channel{'s' if self.channels > 1 else ''} of "
                f"{self.bits}-bit")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def _check_budget(plan: DecodePlan, budget: int) -> DecodePlan:
    if plan.estimate > budget:
        raise ApiError(413, f"the image would take about {_mb(plan.estimate)} of memory to decode "
                            f"({plan.describe()}), over the decode budget of {_mb(budget)} (max_decode_bytes); "
                            "send it downscaled, as 8-bit grey, or as a JPEG")
    return plan


def _estimate(decoded: tuple[int, int], decoded_bpp: int) -> int:
    """Peak bytes of a decode: the larger of the decode stage (the decoder's output and its copies,
    ``decoded_bpp`` a pixel, with the float32 image it ends in) and the float stage that follows, on the image as
    reduced (:data:`DECODE_SIDE`). Checked against measured peaks (VmHWM): PNG, JPEG and DICOM from 2000 to
    7000 px, the estimate 0.9 to 1.7 times the peak."""
    from medlens.data.readers import reduction

    w, h = decoded
    factor = reduction((w, h), DECODE_SIDE)
    floats = (w // factor) * (h // factor)
    return max(w * h * decoded_bpp + floats * 4, floats * FLOAT_STAGE_BYTES) + DECODE_OVERHEAD


def _check_pillow_header(data: bytes, kind: str, settings: ServiceSettings) -> DecodePlan:
    """Refuse an image whose header declares more than ``max_image_pixels``, or that would decode over the
    ``max_decode_bytes`` budget, or that holds several frames, before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    from medlens.data.readers import reduction

    limit = settings.max_image_pixels
    if kind == "png":
        if len(data) < 26 or data[12:16] != b"IHDR":
            raise ApiError(422, "the uploaded PNG is truncated or corrupt (no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        if width * height > limit:
            raise _bomb(width, height, 1, limit)
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            width, height = img.size
            if width * height > limit:
                raise _bomb(width, height, 1, limit)
            _refuse_frames(img, kind)
            mode = img.mode
            if kind == "png":
                bits, channels = max(8, data[24]), _PNG_CHANNELS.get(data[25], 4)
            else:
                bits, channels = int(getattr(img, "bits", 8) or 8), len(img.getbands())
            factor = reduction(img.size, DECODE_SIDE)
            if factor > 1 and kind == "jpeg":  # as read_image will decode it: DCT-scaled, RGB straight to grey
                img.draft("L" if mode == "RGB" else mode, (width // factor, height // factor))
                mode = img.mode
            decoded = img.size
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, f"the image header declares more pixels than Pillow decodes safely (the limit is "
                            f"{limit:,}; decompression-bomb guard); send a downscaled image") from None
    except UnidentifiedImageError:
        raise ApiError(422, f"the uploaded {kind.upper()} is truncated or corrupt (its header cannot be read)") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for a broken header
        raise ApiError(422, f"the uploaded {kind.upper()} is truncated or corrupt (its header cannot be read)") from None
    stored = channels * math.ceil(bits / 8)  # bit depth and channels as stored (16-bit RGBA: 8 bytes a pixel)
    in_memory = _PILLOW_BYTES.get(mode, 4) + (4 if mode in _CONVERTED else 0)
    # the decoded image, then its numpy copy (made through a bytes copy: twice its size for a moment)
    decoded_bpp = max(stored, in_memory) + 2 * _PILLOW_BYTES.get(mode, 4)
    plan = DecodePlan(kind, width, height, channels, bits, _estimate(decoded, decoded_bpp))
    return _check_budget(plan, settings.max_decode_bytes)


def _refuse_frames(img: Any, kind: str) -> None:
    """Several frames are refused, not silently read as the first: an animated PNG shows its animation in a
    viewer, and a multi-picture JPEG (MPO) may hold several views (stereo, panorama, multi-angle), so which one
    the clinician means is unknown. A JPEG whose other pictures are smaller (thumbnails, gain maps: phone photos)
    is read: they derive from its first picture, the one every viewer shows."""
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames <= 1:
        return
    if kind == "png":
        raise ApiError(422, f"the uploaded PNG is animated ({frames} frames): the model reads one still image; "
                            "send the frame to assess as a single-frame PNG")
    entries = (getattr(img, "mpinfo", None) or {}).get(0xB002) or []
    types = [str(e.get("Attribute", {}).get("MPType", "")) for e in entries if isinstance(e, dict)]
    views = [t[t.find("(") + 1:t.find(")")].lower() for t in types if t.startswith("Multi-Frame")]
    primary = img.size
    for frame in range(1, frames):
        img.seek(frame)  # the picture's header only
        if img.size[0] >= primary[0] and img.size[1] >= primary[1]:
            views.append("full-size")
    img.seek(0)
    if views:
        raise ApiError(422, f"the uploaded JPEG holds {frames} pictures (a multi-picture file with a {views[0]} "
                            "view): the model reads one image; send the view to assess as a plain JPEG or PNG")


def _check_dicom_header(data: bytes, ctx: RequestContext, settings: ServiceSettings) -> DecodePlan:
    """Parse the DICOM header: keep its fields for the audit row (de-identified there), refuse files without
    pixel data (422), with several frames (422), over ``max_image_pixels`` (413) or over the decode budget."""
    import pydicom

    from medlens.data.dicom import PIXEL_TAGS
    from medlens.service.deid import dicom_fields

    limit = settings.max_image_pixels
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
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError):
        raise ApiError(422, "the uploaded DICOM file has invalid Rows / Columns / NumberOfFrames") from None
    if rows <= 0 or cols <= 0:
        raise ApiError(422, "the uploaded DICOM file has no image size (Rows / Columns missing)")
    if rows * cols * max(frames, 1) > limit:
        raise _bomb(cols, rows, max(frames, 1), limit)
    if frames > 1:
        raise ApiError(422, f"the uploaded DICOM file has {frames} frames: the model reads one image; send the "
                            "frame to assess as a single-frame DICOM")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        samples = 3  # expanded through the palette
    # pydicom holds the pixel bytes and makes the array through copies (~5 times the samples' size measured),
    # then the float32 image exists at full size too; the float stage runs on the reduced copy
    raw = samples * max(1, math.ceil(bits / 8))
    plan = DecodePlan("dicom", cols, rows, samples, bits, _estimate((cols, rows), 5 * raw))
    return _check_budget(plan, settings.max_decode_bytes)


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
    """The image as uint8, scaled down so its longest side is at most DISPLAY_MAX_SIDE (aspect kept). Converted a
    strip of rows at a time (no full-size float temporaries)."""
    from PIL import Image

    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape
    grey = np.empty((h, w), dtype=np.uint8)
    step = max(1, (1 << 22) // max(1, w))
    for top in range(0, h, step):
        grey[top:top + step] = np.clip(np.rint(image[top:top + step] * 255.0), 0, 255)
    scale = DISPLAY_MAX_SIDE / max(h, w)
    if scale >= 1:
        return grey
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey, mode="L").resize(size, Image.BILINEAR))


def plan_decode(data: bytes, ctx: RequestContext, settings: ServiceSettings) -> DecodePlan:
    """The upload's format and what decoding it will take, from its content and header only (worker thread):
    415 for an unsupported format, 413 over the pixel guard or the decode budget, 422 for a broken header or
    several frames."""
    if not data:
        raise ApiError(422, "the uploaded file is empty (0 bytes)")
    kind = sniff(data)
    if kind is None:
        raise ApiError(415, f"the uploaded file is not a PNG, JPEG or DICOM image: it looks like {describe(data)} "
                            "(the type is read from the content, not the file name)")
    if kind == "dicom":
        return _check_dicom_header(data, ctx, settings)
    return _check_pillow_header(data, kind, settings)


def plan_and_decode(data: bytes, ctx: RequestContext, settings: ServiceSettings, predictor: Any,
                    gate: DecodeGate) -> tuple[DecodePlan, DecodedUpload | None]:
    """:func:`plan_decode`, then, if ``gate`` admits the plan at once (:meth:`DecodeGate.try_acquire`),
    :func:`decode_upload` on the same worker thread: one thread hop a request instead of two. ``None`` for the
    upload when the gate is full: the caller waits in :meth:`DecodeGate.reserve` and decodes then."""
    plan = plan_decode(data, ctx, settings)
    if not gate.try_acquire(plan.estimate):
        return plan, None
    try:
        return plan, decode_upload(data, ctx, settings, predictor, plan)
    finally:
        gate.release(plan.estimate)


def decode_upload(data: bytes, ctx: RequestContext, settings: ServiceSettings, predictor: Any,
                  plan: DecodePlan | None = None) -> DecodedUpload:
    """Check (unless ``plan`` is given: :func:`plan_decode`) and decode an upload into the network input (runs
    on a worker thread; the caller holds the plan's share of the :class:`DecodeGate`). After a big decode the
    freed memory is given back to the system (:func:`release_memory`)."""
    plan = plan or plan_decode(data, ctx, settings)
    try:
        return _decode(data, plan, predictor)
    finally:
        if plan.estimate >= TRIM_ABOVE:
            release_memory()


def _decode(data: bytes, plan: DecodePlan, predictor: Any) -> DecodedUpload:
    from medlens.data.readers import box_reduce, read_image_bytes, reduction
    from medlens.domain import DomainGate
    from medlens.errors import DataError

    try:
        image, meta = read_image_bytes(data, plan.kind, name="the uploaded file", reduce_to=DECODE_SIDE)
    except DataError as exc:
        message = exc.message.replace("the uploaded file: ", "the uploaded file ", 1)
        raise ApiError(422, message + (f" ({exc.hint})" if exc.hint else "")) from None
    factor = reduction(image.shape, DECODE_SIDE)  # DICOM: decoded at full size, reduced before the float stage
    if factor > 1:
        image = box_reduce(image, factor)
    try:
        tensor = predictor.prepare(image)
    except ValueError as exc:
        raise ApiError(422, f"the uploaded image cannot be prepared for the model ({exc})") from None
    height, width = (int(s) for s in meta.get("shape", image.shape)[:2])
    gate = getattr(predictor, "gate", None) or DomainGate(getattr(predictor.card, "domain", {}))
    return DecodedUpload(plan.kind, width, height, tensor, display_copy(image), gate.gate_reason(image, meta))


#: a decode whose estimate is at least this gives the freed memory back to the system when it ends
TRIM_ABOVE = 32 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Decodes run on worker threads, whose malloc arenas otherwise keep the freed pages of a big image resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class DecodeGate:
    """Decodes run while their estimated memory together fits ``budget`` bytes and fewer than ``slots`` run;
    the others wait in arrival order (a big upload is not overtaken for ever by small ones). One per server
    process; safe from several event loops (the state is locked, a waiter is woken on its own loop)."""

    def __init__(self, budget: int, slots: int):
        self.budget = max(1, int(budget))
        self.slots = max(1, int(slots))
        self.used = 0  # bytes reserved by running decodes
        self.running = 0
        self._queue: deque[tuple[int, asyncio.Future]] = deque()
        self._lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget (at most all of it) and a slot for the block; waits for them first."""
        nbytes = min(max(0, int(nbytes)), self.budget)
        if self.try_acquire(nbytes):  # open: no future, no wake-up of the loop through call_soon_threadsafe
            try:
                yield
            finally:
                self.release(nbytes)
            return
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queue.append((nbytes, future))
            self._admit()
        try:
            await future
        except asyncio.CancelledError:  # timed out or the client left while waiting
            with self._lock:
                if (nbytes, future) in self._queue:
                    self._queue.remove((nbytes, future))
                    self._admit()
                elif future.done() and not future.cancelled():
                    self._release(nbytes)  # admitted just before the cancellation
                # else: admitted, and _grant (still to run on its loop) sees the cancelled future and releases
            raise
        try:
            yield
        finally:
            with self._lock:
                self._release(nbytes)

    def try_acquire(self, nbytes: int) -> bool:
        """Take ``nbytes`` of the budget and a slot now, from any thread, if they are free and nobody waits for
        them (a waiter is never overtaken); False otherwise (then wait in :meth:`reserve`). Give them back with
        :meth:`release`. This lets a worker thread plan and decode an upload in one go, with no hop back to the
        event loop in between when the gate is open, as it is under normal load."""
        nbytes = min(max(0, int(nbytes)), self.budget)
        with self._lock:
            if self._queue or self.running >= self.slots or self.used + nbytes > self.budget:
                return False
            self.used += nbytes
            self.running += 1
            return True

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`try_acquire` took."""
        with self._lock:
            self._release(min(max(0, int(nbytes)), self.budget))

    def _admit(self) -> None:  # under the lock
        while self._queue:
            nbytes, future = self._queue[0]
            if self.running >= self.slots or self.used + nbytes > self.budget:
                return
            self._queue.popleft()
            self.used += nbytes
            self.running += 1
            future.get_loop().call_soon_threadsafe(self._grant, future, nbytes)

    def _grant(self, future: asyncio.Future, nbytes: int) -> None:  # on the waiter's loop
        if future.cancelled():
            with self._lock:
                self._release(nbytes)
        else:
            future.set_result(None)

    def _release(self, nbytes: int) -> None:  # under the lock
        self.used -= nbytes
        self.running -= 1
        self._admit()


def sha256(data: bytes) -> str:
    """The SHA-256 hex digest of ``data`` (the upload's identity in responses and audit rows)."""
    return hashlib.sha256(data).hexdigest()
