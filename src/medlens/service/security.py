"""Browser and log hygiene: security headers on every response, query strings redacted in the access log, and the
API docs (``/docs``) served from local files only.

- :class:`SecurityHeaders`: a strict Content-Security-Policy (scripts, styles, images and requests from this origin
  only, no inline code, no framing), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
  ``Referrer-Policy: no-referrer`` on every response, errors included. The viewer keeps the API key in
  sessionStorage, so it must not be framed (clickjacking) nor run injected script; its HTML, CSS and JS are
  separate files, so no ``'unsafe-inline'`` is needed.
- :class:`RedactQuery`: uvicorn's access log writes each request's path with its query string. A careless
  client that sends its API key as ``?api_key=...`` is refused (keys are read from headers only), but the key
  would still be written in clear to the log; the filter keeps the values of the API's own harmless parameters
  (``uncertainty``, ``alpha``, paging) and writes ``***`` for every other value.
- :func:`add_docs`: Swagger UI from the ``fastapi-offline`` package's bundled assets (hospital networks are often
  offline, and a page that pulls script from a public CDN would need a CSP that trusts it), started by
  ``static/docs.js``. Without the package ``/docs`` says how to get it and points at ``/openapi.json``; it never
  loads anything from another host. ReDoc (``/redoc``, CDN-only in FastAPI) is off.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: the policy of every response: this origin only, no inline code, no plugins, never framed
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
ACCESS_LOGGER = "uvicorn.access"
#: query parameters of the API whose values are harmless and useful in the access log
LOGGED_PARAMETERS = frozenset({"uncertainty", "alpha", "limit", "offset", "status", "action", "since"})
_LOGGED_VALUE = re.compile(r"[A-Za-z0-9._:+%-]{0,40}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
DOCS_ASSETS = "/docs/assets"


class SecurityHeaders:
    """A pure ASGI middleware that adds :data:`HEADERS` to every HTTP response that does not set them itself."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [(name, value) for name, value in HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def redact_query(target: str) -> str:
    """``target`` (a request path) with the values of its query string replaced by ``***``, except those of
    :data:`LOGGED_PARAMETERS` that look like what they should; a parameter name that is not a plain identifier
    (it might be a key sent bare) is replaced too."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    items = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if not _NAME.fullmatch(name):
            items.append("***")
        elif eq and not (name in LOGGED_PARAMETERS and _LOGGED_VALUE.fullmatch(value)):
            items.append(f"{name}=***")
        else:
            items.append(item)
    return f"{path}?{'&'.join(items)}"


class RedactQuery(logging.Filter):
    """A filter for uvicorn's access logger: the request target (its third argument) gets :func:`redact_query`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Put :class:`RedactQuery` on uvicorn's access logger (once; logging configuration keeps logger filters)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's JS and CSS bundled with ``fastapi-offline``, or None without the package."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() and (folder / "swagger-ui.css").is_file() else None


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css"><link rel="icon" href="{assets}/favicon.png"></head>
<body><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script><script src="/static/docs.js"></script></body></html>
"""
NO_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API</title></head>
<body><h1>{title} API</h1><p>The interactive API documentation needs the <code>fastapi-offline</code> package
(<code>pip install 'medlens[service]'</code>); it is served from this server, never from a public CDN. The API is
described at <a href="/openapi.json">/openapi.json</a>.</p></body></html>
"""


def add_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI from local files (create the app with ``docs_url=None, redoc_url=None``)."""
    assets = swagger_assets()
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    page = (DOCS_PAGE if assets is not None else NO_DOCS_PAGE).format(title=app.title, assets=DOCS_ASSETS)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(page)
