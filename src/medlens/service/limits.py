"""Clients without a valid API key, and slow request bodies (the connection-level half is :mod:`.transport`).

Per address. Requests that carry no valid key are limited per client IP address by a token bucket
(``anonymous_rate_per_minute``, bursts of ``anonymous_burst``; 0 turns it off): past it they get 429 with
``Retry-After``, before any handler runs. ``/healthz`` and ``/readyz`` are exempt (a load balancer probes them
often from one address, and both are cheap: ``/readyz`` writes at most once a second). A request with no key
takes a token up front; one with a key is not slowed down by this at all unless its address has run out, and
then only if its key is invalid; a key that fails verification costs its address a token afterwards.

Audit rows of requests without a valid key (401s, 404s of unknown ``/v1`` paths, these 429s ...). Each used to
get its own committed row, so a flood grew the database as fast as it arrived (500 anonymous requests: 500 rows,
184 KB). Now the first ``anonymous_audit_sample`` of them per address per minute still get their own row
(written before the answer, as every ``/v1`` row is), and the rest of that minute are counted and recorded as ONE
summary row per address (action ``anonymous_summary``: the address, the minute, how many, by status and action),
written when the minute ends (and at shutdown). So the audit trail still records that a flood happened, from
where and how large, and grows by at most ``anonymous_audit_sample + 1`` rows per address per minute, from at most
:data:`MAX_ADDRESSES` addresses (the rest share one ``other addresses`` summary). Every request that carries a
valid key still gets exactly its own row, whatever its status.

Slow bodies. :class:`ClientLimits` gives each request body a deadline like Apache's ``mod_reqtimeout``:
``body_timeout_s`` from the first read, plus one second for every ``body_min_rate`` bytes received, so an honest
large upload on a slow link gets the time it needs while a body that trickles in is cut off: the request is
answered ``408`` (its handler's own answer, if any, is dropped) and the connection closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from medlens.service.auth import RateLimiter
from medlens.service.context import RequestContext
from medlens.service.db import utc_iso

if TYPE_CHECKING:
    from medlens.service.audit import AuditLog
    from medlens.service.settings import ServiceSettings
    from medlens.service.state import ServiceState

log = logging.getLogger(__name__)

#: paths that are never limited (probes)
EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})
#: the period of one summary row (seconds)
WINDOW_S = 60.0
#: most addresses counted separately in one window; any further ones share the ``other addresses`` summary
MAX_ADDRESSES = 1000
OTHER = "other addresses"
SUMMARY_ACTION = "anonymous_summary"


def client_ip(scope: dict) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def presented_key(scope: dict) -> str | None:
    """The API key a request presents (``Authorization: Bearer`` or ``X-API-Key``), or None."""
    key = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            key = value.decode("latin-1").strip()
    return key


def has_credentials(scope: dict) -> bool:
    """The request sends an ``Authorization`` or ``X-API-Key`` header (valid or not)."""
    return any(name in (b"authorization", b"x-api-key") and value.strip() for name, value in scope.get("headers", ()))


@dataclass
class _Tally:
    total: int = 0
    own_rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)


class AnonymousTraffic:
    """The per-address token bucket for requests without a valid key, and the summary rows of their audit trail
    (see the module docstring). ``describe()`` gives the model fields every audit row carries. A daemon thread
    writes each window's summary rows when it ends; :meth:`close` writes the last one."""

    def __init__(self, settings: ServiceSettings, audit: AuditLog, describe: Callable[[], dict[str, Any]], *,
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.limiter = RateLimiter(settings.anonymous_rate_per_minute, burst=settings.anonymous_burst)
        self.sample = settings.anonymous_audit_sample
        self.audit = audit
        self.describe = describe
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._tallies: dict[str, _Tally] = {}
        self._started, self._started_iso = clock(), utc_iso()
        self._unwritten: list[dict[str, Any]] = []  # summary rows whose write failed: tried again next time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medlens-anonymous-audit", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.limiter.per_minute > 0

    def count(self, ip: str, action: str, status: int) -> bool:
        """Count one request without a valid key; True if it gets a row of its own (one of the first
        ``sample`` of its address this window), False if only the window's summary row records it."""
        with self._lock:
            tally = self._tallies.get(ip)
            if tally is None:
                if len(self._tallies) >= MAX_ADDRESSES:
                    ip = OTHER
                tally = self._tallies.setdefault(ip, _Tally())
            tally.total += 1
            own = ip != OTHER and tally.own_rows < self.sample
            if own:
                tally.own_rows += 1
            else:
                tally.statuses[str(status)] += 1
                tally.actions[action] += 1
            return own

    async def absorbs(self, ctx: RequestContext, scope: dict, action: str, status: int, keys: Any) -> bool:
        """For the middleware's audit step: True if this ``/v1`` request's row is left to the summary row.
        Only for requests without a valid key: a request whose key the route never checked (an unknown
        path) and that presents one is verified here, and with a valid key keeps its own row."""
        if ctx.user is not None:
            return False
        key = presented_key(scope)
        if key and status not in (401, 429) and keys is not None:  # 401, 429: the key was checked, and failed
            try:
                identity = await anyio.to_thread.run_sync(keys.verify, key)
            except Exception:  # noqa: BLE001 - the key database failed: counted as without a valid key
                identity = None
            if identity is not None:
                ctx.user, ctx.role = identity.name, identity.role
                return False
        return not self.count(client_ip(scope), action, status)

    def flush(self, *, force: bool = False) -> int:
        """Write the summary rows of the window if it has ended (or ``force``); the number written."""
        with self._lock:
            now = self._clock()
            if not force and now - self._started < self.window_s:
                return 0
            tallies, self._tallies = self._tallies, {}
            started_iso, self._started, self._started_iso = self._started_iso, now, utc_iso()
        ended_iso = utc_iso()
        model = self.describe()
        rows = []
        for ip, tally in tallies.items():
            summarised = tally.total - tally.own_rows
            if summarised <= 0:
                continue
            status = int(tally.statuses.most_common(1)[0][0])
            statuses = dict(sorted(tally.statuses.items()))
            rows.append(self.audit.prepare(
                request_id=f"anonymous-{uuid.uuid4()}", action=SUMMARY_ACTION, status=status, **model,
                output={"address": ip, "from": started_iso, "to": ended_iso, "requests": tally.total,
                        "own_rows": tally.own_rows, "in_this_row": summarised, "statuses": statuses,
                        "actions": dict(sorted(tally.actions.items()))},
                error=(f"{summarised} more requests without a valid API key from {ip} between {started_iso} and "
                       f"{ended_iso} (statuses {json.dumps(statuses)}); the first {tally.own_rows} have rows of "
                       "their own"),
            ))
        return self._write(rows)

    def _write(self, rows: list[dict[str, Any]]) -> int:
        with self._write_lock:
            rows = self._unwritten + rows
            self._unwritten = []
            if not rows:
                return 0
            try:
                self.audit.insert_rows(rows)
            except Exception as exc:  # noqa: BLE001 - the database is down: keep them for the next try
                self._unwritten = rows[-(MAX_ADDRESSES + 1) * 10:]
                log.warning("could not write %d summary rows of requests without a key (%s); will retry",
                            len(rows), type(exc).__name__)
                return 0
            return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.window_s)):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - never let the thread die
                log.exception("summary rows of requests without a key: flush failed")

    def close(self) -> None:
        """Stop the thread and write what was counted."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush(force=True)


class BodyTimeout(Exception):
    """Raised into a handler whose request body did not arrive in time (the client gets 408)."""


class ClientLimits:
    """ASGI middleware (inside :class:`~medlens.service.middleware.ServiceMiddleware`, so its answers are audited
    like any other): the per-address limit for requests without a valid key, and the body deadline."""

    def __init__(self, app: Any, state: ServiceState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        ctx: RequestContext | None = scope.get("state", {}).get("ctx")
        anonymous: AnonymousTraffic | None = getattr(state, "anonymous", None)
        ip = client_ip(scope)
        limited = anonymous is not None and anonymous.enabled and scope["path"] not in EXEMPT_PATHS
        credentials = has_credentials(scope)
        if limited:
            if not credentials:
                allowed, wait = anonymous.limiter.allow(ip)
            else:  # only checked when its address has run out: a valid key is never held up by its neighbours
                wait = anonymous.limiter.wait(ip)
                allowed = wait <= 0 or await self._valid_key(scope)
            if not allowed:
                await self._too_many(send, ctx, wait)
                return

        settings = state.settings
        loop = asyncio.get_running_loop()
        started: float | None = None
        received = 0
        body_done = False
        timed_out = False
        response_started = False
        detail = (f"the request body did not arrive in time (a body gets {settings.body_timeout_s:g} s plus 1 s "
                  f"per {settings.body_min_rate:,} bytes received); connection closed")

        async def timed_receive() -> dict:
            nonlocal started, received, body_done, timed_out
            if body_done:  # after the body: waits for a disconnect (streaming responses), no deadline
                return await receive()
            if timed_out:
                raise BodyTimeout(detail)
            now = loop.time()
            started = now if started is None else started
            left = started + settings.body_timeout_s + received / settings.body_min_rate - now
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                timed_out = True
                raise BodyTimeout(detail) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal response_started
            if timed_out:  # the handler's answer to a body that never came is replaced by the 408
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await self._send_408(send, ctx, detail)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out:
                raise
        finally:
            if limited and credentials and ctx is not None and ctx.user is None:
                anonymous.limiter.allow(ip)  # a key that did not verify: its address pays afterwards
        if timed_out and not response_started:
            await self._send_408(send, ctx, detail)

    async def _valid_key(self, scope: dict) -> bool:
        key, keys = presented_key(scope), self.state.keys
        if not key or keys is None:
            return False
        try:
            return await anyio.to_thread.run_sync(keys.verify, key) is not None
        except Exception:  # noqa: BLE001 - the key database failed: the route will answer for it
            return True

    async def _too_many(self, send: Callable, ctx: RequestContext | None, wait: float) -> None:
        seconds = max(1, int(wait + 0.999))
        detail = (f"too many requests without a valid API key from this address (limit "
                  f"{self.state.settings.anonymous_rate_per_minute} a minute); retry in {seconds} s")
        await _send_json(send, ctx, 429, detail, [(b"retry-after", str(seconds).encode())])

    @staticmethod
    async def _send_408(send: Callable, ctx: RequestContext | None, detail: str) -> None:
        await _send_json(send, ctx, 408, detail, [(b"connection", b"close")])


async def _send_json(send: Callable, ctx: RequestContext | None, status: int, detail: str,
                     headers: list[tuple[bytes, bytes]]) -> None:
    if ctx is not None:
        ctx.error = detail
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
