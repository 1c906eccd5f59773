"""Request dependencies: the caller's identity from its API key (401 / 403 / 429), the ready service (503).

Keys come as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (``medlens keys create NAME --role ROLE``).
No key, a malformed ``Authorization`` header, or an unknown or revoked key is 401; a role without the rights
403; too many requests for one key 429 with ``Retry-After``. Roles: :mod:`medlens.service.auth`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Annotated

import anyio
from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from medlens.service.auth import Identity, role_allows
from medlens.service.context import ApiError, printable, request_context
from medlens.service.state import ServiceState

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (create keys with "
                                                   "`medlens keys create NAME --role ROLE`)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key in an `X-API-Key` header")


def require(role: str) -> Callable[..., Identity]:
    """A dependency: the caller's :class:`Identity` if its key is valid, has ``role``'s rights and is within
    its rate limit; 401 / 403 / 429 otherwise."""

    async def dependency(request: Request,
                         bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                         api_key: Annotated[str | None, Security(_api_key)]) -> Identity:
        state: ServiceState = request.app.state.service
        ctx = request_context(request)
        key = (bearer.credentials if bearer is not None else None) or api_key
        if not key:
            if request.headers.get("authorization", "").strip():  # "Basic ...", "Bearer" alone, no scheme ...
                raise ApiError(401, "malformed Authorization header: send 'Authorization: Bearer <key>' or "
                                    "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if state.keys is None:
            raise ApiError(503, "the service is starting; try again shortly")
        # answered at once where it can be (PostgreSQL's key cache, SQLite's read that never waits: .keycache);
        # else looked up on a worker thread
        answered, identity = state.keys.quick(key)
        if not answered:
            identity = await anyio.to_thread.run_sync(state.keys.verify, key)
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


# one dependency per role, shared by the route modules
require_viewer = require("viewer")
require_clinician = require("clinician")
require_admin = require("admin")


def service_state(request: Request) -> ServiceState:
    """The service's state once the model is loaded; 503 before."""
    state: ServiceState = request.app.state.service
    if not state.ready:
        raise ApiError(503, "the service is starting (the model is not loaded yet); try again shortly")
    return state


def prediction_id(value: str) -> str:
    """A prediction id as given, if it is one (a UUID); else a 404 that does not echo odd input."""
    try:
        uuid.UUID(value)
    except ValueError:
        raise ApiError(404, f"no prediction with id '{printable(value, 64)}' (prediction ids are UUIDs)") from None
    return value


def owner_filter(identity: Identity) -> str | None:
    """Whose predictions ``identity`` may read: its own (the key name), or everyone's (None) for an admin."""
    return None if role_allows(identity.role, "admin") else identity.name
