"""The service middleware: request id, request timeout, the audit row of every ``/v1`` request, metrics.

Every request to ``/v1/...`` with a valid API key gets exactly one audit row, whatever its outcome (403, 413,
429 and 504 included), written when the response starts and *before* any of it is sent: a client that received an
answer knows it is in the audit trail. Requests without a valid key (401, unknown paths, the per-address 429) get
their own row too, up to ``anonymous_audit_sample`` per address a minute; the rest are counted in one summary row
per address a minute (:mod:`medlens.service.limits`), so a flood cannot grow the database as fast as it arrives. If the row cannot be written the client gets a 503 instead of the answer, and the
row says so (status 503, withheld; never the prediction): the invariant and its paths are in docs/AUDIT.md. The
request id (a UUID, also the prediction id) is returned in ``X-Request-ID``. A bug in a handler is logged with
its traceback and answered 500 with one sentence; a traceback never reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
from starlette.datastructures import MutableHeaders

from medlens.service.committer import WITHHELD
from medlens.service.context import API_PREFIX, RequestContext, printable
from medlens.service.state import ServiceState

log = logging.getLogger(__name__)

#: longest wait for a request's audit row to be committed before the answer is withheld (503)
AUDIT_TIMEOUT_S = 30.0
#: audit action names by (HTTP method, route template)
ACTIONS: dict[tuple[str, str], str] = {
    ("POST", "/v1/predictions"): "predict",
    ("GET", "/v1/predictions/{id}"): "get_prediction",
    ("GET", "/v1/predictions/{id}/heatmap.png"): "heatmap",
    ("GET", "/v1/models"): "list_models",
    ("GET", "/v1/audit"): "list_audit",
}


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
        anonymous = state.anonymous  # no valid key: beyond a few per address a minute, one summary row (.limits)
        if ctx.user is None and anonymous is not None and await anonymous.absorbs(
                ctx, scope, ACTIONS.get((scope["method"], route), "unknown"), status, state.keys):
            return True
        out = ctx.output if isinstance(ctx.output, dict) and "in_domain" in ctx.output else {}
        try:
            row = state.audit.prepare(
                request_id=ctx.request_id, action=ACTIONS.get((scope["method"], route), "unknown"), status=status,
                user=ctx.user, role=ctx.role, input_sha256=ctx.input_sha256, dicom=ctx.dicom,
                model_id=card.model_id if card else None,
                policy_hash=(card.policy_hash or None) if card else None,
                weights_sha256=(card.weights_sha256 or None) if card else None,
                output=ctx.output, latency_ms=(time.perf_counter() - started) * 1000.0,
                **{k: out.get(k) for k in ("in_domain", "domain_score", "domain_reason")},
                error=printable(ctx.error, 2000) if status >= 400 and ctx.error else None,
            )
            writer = state.audit_writer
            if writer is None:  # stopping: write it directly
                await anyio.to_thread.run_sync(state.audit.insert_rows, [row])
                return True
            # resolves after the commit that holds the row. A row not claimed by the writer within
            # AUDIT_TIMEOUT_S is withdrawn: its withheld version (503, the reason, no prediction) is written in its
            # place and the client gets 503. A row the writer already claimed is waited for: its one transaction
            # is bounded by the database's lock timeout, and its outcome decides the answer (docs/AUDIT.md).
            future = writer.submit(row, deadline=time.monotonic() + AUDIT_TIMEOUT_S)
            # one asyncio wrapper, awaited (again) after a timeout: a second wrapper would leave the first holding
            # a database error nobody reads ("Future exception was never retrieved" in the log)
            waiter = asyncio.wrap_future(future)
            try:
                result = await asyncio.wait_for(asyncio.shield(waiter), AUDIT_TIMEOUT_S)
            except asyncio.TimeoutError:
                reason = (f"the audit trail did not record the answer within {AUDIT_TIMEOUT_S:g} s, so it was "
                          "withheld (503)")
                if writer.withdraw(future, reason):
                    waiter.add_done_callback(_consume)  # settled only if the writer stops with it still queued
                    raise
                result = await waiter
            if result == WITHHELD:
                raise RuntimeError("the row was claimed after its deadline and written as withheld")
            return True
        except Exception as exc:  # noqa: BLE001 - a database failure: logged, and the answer withheld
            state.metrics.audit_failures.inc()
            log.error("request %s: the audit row could not be written (%s: %s)", ctx.request_id,
                      type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return False


def _route(scope: dict) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _consume(task: asyncio.Future) -> None:
    """Retrieve an abandoned handler's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
