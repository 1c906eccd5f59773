"""Slow clients at the connection level: uvicorn with a header timeout (it has none of its own).

uvicorn closes a kept-alive connection that stays silent for ``timeout_keep_alive`` seconds, but a client that
sends part of a request's headers and then stops (a "slowloris") keeps its connection, and a slot of the
server, open forever: every byte it sends cancels the keep-alive timer, and there is no timer while headers
arrive. :class:`HeaderTimeoutProtocol` is uvicorn's HTTP protocol (h11, or httptools where installed) with
one more timer: a request's headers must be complete within ``header_timeout_s`` of the connection opening (or
of the previous response, on a kept-alive connection); otherwise the server answers ``408 Request Timeout``
and closes the connection. The request body has its own deadline, kept by
:class:`medlens.service.limits.ClientLimits` (it is read by the app, not here).

:func:`uvicorn_options` gives the keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply the
service's settings: this protocol, the keep-alive timeout, the header size limit, and which proxies'
``X-Forwarded-For`` to believe (none unless ``trusted_proxies`` is set: otherwise a client on the server's
own machine could claim any address and slip past the per-address limit for clients without a key).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from medlens.service.settings import ServiceSettings

log = logging.getLogger(__name__)

#: seconds a kept-alive connection may stay silent between requests (uvicorn's own default)
KEEP_ALIVE_S = 5
#: the largest request head (request line + headers) accepted, in bytes; larger is a 400 (h11's own limit)
MAX_HEADER_BYTES = 16 * 1024

_BODY_408 = b'{"detail": "the request headers did not arrive in time; connection closed"}'
RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(_BODY_408)).encode() + b"\r\n\r\n" + _BODY_408)


class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol plus a deadline for each request's headers (see the module docstring)."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = float(header_timeout_s)
        self._header_timer: asyncio.TimerHandle | None = None
        self._app = self.app
        self.app = self._headers_complete  # uvicorn calls the app once a request's headers are complete

    async def _headers_complete(self, scope: Any, receive: Any, send: Any) -> None:
        self._disarm()
        await self._app(scope, receive, send)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once: arm, and its app call disarms
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request is being answered (its body has its own deadline)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("%s did not complete a request's headers within %g s: 408, connection closed", client,
                 self.header_timeout_s)
        self.transport.write(RESPONSE_408)
        self.transport.close()


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply ``settings`` to the connections."""
    trusted = list(settings.trusted_proxies)
    return {
        # a partial of a module-level class: picklable, so it also works with uvicorn's worker processes
        "http": functools.partial(HeaderTimeoutProtocol, header_timeout_s=settings.header_timeout_s),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or None,
    }
