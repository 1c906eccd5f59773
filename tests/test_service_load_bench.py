"""The service load benchmark's own bookkeeping (``bench/load_service.py``), without a server or a model: the audit
trail is reconciled with every answer whatever its status, a request that times out or cannot connect is
counted as a transport error (never dropped) and fails the run, as do a 5xx and an unreconciled audit trail, and
the summary gives every run and the spread (and no README row when a mode has no figures)."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import require_module

require_module("httpx")
require_module("prometheus_client")

from medlens.service.audit import AuditLog  # noqa: E402
from medlens.service.settings import database_url  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_service.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("load_service_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _trail(tmp_path: Path, rows: list[tuple[str, int]]) -> Path:
    db = tmp_path / "audit.db"
    with AuditLog(database_url(db)) as log:
        for rid, status in rows:
            log.record(request_id=rid, action="predict", status=status)
    return db


def test_every_answer_needs_one_row_with_its_status(bench, tmp_path):
    rows = [("a", 200), ("b", 401), ("c", 429), ("d", 503)]
    db = _trail(tmp_path, rows)
    report = bench.check_audit(db, rows)
    assert report["ok"] and report["answers_by_status"] == {"200": 1, "401": 1, "429": 1, "503": 1}

    wrong = bench.check_audit(db, [("a", 200), ("b", 401), ("c", 200), ("d", 503)])  # c was a 429 in the trail
    assert not wrong["ok"] and wrong["answers_with_other_status_in_row"] == 1
    assert wrong["wrong_status_examples"] == [{"request_id": "c", "answered": 200, "audited": [429]}]

    unanswered = bench.check_audit(db, rows[:3])  # a row no client got an answer for
    assert not unanswered["ok"] and unanswered["rows_without_answer"] == 1

    missing = bench.check_audit(db, [*rows, ("e", 413)])  # an answer without a row
    assert not missing["ok"] and missing["answers_without_row"] == 1

    no_id = bench.check_audit(db, [*rows, (None, 404)])  # an answer without X-Request-ID
    assert not no_id["ok"] and no_id["answers_without_request_id"] == 1

    twice = bench.check_audit(db, [*rows, ("a", 200)])  # the same id answered twice
    assert not twice["ok"] and twice["duplicated_ids"] == 1


def _silent_server() -> tuple[socket.socket, int]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def test_timeouts_and_refused_connections_are_transport_errors(bench):
    import asyncio

    upload = bench.Upload("x", b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b")
    server, port = _silent_server()
    try:
        # windows of seconds, not tenths: creating the httpx client (its SSL context) took longer than a 0.5 s
        # window once on a loaded machine, and a window that closes before the first request leaves no result
        stop_at = time.perf_counter() + 2.0
        results = asyncio.run(bench.run_clients(f"http://127.0.0.1:{port}", "k", [upload], 2, stop_at, 0.2))
    finally:
        server.close()
    assert results and all(r.status is None and r.request_id is None for r in results)
    assert {r.error for r in results} <= {"ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout"}
    results = asyncio.run(bench.run_clients(f"http://127.0.0.1:{_closed_port()}", "k", [upload], 1,
                                            time.perf_counter() + 1.0, 0.2))
    assert results and {r.error for r in results} == {"ConnectError"}


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- pass / fail of a run


def _run_record(**changes) -> dict:
    """The fields of a clean run as run_once records them, with ``changes``."""
    run = {"requests": 130, "requests_in_window_ok": 120, "responses_by_status": {"200": 130}, "responses_5xx": 0,
           "transport_errors": 0, "transport_errors_by_type": {}, "audit": {"ok": True},
           "server_stop": {"clean": True}}
    return {**run, **changes}


@pytest.mark.parametrize("changes, words", [
    ({"transport_errors": 3, "transport_errors_by_type": {"ConnectError": 1, "ReadTimeout": 2}},
     "3 transport errors {'ConnectError': 1, 'ReadTimeout': 2}"),
    ({"responses_5xx": 1, "responses_by_status": {"200": 129, "503": 1}}, "1 responses 5xx"),
    ({"audit": {"ok": False, "answers_without_row": 1}}, "the audit trail does not reconcile"),
    ({"server_stop": {"clean": False}}, "the server did not stop cleanly"),
    ({"requests_in_window_ok": 0, "responses_by_status": {"429": 130}}, "no 200 answer in the measured window"),
], ids=["transport", "5xx", "audit", "stop", "no-200"])
def test_each_fault_fails_the_run_and_a_clean_run_passes(bench, changes, words):
    assert bench.run_failures(_run_record()) == []
    failures = bench.run_failures(_run_record(**changes))
    assert len(failures) == 1 and words in failures[0], failures


class _NoServer:
    """Stands in for bench.Server: "ready" at once on a port nobody listens on, and stops cleanly."""

    def __init__(self, run, db, port, extra, log_path):
        self.url, self.log_path = f"http://127.0.0.1:{_closed_port()}", log_path
        self.args = ["python", "-m", "medlens.cli", "serve", str(run), *extra]
        log_path.write_text("")

    def wait_ready(self):
        return {"model_id": "none"}

    def cpu_seconds(self):
        return None

    def stop(self):
        return {"returncode": 0, "needed_sigkill": False, "shutdown_complete": True, "clean": True}

    def kill(self):
        pass


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_run_once_fails_a_run_whose_requests_got_no_answer(bench, tmp_path, monkeypatch, client):
    """run_once end to end (the real clients, a server whose port refuses connections): the transport errors
    are counted and fail the run, even though everything else (stop, audit) is clean."""
    monkeypatch.setattr(bench, "Server", _NoServer)
    monkeypatch.setattr(bench, "create_key", lambda db: "mlk_test")
    monkeypatch.setattr(bench, "scrape_batch_sizes", lambda url: {"model_calls": 0, "images": 0, "mean": None,
                                                                  "calls_by_size": {}})
    monkeypatch.setattr(bench, "check_audit", lambda db, answers: {"ok": not answers, "answers": len(answers)})
    upload = bench.Upload("x", b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b")
    args = argparse.Namespace(run=tmp_path / "run", port=0, clients=1, warmup=0.0, seconds=0.3, timeout=0.2,
                              client=client)
    run = bench.run_once("batching", 1, 1, args, [upload], tmp_path)
    assert run["transport_errors"] > 0 and run["transport_errors_by_type"].keys() == {"ConnectError"}
    assert run["audit"]["ok"] and run["server_stop"]["clean"] and run["responses_5xx"] == 0
    assert not run["passed"] and run["failures"] == bench.run_failures(run)
    assert any("transport errors" in f for f in run["failures"]), run["failures"]


# ------------------------------------------------------------------------------------------------- summary


def _summary_run(order: int, mode: str, rps: float, p50: float | None) -> dict:
    """A run record with what summarise needs; ``p50`` None: no 200 answer, so no latency."""
    passed = p50 is not None
    return {"order": order, "round": (order + 1) // 2, "mode": mode, "throughput_rps": rps,
            "latency_ms": {"p50": p50, "p90": p50 and p50 * 1.5, "p99": p50 and p50 * 2},
            "batch_size": {"mean": 2.0 if passed else None}, "cpu": None, "requests": 100, "responses_5xx": 0,
            "transport_errors": 0, "errors_by_status": {} if passed else {"429": 100}, "audit": {"ok": True},
            "passed": passed}


def test_summary_reports_every_run_and_the_spread(bench):
    run = _summary_run
    runs = [run(1, "batching", 80.0, 190.0), run(2, "no-batching", 50.0, 280.0),
            run(3, "batching", 90.0, 170.0), run(4, "no-batching", 60.0, 260.0)]
    summary = bench.summarise(runs, ["batching", "no-batching"])
    t = summary["batching"]["throughput_rps"]
    assert t["runs"] == [80.0, 90.0] and t["mean"] == 85.0 and (t["min"], t["max"]) == (80.0, 90.0)
    assert t["sd"] == pytest.approx(7.07, abs=0.01) and summary["batching"]["order"] == [1, 3]
    ratio = summary["throughput_ratio_batching_over_no_batching"]
    assert ratio["of_means"] == pytest.approx(85 / 55, abs=0.01)
    assert ratio["per_round"]["runs"] == [1.6, 1.5]
    line = bench.readme_figure({"summary": summary, "clients": 16, "seconds": 60.0, "recipe": "cxr_cpu"})
    assert "85.0 req/s (runs 80.0-90.0)" in line and "55.0 req/s (runs 50.0-60.0)" in line
    assert "1.55x; per round 1.50-1.60x" in line and "0 5xx" in line and "exactly one audit row" in line


@pytest.mark.parametrize("empty", ["no-batching", "batching"])
def test_no_readme_row_when_a_mode_had_no_200_answer(bench, empty):
    """A mode whose runs got no 200 answer (all 429, say) has no latency, a zero throughput and no ratio: the
    README row is None, not a crash, and main() keeps the JSON (it asks for the row only when every run passed)."""
    figures = {"batching": (80.0, 190.0), "no-batching": (50.0, 280.0)}
    runs = [_summary_run(order, mode, *((0.0, None) if mode == empty else figures[mode]))
            for order, mode in enumerate(["batching", "no-batching"] * 2, start=1)]
    summary = bench.summarise(runs, ["batching", "no-batching"])
    assert summary[empty]["latency_p50_ms"]["mean"] is None and not summary[empty]["passed"]
    assert bench.readme_figure({"summary": summary, "clients": 16, "seconds": 60.0, "recipe": "cxr_cpu"}) is None


def test_raw_client_reads_every_answer_on_keep_alive_connections(bench):
    """The lean load client against a real socket server: each request's status and X-Request-ID are recorded,
    bodies framed by Content-Length and by chunks are both consumed (the next answer on the same connection is
    read right), and a ``Connection: close`` answer is kept and followed by a new connection."""
    import asyncio

    seen = {"connections": 0, "requests": 0}

    async def handle(reader, writer):
        seen["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0])
                await reader.readexactly(length)
                seen["requests"] += 1
                n = seen["requests"]
                rid = f"rid-{n}".encode()
                if n % 3 == 0:  # chunked, with a chunk extension
                    writer.write(b"HTTP/1.1 429 Too Many\r\nX-Request-ID: " + rid + b"\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n5;x=1\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
                elif n % 5 == 0:  # the server closes after this answer
                    writer.write(b"HTTP/1.1 503 Busy\r\nX-Request-ID: " + rid + b"\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n{}")
                    await writer.drain()
                    writer.close()
                    return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nx-request-id: " + rid + b"\r\nContent-Length: 11\r\n\r\n"
                                 b'{"ok":true}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upload = bench.Upload("x", b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b")
        stop_at = time.perf_counter() + 0.5
        async with server:
            return await bench.run_clients_raw(f"http://127.0.0.1:{port}", "mlk_k", [upload], 1, stop_at, 2.0)

    results = asyncio.run(main())
    assert results and all(r.error is None for r in results), [r.error for r in results if r.error][:3]
    assert [r.request_id for r in results] == [f"rid-{i}" for i in range(1, len(results) + 1)]
    statuses = {i + 1: r.status for i, r in enumerate(results)}
    assert all(s == (429 if i % 3 == 0 else 503 if i % 5 == 0 else 200) for i, s in statuses.items())
    closed_after = [i for i in statuses if i % 5 == 0 and i % 3 != 0]  # answers after which the server closed
    reopened = len(closed_after) - (closed_after[-1:] == [len(results)])  # no new connection after the last one
    assert len(results) >= 10 and seen["connections"] == 1 + reopened


def test_a_run_whose_code_changed_underneath_is_not_credited_to_a_commit(bench):
    """Each server process starts on whatever is checked out at that moment: a commit or an edit during the run
    mixes code, so the result records the start's commit and fails with the reason (an earlier result took its
    commit from the end of the run)."""
    clean = {"commit": "a" * 40, "uncommitted_changes": False}
    assert bench.code_changed(clean, dict(clean)) is None
    assert "changed during the run" in bench.code_changed(clean, {**clean, "uncommitted_changes": True})
    assert "ended on " + "b" * 40 in bench.code_changed(clean, {**clean, "commit": "b" * 40})
    assert bench.provenance().keys() == clean.keys()
