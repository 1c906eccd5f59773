"""Operations, open without a key: ``/healthz`` (liveness), ``/readyz`` (readiness: the model is loaded and the
audit trail commits a write), ``/metrics`` (Prometheus: operational series; the prediction distribution only with
an admin key, see :mod:`medlens.service.metrics`) and the web viewer at ``/`` (``static/index.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from medlens.service.auth import role_allows
from medlens.service.context import printable, request_context
from medlens.service.limits import presented_key
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
            description="200 when the model is loaded and the audit trail can commit a write (a heartbeat row, "
                        "committed at most once a second); 503 otherwise.",
            responses={503: {"model": ErrorResponse, "description": "not ready"}})
def readyz(request: Request) -> Any:
    st: ServiceState = request.app.state.service
    # A real, committed write (medlens.service.health), not a SELECT: with the disk full or the database locked a
    # read still works while every prediction is refused (its audit row cannot be committed).
    probe = st.readiness
    database, why = probe.check() if probe is not None else (False, "not open")
    loaded = bool(st.ready and st.predictor is not None)
    body = {"model_loaded": loaded, "database": database, "model_id": st.card.model_id if st.card else None}
    if loaded and database:
        return {"status": "ready", **body}
    missing = " and ".join(w for w, ok in (("the model is not loaded", loaded),
                                           (f"the audit trail cannot commit ({printable(why)})", database)) if not ok)
    return JSONResponse({"detail": f"not ready: {missing}", "status": "not ready", **body}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            description="Request counts, latency, batch sizes and audit failures, in the Prometheus text format, "
                        "open. The prediction distribution (predictions by label, referrals, the probability "
                        "histogram) only with an admin key: before and after one prediction it would give away "
                        "that prediction's label and probability.",
            responses={200: {"content": {"text/plain": {}}, "description": "the metrics"},
                       401: {"model": ErrorResponse, "description": "an invalid key"},
                       403: {"model": ErrorResponse, "description": "a key that is not an admin's"}})
def metrics(request: Request) -> Response:
    st: ServiceState = request.app.state.service
    key = presented_key(request.scope)
    if key is None:
        return Response(st.metrics.render(), media_type=CONTENT_TYPE)
    identity = st.keys.verify(key) if st.keys is not None else None
    if identity is None:
        return JSONResponse({"detail": "invalid or revoked API key (leave the key out for the open metrics)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    request_context(request).user = identity.name  # a valid key: not counted against its address (limits)
    if not role_allows(identity.role, "admin"):
        return JSONResponse({"detail": f"the key '{identity.name}' is not an admin's: the prediction distribution "
                                       "needs an admin key (leave the key out for the open metrics)"},
                            status_code=403)
    return Response(st.metrics.render(results=True), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
def viewer_page() -> Response:
    index = STATIC_DIR / "index.html"
    if index.is_file():
        return FileResponse(index, media_type="text/html")
    return HTMLResponse(PLACEHOLDER_PAGE)
