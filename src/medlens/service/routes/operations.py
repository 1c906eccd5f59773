"""Operations, open without a key: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics`` (Prometheus)
and the web viewer at ``/`` (``static/index.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from medlens.service.metrics import CONTENT_TYPE
from medlens.service.schemas import ErrorResponse, Health, Readiness
from medlens.service.state import ServiceState

router = APIRouter(tags=["operations"])

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

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


@router.get("/healthz", response_model=Health, summary="Liveness", description="200 while the process runs.")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="Readiness",
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


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            description="Request counts, latency, prediction distribution and batch sizes, in the Prometheus "
                        "text format.",
            responses={200: {"content": {"text/plain": {}}, "description": "the metrics"}})
def metrics(request: Request) -> Response:
    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
def viewer_page() -> Response:
    index = STATIC_DIR / "index.html"
    if index.is_file():
        return FileResponse(index, media_type="text/html")
    return HTMLResponse(PLACEHOLDER_PAGE)
