"""Service hardening (issue 9, findings 1 and 7): what an attacker and a careless client found, as tests.

Against a real ``medlens serve`` process (its memory is read from ``/proc/PID/status``; its access log from its
stderr) serving a small model really trained on Kermany chest X-rays:

- memory: a 381 KB PNG just under the pixel guard (7000 x 7000, 16-bit RGBA: 392 MB decoded) is a clear 413
  naming the decode budget, alone and eight at once, and near-budget images that are accepted (16-bit grey PNG,
  a big RGB JPEG) are decoded under the budget; the server's peak RSS (``VmHWM``, reset before each attack)
  grows by less than a bound far below what the old decoder took (0.6 GB for one, 6 GB for eight);
- the access log never holds a key sent in the query string.

In process (the app on a test client):

- security headers on every response (CSP without 'unsafe-inline', frame-ancestors / X-Frame-Options,
  X-Content-Type-Options, Referrer-Policy); ``/docs`` names no external host and its assets are served locally;
- ``audit.db`` (with its WAL) and ``audit.key`` are created 0600 in a folder that is not world-writable;
- an animated PNG is refused with a clear 422 instead of silently predicting its first frame.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import signal
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_run, free_port, require_module

require_module("fastapi")
require_module("uvicorn")
httpx = require_module("httpx")

from PIL import Image  # noqa: E402

from medlens.service.auth import KeyStore  # noqa: E402
from medlens.service.settings import ServiceSettings  # noqa: E402

MiB = 1024 * 1024
#: the bound on the server's peak RSS growth during an attack (VmHWM after minus VmRSS before): the default decode
#: budget plus room for the requests themselves. Measured with the old decoder: +938 MiB for one attack PNG (a 200
#: after 0.6 s of decoding), +5.7 GiB for eight at once (seven 504s).
PEAK_GROWTH_BOUND = ServiceSettings.max_decode_bytes + 64 * MiB
QUERY_KEY = "mlk_query-string-secret-0123456789abcdef"


# ------------------------------------------------------------------------------------------------ images


def _png(width: int, height: int, bits: int, colour_type: int, channels: int, extra: bytes = b"") -> bytes:
    """A PNG of a constant image, streamed row by row (never held decoded): 7000 x 7000 16-bit RGBA is 381 KB."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    z = zlib.compressobj(9)
    row = b"\x00" + bytes(width * channels * bits // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def attack_png() -> bytes:
    """The finding: 7000 x 7000 (49 MP, under the 50 MP guard), 16-bit RGBA, 381 KB on the wire."""
    data = _png(7000, 7000, 16, 6, 4)
    assert len(data) < 400_000
    return data


@pytest.fixture(scope="module")
def grey16_png() -> bytes:
    """7000 x 7000 16-bit grey: 98 MB decoded (~310 MiB estimated with its copies), under the default budget."""
    return _png(7000, 7000, 16, 0, 1)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """7000 x 7000 RGB JPEG (196 MB decoded at full size): accepted, decoded reduced (DCT scaling)."""
    import numpy as np
    from PIL import Image

    ramp = np.tile(np.linspace(0, 255, 700, dtype=np.uint8), (700, 1))
    rgb = np.stack([ramp, ramp.T, ramp[::-1]], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").resize((7000, 7000)).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ server


@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen
    key: str
    log: Path

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` memory field in bytes (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def reset_peak(self) -> int:
        """Reset VmHWM to the current RSS (``/proc/PID/clear_refs``: 5) and return that RSS."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.status("VmRSS")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """``medlens serve`` in its own process (default settings, access log on), with one clinician key."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the server's memory from /proc (Linux)")
    tmp = tmp_path_factory.mktemp("hardening")
    run = copy_run(tiny_run, tmp / "run")
    db = tmp / "db" / "audit.db"
    settings = ServiceSettings.load(run, database=db, env={})
    with KeyStore(settings.database_url) as store:
        key = store.create("dr-hardening", "clinician")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLENS_")}
    env["MEDLENS_RATE_LIMIT_PER_MINUTE"] = "0"
    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from medlens.cli import main; sys.exit(main(sys.argv[1:]))",
             "serve", str(run), "--db", str(db), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"medlens serve did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield Server(url, proc, key, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _post(server: Server, data: bytes, name: str = "x.png") -> httpx.Response:
    return httpx.post(server.url + "/v1/predictions", files={"file": (name, data)},
                      headers={"Authorization": f"Bearer {server.key}"}, timeout=300)


def _warm(server: Server, kermany: Path) -> None:
    """One ordinary prediction first, so the model's own first-call allocations are not counted."""
    xray = sorted(p for p in (kermany / "test" / "NORMAL").iterdir() if not p.name.startswith("."))[0]
    r = _post(server, xray.read_bytes(), "x.jpeg")
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------ memory


def test_one_attack_png_is_a_clear_413_and_the_peak_stays_bounded(server, attack_png, kermany):
    _warm(server, kermany)
    before = server.reset_peak()
    r = _post(server, attack_png)
    growth = server.status("VmHWM") - before
    print(f"one attack PNG: {r.status_code}, VmHWM growth {growth / MiB:.0f} MiB (RSS before {before / MiB:.0f})")
    assert r.status_code == 413, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert "decode" in detail and "budget" in detail and "max_decode_bytes" in detail, detail
    assert "16-bit" in detail and "4 channels" in detail, detail
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_eight_concurrent_near_limit_uploads_stay_under_the_bound(server, attack_png, grey16_png, big_jpeg,
                                                                  kermany):
    """Eight at once: four attack PNGs (413 from the header), two 16-bit grey PNGs and two big JPEGs (decoded
    under the budget, one at a time): every answer 200 or 413, and the peak bounded."""
    _warm(server, kermany)
    uploads = [attack_png] * 4 + [grey16_png] * 2 + [big_jpeg] * 2
    before = server.reset_peak()
    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        responses = list(pool.map(lambda data: _post(server, data), uploads))
    hwm = server.status("VmHWM")
    growth = hwm - before
    statuses = [r.status_code for r in responses]
    print(f"eight at once: {statuses}, VmHWM {hwm / MiB:.0f} MiB, growth {growth / MiB:.0f} MiB, "
          f"resident after {server.status('VmRSS') / MiB:.0f} MiB (before {before / MiB:.0f})")
    assert statuses[:4] == [413] * 4, [r.text[:200] for r in responses]
    assert statuses[4:] == [200] * 4, [r.text[:200] for r in responses]
    for r in responses[4:]:
        assert r.json()["input"]["width"] == 7000 and r.json()["input"]["height"] == 7000
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"
    assert hwm < 1024 * MiB, f"server peak RSS {hwm / MiB:.0f} MiB (bar: 1.0 GB)"
    # the freed memory goes back to the system (without malloc_trim: +94 MiB stayed resident, measured)
    assert server.status("VmRSS") - before < 48 * MiB


def test_the_decode_gate_bounds_memory_keeps_arrival_order_and_survives_cancellation():
    import asyncio

    from medlens.service.uploads import DecodeGate

    async def scenario() -> list[str]:
        gate = DecodeGate(budget=100, slots=2)
        order: list[str] = []
        peak = 0

        async def decode(name: str, nbytes: int, hold: float) -> None:
            nonlocal peak
            async with gate.reserve(nbytes):
                peak = max(peak, gate.used)
                assert gate.used <= gate.budget and gate.running <= gate.slots
                order.append(name)
                await asyncio.sleep(hold)

        big = asyncio.create_task(decode("big", 80, 0.05))
        await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(decode("huge", 100, 0.01)),  # waits for big, and small ones queue behind it
                 asyncio.create_task(decode("small1", 10, 0.01)), asyncio.create_task(decode("small2", 10, 0.01))]
        doomed = asyncio.create_task(decode("cancelled", 50, 0.01))
        await asyncio.sleep(0.01)
        doomed.cancel()  # a request that times out while it waits gives its place back
        await asyncio.wait_for(asyncio.gather(big, *tasks), 30)
        assert doomed.cancelled() and gate.used == 0 and gate.running == 0
        assert peak <= 100
        return order

    assert asyncio.run(scenario()) == ["big", "huge", "small1", "small2"]


def test_the_decode_gate_admits_a_worker_thread_at_once_only_when_nobody_waits():
    """try_acquire (a worker thread planning and decoding in one go) takes budget and a slot only when they are
    free and no request is queued for them: it never overtakes a waiting upload, and gives back what it took."""
    import asyncio

    from medlens.service.uploads import DecodeGate

    gate = DecodeGate(budget=100, slots=2)
    assert gate.try_acquire(60) and (gate.used, gate.running) == (60, 1)
    assert not gate.try_acquire(50)  # over the budget
    assert gate.try_acquire(40) and not gate.try_acquire(0)  # both slots taken
    gate.release(40)
    gate.release(60)
    assert (gate.used, gate.running) == (0, 0)

    async def scenario() -> list[bool]:
        seen = []
        assert gate.try_acquire(90)
        waiter = asyncio.create_task(_hold(gate, 50))  # queues: 90 + 50 > 100
        await asyncio.sleep(0.01)
        seen.append(gate.try_acquire(5))  # fits the budget and a slot, but a request waits: refused
        gate.release(90)
        await asyncio.wait_for(waiter, 10)
        seen.append(gate.try_acquire(5))  # nobody waits any more
        gate.release(5)
        return seen

    async def _hold(g, n):
        async with g.reserve(n):
            await asyncio.sleep(0.01)

    assert asyncio.run(scenario()) == [False, True]
    assert (gate.used, gate.running) == (0, 0)


# ------------------------------------------------------------------------------------------------ access log


def test_the_access_log_never_holds_a_key_sent_in_the_query_string(server):
    """A careless client puts its key in the URL: refused (keys are read from headers only), and the access log
    shows the request with the value redacted; the API's own parameters stay readable."""
    for url in (f"/v1/models?api_key={QUERY_KEY}", f"/v1/predictions?key={QUERY_KEY}&uncertainty=mc",
                f"/v1/models?{QUERY_KEY}", "/healthz?alpha=0.5"):
        r = httpx.get(server.url + url, timeout=30)
        assert r.status_code in (200, 401, 405), (url, r.status_code)
    deadline = time.monotonic() + 10
    while "alpha=0.5" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log.read_text()
    assert "GET /v1/models?api_key=*** HTTP/1.1" in log, log[-2000:]  # the access log is on, and redacted
    assert "key=***&uncertainty=mc" in log and "GET /healthz?alpha=0.5" in log
    assert QUERY_KEY not in log and QUERY_KEY[4:20] not in log


# ------------------------------------------------------------------------------------------------ in process


@pytest.fixture(scope="module")
def client(tiny_run, tmp_path_factory):
    import warnings

    from helpers import clinician_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    app, key = clinician_app(tiny_run, tmp_path_factory, "hygiene", "dr-hygiene")
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def test_every_response_carries_the_security_headers(client):
    for method, path in (("GET", "/"), ("GET", "/static/viewer.js"), ("GET", "/docs"), ("GET", "/healthz"),
                         ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/nope"), ("POST", "/v1/models"),
                         ("GET", "/v1/predictions/00000000-0000-0000-0000-000000000000")):
        r = client.request(method, path)
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, (path, r.headers)
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers.get("x-frame-options") == "DENY", path
        assert r.headers.get("x-content-type-options") == "nosniff", path
        assert r.headers.get("referrer-policy") == "no-referrer", path
    r = client.get("/v1/models", headers={"Authorization": "Bearer nope"})  # an error answer too
    assert r.status_code == 401 and r.headers.get("x-frame-options") == "DENY"


def test_the_viewer_needs_no_inline_code():
    """The CSP forbids inline script and style: the viewer's page must hold none (the browser test runs it)."""
    import re

    from medlens.service.routes.operations import STATIC_DIR

    page = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), "an inline <script>"
    assert "<style" not in page and not re.search(r"\sstyle=", page) and not re.search(r"\son[a-z]+=", page)


def test_docs_load_nothing_from_another_host(client):
    import re

    r = client.get("/docs")
    assert r.status_code == 200 and "swagger-ui" in r.text
    assert "http://" not in r.text and "https://" not in r.text and "//" not in r.text.replace("://", "")
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert "validatorUrl: null" in client.get("/static/docs.js").text  # no badge from validator.swagger.io
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page is CDN-only: off


def test_audit_database_and_key_are_private(tiny_run, tmp_path):
    import stat
    import warnings

    from medlens.service.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    folder = tmp_path / "audit"
    settings = ServiceSettings.load(tiny_run, database=folder / "audit.db", env={})
    with TestClient(create_app(tiny_run, settings)) as c:
        assert c.get("/v1/models").status_code == 401  # an audited request: the database and its WAL exist
        files = [folder / "audit.db", folder / "audit.db-wal", folder / "audit.db-shm", folder / "audit.key"]
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    assert modes == dict.fromkeys(modes, 0o600), {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_an_animated_png_or_a_multi_view_jpeg_is_refused(client, kermany):
    import numpy as np
    from PIL import Image

    xray = sorted(p for p in (kermany / "test" / "NORMAL").iterdir() if not p.name.startswith("."))[0]
    first = Image.open(xray).convert("L")
    second = Image.fromarray(255 - np.asarray(first))

    def post(image: Image.Image, fmt: str, **options) -> httpx.Response:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return client.post("/v1/predictions", files={"file": ("x", buffer.getvalue())})

    r = post(first, "PNG", save_all=True, append_images=[second], duration=100)  # an APNG of two frames
    assert r.status_code == 422 and "animated (2 frames)" in r.json()["detail"], r.text
    r = post(first, "MPO", save_all=True, append_images=[second])  # two full-size pictures: which one?
    assert r.status_code == 422 and "2 pictures" in r.json()["detail"], r.text
    assert post(first, "MPO", save_all=True, append_images=[first.resize((32, 32))]).status_code == 200  # thumbnail
    assert post(first, "PNG").status_code == 200


def test_uploads_are_decoded_in_memory_without_temporary_files(monkeypatch):
    """A temporary folder per request (made, written, removed) was ~8% of the busy time under load."""
    import tempfile

    from medlens.service import uploads

    def no_temp(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    buf = io.BytesIO()
    Image.fromarray((np.arange(96 * 80) % 253).astype(np.uint8).reshape(80, 96)).save(buf, format="PNG")
    plan = uploads.DecodePlan("png", 96, 80, 1, 8, 0)
    predictor = types.SimpleNamespace(prepare=lambda image: image, card=types.SimpleNamespace(domain={}),
                                      gate=types.SimpleNamespace(gate_reason=lambda image, meta: None))
    decoded = uploads._decode(buf.getvalue(), plan, predictor)
    assert (decoded.width, decoded.height) == (96, 80)
