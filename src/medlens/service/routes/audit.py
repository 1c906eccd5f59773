"""``GET /v1/audit``: the audit trail, newest first, with filters (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from medlens.service.auth import Identity
from medlens.service.context import API_PREFIX, ApiError, printable, request_context
from medlens.service.db import utc_iso
from medlens.service.deps import require_admin, service_state
from medlens.service.schemas import AuditPage, error_responses

router = APIRouter(prefix=API_PREFIX, tags=["audit"])


@router.get("/audit", response_model=AuditPage, summary="The audit trail",
            description="Audit rows, newest first, with optional filters. Needs an admin key.",
            responses=error_responses(401, 403, 422, 429, 503, 504))
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
    st = service_state(request)
    try:
        since_iso = utc_iso(since) if since else None  # a bad time: ConfigError -> 422
    except (OverflowError, ValueError):  # parsed, but outside the representable range
        raise ApiError(422, f"'since' is outside the range of dates: '{printable(since or '', 64)}'") from None

    rows = st.audit.list(limit, offset, since_iso, action=action, user=user, status=status)
    total = st.audit.count(since_iso, action=action, user=user, status=status)
    request_context(request).output = {"returned": len(rows), "total": total}
    return {"total": total, "limit": limit, "offset": offset, "items": [r.to_dict() for r in rows]}
