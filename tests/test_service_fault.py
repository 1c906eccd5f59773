"""Fault test of the clinical service (issue #4, bar 3): ``kill -9`` the server under load, restart it.

A real ``medlens serve`` process (``python -m medlens.cli serve``: the process started *is* the uvicorn
server, there is no wrapper in between) serves a tiny model really trained on Kermany chest X-rays, with a
fresh SQLite audit database. A few client threads post real X-rays over loopback; once at least
``ACKS_BEFORE_KILL`` predictions were acknowledged (200 + ``X-Request-ID``), the server gets SIGKILL. Then:

- the database file is intact (``PRAGMA integrity_check``), its WAL is recovered on opening, and
  :class:`~medlens.service.audit.AuditLog` opens it cleanly;
- every acknowledged request has exactly one audit row, with status 200; no request id appears twice; rows
  for requests that were never acknowledged (audited, then killed before the answer left) are at most the
  requests in flight at the kill, i.e. at most one per client;
- the server restarts on the same database, becomes ready, serves an acknowledged prediction from before
  the kill (read from the audit trail) and a new prediction, which is audited.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import copy_run, free_port, require_module

require_module("fastapi")
require_module("uvicorn")
httpx = require_module("httpx")

from medlens.cli import main  # noqa: E402
from medlens.service.audit import AuditLog  # noqa: E402
from medlens.service.settings import database_url  # noqa: E402

pytest_plugins = ["service_pg"]

CLIENTS = 4
ACKS_BEFORE_KILL = 20
READY_TIMEOUT_S = 90.0
LOAD_TIMEOUT_S = 60.0


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """This module's own copy of the session's tiny Kermany run (the service may write beside it)."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("fault-run") / "r")


def _server_env() -> dict[str, str]:
    """The caller's environment without its MEDLENS_* settings, and no rate limit (the clients share a key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLENS_")}
    env["MEDLENS_RATE_LIMIT_PER_MINUTE"] = "0"
    return env


class Server:
    """``medlens serve RUN [--workers N]`` in its own process group on a free loopback port, logging to a file."""

    def __init__(self, run: Path, db: Path | str, log: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        extra = ["--workers", str(workers)] if workers > 1 else []
        with open(log, "ab") as out:  # a file, not a pipe: nobody reads a pipe while the server runs
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medlens.cli", "serve", str(run), "--port", str(self.port), "--db", str(db),
                 *extra], stdout=out, stderr=subprocess.STDOUT, env=_server_env(), cwd=log.parent,
                start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}) before it was ready:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server was not ready within {READY_TIMEOUT_S:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # worker processes left behind, if any
            os.killpg(self.proc.pid, signal.SIGKILL)


def _post(client: httpx.Client, key: str, image: Path) -> httpx.Response:
    return client.post("/v1/predictions", files={"file": (image.name, image.read_bytes())},
                       headers={"Authorization": f"Bearer {key}"})


def _predict_rows(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT request_id, status FROM audit WHERE action = 'predict'").fetchall()


# --------------------------------------------------------------------------------------------------- test


def test_kill_9_under_load_loses_no_acknowledged_audit_row(run_dir, kermany, tmp_path, capsys):
    db = tmp_path / "audit.db"
    assert main(["keys", "create", "fault-client", "--role", "clinician", "--db", str(db)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    images = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((kermany / "test" / cls).iterdir())[:4]]

    server = Server(run_dir, db, tmp_path / "server-1.log")
    try:
        server.wait_ready()

        # -- load: CLIENTS threads post X-rays back to back until the server dies
        acknowledged: list[str] = []
        failures: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        enough = threading.Event()
        killed = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30.0) as http:
                n = k
                while not killed.is_set():
                    try:
                        r = _post(http, key, images[n % len(images)])
                    except httpx.TransportError as exc:  # expected once the server is killed
                        with lock:
                            failures[type(exc).__name__] += 1
                        if killed.is_set():
                            return
                        time.sleep(0.05)
                        continue
                    n += CLIENTS
                    with lock:
                        if r.status_code == 200:
                            acknowledged.append(r.headers["x-request-id"])
                            if len(acknowledged) >= ACKS_BEFORE_KILL:
                                enough.set()
                        else:
                            failures[str(r.status_code)] += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        assert enough.wait(LOAD_TIMEOUT_S), f"only {len(acknowledged)} acknowledged in {LOAD_TIMEOUT_S:.0f} s:\n" \
                                            f"{server.tail()}"
        os.kill(server.proc.pid, signal.SIGKILL)  # the uvicorn process itself (no wrapper, no workers)
        assert server.proc.wait(10) == -signal.SIGKILL
        killed.set()
        for t in threads:
            t.join(40)
            assert not t.is_alive(), "a client hung after the kill"
        with lock:
            acked = list(acknowledged)
        with pytest.raises(httpx.TransportError):  # nothing survived the kill on that port
            httpx.get(server.url + "/healthz", timeout=2.0)
        assert not {k for k in failures if k[0] == "5"}, f"5xx before the kill: {failures}"
        assert set(failures) <= {"ReadError", "RemoteProtocolError", "ConnectError", "WriteError"}, failures

        # -- the database after the kill: the WAL is left behind, the file opens and is intact
        assert Path(f"{db}-wal").exists(), "no WAL after kill -9: the test did not exercise WAL recovery"
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with AuditLog(database_url(db)) as log:
            assert log.ping()
            total = log.count(action="predict")
            for rid in acked:
                row = log.get(rid)
                assert row is not None, f"acknowledged request {rid} has no audit row"
                assert row.status == 200 and row.action == "predict" and row.output["id"] == rid

        rows = _predict_rows(db)
        counts = collections.Counter(rid for rid, _ in rows)
        assert len(acked) == len(set(acked)) >= ACKS_BEFORE_KILL
        assert not [rid for rid, n in counts.items() if n > 1], "a request id is in the audit trail twice"
        assert all(counts[rid] == 1 for rid in acked)
        assert total == len(rows) >= len(acked)
        unacknowledged = set(counts) - set(acked)
        assert len(unacknowledged) <= CLIENTS, (
            f"{len(unacknowledged)} audited predictions were never acknowledged: more than the {CLIENTS} requests "
            "that can have been in flight")
        assert all(status == 200 for _, status in rows), rows  # no 429 / 5xx rows either
        print(f"kill -9 after {len(acked)} acknowledged; {len(rows)} audited predictions "
              f"({len(unacknowledged)} in flight at the kill); client errors {dict(failures)}")
    finally:
        server.close()

    # -- restart on the same database: ready, old predictions readable, a new one works and is audited
    server = Server(run_dir, db, tmp_path / "server-2.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30.0) as http:
            old = http.get(f"/v1/predictions/{acked[0]}", headers={"Authorization": f"Bearer {key}"})
            assert old.status_code == 200 and old.json()["id"] == acked[0], old.text
            r = _post(http, key, images[0])
            assert r.status_code == 200, r.text
            new_id = r.headers["x-request-id"]
            assert r.json()["id"] == new_id and new_id not in counts
        with AuditLog(database_url(db)) as log:
            row = log.get(new_id)
            assert row is not None and row.status == 200 and row.action == "predict"
            assert log.count(action="predict") == total + 1
            assert log.count(action="get_prediction") == 1
    finally:
        server.close()
    assert server.proc.returncode is not None
    rows = _predict_rows(db)
    assert len(rows) == len({rid for rid, _ in rows}) == total + 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_kill_9_of_two_server_processes_loses_no_acknowledged_audit_row(run_dir, kermany, db_url, tmp_path, capsys):
    """``medlens serve --workers 2`` on one audit database (SQLite WAL across processes, or PostgreSQL): under load
    from several clients the whole process group gets SIGKILL; every acknowledged prediction has exactly one row
    with status 200, and a restart serves them."""
    assert main(["keys", "create", "fault-client", "--role", "clinician", "--db", db_url]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    images = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((kermany / "test" / cls).iterdir())[:4]]
    server = Server(run_dir, db_url, tmp_path / "workers.log", workers=2)
    acknowledged: list[str] = []
    lock, enough, killed = threading.Lock(), threading.Event(), threading.Event()
    try:
        server.wait_ready()
        children = subprocess.run(["pgrep", "-g", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 3, f"expected a supervisor and two workers, found {children}"

        def client(k: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30.0) as http:
                n = k
                while not killed.is_set():
                    try:
                        r = _post(http, key, images[n % len(images)])
                    except httpx.TransportError:
                        if killed.is_set():
                            return
                        time.sleep(0.05)
                        continue
                    n += CLIENTS
                    if r.status_code == 200:
                        with lock:
                            acknowledged.append(r.headers["x-request-id"])
                            if len(acknowledged) >= ACKS_BEFORE_KILL:
                                enough.set()

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        assert enough.wait(LOAD_TIMEOUT_S), f"only {len(acknowledged)} acknowledged:\n{server.tail()}"
        os.killpg(server.proc.pid, signal.SIGKILL)  # the supervisor and both workers at once
        server.proc.wait(10)
        killed.set()
        for t in threads:
            t.join(40)
        with lock:
            acked = list(acknowledged)
    finally:
        server.close()
    with AuditLog(db_url) as log:
        rows = log.list(100000, action="predict")
        ids = collections.Counter(r.request_id for r in rows)
        assert not [rid for rid, n in ids.items() if n > 1], "a request id is in the audit trail twice"
        for rid in acked:
            row = log.get(rid)
            assert row is not None and row.status == 200 and row.output["id"] == rid, rid
        assert len(set(ids) - set(acked)) <= CLIENTS  # at most the requests in flight at the kill
    server = Server(run_dir, db_url, tmp_path / "workers-2.log", workers=2)
    try:
        server.wait_ready()
        old = httpx.get(f"{server.url}/v1/predictions/{acked[0]}", headers={"Authorization": f"Bearer {key}"})
        assert old.status_code == 200 and old.json()["id"] == acked[0]
        _revoked_at_once_by_every_worker(server.url, db_url)
    finally:
        server.close()


def _revoked_at_once_by_every_worker(url: str, db_url: str) -> None:
    """A key that both server processes have verified (on PostgreSQL: cached, medlens.service.keycache) is
    refused by both within milliseconds of `medlens keys revoke`'s commit (the notification), well inside the
    cache's MAX_AGE_S (1 s). Each burst opens 16 new connections, which SO_REUSEPORT spreads over the two
    processes by hash: that all 48 of the warm-up land on one has a probability of 2**-47."""
    from medlens.service.auth import KeyStore
    from medlens.service.keycache import MAX_AGE_S

    with KeyStore(db_url) as store:
        doomed = store.create("fault-revoked-soon", "viewer")

    async def burst() -> list[int]:  # 16 connections at once: both processes answer some
        async with httpx.AsyncClient(base_url=url, timeout=10.0,
                                     limits=httpx.Limits(max_connections=16, max_keepalive_connections=0)) as http:
            rs = await asyncio.gather(*[http.get("/v1/models", headers={"X-API-Key": doomed}) for _ in range(16)])
        return [r.status_code for r in rs]

    for _ in range(3):
        assert asyncio.run(burst()) == [200] * 16
    with KeyStore(db_url) as store:
        assert store.revoke("fault-revoked-soon") is True
        revoked = time.perf_counter()
    while (statuses := asyncio.run(burst())) != [401] * 16:  # the notification may still be on its way
        assert time.perf_counter() - revoked < MAX_AGE_S / 2, f"{statuses}: still served after the revocation"
    assert asyncio.run(burst()) == [401] * 16
