"""The service load benchmark's own bookkeeping (``bench/load_service.py``), without a server or a model: the audit
trail is reconciled with every answer whatever its status, a request that times out or cannot connect is
counted as a transport error (never dropped), and the summary gives every run and the spread."""

from __future__ import annotations

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
        stop_at = time.perf_counter() + 0.5
        results = asyncio.run(bench.run_clients(f"http://127.0.0.1:{port}", "k", [upload], 2, stop_at, 0.2))
    finally:
        server.close()
    assert results and all(r.status is None and r.request_id is None for r in results)
    assert {r.error for r in results} <= {"ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout"}
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    results = asyncio.run(bench.run_clients(f"http://127.0.0.1:{closed}", "k", [upload], 1,
                                            time.perf_counter() + 0.2, 0.2))
    assert results and {r.error for r in results} == {"ConnectError"}


def test_summary_reports_every_run_and_the_spread(bench):
    def run(order, mode, rps, p50):
        return {"order": order, "round": (order + 1) // 2, "mode": mode, "throughput_rps": rps,
                "latency_ms": {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 2}, "batch_size": {"mean": 2.0},
                "cpu": None, "requests": 100, "responses_5xx": 0, "transport_errors": 0,
                "errors_by_status": {}, "audit": {"ok": True}, "passed": True}

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
