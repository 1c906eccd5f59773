"""The clinical service: a FastAPI app that serves one trained run (``medlens serve RUN``).

:func:`create_app` builds the app; the model, the audit trail and the API keys are opened once, in the
app's lifespan. Endpoints (all described in ``/openapi.json``, browsable at ``/docs``):

=========================================  ==========  ===============================================
``POST /v1/predictions``                   clinician   multipart upload (field ``file``: PNG / JPEG /
                                                       DICOM; ``uncertainty`` softmax|mc|tta|ensemble)
``GET /v1/predictions/{id}``               clinician   a past prediction, from its audit row (own; admin: all)
``GET /v1/predictions/{id}/heatmap.png``   clinician   Grad-CAM overlay of the label shown (own; admin: all)
``GET /v1/models``                         viewer      the served model's card summary and policy hash
``GET /v1/audit``                          admin       the audit trail, newest first
``GET /healthz`` / ``/readyz``             open        process alive / model loaded and the audit trail commits
``GET /metrics``                           open        Prometheus text format (operational series; with an
                                                       admin key also the prediction distribution)
``GET /``                                  open        the web viewer (``static/index.html``)
=========================================  ==========  ===============================================

Keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (``medlens keys create NAME --role ROLE``).
No key, a malformed ``Authorization`` header, or an unknown or revoked key is 401, a role without the rights
403, too many requests for one key 429 (with ``Retry-After``), and so are too many requests without a valid key
from one address (:mod:`medlens.service.limits`; ``/healthz`` and ``/readyz`` exempt). A clinician reads only
their own predictions and heat maps (another user's id is a 404, like an unknown one), an admin all of them; a
viewer reads the model information only. CORS is off unless ``cors_origins`` is set.

Every request to ``/v1/...`` with a valid key gets exactly one audit row, whatever its outcome (413 and 429
included; requests without a valid key: their own row up to a few per address a minute, then one summary row),
written by :class:`~medlens.service.middleware.ServiceMiddleware` when the response starts and *before* any
of it is sent: a client that received a prediction knows it is in the audit trail. If the row cannot be
written the client gets a 503 instead of the answer. The request id (a UUID, also the prediction id) is
returned in ``X-Request-ID``. Every prediction, and its audit row, carries the model id, the model card's
operating-policy hash (threshold, temperature, referral policy) and the weights' digest.

Uploads are read with a hard size limit (413 as soon as the body passes it), image dimensions are checked
from the file header before anything is decoded (decompression bombs: 413), anything that is not a PNG,
JPEG or DICOM image is refused by its content, not its name (415), and unreadable images or DICOM without
pixels are 422 (:mod:`medlens.service.uploads`). Errors are always ``{"detail": "<one clear sentence>"}``; a
traceback never reaches a client.

Privacy: raw DICOM patient fields are never logged or stored; the audit row and the response hold only
:func:`~medlens.service.deid.deidentify_dicom_fields` output, and upload file names are ignored. While the
service runs, pydicom's reading validation is set to "ignore", because its warnings quote element values.

Where things are: :mod:`.schemas` (request / response models), :mod:`.deps` (keys and roles),
:mod:`.uploads` (upload checks), :mod:`.middleware` (request id, timeout, audit row), :mod:`.state` (model,
database, batcher, audit writer; the lifespan), :mod:`.routes` (the endpoints, one module per resource).
This module wires them together in :func:`create_app`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

import medlens
from medlens.errors import MedlensError
from medlens.service.context import printable, request_context
from medlens.service.limits import ClientLimits
from medlens.service.middleware import ServiceMiddleware
from medlens.service.routes import audit, clinical, models, operations, predictions
from medlens.service.security import SecurityHeaders, add_docs, redact_access_log
from medlens.service.settings import ServiceSettings
from medlens.service.state import INPUT_CACHE_SIZE, ServiceState, lifespan

__all__ = ["create_app"]


#: the environment ``medlens serve --workers N`` hands to each server process (see :func:`app_from_env`)
SERVE_ENV = {"run": "MEDLENS_SERVE_RUN", "database": "MEDLENS_SERVE_DATABASE", "batching": "MEDLENS_SERVE_BATCHING",
             "model_workers": "MEDLENS_SERVE_MODEL_WORKERS", "backend": "MEDLENS_SERVE_BACKEND"}


def app_from_env() -> FastAPI:
    """The app of one of ``medlens serve --workers N``'s processes (uvicorn calls this factory in each): the run,
    the shared audit database and the per-process model workers come from :data:`SERVE_ENV`."""
    run = os.environ[SERVE_ENV["run"]]
    settings = ServiceSettings.load(run, database=os.environ[SERVE_ENV["database"]])
    return create_app(run, settings, batching=os.environ.get(SERVE_ENV["batching"], "1") == "1",
                      workers=int(os.environ.get(SERVE_ENV["model_workers"], "1")),
                      backend=os.environ.get(SERVE_ENV["backend"], "torch"))


def create_app(run_dir: str | os.PathLike, settings: ServiceSettings | None = None, *, batching: bool = True,
               device: str = "auto", workers: int | None = None, torch_threads: int | None = None,
               cache_size: int = INPUT_CACHE_SIZE, backend: str = "torch") -> FastAPI:
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
                         workers=workers, cache_size=cache_size, backend=backend)

    app = FastAPI(
        title="medlens",
        version=medlens.__version__,
        summary="Chest X-ray classification with calibrated probabilities, uncertainty, heat maps and an "
                "audit trail. Research software: not for diagnostic use.",
        description=__doc__.split("\n\n")[0] + "\n\nAuthenticate with `Authorization: Bearer <key>` or "
                    "`X-API-Key: <key>`. Every `/v1` request is recorded in the audit trail; its id is "
                    "returned in `X-Request-ID`. Errors are `{\"detail\": \"...\"}`.",
        lifespan=lifespan(state),
        docs_url=None,  # served from local files by security.add_docs (FastAPI's pages load from a public CDN)
        redoc_url=None,
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
    app.add_middleware(ClientLimits, state=state)  # inside ServiceMiddleware: its 429 / 408 are audited
    app.add_middleware(ServiceMiddleware, state=state)
    app.add_middleware(SecurityHeaders)  # outermost: on every response, the middleware's own 503 / 504 included
    redact_access_log()
    _add_error_handlers(app)
    for router in (predictions.router, clinical.router, models.router, audit.router, operations.router):
        app.include_router(router)
    add_docs(app)
    if operations.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=operations.STATIC_DIR), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {printable(request.url.path)} (see /docs)"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"method {request.method} is not allowed on {printable(request.url.path)} (see /docs)"
        request_context(request).error = detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:5]:
            where = " ".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
            problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
        detail = "invalid request: " + "; ".join(problems)
        request_context(request).error = detail
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(MedlensError)
    async def medlens_error(request: Request, exc: MedlensError) -> JSONResponse:
        detail = exc.message + (f" ({exc.hint})" if exc.hint else "")
        request_context(request).error = detail
        return JSONResponse({"detail": detail}, status_code=422)
