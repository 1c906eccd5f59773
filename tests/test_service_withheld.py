"""The audit row tells the truth about what the client got (issue 9, finding 2; docs/AUDIT.md).

The attack: with the audit database write-locked by another process for longer than the service waits for its
row, the client got 503, yet the queued row was committed later with status 200 and the full prediction, and
``GET /v1/predictions/{id}`` then served the withheld answer. Here the lock is held by a real second SQLite
connection (``BEGIN IMMEDIATE``) against the real service on a real uvicorn server, with the wait shortened.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa
from helpers import clinician_app, require_module, serve_in_thread

require_module("fastapi")
httpx = require_module("httpx")

from medlens.service.audit import AuditLog  # noqa: E402
from medlens.service.committer import WITHHELD, GroupCommitter  # noqa: E402


def _rows(db) -> dict[str, tuple[int, str | None, str | None]]:
    with sqlite3.connect(db) as conn:
        return {r[0]: (r[1], r[2], r[3]) for r in
                conn.execute("SELECT request_id, status, output, error FROM audit WHERE action = 'predict'")}


def test_a_withheld_answer_is_recorded_as_withheld_and_never_served(tiny_run, cxr_tiny, tmp_path_factory,
                                                                     monkeypatch):
    from medlens.service import middleware

    monkeypatch.setattr(middleware, "AUDIT_TIMEOUT_S", 1.0)
    app, key = clinician_app(tiny_run, tmp_path_factory, "withheld", "dr-a")
    db = app.state.service.settings.database_url.removeprefix("sqlite:///")
    image = next((cxr_tiny / "test" / "PNEUMONIA").iterdir()).read_bytes()
    headers = {"Authorization": f"Bearer {key}"}
    answers: dict[str, httpx.Response] = {}

    def post(name: str, url: str) -> None:
        answers[name] = httpx.post(url + "/v1/predictions", files={"file": ("x.jpeg", image)}, headers=headers,
                                   timeout=60)

    with serve_in_thread(app) as url:
        assert httpx.post(url + "/v1/predictions", files={"file": ("x.jpeg", image)}, headers=headers,
                          timeout=60).status_code == 200  # warm: the writer and the model are up
        locker = sqlite3.connect(db, timeout=1, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            first = threading.Thread(target=post, args=("first", url))
            first.start()
            time.sleep(0.5)  # the writer has claimed the first row and waits for the lock inside its transaction
            second = threading.Thread(target=post, args=("second", url))
            second.start()
            second.join(30)  # queued behind the first: not claimed within the wait -> withheld
            assert answers["second"].status_code == 503, answers["second"].text
            time.sleep(2.0)  # the lock outlives the service's wait, as in the attack
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        first.join(60)
        assert answers["first"].status_code == 200  # its row was being written: the commit decided the answer
        deadline = time.monotonic() + 20
        ids = {name: r.headers["X-Request-ID"] for name, r in answers.items()}
        while ids["second"] not in _rows(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = _rows(db)
        status, output, error = rows[ids["second"]]
        assert status == 503 and output is None and "withheld" in error
        assert rows[ids["first"]][0] == 200 and rows[ids["first"]][1] is not None
        assert httpx.get(f"{url}/v1/predictions/{ids['second']}", headers=headers).status_code == 404
        assert httpx.get(f"{url}/v1/predictions/{ids['first']}", headers=headers).status_code == 200
        # every answer the client got has exactly one row saying what it was
        for name, response in answers.items():
            assert rows[ids[name]][0] == response.status_code


def test_a_failed_commit_after_the_wait_answers_503_and_logs_no_orphaned_error(tiny_run, cxr_tiny,
                                                                             tmp_path_factory, monkeypatch,
                                                                             caplog):
    """The row is claimed, the request stops waiting, then the commit itself fails (the lock outlives SQLite's
    busy timeout): the client gets 503, the row says 503, and the database error is read by the request, not
    left in an abandoned asyncio future (which asyncio logs as "Future exception was never retrieved")."""
    import gc
    import logging

    from medlens.service import committer, middleware
    from medlens.service import db as service_db

    monkeypatch.setattr(middleware, "AUDIT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(service_db, "BUSY_TIMEOUT_MS", 2000)
    monkeypatch.setattr(committer, "DEFERRED_RETRY_S", 0.2)
    app, key = clinician_app(tiny_run, tmp_path_factory, "withheld-fail", "dr-a")
    db = app.state.service.settings.database_url.removeprefix("sqlite:///")
    image = next((cxr_tiny / "test" / "PNEUMONIA").iterdir()).read_bytes()
    headers = {"Authorization": f"Bearer {key}"}
    caplog.set_level(logging.ERROR, logger="asyncio")
    with serve_in_thread(app) as url:
        assert httpx.post(url + "/v1/predictions", files={"file": ("x.jpeg", image)}, headers=headers,
                          timeout=60).status_code == 200  # warm: the writer's connection is open
        locker = sqlite3.connect(db, timeout=1, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            answer = httpx.post(url + "/v1/predictions", files={"file": ("x.jpeg", image)}, headers=headers,
                                timeout=60)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert answer.status_code == 503, answer.text
        rid = answer.headers["X-Request-ID"]
        deadline = time.monotonic() + 20
        while rid not in _rows(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        status, output, error = _rows(db)[rid]
        assert status == 503 and output is None and "withheld" in error
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


def _gated(log: AuditLog, monkeypatch):
    gate, calls = threading.Event(), []
    real = log.insert_rows

    def slow(rows):
        calls.append([r["request_id"] for r in rows])
        if len(calls) == 1:
            gate.wait(10)
        return real(rows)

    monkeypatch.setattr(log, "insert_rows", slow)
    return gate, calls


def _wait(calls) -> None:
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_row_claimed_after_its_deadline_is_written_withheld(tmp_path, monkeypatch):
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}")
    gate, calls = _gated(log, monkeypatch)
    writer = GroupCommitter(log)
    first = writer.submit(log.prepare(request_id="a", action="predict", status=200, output={"p": 1}))
    _wait(calls)
    late = writer.submit(log.prepare(request_id="b", action="predict", status=200, output={"p": 2}),
                         deadline=time.monotonic() + 0.05)
    time.sleep(0.2)  # its deadline passes while the writer is busy with the first row
    gate.set()
    assert first.result(10) is True and late.result(10) == WITHHELD
    writer.close()
    b = log.get("b")
    assert b.status == 503 and b.output is None and log.get_prediction("b") is None


def test_a_withdrawn_row_is_never_written_as_answered(tmp_path, monkeypatch):
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}")
    gate, calls = _gated(log, monkeypatch)
    writer = GroupCommitter(log)
    writer.submit(log.prepare(request_id="a", action="predict", status=200, output={"p": 1}))
    _wait(calls)
    queued = writer.submit(log.prepare(request_id="b", action="predict", status=200, output={"p": 2}))
    assert writer.withdraw(queued, "gave up waiting")
    gate.set()
    writer.close()
    b = log.get("b")
    assert b.status == 503 and b.error == "gave up waiting" and b.output is None


def test_a_row_being_written_cannot_be_withdrawn(tmp_path, monkeypatch):
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}")
    gate, calls = _gated(log, monkeypatch)
    writer = GroupCommitter(log)
    claimed = writer.submit(log.prepare(request_id="a", action="predict", status=200, output={"p": 1}))
    _wait(calls)
    assert not writer.withdraw(claimed, "too late")  # the request must wait for this transaction instead
    gate.set()
    assert claimed.result(10) is True
    writer.close()
    assert log.get("a").status == 200


def test_database_failure_withholds_and_records_once_it_is_back(tmp_path, monkeypatch):
    from medlens.service import committer

    monkeypatch.setattr(committer, "DEFERRED_RETRY_S", 0.1)
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}")
    real, failing = log.insert_rows, threading.Event()
    failing.set()

    def flaky(rows):
        if failing.is_set():
            raise sa.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))
        return real(rows)

    monkeypatch.setattr(log, "insert_rows", flaky)
    writer = GroupCommitter(log)
    future = writer.submit(log.prepare(request_id="a", action="predict", status=200, output={"p": 1}))
    with pytest.raises(sa.exc.OperationalError):
        future.result(10)  # the request answers 503
    assert log.get("a") is None
    failing.clear()  # the disk has room again: the withheld row is written without any new request
    deadline = time.monotonic() + 10
    while log.get("a") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.close()
    a = log.get("a")
    assert a.status == 503 and a.output is None and "withheld" in a.error
