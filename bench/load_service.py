"""Load test of the clinical service (issue #4, bar 2): a real `medlens serve` process on loopback, N concurrent
clients posting real chest X-rays for a fixed time, with and without micro-batching, each mode run at least
twice, interleaved; then each run's audit trail is reconciled with every answer the clients got.

    python bench/load_service.py --run RUN                          # 2 x 60 s per mode, 16 clients, A B A B
    python bench/load_service.py --run RUN --seconds 3 --clients 2 --result /tmp/load.json   # smoke run

Runs go in the order A B A B ... (``--repeats`` rounds, each running every mode once), so a machine that drifts
(another process, thermal state) shows up as spread within a mode instead of as a difference between modes.
Each run (``batching``: the default server; ``no-batching``: ``medlens serve --no-batching``)

1. creates a fresh SQLite audit database in a temporary folder and a clinician key with the CLI
   (``medlens keys create load-client --role clinician --db DB``);
2. starts ``python -m medlens.cli serve RUN --port P --db DB`` as a separate process (its own stdout/stderr
   go to a log file) and waits for ``/readyz``;
3. runs ``--clients`` concurrent clients (asyncio, one keep-alive connection per client; ``--client raw``, the
   default, writes each request from bytes built once and reads only the status line and headers, ``--client
   httpx`` uses one shared ``httpx.AsyncClient`` as the results before 2026-12-03 did) that POST images from
   ``--images`` (both classes, interleaved) to
   ``/v1/predictions`` back to back: ``--warmup`` seconds first (not counted in the statistics), then
   ``--seconds`` measured. Each request records its status, its latency (request sent to response read) and
   its ``X-Request-ID``, whatever the status. A request that got no HTTP answer (connection refused or reset,
   a timeout after ``--timeout`` seconds, any other transport error) is a *transport error*: counted by type,
   and it fails the run. After the window no new request starts and the ones in flight are waited for, so at
   the end nothing is in flight;
4. scrapes ``/metrics`` (the ``medlens_batch_size`` histogram), stops the server with SIGINT (uvicorn's
   graceful shutdown) and opens the audit database directly (``PRAGMA integrity_check``, then
   :class:`medlens.service.audit.AuditLog`). Reconciliation: every answer a client got, whatever its status
   (200, 4xx, 5xx), must carry an ``X-Request-ID`` and have exactly one audit row with that id and that status;
   no audit row may be left that no client got an answer for; no response may be a 5xx.

Throughput is the number of 200 responses completed inside the measured window divided by its length; the
latency percentiles are over those responses. Status and error counts cover every request of the run
(warm-up included), since the bar is "0 responses 5xx" and "one audit row per answer" for all. Per mode, the
result gives every run's figures and their spread (mean, sample sd, min, max); the batching / no-batching
throughput ratio is given per round (runs next to each other) and as the ratio of the means.

The per-key rate limit is turned off in the server under test (``MEDLENS_RATE_LIMIT_PER_MINUTE=0``; the
default of 120 a minute per key would answer most of this load with 429); every other setting is the
service's default (request timeout 30 s, batches of up to 16 images waiting at most 5 ms, one model worker
per core with one torch thread each, uvicorn's access log on). Other ``MEDLENS_*`` variables of the caller
are not passed to the server.

CPU. The clients run in this process, on the same cores as the server (the bar asks for loopback). To keep
them out of the server's way the clients are one asyncio thread, every request is encoded once up front,
and response bodies are not parsed. With httpx the clients took ~17% of 2 cores (~2.4 ms of CPU a request);
the raw client takes ~2%, as a C load generator (wrk, h2load) would. The result records the CPU seconds the server, the clients and
everything else on the machine used during the measured window (from ``/proc``), so a reader can see what
share of the cores the clients took and whether the machine was quiet. Run it on a quiet machine: on 2
cores a second busy process changes the numbers several-fold.

Writes ``bench/results/load_service-cpu.json`` (``--result`` to change) and prints a table. The JSON is the
whole record: it names the script and command that wrote it, the commit, the machine, every run, the
summary and the README figure (``readme``), so no result file is edited by hand. Exit code 0 if every run had
no 5xx, no transport error, a reconciled audit trail, a clean server stop and at least one 200 answer in its
measured window (:func:`run_failures`); 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

import medlens
from medlens.models.card import _find_card
from medlens.service.audit import AuditLog
from medlens.service.settings import database_url

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_IMAGES = SHARED / "chest_xray" / "test"
DEFAULT_RESULT = ROOT / "bench" / "results" / "load_service-cpu.json"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
MODES = {"batching": [], "no-batching": ["--no-batching"], "workers-2": ["--workers", "2"],
         "workers-2-pg": ["--workers", "2"], "peer": [], "peer-workers-2": ["--workers", "2"],
         "batching-int8": ["--backend", "onnx-int8"], "workers-2-int8": ["--workers", "2", "--backend", "onnx-int8"],
         "peer-workers-2-int8": ["--workers", "2", "--backend", "onnx-int8"], "workers-4": ["--workers", "4"]}
#: ``*-int8`` modes serve the run's ONNX Runtime INT8 export (``medlens export RUN --data DATA --int8`` first)
#: ``*-pg`` modes keep the audit trail in PostgreSQL (a throwaway server started by this script, fsync on);
#: ``peer*`` modes run bench/peer_app.py (the same model behind a bare FastAPI endpoint: no auth, no audit)
PEER_APP = Path(__file__).resolve().parent / "peer_app.py"


def is_pg(mode: str) -> bool:
    return mode.endswith("-pg")


def is_peer(mode: str) -> bool:
    return mode.startswith("peer")
#: the server's environment on top of the caller's (minus the caller's MEDLENS_* settings)
SERVER_ENV = {"MEDLENS_RATE_LIMIT_PER_MINUTE": "0"}
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0  # the client's (--timeout); the server answers 504 after its own 30 s
SCRIPT = "bench/load_service.py"


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Upload:
    name: str
    body: bytes  # the whole multipart/form-data body, encoded once
    content_type: str


def load_uploads(folder: Path, limit: int) -> list[Upload]:
    """Up to ``limit`` images from ``folder``'s class subfolders (NORMAL / PNEUMONIA ...), classes interleaved,
    each as a ready multipart body (field ``file``)."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SystemExit(f"{folder}: no class subfolders with images")
    per_class = [sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
                 for d in classes]
    share = max(1, limit // len(classes))
    picked = [p for group in zip(*(files[:share] for files in per_class if files), strict=False) for p in group]
    if not picked:
        raise SystemExit(f"{folder}: no PNG / JPEG / DICOM images in its class subfolders")
    boundary = "medlens-load-" + os.urandom(8).hex()
    uploads = []
    for path in picked[:limit]:
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload{path.suffix}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        uploads.append(Upload(f"{path.parent.name}/{path.name}", body, f"multipart/form-data; boundary={boundary}"))
    return uploads


# ------------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLENS_")}
    env.update(SERVER_ENV)
    return env


def medlens_cli(*args: str) -> list[str]:
    """The ``medlens`` command line run by this interpreter (the process started is the server itself)."""
    return [sys.executable, "-m", "medlens.cli", *args]


def create_key(db: Path | str) -> str:
    out = subprocess.run(medlens_cli("keys", "create", "load-client", "--role", "clinician", "--db", str(db)),
                         env=server_env(), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"`medlens keys create` failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


class Server:
    """One ``medlens serve`` process on loopback with its own log file."""

    def __init__(self, run: Path, db: Path | str | None, port: int, extra: list[str], log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        if db is None:  # the peer: the same model behind a bare FastAPI endpoint
            self.args = [sys.executable, str(PEER_APP), str(run), "--port", str(port), *extra]
        else:
            self.args = medlens_cli("-v", "serve", str(run), "--port", str(port), "--db", str(db), *extra)
        self._log = open(log_path, "wb")  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=server_env(),
                                     cwd=log_path.parent)

    def log_tail(self, n: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited ({self.proc.returncode}) before it was ready:\n"
                                     f"{self.log_tail()}")
                try:
                    r = client.get(self.url + "/readyz")
                    if r.status_code == 200:
                        return r.json()
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.kill()
        raise SystemExit(f"the server was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        """CPU seconds of the server and every process under it (``--workers N``: the uvicorn supervisor and
        its N worker processes; a live child's time is not in its parent's counters until it exits)."""
        return process_tree_cpu_seconds(self.proc.pid)

    def stop(self) -> dict[str, Any]:
        """SIGINT (uvicorn's graceful shutdown), then wait; SIGKILL only if it hangs."""
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(STOP_TIMEOUT_S)
            killed = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            killed = True
        self._log.close()
        text = self.log_path.read_text(errors="replace")
        return {"returncode": rc, "needed_sigkill": killed,
                "shutdown_complete": "Application shutdown complete" in text,
                "clean": not killed and "Application shutdown complete" in text}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux ``/proc``), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_tree_cpu_seconds(pid: int) -> float | None:
    """:func:`process_cpu_seconds` summed over ``pid`` and all its live descendants (``/proc/*/stat`` ppid)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))  # ppid -> pid
    total, todo, seen = None, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        cpu = process_cpu_seconds(current)
        if cpu is not None:
            total = (total or 0.0) + cpu
        todo.extend(children.get(current, []))
    return total


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have been busy since boot (``/proc/stat``), or None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------ clients


@dataclass
class Result:
    client: int
    start: float  # time.perf_counter()
    end: float
    status: int | None  # None: no HTTP answer (a transport error)
    error: str | None  # the transport error's type (ConnectError, ReadTimeout, ...)
    request_id: str | None  # the answer's X-Request-ID, whatever its status (None: no answer, or no header)


async def run_clients(url: str, key: str, uploads: list[Upload], clients: int, stop_at: float,
                      timeout: float) -> list[Result]:
    """``clients`` loops posting uploads back to back until ``stop_at`` (perf_counter); waits for the last ones.

    A request without an HTTP answer (connection error, timeout after ``timeout`` s, protocol error) is kept as
    a Result with ``status`` None and the error's type: a failure of the run, never dropped or retried.
    """
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:

        async def client(k: int) -> None:
            n = k  # client k starts at image k, so the clients do not all send the same file at once
            while time.perf_counter() < stop_at:
                upload = uploads[n % len(uploads)]
                n += clients
                headers = {"Authorization": f"Bearer {key}", "Content-Type": upload.content_type}
                start = time.perf_counter()
                try:
                    r = await http.post("/v1/predictions", content=upload.body, headers=headers)
                    await r.aread()
                except (httpx.HTTPError, OSError) as exc:  # TransportError (timeouts included), decoding, ...
                    results.append(Result(k, start, time.perf_counter(), None, type(exc).__name__, None))
                    await asyncio.sleep(0.05)  # do not spin on a dead server
                    continue
                results.append(Result(k, start, time.perf_counter(), r.status_code, None,
                                      r.headers.get("x-request-id")))

        await asyncio.gather(*(client(k) for k in range(clients)))
    return results


class ConnectError(Exception):
    """No connection to the server (refused, unreachable, timed out): httpx's name for it, kept in the results."""


class ProtocolError(Exception):
    """The server's answer was not a well-formed HTTP/1.1 response this client can read."""


def raw_request(host: str, key: str, upload: Upload) -> bytes:
    """One ``POST /v1/predictions`` as the bytes on the wire (HTTP/1.1, keep-alive), built once per upload."""
    head = (f"POST /v1/predictions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {upload.content_type}\r\nContent-Length: {len(upload.body)}\r\n"
            "Accept: */*\r\nUser-Agent: medlens-load\r\n\r\n").encode()
    return head + upload.body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, str | None, bool]:
    """Status, ``X-Request-ID`` and "the server closes the connection" of one HTTP/1.1 response; its body is read
    (by Content-Length or chunks) and dropped. Anything else (no status line, no length, a closed connection)
    raises."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif status not in (204, 304) and not 100 <= status < 200:
        raise ProtocolError(f"HTTP {status} without Content-Length or chunked body")
    return status, headers.get("x-request-id"), headers.get("connection", "").lower() == "close"


async def run_clients_raw(url: str, key: str, uploads: list[Upload], clients: int, stop_at: float,
                          timeout: float) -> list[Result]:
    """:func:`run_clients` with a lean client: each of the ``clients`` loops keeps one keep-alive connection
    (``asyncio.open_connection``) and writes a request built once per upload, then reads the status line and
    headers and skips the body. httpx spent ~2.4 ms of CPU a request (17% of 2 cores at 140 req/s), CPU the
    server under test then did not get; this client does the same exchange for a fraction of that, like the
    C load generators (wrk, h2load) servers are usually measured with. Same contract: a request without an HTTP
    answer is a Result with ``status`` None and the error's type, never dropped or retried."""
    host_port = url.split("://", 1)[1].rstrip("/")
    host, port = host_port.rsplit(":", 1)
    requests = [raw_request(host_port, key, u) for u in uploads]
    results: list[Result] = []

    async def client(k: int) -> None:
        n = k  # client k starts at image k, so the clients do not all send the same file at once
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < stop_at:
            request = requests[n % len(requests)]
            n += clients
            start = time.perf_counter()
            try:
                if conn is None:
                    try:
                        conn = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
                    except (OSError, asyncio.TimeoutError) as exc:  # named as httpx names it
                        raise ConnectError(f"{type(exc).__name__}: {exc}") from exc
                reader, writer = conn
                writer.write(request)
                status, request_id, close = await asyncio.wait_for(read_response(reader), timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ProtocolError, ConnectError, ValueError) as exc:
                results.append(Result(k, start, time.perf_counter(), None, type(exc).__name__, None))
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.05)  # do not spin on a dead server
                continue
            results.append(Result(k, start, time.perf_counter(), status, None, request_id))
            if close:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return results


# ---------------------------------------------------------------------------------------------- checking


def scrape_batch_sizes(url: str) -> dict[str, Any]:
    """The ``medlens_batch_size`` histogram from ``/metrics``: model calls per batch-size bucket, mean size."""
    text = httpx.get(url + "/metrics", timeout=30.0).text
    cumulative: dict[float, float] = collections.defaultdict(float)
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "medlens_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                cumulative[float(sample.labels["le"])] += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    buckets: dict[str, int] = {}  # "3-4": model calls on 3 or 4 images
    below = previous = 0.0
    for le in sorted(cumulative):
        low = int(previous) + 1
        if le == float("inf"):
            label = f">{int(previous)}"
        else:
            label = str(int(le)) if low >= le else f"{low}-{int(le)}"
        if cumulative[le] - below:
            buckets[label] = int(cumulative[le] - below)
        below, previous = cumulative[le], le
    return {"model_calls": int(count), "images": int(total), "mean": round(total / count, 2) if count else None,
            "calls_by_size": buckets}


def check_audit(db: Path | str, answers: list[tuple[str | None, int]]) -> dict[str, Any]:
    """Reconcile the stopped server's audit trail with every answer the clients got: ``(X-Request-ID, status)``.

    Every answer, whatever its status, must carry a request id and have exactly one audit row with that id and
    that status; every audit row must belong to an answer (nothing was in flight at the end, so a row without
    an answer means a request the server recorded but the client never heard back from).
    """
    if isinstance(db, Path):
        with sqlite3.connect(db) as conn:  # the raw file first: does it open, is it intact
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    else:  # PostgreSQL: the server checks its own pages; reconciliation below is the same
        integrity = "ok"
    with AuditLog(database_url(db)) as log:
        t = log.table
        with log.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.request_id, t.c.action, t.c.status)).all()
    statuses_by_id: dict[str, list[int]] = collections.defaultdict(list)
    for rid, _action, status in rows:
        statuses_by_id[rid].append(status)
    answered = collections.Counter(rid for rid, _ in answers if rid)
    without_id = sum(1 for rid, _ in answers if not rid)
    missing, wrong_status = [], []
    for rid, status in answers:
        if not rid:
            continue
        found = statuses_by_id.get(rid, [])
        if not found:
            missing.append(rid)
        elif found != [status]:
            wrong_status.append({"request_id": rid, "answered": status, "audited": found})
    duplicated = sorted({rid for rid, found in statuses_by_id.items() if len(found) > 1}
                        | {rid for rid, n in answered.items() if n > 1})
    unanswered = sorted(set(statuses_by_id) - set(answered))
    result: dict[str, Any] = {
        "integrity_check": integrity,
        "answers": len(answers),
        "answers_by_status": dict(sorted(collections.Counter(str(s) for _, s in answers).items())),
        "acknowledged": sum(1 for _, s in answers if s == 200),
        "rows": len(rows),
        "rows_by_status": dict(sorted(collections.Counter(str(s) for _, _, s in rows).items())),
        "rows_by_action": dict(sorted(collections.Counter(a for _, a, _ in rows).items())),
        "answers_without_request_id": without_id,
        "answers_without_row": len(missing),
        "answers_with_other_status_in_row": len(wrong_status),
        "duplicated_ids": len(duplicated),
        "rows_without_answer": len(unanswered),
    }
    result["ok"] = (integrity == "ok" and not without_id and not missing and not wrong_status and not duplicated
                    and not unanswered and len(rows) == len(answers))
    if missing:
        result["missing_examples"] = missing[:5]
    if wrong_status:
        result["wrong_status_examples"] = wrong_status[:5]
    if unanswered:
        result["rows_without_answer_examples"] = unanswered[:5]
    return result


def startup_line(log_path: Path) -> str | None:
    """The server's "serving ..." log line (workers x torch threads, batching, load time), without settings."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "serving " in line and "model workers" in line:
            return line.split("; settings ")[0].removeprefix("medlens: ")
    return None


def percentiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    ms = np.asarray(latencies) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "mean": round(float(ms.mean()), 1), "max": round(float(ms.max()), 1)}


def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    """Every run's value and their mean, sample sd (None for one run), min and max."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return {"runs": list(values), "mean": None, "sd": None, "min": None, "max": None}
    arr = np.asarray(clean)
    return {"runs": [None if v is None else round(float(v), digits) for v in values],
            "mean": round(float(arr.mean()), digits),
            "sd": round(float(arr.std(ddof=1)), digits) if len(arr) > 1 else None,
            "min": round(float(arr.min()), digits), "max": round(float(arr.max()), digits)}


# -------------------------------------------------------------------------------------------------- a run


def run_once(mode: str, round_no: int, order: int, args: argparse.Namespace, uploads: list[Upload],
             work: Path, pg: Any = None, profile: float = 0.0) -> dict[str, Any]:
    """One run of one mode: a fresh database and server, the load, the reconciliation. With ``profile`` (seconds),
    py-spy samples the server's processes during the window (the run is then not counted: the profiler takes CPU)."""
    folder = work / (f"{order:02d}-{mode}" + ("-profile" if profile else ""))
    folder.mkdir()
    db: Path | str | None
    if is_peer(mode):
        db, key = None, "none"
    else:
        db = pg.create_database() if is_pg(mode) else folder / "audit.db"
        key = create_key(db)
    port = args.port or free_port()
    server = Server(args.run, db, port, MODES[mode], folder / "server.log")
    try:
        ready = server.wait_ready()
        print(f"[run {order}: {mode}, round {round_no}] server ready ({ready.get('model_id')}); {args.clients} "
              f"clients, {args.warmup:g} s warm-up + {args.seconds:g} s", file=sys.stderr)
        load_before = os.getloadavg()
        began = time.perf_counter()
        window_start = began + args.warmup
        window_end = window_start + args.seconds
        marks: dict[str, Any] = {}

        async def measure() -> list[Result]:
            async def sample_cpu() -> None:  # CPU counters at the window's edges
                await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
                marks["start"] = (time.perf_counter(), server.cpu_seconds(), time.process_time(),
                                  machine_busy_seconds())
                await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
                marks["end"] = (time.perf_counter(), server.cpu_seconds(), time.process_time(), machine_busy_seconds())

            sampler = asyncio.ensure_future(sample_cpu())
            profiler = asyncio.ensure_future(asyncio.to_thread(
                profile_server, server, window_start, min(profile, args.seconds), folder)) if profile else None
            clients = run_clients_raw if args.client == "raw" else run_clients
            results = await clients(server.url, key, uploads, args.clients, window_end, args.timeout)
            await sampler
            if profiler is not None:
                marks["profile"] = await profiler
            return results

        results = asyncio.run(measure())
        drained = time.perf_counter()
        batches = (scrape_batch_sizes(server.url) if db is not None else
                   {"model_calls": None, "images": None, "mean": None, "calls_by_size": {}})
    except BaseException:
        server.kill()
        raise
    stop = server.stop()
    answers = [(r.request_id, r.status) for r in results if r.status is not None]
    audit = check_audit(db, answers) if db is not None else {"ok": True, "note": "the peer has no audit trail"}

    in_window = [r for r in results if r.status == 200 and window_start <= r.end <= window_end]
    statuses = collections.Counter(str(r.status) for r in results if r.status is not None)
    transport = collections.Counter(r.error for r in results if r.status is None)
    server_errors = sum(1 for r in results if r.status is not None and r.status >= 500)
    cpu = None
    if "start" in marks and "end" in marks:
        (t0, s0, c0, m0), (t1, s1, c1, m1) = marks["start"], marks["end"]
        wall = t1 - t0
        server_cpu = None if s0 is None or s1 is None else s1 - s0
        client_cpu = c1 - c0
        machine = None if m0 is None or m1 is None else m1 - m0
        cores = os.cpu_count() or 1
        cpu = {
            "window_s": round(wall, 2),
            "core_seconds_available": round(wall * cores, 1),
            "server_cpu_s": None if server_cpu is None else round(server_cpu, 1),
            "clients_cpu_s": round(client_cpu, 1),
            "other_processes_cpu_s": (None if machine is None or server_cpu is None
                                      else round(max(0.0, machine - server_cpu - client_cpu), 1)),
            "clients_share_of_cores": round(client_cpu / (wall * cores), 3),
            "server_share_of_cores": None if server_cpu is None else round(server_cpu / (wall * cores), 3),
        }
    run = {
        "order": order,
        "round": round_no,
        "mode": mode,
        "database": "none (peer)" if db is None else ("postgresql" if is_pg(mode) else "sqlite"),
        "server_command": (" ".join(["python", "bench/peer_app.py", *server.args[3:]]) if db is None else
                           " ".join(["medlens", *server.args[3:]])),
        "requests": len(results),
        "requests_in_window_ok": len(in_window),
        "throughput_rps": round(len(in_window) / args.seconds, 2),
        "latency_ms": percentiles_ms([r.end - r.start for r in in_window]),
        "responses_by_status": dict(sorted(statuses.items())),
        "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "responses_5xx": server_errors,
        "transport_errors": sum(transport.values()),
        "transport_errors_by_type": dict(sorted(transport.items())),
        "drain_s": round(drained - window_end, 2),
        "audit": audit,
        "batch_size": batches,
        "cpu": cpu,
        "load_average_before": [round(x, 2) for x in load_before],
        "server_startup": startup_line(server.log_path),
        "server_stop": stop,
    }
    if profile:
        run["profile"] = marks.get("profile")
    run["failures"] = run_failures(run)
    run["passed"] = not run["failures"]
    return run


# ------------------------------------------------------------------------------------------------ profile

#: where the time goes: a sample belongs to the first category whose pattern matches one of its frames, looking
#: from the innermost frame outwards (so JSON encoding inside the audit code counts as audit)
PROFILE_CATEGORIES = [
    ("model forward (torch)", ("torch/nn/", "medlens/forward.py", "medlens/models/", "predict_logits")),
    ("image decode + preprocessing", ("PIL/", "medlens/data/readers.py", "medlens/data/dicom.py", "pydicom/",
                                      "medlens/data/cache.py", "preprocess", "medlens/domain.py", "cv2")),
    ("audit trail (prepare, commit, SQL)", ("medlens/service/audit.py", "medlens/service/committer.py",
                                            "sqlalchemy/", "sqlite3", "psycopg", "medlens/service/db.py",
                                            "medlens/service/deid.py")),
    ("upload reading + multipart", ("multipart", "medlens/service/uploads.py", "starlette/formparsers.py")),
    ("JSON responses", ("json", "pydantic", "medlens/service/schemas.py", "fastapi/encoders.py")),
    ("auth, limits, metrics, middleware", ("medlens/service/auth.py", "medlens/service/limits.py",
                                           "medlens/service/middleware.py", "medlens/service/metrics.py",
                                           "prometheus_client", "medlens/service/security.py", "hashlib", "hmac")),
    ("batching + model worker threads", ("medlens/service/batching.py", "concurrent/futures", "threading.py")),
    ("HTTP server + event loop (uvicorn, starlette, asyncio)", ("uvicorn/", "h11", "httptools", "starlette/",
                                                                 "fastapi/", "asyncio/", "anyio/", "selectors")),
    ("logging", ("logging/",)),
]


def profile_server(server: Server, start: float, seconds: float, folder: Path) -> dict[str, Any] | None:
    """py-spy (sampling, 100 Hz, every process of the server) for ``seconds`` from ``start`` (perf_counter):
    the share of non-idle samples per category of :data:`PROFILE_CATEGORIES`, and the top functions by self
    samples. None when py-spy is not installed (``pip install py-spy``) or cannot attach."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    time.sleep(max(0.0, start - time.perf_counter()))
    out = folder / "profile.txt"
    proc = subprocess.run([spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--rate", "100",
                           "--duration", str(int(seconds)), "--format", "raw", "--output", str(out)],
                          capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"}
    return summarise_profile(out.read_text(errors="replace"))


#: innermost frames of a thread that waits rather than works (py-spy's own idle detection misses some)
IDLE_LEAVES = ("select (selectors.py", "Condition.wait (threading.py", "Event.wait (threading.py",
               "SimpleQueue.get", "Queue.get (queue.py", "_worker (concurrent/futures/thread.py")


def summarise_profile(text: str) -> dict[str, Any]:
    """Collapsed stacks (``frame;frame;... count``, outermost first) -> shares by category and top self frames,
    over the samples of threads that were working (waiting threads are counted apart, as ``idle_samples``)."""
    by_category: collections.Counter = collections.Counter()
    by_self: collections.Counter = collections.Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if any(frames[-1].startswith(leaf) for leaf in IDLE_LEAVES):
            idle += n
            continue
        total += n
        by_self[frames[-1][:160]] += n
        for frame in reversed(frames):
            category = next((name for name, patterns in PROFILE_CATEGORIES if any(p in frame for p in patterns)),
                            None)
            if category:
                by_category[category] += n
                break
        else:
            by_category["other"] += n
    share = {k: round(v / total, 3) for k, v in by_category.most_common()} if total else {}
    return {"samples": total, "idle_samples": idle, "share_by_category": share,
            "top_self": [{"frame": f, "share": round(n / total, 3)} for f, n in by_self.most_common(15)]}


def run_failures(run: dict[str, Any]) -> list[str]:
    """Why one run (as :func:`run_once` records it) fails; empty when it passes. Any 5xx answer, any request
    without an HTTP answer (a transport error: refused, reset, timed out), an audit trail that does not
    reconcile with the answers, a server that did not stop cleanly, or no 200 answer in the measured window
    (nothing was measured: a wrong key, a rate limit, a server that refuses everything)."""
    failures = []
    if run["responses_5xx"]:
        failures.append(f"{run['responses_5xx']} responses 5xx")
    if run["transport_errors"]:
        failures.append(f"{run['transport_errors']} transport errors {run['transport_errors_by_type']}")
    if not run["audit"]["ok"]:
        failures.append("the audit trail does not reconcile with the answers")
    if not run["server_stop"]["clean"]:
        failures.append("the server did not stop cleanly")
    if not run["requests_in_window_ok"]:
        failures.append(f"no 200 answer in the measured window (answers by status: {run['responses_by_status']})")
    return failures


# ---------------------------------------------------------------------------------------------- summary


def summarise(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Per mode: every run's figures and their spread; the batching / no-batching ratio per round and overall."""
    out: dict[str, Any] = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        out[mode] = {
            "runs": len(mine),
            "order": [r["order"] for r in mine],
            "throughput_rps": spread([r["throughput_rps"] for r in mine], 2),
            "latency_p50_ms": spread([r["latency_ms"]["p50"] for r in mine]),
            "latency_p90_ms": spread([r["latency_ms"]["p90"] for r in mine]),
            "latency_p99_ms": spread([r["latency_ms"]["p99"] for r in mine]),
            "mean_batch_size": spread([r["batch_size"]["mean"] for r in mine], 2),
            "server_share_of_cores": spread([(r["cpu"] or {}).get("server_share_of_cores") for r in mine], 3),
            "other_processes_cpu_s": spread([(r["cpu"] or {}).get("other_processes_cpu_s") for r in mine]),
            "requests": sum(r["requests"] for r in mine),
            "responses_5xx": sum(r["responses_5xx"] for r in mine),
            "transport_errors": sum(r["transport_errors"] for r in mine),
            "non_200_answers": sum(sum(r["errors_by_status"].values()) for r in mine),
            "audit_reconciled_every_run": all(r["audit"]["ok"] for r in mine),
            "passed": all(r["passed"] for r in mine),
        }
    if "batching" in out and "no-batching" in out:
        rounds = sorted({r["round"] for r in runs})
        per_round = []
        for k in rounds:
            pair = {r["mode"]: r["throughput_rps"] for r in runs if r["round"] == k}
            if pair.get("batching") is not None and pair.get("no-batching"):
                per_round.append(pair["batching"] / pair["no-batching"])
        no_batching_mean = out["no-batching"]["throughput_rps"]["mean"]
        out["throughput_ratio_batching_over_no_batching"] = {
            "of_means": (round(out["batching"]["throughput_rps"]["mean"] / no_batching_mean, 2)
                         if no_batching_mean else None),
            "per_round": spread(per_round, 2),
        }
    pairs = [("batching", "peer"), ("workers-2", "peer-workers-2"), ("workers-2-pg", "peer-workers-2"),
             ("workers-2-int8", "peer-workers-2-int8"), ("workers-2-int8", "workers-2"),
             ("batching-int8", "batching")]
    out["medlens_over_peer"] = {}
    for mine, peer in pairs:  # the same number of server processes on both sides
        if mine in out and peer in out and out[peer]["throughput_rps"]["mean"]:
            per_round = []
            for k in sorted({r["round"] for r in runs}):
                pair = {r["mode"]: r["throughput_rps"] for r in runs if r["round"] == k}
                if pair.get(mine) is not None and pair.get(peer):
                    per_round.append(pair[mine] / pair[peer])
            out["medlens_over_peer"][f"{mine} / {peer}"] = {
                "of_means": round(out[mine]["throughput_rps"]["mean"] / out[peer]["throughput_rps"]["mean"], 2),
                "per_round": spread(per_round, 2)}
    return out


def readme_workers_figure(result: dict[str, Any]) -> list[str]:
    """README rows for issue 9's bar 3 (``workers-2`` on SQLite and PostgreSQL against the bare peer), from the
    JSON only; modes that did not run are left out."""
    summary, rows = result["summary"], []
    ratios = summary.get("medlens_over_peer") or {}
    for mode, database, peer_mode in (("workers-2", "SQLite", "peer-workers-2"),
                                      ("workers-2-pg", "PostgreSQL", "peer-workers-2"),
                                      ("workers-2-int8", "SQLite, model as ONNX Runtime INT8", "peer-workers-2-int8")):
        m = summary.get(mode)
        if not m or m["throughput_rps"]["mean"] is None or m["latency_p99_ms"]["mean"] is None:
            continue
        t = m["throughput_rps"]
        ratio = ratios.get(f"{mode} / {peer_mode}")
        peer = (f"; bare FastAPI peer {summary[peer_mode]['throughput_rps']['mean']:.1f} req/s, medlens / "
                f"peer {ratio['of_means']:.2f}x" if ratio else "")
        rows.append(f"| API load, `--workers 2`, audit in {database}, {result['clients']} clients, "
                    f"{result['seconds']:g} s x {m['runs']} runs (interleaved) | {t['mean']:.1f} req/s (runs "
                    f"{t['min']:.1f}-{t['max']:.1f}), p50 {m['latency_p50_ms']['mean']:.0f} ms, p99 "
                    f"{m['latency_p99_ms']['mean']:.0f} ms, {m['responses_5xx']} 5xx, "
                    + ("audit rows = answers exactly" if m["audit_reconciled_every_run"] else "AUDIT NOT RECONCILED")
                    + peer + " |")
    return rows


def readme_figure(result: dict[str, Any]) -> str | None:
    """The README's table row for this result, built from the JSON only (copy it; never type figures in); None
    when a mode is missing or lacks a figure (e.g. it had no 200 answer, so no latency and no ratio)."""
    summary = result["summary"]
    b, nb = summary.get("batching"), summary.get("no-batching")
    if not b or not nb:
        return None
    ratio = summary.get("throughput_ratio_batching_over_no_batching") or {}
    figures = [m[k][s] for m in (b, nb) for k in ("throughput_rps", "latency_p50_ms", "latency_p99_ms")
               for s in ("mean", "min", "max")]
    figures += [ratio.get("of_means"), (ratio.get("per_round") or {}).get("min"),
                (ratio.get("per_round") or {}).get("max")]
    if any(v is None for v in figures) or not b["throughput_rps"]["mean"] or not nb["throughput_rps"]["mean"]:
        return None

    def rps(m: dict[str, Any]) -> str:
        t = m["throughput_rps"]
        return f"{t['mean']:.1f} req/s (runs {t['min']:.1f}-{t['max']:.1f})"

    per_round = ratio["per_round"]
    errors_5xx = b["responses_5xx"] + nb["responses_5xx"]
    other = b["non_200_answers"] + nb["non_200_answers"] - errors_5xx
    transport = b["transport_errors"] + nb["transport_errors"]
    reconciled = b["audit_reconciled_every_run"] and nb["audit_reconciled_every_run"]
    what = (f"API load, {result['clients']} clients, {result['seconds']:g} s x {b['runs']} runs per mode "
            f"(interleaved), `{result.get('recipe') or result.get('model_name')}` model")
    figure = (f"{rps(b)}, p50 {b['latency_p50_ms']['mean']:.0f} ms, p99 {b['latency_p99_ms']['mean']:.0f} ms with "
              f"micro-batching; {rps(nb)} without ({ratio['of_means']:.2f}x; per round "
              f"{per_round['min']:.2f}-{per_round['max']:.2f}x); {errors_5xx} 5xx, {other} other non-200, {transport} "
              "transport errors; "
              + ("every answer has exactly one audit row with its status" if reconciled
                 else "AUDIT NOT RECONCILED"))
    return f"| {what} | {figure} |"


# --------------------------------------------------------------------------------------------------- main


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(result: dict[str, Any]) -> None:
    head = f"{'run':>3} {'mode':<12} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
           f"{'5xx':>4} {'other':>6} {'transport':>9} {'audit':>6} {'mean batch':>10} {'client CPU':>10}"
    print(head)
    print("-" * len(head))
    for m in result["runs"]:
        lat = m["latency_ms"]
        other = sum(v for k, v in m["errors_by_status"].items() if not k.startswith("5"))
        audit = "ok" if m["audit"]["ok"] else "FAIL"
        share = m["cpu"]["clients_share_of_cores"] if m["cpu"] else None
        print(f"{m['order']:>3} {m['mode']:<12} {m['requests']:>8} {m['throughput_rps']:>7.1f} {lat['p50'] or 0:>8.1f} "
              f"{lat['p90'] or 0:>8.1f} {lat['p99'] or 0:>8.1f} {m['responses_5xx']:>4} {other:>6} "
              f"{m['transport_errors']:>9} {audit:>6} {m['batch_size']['mean'] or 0:>10} "
              f"{'-' if share is None else f'{share:.0%}':>10}")
    for mode, m in result["summary"].items():
        if not isinstance(m, dict) or "throughput_rps" not in m:
            continue
        t = m["throughput_rps"]
        sd = "" if t["sd"] is None else f" +- {t['sd']:.1f}"
        print(f"{mode}: {t['mean']:.1f}{sd} req/s over {m['runs']} runs (min {t['min']:.1f}, max {t['max']:.1f})")
    ratio = result["summary"].get("throughput_ratio_batching_over_no_batching")
    if ratio and ratio["of_means"] is not None:
        print(f"micro-batching throughput / no batching: {ratio['of_means']:.2f}x (per round "
              f"{ratio['per_round']['min']:.2f}-{ratio['per_round']['max']:.2f}x)")
    for failure in result["failures"]:
        print(f"FAILED: {failure}")


def code_changed(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """Why a run's figures belong to no one commit (the commit or the uncommitted changes differ between the start
    and the end: each server started on whatever was checked out then), or None."""
    if before == after:
        return None
    return (f"the code changed during the run (started on {before['commit']}, uncommitted changes "
            f"{before['uncommitted_changes']}; ended on {after['commit']}, {after['uncommitted_changes']}): run it "
            "again on a fixed checkout")


def provenance() -> dict[str, Any]:
    """The commit the benchmark ran on, and whether the service or this script had uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", "src", "bench/load_service.py")
    return {"commit": commit, "uncommitted_changes": None if changed is None else bool(changed)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a trained run directory (`medlens train --out RUN`)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                   help="folder with class subfolders of chest X-rays (default ../shared/data/chest_xray/test)")
    p.add_argument("--max-images", type=int, default=64, help="images held in memory and cycled through")
    p.add_argument("--seconds", type=float, default=60.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=5.0, help="load before the window, not in the statistics")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--modes", default="batching,no-batching",
                   help="comma-separated: batching, no-batching, workers-2 (two server processes, one database), "
                        "batching-int8 and workers-2-int8 (the same with --backend onnx-int8), "
                        "workers-2-pg (the same, audit trail in a throwaway PostgreSQL server, fsync on), peer and "
                        "peer-workers-2 (bench/peer_app.py: the same model behind a bare FastAPI endpoint), peer-workers-2-int8 "
                        "(the peer on the INT8 export)")
    p.add_argument("--profile", type=float, default=0.0,
                   help="after the measured runs, one more run per --profile-modes mode with py-spy sampling the "
                        "server for this many seconds (not counted in the figures): where the time goes")
    p.add_argument("--profile-modes", default="",
                   help="comma-separated modes to profile (default: every mode of --modes)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds; each runs every mode once, in the order A B A B ... (at least 2: a spread needs "
                        "two runs)")
    p.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S,
                   help="the clients' timeout per request (s); a request that times out fails the run")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator: raw (asyncio streams, requests built once; default) or httpx (the "
                        "earlier results' client, ~2.4 ms of CPU a request on this machine's cores)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--result", type=Path, default=DEFAULT_RESULT, help="JSON to write")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (databases, server logs)")
    args = p.parse_args(argv)
    command = " ".join(["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {unknown}: use {', '.join(MODES)}")
    if not args.run.is_dir() or not list(args.run.glob("*.card.json")):
        p.error(f"{args.run} is not a trained run (no model card in it)")
    if args.clients < 1 or args.seconds <= 0 or args.warmup < 0 or args.timeout <= 0:
        p.error("--clients must be >= 1, --seconds and --timeout > 0 and --warmup >= 0")
    if args.repeats < 2:
        p.error("--repeats must be >= 2: every mode runs at least twice, so the result has a spread")
    args.run = args.run.resolve()
    uploads = load_uploads(args.images, args.max_images)

    profile_modes = [m.strip() for m in (args.profile_modes or args.modes).split(",") if m.strip()]
    if unknown := [m for m in profile_modes if m not in MODES]:
        p.error(f"unknown --profile-modes {unknown}")
    started_on = provenance()  # the code the servers run; compared with the end's (code_changed)
    work = Path(tempfile.mkdtemp(prefix="medlens-load-"))
    runs: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    pg = None
    try:
        if any(is_pg(m) for m in modes + (profile_modes if args.profile else [])):
            sys.path.insert(0, str(ROOT / "tests"))  # the test suite's throwaway PostgreSQL server
            from service_pg import start_pg_server

            pg = start_pg_server(fsync=True)
        order = 0
        for round_no in range(1, args.repeats + 1):
            for mode in modes:  # A B, A B, ...: drift shows as spread within a mode, not between modes
                order += 1
                runs.append(run_once(mode, round_no, order, args, uploads, work, pg))
        if args.profile:
            for mode in profile_modes:
                order += 1
                profiled = run_once(mode, 0, order, args, uploads, work, pg, profile=args.profile)
                profiles[mode] = {"throughput_rps_while_profiled": profiled["throughput_rps"],
                                  "passed": profiled["passed"], **(profiled.get("profile") or {})}
    finally:
        if pg is not None:
            from service_pg import stop_pg_server

            stop_pg_server(pg)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    card = json.loads(_find_card(args.run).read_text())
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {
        "bench": "load_service",
        "written_by": SCRIPT,
        "command": command,
        **started_on,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_model(), "cores": cores,
                   "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores,
                   "platform": platform.platform(), "python": platform.python_version()},
        "medlens_version": medlens.__version__,
        "run": str(args.run),
        "recipe": (card.get("config") or {}).get("recipe"),
        "model_id": card.get("model_id"),
        "model_name": card.get("model_name"),
        "policy_hash": card.get("policy_hash"),
        "input_size": card.get("input_size"),
        "clients": args.clients,
        "client": args.client,
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "client_timeout_s": args.timeout,
        "order": [f"{r['order']}:{r['mode']}" for r in runs],
        "images": {"folder": str(args.images), "count": len(uploads),
                   "mean_bytes": round(float(np.mean([len(u.body) for u in uploads])))},
        "server_settings": {**SERVER_ENV, "note": "every other setting is the service default; the caller's "
                                                  "MEDLENS_* variables are not passed on"},
        "clients_share_cores": (f"the {args.clients} clients run in the benchmark process on the same "
                                f"{cores} cores as the server (loopback); see each run's cpu block for the CPU "
                                "seconds they took during the window"),
        "runs": runs,
        "summary": summarise(runs, modes),
        "profiles": profiles or None,
    }
    result["failures"] = [f"run {r['order']} ({r['mode']}): {f}" for r in runs for f in r["failures"]]
    if changed := code_changed(started_on, provenance()):
        result["failures"].append(changed)
    result["passed"] = not result["failures"]
    try:  # a failed run (e.g. no 200 answers in a mode) has missing figures: record it, never lose the JSON
        result["readme"] = readme_figure(result) if result["passed"] else None
        result["readme_workers"] = readme_workers_figure(result) if result["passed"] else []
    except (TypeError, KeyError) as exc:
        result["readme"] = None
        result["failures"].append(f"no README row: {exc}")
        result["passed"] = False
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    if result["readme"]:
        print(f"README: {result['readme']}")
    for row in result.get("readme_workers") or []:
        print(f"README: {row}")
    for mode, prof in (result.get("profiles") or {}).items():
        print(f"profile {mode}: {prof.get('share_by_category') or prof.get('error')}")
    print(f"wrote {args.result}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
