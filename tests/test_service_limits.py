"""Issue 9, finding 5: clients without a key and slow clients, against a real uvicorn server on loopback (the
service's own connection settings, ``transport.uvicorn_options``), driven with httpx and raw sockets.

- a flood without a key (300 requests) is cut to the per-address burst with 429 + ``Retry-After``; its audit trail
  is a few rows of their own plus ONE summary row that counts all of it (it used to be one row per request),
  while a valid key from the same address is not held up and every request with it keeps its own row;
- a connection that sends part of a request's headers (or nothing, or a second request's first line on a
  kept-alive connection) and stops is answered 408 and closed at the header timeout (it used to stay open);
- a request body that trickles in is answered 408 (audited, under its key) and its connection closed at the body
  deadline (it used to run into the 30 s request timeout), while a slow but steady upload is served.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import copy_run, require_module, serve_in_thread

require_module("fastapi")
uvicorn = require_module("uvicorn")
httpx = require_module("httpx")

from medlens.service.app import create_app  # noqa: E402
from medlens.service.auth import KeyStore  # noqa: E402
from medlens.service.settings import ServiceSettings  # noqa: E402
from medlens.service.transport import uvicorn_options  # noqa: E402

BURST, SAMPLE = 10, 3  # per-address burst of requests without a key; own audit rows per address a minute
HEADER_S, BODY_S, MIN_RATE = 1.0, 1.0, 1000


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """(base URL, service state, alice's clinician key): the app on a real server with short limits."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("limits-run") / "r")
    db = tmp_path_factory.mktemp("limits-db") / "audit.db"
    settings = dataclasses.replace(
        ServiceSettings.load(run, database=db, env={}), rate_limit_per_minute=0, anonymous_rate_per_minute=60,
        anonymous_burst=BURST, anonymous_audit_sample=SAMPLE, header_timeout_s=HEADER_S, body_timeout_s=BODY_S,
        body_min_rate=MIN_RATE)
    with KeyStore(settings.database_url) as store:
        key = store.create("alice", "clinician")
    app = create_app(run, settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(settings))
    with serve_in_thread(config) as url:
        yield url, app.state.service, key


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _xray(kermany: Path) -> bytes:
    return sorted(p for p in (kermany / "test" / "PNEUMONIA").iterdir() if not p.name.startswith("."))[0].read_bytes()


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (seconds from now);
    fails if it is still open after ``limit_s``."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit_s:g} s (received {data[:80]!r})")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


# ------------------------------------------------------------------------------------- clients without a key


def test_a_flood_without_a_key_is_limited_and_summarised(served):
    url, state, key = served
    audit = state.audit
    rows_before = audit.count()
    with httpx.Client(base_url=url) as http:
        answers = [http.get(f"/v1/nothing-{i}" if i % 2 else "/v1/models") for i in range(300)]
        statuses = Counter(r.status_code for r in answers)
        # one address: its burst (and the odd token that refilled meanwhile) gets through, the rest is 429
        assert statuses[429] >= 300 - BURST - 10 and set(statuses) <= {401, 404, 429}, statuses
        limited = next(r for r in answers if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1 and "without a valid API key" in limited.json()["detail"]
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200  # probes: exempt
        # a valid key from the same address is not held up, and each of its requests has its own row
        for path, status in (("/v1/models", 200), ("/v1/nothing", 404)):
            r = http.get(path, headers={"X-API-Key": key})
            assert r.status_code == status, r.text
            row = audit.get(r.headers["x-request-id"])
            assert (row.user, row.status) == ("alice", status)
    added = audit.list(limit=audit.count() - rows_before)  # newest first
    assert sum(row.user is None for row in added) == SAMPLE  # the first few without a key: rows of their own
    state.anonymous.flush(force=True)  # what the minute's end (or the shutdown) writes
    [summary] = audit.list(action="anonymous_summary")
    out = summary.output
    assert out["address"] == "127.0.0.1" and out["requests"] == 300 and out["own_rows"] == SAMPLE
    assert out["in_this_row"] == 300 - SAMPLE == sum(out["statuses"].values())
    assert out["statuses"]["429"] == statuses[429] and f"{300 - SAMPLE} more requests" in summary.error
    assert summary.policy_hash == state.card.policy_hash  # like every row, it names the model served
    assert audit.count() - rows_before == SAMPLE + 1 + 2  # was 300 + 2: one row per request


# --------------------------------------------------------------------------------------------- slow headers


@pytest.mark.parametrize("first, partial", [
    (b"", b""),  # connects, sends nothing
    (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a"),  # a header line begun, never ended
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HT"),  # the same on a kept-alive connection
], ids=["silent", "partial-header", "keep-alive"])
def test_a_slow_header_connection_is_closed_at_the_header_timeout(served, first, partial):
    url, _, _ = served
    with socket.create_connection(_address(url)) as sock:
        data = b""
        if first:  # a whole request, its whole answer, then the slow one (its first byte stops the keep-alive timer)
            sock.sendall(first)
            sock.settimeout(10)
            while not data.endswith(b'{"status":"ok"}'):
                data += sock.recv(65536)
        sock.sendall(partial)
        rest, after = _read_until_closed(sock, HEADER_S + 4)
        data += rest
    assert HEADER_S * 0.5 <= after <= HEADER_S + 2, after
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == ([b"200"] if first else []) + [b"408"], data


# ------------------------------------------------------------------------------------------------ slow bodies


def _upload_head(key: str, length: int) -> bytes:
    return (b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nX-API-Key: " + key.encode() +
            b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: " + str(length).encode() +
            b"\r\n\r\n")


def _multipart(data: bytes) -> bytes:
    return (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n' + data +
            b"\r\n--b--\r\n")


def test_a_trickling_body_is_answered_408_and_closed(served, kermany):
    url, state, key = served
    body = _multipart(_xray(kermany))
    with socket.create_connection(_address(url)) as sock:
        sock.sendall(_upload_head(key, len(body)) + body[:200])
        started, sent = time.monotonic(), 200
        sock.settimeout(0.2)
        data = b""
        while time.monotonic() - started < BODY_S + 5 and sent < len(body):  # 5 bytes a second
            try:
                sock.sendall(body[sent:sent + 1])
                sent += 1
                data += sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        rest, _ = _read_until_closed(sock, 5)
        elapsed = time.monotonic() - started
    data += rest
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert elapsed <= BODY_S + 3, elapsed
    request_id = next(line.split(b": ")[1].decode() for line in data.split(b"\r\n")
                      if line.lower().startswith(b"x-request-id"))
    row = state.audit.get(request_id)  # with a valid key: its own row, saying 408
    assert (row.user, row.status, row.action) == ("alice", 408, "predict") and "did not arrive in time" in row.error


def test_a_slow_but_steady_upload_is_served(served, kermany):
    """4 KB a second, longer than the body timeout: the deadline grows with what arrives."""
    url, _, key = served
    body = _multipart(_xray(kermany))
    with socket.create_connection(_address(url)) as sock:
        sock.sendall(_upload_head(key, len(body)))
        started = time.monotonic()
        for start in range(0, len(body), 1024):
            sock.sendall(body[start:start + 1024])
            time.sleep(0.25)
        assert time.monotonic() - started > BODY_S
        sock.settimeout(30)
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 "), data[:300]
