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
import zlib
from pathlib import Path

import pytest
from helpers import copy_run, free_port, require_module

require_module("fastapi")
require_module("uvicorn")
httpx = require_module("httpx")

from medlens.service.auth import KeyStore  # noqa: E402
from medlens.service.settings import ServiceSettings  # noqa: E402

MiB = 1024 * 1024
#: the bound on the server's peak RSS growth during an attack (VmHWM after minus VmRSS before). Measured with
#: the old decoder: +0.6 GB for one attack PNG, +6 GB for eight at once; with the budget: see the tests.
PEAK_GROWTH_BOUND = 320 * MiB
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
    """7000 x 7000 16-bit grey: 98 MB decoded, under the default 128 MiB budget: accepted."""
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
    print(f"eight at once: {statuses}, VmHWM {hwm / MiB:.0f} MiB, growth {growth / MiB:.0f} MiB")
    assert statuses[:4] == [413] * 4, [r.text[:200] for r in responses]
    assert statuses[4:] == [200] * 4, [r.text[:200] for r in responses]
    for r in responses[4:]:
        assert r.json()["input"]["width"] == 7000 and r.json()["input"]["height"] == 7000
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / MiB:.0f} MiB"
    assert hwm < 1024 * MiB, f"server peak RSS {hwm / MiB:.0f} MiB (bar: 1.0 GB)"
