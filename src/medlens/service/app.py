"""The clinical service: a FastAPI app that serves one trained run (``medlens serve RUN``).

:func:`create_app` builds the app; the model, the audit trail and the API keys are opened once, in the
app's lifespan. Endpoints (all described in ``/openapi.json``, browsable at ``/docs``):

=========================================  ==========  ===============================================
``POST /v1/predictions``                   clinician   multipart upload (field ``file``: PNG / JPEG /
                                                       DICOM; ``uncertainty`` softmax|mc|tta|ensemble)
``GET /v1/predictions/{id}``               viewer      a past prediction, from its audit row
``GET /v1/predictions/{id}/heatmap.png``   viewer      Grad-CAM overlay of the label shown
``GET /v1/models``                         viewer      the served model's card summary
``GET /v1/audit``                          admin       the audit trail, newest first
``GET /healthz`` / ``/readyz``             open        process alive / model loaded and database up
``GET /metrics``                           open        Prometheus text format
``GET /``                                  open        the web viewer (``static/index.html``)
=========================================  ==========  ===============================================

Keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (``medlens keys create NAME --role ROLE``).
No or an unknown key is 401, a role without the rights 403, too many requests for one key 429 (with
``Retry-After``).

Every request to ``/v1/...`` gets exactly one audit row, whatever its outcome (401, 413 and 429 included),
written by :class:`ServiceMiddleware` when the response starts and *before* any of it is sent: a client
that received a prediction knows it is in the audit trail. If the row cannot be written the client gets a
503 instead of the answer. The request id (a UUID, also the prediction id) is returned in ``X-Request-ID``.

Uploads are read with a hard size limit (413 as soon as the body passes it), image dimensions are checked
from the file header before anything is decoded (decompression bombs: 413), anything that is not a PNG,
JPEG or DICOM image is refused by its content, not its name (415), and unreadable images or DICOM without
pixels are 422. Errors are always ``{"detail": "<one clear sentence>"}``; a traceback never reaches a client.

Privacy: raw DICOM patient fields are never logged or stored; the audit row and the response hold only
:func:`~medlens.service.audit.deidentify_dicom_fields` output, and upload file names are ignored. While the
service runs, pydicom's reading validation is set to "ignore", because its warnings quote element values.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import struct
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException

import medlens
from medlens.errors import MedlensError
from medlens.service.audit import AuditRecord, GroupCommitter
from medlens.service.auth import Identity, role_allows
from medlens.service.metrics import CONTENT_TYPE, ServiceMetrics
from medlens.service.settings import ServiceSettings

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
STATIC_DIR = Path(__file__).parent / "static"
#: longest wait for a request's audit row to be committed before the answer is withheld (503)
AUDIT_TIMEOUT_S = 30.0
UNCERTAINTY_METHODS = ("softmax", "mc", "tta", "ensemble")
UncertaintyMethod = Literal["softmax", "mc", "tta", "ensemble"]
PredictionId = Annotated[str, PathParam(max_length=128, description="the prediction id (a UUID)")]
#: recent inputs kept in memory for heat maps
INPUT_CACHE_SIZE = 256
#: the image a heat map is drawn over: the upload, scaled down so its longest side is at most this
DISPLAY_MAX_SIDE = 512
#: multipart framing allowed on top of settings.max_upload_bytes (boundaries, part headers, small fields)
MULTIPART_SLACK = 64 * 1024
#: audit action names by (HTTP method, route template)
ACTIONS: dict[tuple[str, str], str] = {
    ("POST", "/v1/predictions"): "predict",
    ("GET", "/v1/predictions/{id}"): "get_prediction",
    ("GET", "/v1/predictions/{id}/heatmap.png"): "heatmap",
    ("GET", "/v1/models"): "list_models",
    ("GET", "/v1/audit"): "list_audit",
}

PLACEHOLDER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medlens</title>
<style>body{font-family:system-ui,sans-serif;margin:0}
.banner{background:#b00020;color:#fff;padding:.8em 1em;font-weight:bold}
main{padding:1em 1.5em;max-width:50em}</style></head>
<body><div class="banner" role="alert">Research software: not for diagnostic use.</div>
<main><h1>medlens</h1>
<p>The web viewer is not installed in this build. The API is described at <a href="/docs">/docs</a>
(OpenAPI: <a href="/openapi.json">/openapi.json</a>).</p></main></body></html>
"""


# ----------------------------------------------------------------------------------------- response models


class ErrorResponse(BaseModel):
    """Every error: one sentence that says what was wrong and, where it helps, what to do."""

    detail: str = Field(description="what went wrong, in words", examples=["missing API key"])


class Uncertainty(BaseModel):
    method: UncertaintyMethod = Field(description="how the uncertainty was estimated")
    predictive_entropy: float = Field(description="entropy of the mean predictive distribution (nats), centred "
                                                  "on p = 0.5")
    decision_entropy: float = Field(description="entropy of the call at the operating threshold (nats): the "
                                                "probability shifted in logit space so the threshold sits at 0.5; "
                                                "the referral measure")
    mutual_information: float = Field(description="epistemic part of the entropy (nats); 0 for softmax")
    variance: float = Field(description="variance of the positive-class probability over the passes")
    passes: int = Field(description="stochastic passes (1 for softmax)")


class InputInfo(BaseModel):
    sha256: str = Field(description="SHA-256 of the uploaded file's bytes")
    format: str = Field(description="png, jpeg or dicom")
    width: int
    height: int
    bytes: int = Field(description="size of the uploaded file")
    dicom: dict[str, Any] | None = Field(
        None, description="de-identified DICOM fields (technical fields in clear, identifiers as keyed hashes)")


class Prediction(BaseModel):
    """One prediction; also what ``GET /v1/predictions/{id}`` returns later, from the audit trail."""

    id: str = Field(description="request id (UUID): the prediction's id and the X-Request-ID header")
    created: str = Field(description="UTC time, ISO 8601")
    probability: float = Field(ge=0, le=1, description="calibrated probability of the positive class")
    positive_class: str = Field(description="the class the probability is for")
    label: str = Field(description="the label at the model's operating threshold")
    positive: bool = Field(description="probability >= threshold")
    threshold: float = Field(description="the operating threshold chosen on validation data")
    uncertainty: Uncertainty
    refer: bool | None = Field(description="refer to a radiologist (uncertainty above the card's referral "
                                           "threshold); null when the card has no policy for the method")
    refer_reason: str = Field(description="what refer means for this method, in words")
    model_id: str
    weights_sha256: str
    version: str = Field(description="medlens version that served the prediction")
    input: InputInfo
    heatmap_url: str = Field(description="Grad-CAM overlay of the label shown (while the input is held)")


class ModelInfo(BaseModel):
    model_id: str
    model_name: str
    weights_sha256: str
    created: str
    class_names: list[str]
    positive_class: str
    input_size: int
    threshold: float
    threshold_policy: str
    temperature: float
    uncertainty_methods: list[str] = Field(description="methods this model supports for ?uncertainty=")
    refer: dict[str, Any] = Field(description="the referral policy (coverage, measure, thresholds by method)")
    metrics: dict[str, Any] = Field(description="validation metrics of the chosen epoch")
    versions: dict[str, str]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class AuditPage(BaseModel):
    total: int = Field(description="rows matching the filters")
    limit: int
    offset: int
    items: list[AuditRecord] = Field(description="audit rows (the dataclass of medlens.service.audit)")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model_loaded: bool
    database: bool
    model_id: str | None = None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer."""
    text = {
        400: "malformed request body",
        401: "no API key, or an unknown or revoked one",
        403: "the key's role may not do this",
        404: "not found",
        413: "upload too large, or image dimensions over the decompression-bomb limit",
        415: "not a PNG, JPEG or DICOM image",
        422: "invalid parameter, unreadable image, or DICOM without pixel data",
        429: "rate limit of this key reached (see Retry-After)",
        503: "not ready, or the audit row could not be written (the answer is withheld)",
        504: "the request took longer than the request timeout",
    }
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "the image: PNG, JPEG or DICOM (Part 10, with the 'DICM' marker)"},
                        "uncertainty": {"type": "string", "enum": list(UNCERTAINTY_METHODS),
                                        "description": "as the query parameter (the query wins if both are given)"},
                    },
                }
            }
        },
    }
}


# ----------------------------------------------------------------------------------------- request context


@dataclass
class RequestContext:
    """What the audit row of one request needs; filled in by the middleware, dependencies and handlers."""

    request_id: str
    user: str | None = None
    role: str | None = None
    input_sha256: str | None = None
    dicom: Any = None  # raw DICOM fields: de-identified by AuditLog.record, never stored or logged as they are
    output: Any = None
    error: str | None = None


def _ctx(request: Request) -> RequestContext:
    ctx = getattr(request.state, "ctx", None)
    if ctx is None:  # only when the app runs without its middleware (never in create_app's app)
        ctx = RequestContext(str(uuid.uuid4()))
        request.state.ctx = ctx
    return ctx


class ApiError(HTTPException):
    """An error answered as ``{"detail": ...}`` with ``status_code``."""


# ------------------------------------------------------------------------------------------- input cache


@dataclass
class HeldInput:
    """A recent prediction's input, kept for its heat map."""

    image: torch.Tensor  # uint8 (1, 1, S, S): the network input
    display: np.ndarray  # uint8 (H, W): the upload, longest side <= DISPLAY_MAX_SIDE
    target: int  # the class of the label shown
    cam: np.ndarray | None = None  # computed on the first heat-map request


class InputCache:
    """A thread-safe LRU of :class:`HeldInput` by prediction id, bounded in entries (and so in memory)."""

    def __init__(self, capacity: int = INPUT_CACHE_SIZE):
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, HeldInput] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, value: HeldInput) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: str) -> HeldInput | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# ------------------------------------------------------------------------------------------ service state


class ServiceState:
    """Everything the endpoints share: settings, model, audit trail, keys, limiter, runner, metrics.

    :meth:`start` / :meth:`stop` are reference-counted, so the app can be started by more than one lifespan
    at once (a test client and a fuzzer on the same app) and is shut down when the last one ends.
    """

    def __init__(self, run_dir: Path, settings: ServiceSettings, *, batching: bool, device: str,
                 torch_threads: int | None, workers: int | None, cache_size: int):
        self.run_dir = run_dir
        self.settings = settings
        self.batching = batching
        self.device = device
        self.torch_threads = torch_threads
        self.workers = workers
        self.metrics = ServiceMetrics()
        self.inputs = InputCache(cache_size)
        self.predictor: Any = None
        self.audit: Any = None
        self.keys: Any = None
        self.limiter: Any = None
        self.runner: Any = None
        self.lock: Any = None
        self.methods: list[str] = []
        self.ready = False
        # Audit rows go through one writer thread that commits every row waiting in one transaction (group
        # commit): one fsync for many requests, and no writers colliding inside SQLite's busy handler (which
        # sleeps up to 100 ms a try). Each request is still answered only after its own row is committed.
        self.audit_writer: GroupCommitter | None = None
        self._users = 0
        self._start_lock = threading.Lock()
        self._restore: list[Callable[[], None]] = []

    # -- life cycle

    def start(self) -> None:
        with self._start_lock:
            self._users += 1
            if self._users > 1:
                return
            try:
                self._start()
            except BaseException:
                self._users -= 1
                self._close()
                raise

    def _start(self) -> None:
        from medlens.inference import Predictor
        from medlens.service.audit import AuditLog, create_engine
        from medlens.service.auth import KeyStore, RateLimiter
        from medlens.service.batching import DirectRunner, MicroBatcher, ModelLock, default_workers
        from medlens.uncertainty import available_methods

        threads = 1 if self.torch_threads is None else self.torch_threads
        if threads > 0 and threads != torch.get_num_threads():
            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            self._restore.append(lambda: torch.set_num_threads(previous_threads))
        self._quiet_dicom_validation()
        self._raise_pillow_limit()
        started = time.perf_counter()
        self.predictor = Predictor.from_run(self.run_dir, device=self.device)
        card = self.predictor.card
        self.methods = available_methods(self.predictor.model)
        engine = create_engine(self.settings.database_url)
        self.audit = AuditLog(engine, hash_key=self.settings.audit_key)
        self.audit_writer = GroupCommitter(self.audit)
        self.keys = KeyStore(engine)
        self.limiter = RateLimiter(self.settings.rate_limit_per_minute)
        self.lock = ModelLock()
        workers = self.workers or (1 if self.predictor.device.type == "cuda" else default_workers())
        if self.batching:
            self.runner = MicroBatcher(self._predict, max_size=self.settings.batch_max_size,
                                       max_wait_ms=self.settings.batch_max_wait_ms, workers=workers,
                                       threads=threads or None, lock=self.lock, on_batch=self.metrics.observe_batch)
        else:
            self.runner = DirectRunner(self._predict, workers=workers, threads=threads or None, lock=self.lock,
                                       on_batch=self.metrics.observe_batch)
        self.runner.start()
        self.metrics.set_model(card.model_id, card.weights_sha256, medlens.__version__)
        self.ready = True
        log.info("serving %s (%s) on %s with %s; %d model workers x %d torch threads; model loaded in %.1f s; "
                 "settings %s", card.model_id, self.run_dir, self.predictor.device,
                 "micro-batching" if self.batching else "one forward pass per request", workers,
                 torch.get_num_threads(), time.perf_counter() - started, json.dumps(self.settings.public_dict()))

    def _quiet_dicom_validation(self) -> None:
        """pydicom's reading-validation warnings quote element values (a patient's name, say): off while serving."""
        from pydicom import config

        previous = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE

        def restore() -> None:
            config.settings.reading_validation_mode = previous

        self._restore.append(restore)

    def _raise_pillow_limit(self) -> None:
        """Our pixel limit is checked from the header first; Pillow's own (lower) bomb check must not refuse
        an image we accept. Raised only, never lowered."""
        from PIL import Image

        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None and previous < self.settings.max_image_pixels:
            Image.MAX_IMAGE_PIXELS = self.settings.max_image_pixels

            def restore() -> None:
                Image.MAX_IMAGE_PIXELS = previous

            self._restore.append(restore)

    def stop(self) -> None:
        with self._start_lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                self._close()

    def _close(self) -> None:
        self.ready = False
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.stop()
        writer, self.audit_writer = self.audit_writer, None
        if writer is not None:
            writer.close()
        if self.audit is not None:
            self.audit.engine.dispose()
        while self._restore:
            self._restore.pop()()

    # -- model calls

    def _predict(self, images: torch.Tensor, method: str) -> dict[str, np.ndarray]:
        out = self.predictor.predict_with_uncertainty(images, method)
        if "refer" not in out:  # no referral policy for this method in the card
            out["refer"] = np.full(len(images), -1, dtype=np.int64)
        return out

    @property
    def card(self) -> Any:
        return None if self.predictor is None else self.predictor.card


# ---------------------------------------------------------------------------------------------- uploads


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
    from medlens.service.audit import dicom_fields

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


def _display_copy(image: np.ndarray) -> np.ndarray:
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
    return DecodedUpload(kind, width, height, tensor, _display_copy(image))


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- middleware


class ServiceMiddleware:
    """Request id, request timeout, the audit row of every ``/v1`` request, metrics, and no tracebacks.

    A pure ASGI middleware: the audit row is written when the handler starts its response and before that
    response is passed on, so an answered request is an audited one; if the row cannot be written the
    client gets 503 instead. A request that runs past ``settings.request_timeout_s`` before its response
    starts is answered 504 (and audited); its handler is cancelled.
    """

    def __init__(self, app: Any, state: ServiceState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        started = time.perf_counter()
        ctx = RequestContext(request_id=str(uuid.uuid4()))
        scope["state"] = {**scope.get("state", {}), "ctx": ctx}
        audited = scope["path"] == API_PREFIX or scope["path"].startswith(API_PREFIX + "/")
        status = 500
        response_started = False
        abandoned = False  # timed out: the handler's later messages are dropped
        withheld = False  # the audit row failed: the handler's response is replaced by a 503

        async def send_wrapper(message: dict) -> None:
            nonlocal status, response_started, withheld
            if abandoned or withheld:
                return
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                if audited and not await self._audit(ctx, scope, status, started):
                    withheld = True
                    status = 503
                    await self._send_json(send, ctx, 503, "the request could not be recorded in the audit "
                                                          "trail, so its answer is withheld; try again")
                    return
                MutableHeaders(scope=message)["X-Request-ID"] = ctx.request_id
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_wrapper))
        try:
            await asyncio.wait_for(asyncio.shield(task), state.settings.request_timeout_s)
        except asyncio.CancelledError:  # the server is shutting down or the client went away
            task.cancel()
            task.add_done_callback(_consume)
            raise
        except asyncio.TimeoutError:
            if response_started:
                with contextlib.suppress(Exception):
                    await task
            else:
                abandoned = True
                task.cancel()
                task.add_done_callback(_consume)
                status = 504
                ctx.error = (f"the request took longer than the {state.settings.request_timeout_s:g} s "
                             "request timeout")
                await self._respond_after_failure(send, ctx, scope, status, started, audited)
        except Exception as exc:  # a bug in a handler: logged here with its traceback, never sent
            log.error("request %s (%s %s) failed: %s", ctx.request_id, scope["method"], _route(scope),
                      type(exc).__name__, exc_info=exc)
            if not response_started:
                status = 500
                ctx.error = f"internal error ({type(exc).__name__}); see the server log for request {ctx.request_id}"
                await self._respond_after_failure(send, ctx, scope, status, started, audited)
        finally:
            if status >= 500:
                log.warning("request %s: %s %s -> %d %s", ctx.request_id, scope["method"], _route(scope), status,
                            ctx.error or "")
            state.metrics.observe_request(_route(scope), scope["method"], status, time.perf_counter() - started)

    async def _respond_after_failure(self, send: Callable, ctx: RequestContext, scope: dict, status: int,
                                     started: float, audited: bool) -> None:
        if audited and not await self._audit(ctx, scope, status, started):
            status = 503
        await self._send_json(send, ctx, status, ctx.error or "internal error")

    @staticmethod
    async def _send_json(send: Callable, ctx: RequestContext, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode("utf-8")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", ctx.request_id.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _audit(self, ctx: RequestContext, scope: dict, status: int, started: float) -> bool:
        """Write the request's audit row (committed before this returns); False if it could not be written."""
        state = self.state
        if state.audit is None:
            return False
        card = state.card
        route = _route(scope)
        try:
            row = state.audit.prepare(
                request_id=ctx.request_id, action=ACTIONS.get((scope["method"], route), "unknown"), status=status,
                user=ctx.user, role=ctx.role, input_sha256=ctx.input_sha256, dicom=ctx.dicom,
                model_id=card.model_id if card else None,
                weights_sha256=(card.weights_sha256 or None) if card else None,
                output=ctx.output, latency_ms=(time.perf_counter() - started) * 1000.0,
                error=printable(ctx.error, 2000) if status >= 400 and ctx.error else None,
            )
            writer = state.audit_writer
            if writer is None:  # stopping: write it directly
                await anyio.to_thread.run_sync(state.audit.insert_rows, [row])
            else:
                # resolves after the commit that holds the row; a database that does not answer gives a 503
                await asyncio.wait_for(asyncio.wrap_future(writer.submit(row)), AUDIT_TIMEOUT_S)
            return True
        except Exception as exc:  # noqa: BLE001 - a database failure: logged, and the answer withheld
            state.metrics.audit_failures.inc()
            log.error("request %s: the audit row could not be written (%s: %s)", ctx.request_id,
                      type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return False


def printable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with control characters (NUL ...) replaced: safe to echo in an
    error message and to store in any database."""
    cut = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("..." if len(text) > limit else "")


def _prediction_id(value: str) -> str:
    """A prediction id as given, if it is one (a UUID); else a 404 that does not echo odd input."""
    try:
        uuid.UUID(value)
    except ValueError:
        raise ApiError(404, f"no prediction with id '{printable(value, 64)}' (prediction ids are UUIDs)") from None
    return value


def _route(scope: dict) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _consume(task: asyncio.Future) -> None:
    """Retrieve an abandoned handler's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


# ---------------------------------------------------------------------------------------------------- auth

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (create keys with "
                                                   "`medlens keys create NAME --role ROLE`)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key in an `X-API-Key` header")


def require(role: str) -> Callable[..., Identity]:
    """A dependency: the caller's :class:`Identity` if its key is valid, has ``role``'s rights and is within
    its rate limit; 401 / 403 / 429 otherwise."""

    def dependency(request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                   api_key: Annotated[str | None, Security(_api_key)]) -> Identity:
        state: ServiceState = request.app.state.service
        ctx = _ctx(request)
        key = (bearer.credentials if bearer is not None else None) or api_key
        if not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if state.keys is None:
            raise ApiError(503, "the service is starting; try again shortly")
        identity = state.keys.verify(key)
        if identity is None:
            raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        ctx.user, ctx.role = identity.name, identity.role
        if not role_allows(identity.role, role):
            raise ApiError(403, f"the key '{identity.name}' has the role '{identity.role}'; this needs '{role}' "
                                "or higher")
        allowed, retry_after = state.limiter.allow(identity.name)
        if not allowed:
            seconds = max(1, math.ceil(retry_after))
            raise ApiError(429, f"rate limit of {state.settings.rate_limit_per_minute} requests a minute reached "
                                f"for the key '{identity.name}'; retry in {seconds} s",
                           headers={"Retry-After": str(seconds)})
        return identity

    return dependency


# module level: the endpoints' annotations are strings (postponed evaluation), resolved in this module's globals
require_viewer = require("viewer")
require_clinician = require("clinician")
require_admin = require("admin")


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    if not state.ready:
        raise ApiError(503, "the service is starting (the model is not loaded yet); try again shortly")
    return state


# --------------------------------------------------------------------------------------------------- app


def create_app(run_dir: str | os.PathLike, settings: ServiceSettings | None = None, *, batching: bool = True,
               device: str = "auto", workers: int | None = None, torch_threads: int | None = None,
               cache_size: int = INPUT_CACHE_SIZE) -> FastAPI:
    """The service for the trained run in ``run_dir``.

    ``settings`` default to :meth:`ServiceSettings.load(run_dir) <ServiceSettings.load>` (environment and
    settings file; the audit database defaults to ``RUN/audit.db``). ``batching`` turns micro-batching on
    (default) or off (one forward pass per request on a thread pool).

    CPU use: ``workers`` model calls run at once (default: one per available core; 1 on a GPU), each on
    ``torch_threads`` torch threads (default 1, so workers x threads = cores: no oversubscription, and no
    OpenMP threads spinning idle between calls; 0 leaves torch's setting alone). The thread count is
    process-wide: it is set while the app runs and restored when it stops. ``cache_size`` recent inputs are
    held in memory for heat maps. The model loads in the lifespan.
    """
    run_dir = Path(run_dir)
    settings = settings or ServiceSettings.load(run_dir)
    state = ServiceState(run_dir, settings, batching=batching, device=device, torch_threads=torch_threads,
                         workers=workers, cache_size=cache_size)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.stop)

    app = FastAPI(
        title="medlens",
        version=medlens.__version__,
        summary="Chest X-ray classification with calibrated probabilities, uncertainty, heat maps and an "
                "audit trail. Research software: not for diagnostic use.",
        description=__doc__.split("\n\n")[0] + "\n\nAuthenticate with `Authorization: Bearer <key>` or "
                    "`X-API-Key: <key>`. Every `/v1` request is recorded in the audit trail; its id is "
                    "returned in `X-Request-ID`. Errors are `{\"detail\": \"...\"}`.",
        lifespan=lifespan,
        openapi_tags=[
            {"name": "predictions", "description": "Submit images; read predictions and their heat maps."},
            {"name": "models", "description": "The model this server runs."},
            {"name": "audit", "description": "The append-only audit trail (admin)."},
            {"name": "operations", "description": "Health, readiness and metrics (no key needed)."},
        ],
    )
    app.state.service = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(ServiceMiddleware, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {printable(request.url.path)} (see /docs)"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"method {request.method} is not allowed on {printable(request.url.path)} (see /docs)"
        _ctx(request).error = detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:5]:
            where = " ".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
            problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
        detail = "invalid request: " + "; ".join(problems)
        _ctx(request).error = detail
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(MedlensError)
    async def medlens_error(request: Request, exc: MedlensError) -> JSONResponse:
        detail = exc.message + (f" ({exc.hint})" if exc.hint else "")
        _ctx(request).error = detail
        return JSONResponse({"detail": detail}, status_code=422)


def _add_routes(app: FastAPI, state: ServiceState) -> None:
    @app.post(
        f"{API_PREFIX}/predictions", response_model=Prediction, tags=["predictions"],
        summary="Predict one image",
        description="Upload one PNG, JPEG or DICOM image as multipart/form-data (field `file`). Returns the "
                    "calibrated probability, the label at the model's operating threshold, the uncertainty of the "
                    "chosen method and whether to refer the case to a radiologist. Needs a clinician key. The "
                    "answer is sent only after its audit row is committed.",
        responses=_errors(400, 401, 403, 413, 415, 422, 429, 503, 504),
        openapi_extra=MULTIPART_BODY,
    )
    async def create_prediction(
        request: Request,
        identity: Annotated[Identity, Depends(require_clinician)],
        uncertainty: Annotated[UncertaintyMethod | None, Query(
            description="how to estimate the uncertainty: softmax (one pass, default), mc (MC dropout), "
                        "tta (test-time augmentation) or ensemble (an ensemble run's members)")] = None,
    ) -> dict[str, Any]:
        st = _state(request)
        ctx = _ctx(request)
        data, form_method = await read_upload(request, st.settings.max_upload_bytes)
        ctx.input_sha256 = _sha256(data)
        method = uncertainty or form_method or "softmax"
        if method not in UNCERTAINTY_METHODS:
            raise ApiError(422, f"unknown uncertainty method '{printable(method, 40)}': use softmax, mc, tta or "
                                "ensemble")
        if method not in st.methods:
            raise ApiError(422, f"this model does not support uncertainty '{method}' (it supports "
                                f"{', '.join(st.methods)}){' (ensemble needs an ensemble run)' if method == 'ensemble' else ''}")
        decoded = await anyio.to_thread.run_sync(decode_upload, data, ctx, st.settings, st.predictor)
        result = await st.runner.submit(decoded.image, method)
        prediction = _prediction(ctx, st, method, result, decoded, len(data))
        ctx.output = prediction
        st.inputs.put(ctx.request_id, HeldInput(decoded.image, decoded.display, prediction.pop("_target")))
        st.metrics.observe_prediction(method, prediction["probability"], prediction["label"], prediction["refer"])
        return prediction

    @app.get(
        f"{API_PREFIX}/predictions/{{id}}", response_model=Prediction, tags=["predictions"],
        summary="A past prediction",
        description="The prediction with this id, as returned when it was made (read from the audit trail, so it "
                    "survives restarts). Needs a viewer key.",
        responses=_errors(401, 403, 404, 422, 429, 503, 504),
    )
    def get_prediction(request: Request, id: PredictionId, identity: Annotated[Identity, Depends(require_viewer)]
                       ) -> dict[str, Any]:
        st = _state(request)
        record = st.audit.get_prediction(_prediction_id(id))
        if record is None or not isinstance(record.output, dict):
            raise ApiError(404, f"no prediction with id '{id}'")
        _ctx(request).output = {"prediction_id": id}
        return record.output

    @app.get(
        f"{API_PREFIX}/predictions/{{id}}/heatmap.png", tags=["predictions"], response_class=Response,
        summary="Heat map of a recent prediction",
        description="Grad-CAM overlay (PNG) of the label shown at the operating threshold, over the uploaded image "
                    f"(scaled so its longest side is at most {DISPLAY_MAX_SIDE} px). The inputs of the last "
                    f"{INPUT_CACHE_SIZE} predictions are held in memory; older ones (or any from before a restart) "
                    "answer 404. Needs a viewer key.",
        responses={200: {"content": {"image/png": {}}, "description": "the overlay"},
                   **_errors(401, 403, 404, 422, 429, 503, 504)},
    )
    async def get_heatmap(request: Request, id: PredictionId, identity: Annotated[Identity, Depends(require_viewer)],
                          alpha: Annotated[float, Query(ge=0.0, le=1.0, description="heat-map opacity")] = 0.4,
                          ) -> Response:
        st = _state(request)
        record = await anyio.to_thread.run_sync(st.audit.get_prediction, _prediction_id(id))
        if record is None:
            raise ApiError(404, f"no prediction with id '{id}'")
        held = st.inputs.get(id)
        if held is None:
            raise ApiError(404, f"the input image of prediction '{id}' is no longer held by this server (it keeps "
                                f"the last {st.inputs.capacity} in memory, none across restarts); submit the image "
                                "again for a new prediction and heat map")
        png, (height, width) = await anyio.to_thread.run_sync(_render_heatmap, st, held, alpha)
        _ctx(request).output = {"prediction_id": id, "width": width, "height": height, "alpha": alpha,
                                "method": "gradcam", "png_sha256": _sha256(png)}
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get(f"{API_PREFIX}/models", response_model=ModelsResponse, tags=["models"], summary="The served model",
             description="The model card summary of the model this server runs. Needs a viewer key.",
             responses=_errors(401, 403, 429, 503, 504))
    def list_models(request: Request, identity: Annotated[Identity, Depends(require_viewer)]) -> dict[str, Any]:
        st = _state(request)
        card = st.card
        info = {
            "model_id": card.model_id, "model_name": card.model_name, "weights_sha256": card.weights_sha256,
            "created": card.created, "class_names": list(card.class_names),
            "positive_class": card.class_names[card.positive_class], "input_size": card.input_size,
            "threshold": card.threshold, "threshold_policy": card.threshold_policy, "temperature": card.temperature,
            "uncertainty_methods": list(st.methods), "refer": _jsonable(card.refer),
            "metrics": _jsonable(card.metrics), "versions": dict(card.versions),
        }
        _ctx(request).output = {"models": [card.model_id]}
        return {"models": [info]}

    @app.get(f"{API_PREFIX}/audit", response_model=AuditPage, tags=["audit"], summary="The audit trail",
             description="Audit rows, newest first, with optional filters. Needs an admin key.",
             responses=_errors(401, 403, 422, 429, 503, 504))
    def list_audit(
        request: Request,
        identity: Annotated[Identity, Depends(require_admin)],
        limit: Annotated[int, Query(ge=1, le=1000, description="rows per page")] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9, description="rows to skip")] = 0,
        since: Annotated[str | None, Query(max_length=64, description="only rows at or after this ISO 8601 time")] = None,
        action: Annotated[str | None, Query(max_length=64, description="e.g. predict")] = None,
        user: Annotated[str | None, Query(max_length=128, description="the key name")] = None,
        status: Annotated[int | None, Query(ge=100, le=599, description="HTTP status")] = None,
    ) -> dict[str, Any]:
        st = _state(request)
        from medlens.service.audit import utc_iso

        try:
            since_iso = utc_iso(since) if since else None  # a bad time: ConfigError -> 422
        except (OverflowError, ValueError):  # parsed, but outside the representable range
            raise ApiError(422, f"'since' is outside the range of dates: '{printable(since, 64)}'") from None
        rows = st.audit.list(limit, offset, since_iso, action=action, user=user, status=status)
        total = st.audit.count(since_iso, action=action, user=user, status=status)
        _ctx(request).output = {"returned": len(rows), "total": total}
        return {"total": total, "limit": limit, "offset": offset, "items": [r.to_dict() for r in rows]}

    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness",
             description="200 while the process runs.")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, tags=["operations"], summary="Readiness",
             description="200 when the model is loaded and the audit database answers; 503 otherwise.",
             responses={503: {"model": ErrorResponse, "description": "not ready"}})
    def readyz(request: Request) -> Any:
        st: ServiceState = request.app.state.service
        database = bool(st.audit is not None and st.audit.ping())
        loaded = bool(st.ready and st.predictor is not None)
        body = {"model_loaded": loaded, "database": database, "model_id": st.card.model_id if st.card else None}
        if loaded and database:
            return {"status": "ready", **body}
        missing = " and ".join(w for w, ok in (("the model is not loaded", loaded),
                                               ("the audit database does not answer", database)) if not ok)
        return JSONResponse({"detail": f"not ready: {missing}", "status": "not ready", **body}, status_code=503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response,
             description="Request counts, latency, prediction distribution and batch sizes, in the Prometheus "
                         "text format.",
             responses={200: {"content": {"text/plain": {}}, "description": "the metrics"}})
    def metrics(request: Request) -> Response:
        return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def viewer_page() -> Response:
        index = STATIC_DIR / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return HTMLResponse(PLACEHOLDER_PAGE)

    if STATIC_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _prediction(ctx: RequestContext, st: ServiceState, method: str, result: dict[str, Any],
                decoded: DecodedUpload, size: int) -> dict[str, Any]:
    """The response body of a prediction (plus ``_target``, the class shown, for the heat map)."""
    from medlens.service.audit import deidentify_dicom_fields

    card = st.card
    probability = float(result["probability"])
    positive = probability >= card.threshold
    target = card.positive_class if positive else 1 - card.positive_class
    refer = result.get("refer")
    refer = None if refer is None or int(refer) < 0 else bool(refer)
    dicom = None
    if ctx.dicom:
        dicom = deidentify_dicom_fields(ctx.dicom, st.settings.audit_key)
    return {
        "id": ctx.request_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "probability": round(probability, 6),
        "positive_class": card.class_names[card.positive_class],
        "label": card.class_names[target],
        "positive": positive,
        "threshold": round(float(card.threshold), 6),
        "uncertainty": {
            "method": method,
            "predictive_entropy": round(float(result["predictive_entropy"]), 6),
            "decision_entropy": round(float(result["decision_entropy"]), 6),
            "mutual_information": round(float(result["mutual_information"]), 6),
            "variance": round(float(result["variance"]), 8),
            "passes": int(result["passes"]),
        },
        "refer": refer,
        "refer_reason": st.predictor.refer_note(method),
        "model_id": card.model_id,
        "weights_sha256": card.weights_sha256,
        "version": medlens.__version__,
        "input": {"sha256": ctx.input_sha256, "format": decoded.kind, "width": decoded.width,
                  "height": decoded.height, "bytes": size, "dicom": _jsonable(dicom) if dicom else None},
        "heatmap_url": f"{API_PREFIX}/predictions/{ctx.request_id}/heatmap.png",
        "_target": target,
    }


def _render_heatmap(st: ServiceState, held: HeldInput, alpha: float) -> tuple[bytes, tuple[int, int]]:
    """Grad-CAM of the held input's shown label, over its display image, as PNG bytes (worker thread)."""
    from PIL import Image

    from medlens.explain import overlay
    from medlens.models.card import normalize_batch

    if held.cam is None:
        predictor = st.predictor
        x = normalize_batch(held.image.to(predictor.device), predictor.card.intensity)
        with st.lock.exclusive():  # the explainer hooks a layer of the shared model
            result = predictor.explain(x, "gradcam", target=held.target)
        held.cam = result.maps[0].detach().float().cpu().numpy()
    picture = overlay(held.display, held.cam, alpha=alpha)
    buffer = io.BytesIO()
    Image.fromarray(picture, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue(), picture.shape[:2]


def _jsonable(value: Any) -> Any:
    from medlens.models.card import jsonable

    return jsonable(value)
