"""What every layer of one request shares: its :class:`RequestContext`, :class:`ApiError` and :func:`printable`.

The middleware (:mod:`medlens.service.middleware`) puts a fresh :class:`RequestContext` on every request; the
dependencies, upload checks and handlers fill it in (who called, the input's digest, the DICOM fields, the
answer, the error), and the middleware writes the audit row from it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException

API_PREFIX = "/v1"


@dataclass
class RequestContext:
    """What the audit row of one request needs; filled in by the middleware, dependencies and handlers."""

    request_id: str
    user: str | None = None
    role: str | None = None
    input_sha256: str | None = None
    dicom: Any = None  # raw DICOM fields: de-identified by AuditLog.prepare, never stored or logged as they are
    output: Any = None
    error: str | None = None


def request_context(request: Request) -> RequestContext:
    """The request's context (made here only when the app runs without its middleware, as in unit tests)."""
    ctx = getattr(request.state, "ctx", None)
    if ctx is None:
        ctx = RequestContext(str(uuid.uuid4()))
        request.state.ctx = ctx
    return ctx


class ApiError(HTTPException):
    """An error answered as ``{"detail": ...}`` with ``status_code``."""


def printable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with control characters (NUL ...) replaced: safe to echo in an
    error message and to store in any database."""
    cut = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("..." if len(text) > limit else "")
