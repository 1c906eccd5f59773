"""The audit trail (SQLite and a real PostgreSQL server), DICOM de-identification and the service settings."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from conftest import require_shared
from sqlalchemy import event

from medlens.errors import ConfigError
from medlens.service.audit import COLUMNS, AuditLog, AuditRecord, DuplicateRequestError, audit_table
from medlens.service.db import create_engine, create_tables, utc_iso, write_transaction
from medlens.service.deid import deidentify_dicom_fields, dicom_fields, keyed_hash
from medlens.service.settings import ServiceSettings, load_or_create_key, read_settings_file

pytest_plugins = ["service_pg"]  # fixtures db_url, pg_url, pg_server: one PostgreSQL server per session

KEY = b"0123456789abcdef-test-key"
SHA = "ab" * 32


#: the out-of-domain verdict of a prediction (issue 8): added after policy_hash, so after it
DOMAIN_COLUMNS = ("in_domain", "domain_score", "domain_reason")

def _record(log: AuditLog, rid: str, **kw) -> bool:
    args = {"action": "predict", "status": 200, "user": "alice", "role": "clinician", "input_sha256": SHA,
            "model_id": "cxr-resnet18", "policy_hash": "0123456789abcdef", "weights_sha256": "cd" * 32,
            "output": {"probability": 0.7},
            "latency_ms": 12.5}
    return log.record(request_id=rid, **{**args, **kw})


def _db_bytes(db: Path) -> bytes:
    """The database file and its WAL / shared-memory side files, as raw bytes."""
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


# ----------------------------------------------------------------------------------------------- SQLite


def test_sqlite_connections_use_wal_and_full_sync(tmp_path):
    db = tmp_path / "audit.db"
    log = AuditLog(f"sqlite:///{db}")
    with log.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    log.close()
    raw = sqlite3.connect(db)  # WAL is a property of the file: a plain connection sees it too
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_foreign_sqlite_engine_is_refused(tmp_path):
    with pytest.raises(ValueError, match="create_engine"):
        AuditLog(sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}"))


def _holding_writer(engine, seconds: float, entered: threading.Event, out: dict) -> threading.Thread:
    """A thread that holds a write transaction on ``engine`` for ``seconds``; ``out["released"]`` is when it
    had committed and let go (time.monotonic)."""
    def hold():
        with write_transaction(engine) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            entered.set()
            time.sleep(seconds)
        out["released"] = time.monotonic()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def test_sqlite_writers_start_within_milliseconds_of_the_lock_being_free(tmp_path):
    """Two engines on one SQLite file (as two ``--workers`` processes have): the second writer starts within a
    few ms of the first one's commit, on the writer lock file, not up to ~100 ms later when SQLite's busy handler
    wakes from its growing sleeps (1, 2, 5, ... 100 ms; at 0.34 s it sleeps from 0.328 s to 0.428 s)."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    first, second = create_engine(url), create_engine(url)
    with write_transaction(first) as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    lags = []
    for _ in range(3):
        entered, out = threading.Event(), {}
        holder = _holding_writer(first, 0.34, entered, out)
        assert entered.wait(10)
        with write_transaction(second) as conn:
            started = time.monotonic()
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        holder.join()
        lags.append(started - out["released"])
    assert min(lags) >= 0 and sorted(lags)[1] < 0.02, lags  # the median of three: robust to one slow wake-up
    assert stat.S_IMODE((tmp_path / "audit.db-writer.lock").stat().st_mode) == 0o600  # private, like the database
    with first.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 6
    first.dispose()
    second.dispose()


def test_sqlite_writer_lock_held_past_the_timeout_is_database_locked(tmp_path):
    """A writer that cannot have the lock within its timeout fails like SQLite's busy timeout does (``database
    is locked``, SQLAlchemy's OperationalError: the audit writer withholds such answers), and in that time."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    first, second = create_engine(url), create_engine(url)
    with write_transaction(first) as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    entered, out = threading.Event(), {}
    holder = _holding_writer(first, 1.0, entered, out)
    assert entered.wait(10)
    began = time.monotonic()
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        with write_transaction(second, lock_timeout_s=0.2) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    assert 0.15 < time.monotonic() - began < 0.8
    holder.join()
    with write_transaction(second, lock_timeout_s=0.2) as conn:  # free again: the next write goes through
        conn.exec_driver_sql("INSERT INTO t VALUES (3)")
    first.dispose()
    second.dispose()


def test_sqlite_kill9_keeps_every_acknowledged_row(tmp_path):
    """A writer (3 threads) prints each request id after record() returns and is SIGKILLed mid-stream."""
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    AuditLog(url).close()  # schema exists before the writer starts
    child = (
        "import sys, threading\n"
        "from medlens.service.audit import AuditLog\n"
        "log = AuditLog(sys.argv[1]); lock = threading.Lock()\n"
        "def work(t):\n"
        "    i = 0\n"
        "    while True:\n"
        "        rid = f'req-{t}-{i:06d}'\n"
        "        log.record(request_id=rid, action='predict', status=200, output={'i': i}, latency_ms=1.0)\n"
        "        with lock:\n"
        "            sys.stdout.write(rid + '\\n'); sys.stdout.flush()\n"
        "        i += 1\n"
        "for t in range(3):\n"
        "    threading.Thread(target=work, args=(t,), daemon=True).start()\n"
        "threading.Event().wait()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    acked: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(acked) < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    acked += rest.split()  # printed before the kill: acknowledged too
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 150, err[-2000:]

    raw = sqlite3.connect(db)  # opening replays the WAL
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()
    log = AuditLog(url)
    stored = [r.request_id for r in log.list(limit=100_000)]
    assert len(stored) == len(set(stored))
    assert set(acked) <= set(stored)
    assert len(stored) - len(acked) <= 3  # at most one committed-but-unprinted row per writer thread
    for rid in acked:  # a client retrying after the crash does not duplicate anything
        assert log.record(request_id=rid, action="predict", status=200) is False
    assert log.count() == len(stored)
    log.close()


# -------------------------------------------------------------------------------- SQLite and PostgreSQL


def test_schema_creation_is_idempotent(db_url):
    first = AuditLog(db_url)
    assert _record(first, "r1")
    second = AuditLog(db_url)  # tables, indexes and triggers exist: nothing fails, nothing is lost
    third = AuditLog(second.engine)
    assert third.count() == 1 and third.get("r1").user == "alice"
    with first.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            n = conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE type='trigger'").scalar()
        else:
            n = conn.exec_driver_sql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'audit'::regclass "
                                     "AND NOT tgisinternal").scalar()
    assert n == 2
    for log in (first, second):
        log.close()


def _table_before_policy_hash() -> sa.Table:
    """The audit table as the release before the policy_hash column created it (so also without the
    out-of-domain columns added after it)."""
    later = ("policy_hash", *DOMAIN_COLUMNS)
    columns = [sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, unique=c.unique,
                         autoincrement=c.autoincrement) for c in audit_table.columns if c.name not in later]
    return sa.Table("audit", sa.MetaData(), *columns, sa.Index("ix_audit_time", "time"))


def _old_database(engine) -> sa.Table:
    """``engine``'s database as the previous version left it: its audit table, with one row."""
    old = _table_before_policy_hash()
    create_tables(engine, old, append_only=("audit",))
    with write_transaction(engine) as conn:
        conn.execute(old.insert().values(time=utc_iso(), request_id="before", action="predict", status=200,
                                         model_id="cxr-resnet18"))
    assert "policy_hash" not in _physical_columns(engine)
    return old


def _physical_columns(engine) -> list[str]:
    return [c["name"] for c in sa.inspect(engine).get_columns("audit")]


@contextmanager
def _statements(engine):
    """The SQL statements ``engine`` runs during the block (a list, filled as they run)."""
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def test_policy_hash_is_the_last_column_everywhere():
    """New columns go last: a new database and a migrated one then have the same column order, and the CSV
    export (whose header is COLUMNS) keeps every column of the release before where it was."""
    assert COLUMNS[-4:] == ("policy_hash", *DOMAIN_COLUMNS)  # policy_hash, then the out-of-domain verdict
    assert COLUMNS[:-4] == tuple(c.name for c in _table_before_policy_hash().columns)
    assert tuple(f.name for f in dataclasses.fields(AuditRecord)) == COLUMNS


def test_a_database_from_before_policy_hash_gets_the_column(db_url):
    """An audit database made before the policy_hash column: opening it adds the column, at the end (the same
    column order as a new database), with one ALTER (after ``SET LOCAL lock_timeout`` on PostgreSQL) and none
    when opened again; old rows read NULL, new rows carry the hash, the append-only triggers stay, and the CSV
    export has the column, last."""
    engine = create_engine(db_url)
    _old_database(engine)
    with _statements(engine) as seen:
        log = AuditLog(engine)
    alters = [i for i, sql in enumerate(seen) if sql.upper().startswith("ALTER TABLE")]
    assert [seen[i] for i in alters] == ["ALTER TABLE audit ADD COLUMN policy_hash VARCHAR(64)",
                                         "ALTER TABLE audit ADD COLUMN in_domain BOOLEAN",
                                         "ALTER TABLE audit ADD COLUMN domain_score FLOAT",
                                         "ALTER TABLE audit ADD COLUMN domain_reason TEXT"], seen
    if engine.dialect.name == "postgresql":
        assert seen[alters[0] - 1] == "SET LOCAL lock_timeout = '5s'", seen
    assert _physical_columns(engine) == list(COLUMNS)  # appended: the order a new database has
    assert log.get("before").policy_hash is None and log.get("before").model_id == "cxr-resnet18"
    assert _record(log, "after")
    assert log.get("after").policy_hash == "0123456789abcdef"
    with _statements(engine) as seen:
        assert AuditLog(engine).count() == 2  # opening it again changes nothing ...
    assert not [sql for sql in seen if "ALTER" in sql.upper() or "lock_timeout" in sql], seen  # ... and alters nothing
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit SET policy_hash = NULL")
    rows = list(csv.DictReader(io.StringIO(log.export_csv_text())))
    assert tuple(rows[0]) == COLUMNS and [r["policy_hash"] for r in rows] == ["", "0123456789abcdef"]
    engine.dispose()


def test_a_new_database_has_the_columns_in_order(db_url):
    with AuditLog(db_url) as log:
        assert _physical_columns(log.engine) == list(COLUMNS)


def test_adding_the_column_needs_the_table_owner(pg_server):
    """On PostgreSQL a role that may not ALTER the audit table (INSERT and SELECT only, as production should run
    the service) gets a ConfigError naming the column and the fix; once the owner has opened the database once,
    the column is there and that role starts (nothing is created again) and writes rows."""
    import psycopg

    owner_url = pg_server.create_database()
    owner = create_engine(owner_url)
    _old_database(owner)
    role = "app_" + os.urandom(4).hex()
    dbname = sa.engine.make_url(owner_url).database
    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user=sa.engine.make_url(owner_url).username,
                         dbname=dbname, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")  # INSERT and SELECT only, as in production
        conn.execute(f"GRANT SELECT, INSERT ON audit TO {role}")
        conn.execute(f"GRANT USAGE ON SEQUENCE audit_id_seq TO {role}")
    app_url = sa.engine.make_url(owner_url).set(username=role).render_as_string(hide_password=False)
    app = create_engine(app_url)
    with pytest.raises(ConfigError) as info:
        AuditLog(app)
    text = str(info.value)
    assert "the audit database needs one start by the owner role" in text and "'policy_hash'" in text, text
    assert "ALTER TABLE audit ADD COLUMN policy_hash" in (info.value.hint or ""), text
    assert "policy_hash" not in _physical_columns(owner)  # nothing half-done
    AuditLog(owner).close()  # the owner's start adds it
    assert _physical_columns(owner) == list(COLUMNS)
    with AuditLog(app) as log:  # and the service's role starts on it, and writes
        assert _record(log, "by-app") and log.get("by-app").policy_hash == "0123456789abcdef"
    app.dispose()
    owner.dispose()


def test_postgresql_pool_replaces_connections_the_server_dropped(pg_url, monkeypatch):
    """Connections the server dropped while idle (a restart, a proxy timeout) are pinged at checkout and replaced:
    the next key lookup and audit write work. Connections used within IDLE_PING_S are not pinged (no round trip
    before every query under load, as SQLAlchemy's pool_pre_ping would add)."""
    import medlens.service.db as db
    from medlens.service.auth import KeyStore

    log = AuditLog(pg_url)
    keys = KeyStore(log.engine)
    key = keys.create("alice", "clinician")
    pings = []
    real = log.engine.dialect.do_ping
    monkeypatch.setattr(log.engine.dialect, "do_ping", lambda conn: pings.append(1) or real(conn))
    for i in range(5):  # busy: no pings
        assert keys.verify(key).name == "alice"
        _record(log, f"busy-{i}")
    assert pings == []
    admin = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"), poolclass=sa.pool.NullPool)
    with admin.connect() as conn:  # the server drops every other connection to this database
        dropped = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    admin.dispose()
    assert dropped >= 1
    monkeypatch.setattr(db, "IDLE_PING_S", 0.2)
    time.sleep(0.3)
    assert keys.verify(key).name == "alice"  # the dead connection was pinged and replaced
    assert _record(log, "after-drop") is True
    assert pings, "an idle connection was handed out without a ping"
    log.close()


def test_adding_the_column_does_not_wait_long_for_a_busy_table(pg_url):
    """A transaction holding the audit table (a long report, an open psql session) makes the ALTER give up
    after 5 s with a ConfigError, instead of queueing every other query on the table behind it for ever."""
    engine = create_engine(pg_url)
    _old_database(engine)
    other = create_engine(pg_url)
    with other.connect() as reader, reader.begin():
        reader.exec_driver_sql("SELECT count(*) FROM audit").scalar()  # holds ACCESS SHARE until it ends
        began = time.monotonic()
        with pytest.raises(ConfigError, match="another transaction held the table"):
            AuditLog(engine)
        assert 4.5 <= time.monotonic() - began < 30
    assert "policy_hash" not in _physical_columns(engine)
    AuditLog(engine).close()  # the table is free again: the column is added
    assert _physical_columns(engine)[-4:] == ["policy_hash", *DOMAIN_COLUMNS]
    other.dispose()
    engine.dispose()


def test_database_refuses_update_delete(db_url):
    log = AuditLog(db_url)
    _record(log, "r1")
    assert not any(hasattr(log, name) for name in ("update", "delete", "remove"))
    statements = ["UPDATE audit SET status = 500", "DELETE FROM audit", "DELETE FROM audit WHERE id = 1"]
    if log.engine.dialect.name == "postgresql":
        statements.append("TRUNCATE audit")
    for sql in statements:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), log.engine.begin() as conn:
            conn.exec_driver_sql(sql)
    row = log.get("r1")
    assert row.status == 200 and log.count() == 1
    log.close()


def test_insert_rows_writes_a_group_once_and_says_which_rows_were_new(db_url):
    """One transaction for a group (PostgreSQL: one multi-row INSERT): per row True if written, False for an id
    already in the trail or earlier in the same group; exactly one row per id afterwards."""
    log = AuditLog(db_url)
    _record(log, "old")
    rows = [log.prepare(request_id=rid, action="predict", status=status, user="alice")
            for rid, status in (("a", 200), ("old", 200), ("b", 503), ("a", 401), ("c", 200))]
    assert log.insert_rows(rows) == [True, False, True, False, True]
    with log.engine.connect() as conn:
        got = conn.execute(sa.select(log.table.c.request_id, log.table.c.status)).all()
    assert sorted(got) == [("a", 200), ("b", 503), ("c", 200), ("old", 200)]
    assert log.insert_rows([]) == []
    log.close()


def test_duplicate_request_id_is_not_duplicated(db_url):
    log = AuditLog(db_url)
    assert _record(log, "r1", output={"probability": 0.1}) is True
    assert _record(log, "r1", output={"probability": 0.9}) is False
    with pytest.raises(DuplicateRequestError, match="r1"):
        _record(log, "r1", on_duplicate="raise")
    assert log.count() == 1
    assert log.get("r1").output == {"probability": 0.1}  # the first write stands
    log.close()


def test_record_get_list_count_and_predictions(db_url):
    log = AuditLog(db_url)
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    _record(log, "p1", time=t0)
    _record(log, "p2", time=t0 + timedelta(minutes=1), user="bob")
    _record(log, "bad", time=t0 + timedelta(minutes=2), status=415, output=None, error="not an image")
    _record(log, "g1", time=t0 + timedelta(minutes=3), action="get", output=None)
    assert log.count() == 4
    assert [r.request_id for r in log.list()] == ["g1", "bad", "p2", "p1"]
    assert [r.request_id for r in log.list(limit=2, offset=1)] == ["bad", "p2"]
    assert [r.request_id for r in log.list(newest_first=False, action="predict")] == ["p1", "p2", "bad"]
    since = "2024-05-01T14:01:30+02:00"  # = 12:01:30 UTC
    assert [r.request_id for r in log.list(since=since)] == ["g1", "bad"]
    assert log.count(since=since) == 2 and log.count(user="bob") == 1 and log.count(status=415) == 1
    p1 = log.get_prediction("p1")
    assert p1.output == {"probability": 0.7} and p1.time == "2024-05-01T12:00:00.000000+00:00"
    assert p1.latency_ms == 12.5 and p1.input_sha256 == SHA and p1.model_id == "cxr-resnet18"
    assert p1.policy_hash == "0123456789abcdef"
    assert log.get_prediction("bad") is None and log.get_prediction("g1") is None  # failed / not a prediction
    assert log.get_prediction("p1", user="bob") is None and log.get_prediction("p2", user="bob") is not None
    assert log.get("nope") is None
    with pytest.raises(ValueError, match="sha256"):
        _record(log, "x", input_sha256="not-a-digest")
    with pytest.raises(ValueError, match="request_id"):
        _record(log, "")
    with pytest.raises(ValueError, match="policy_hash"):
        _record(log, "y", policy_hash="threshold=0.5")
    log.close()


def test_concurrent_writers(db_url):
    log = AuditLog(db_url)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                _record(log, f"t{t}-{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert log.count() == 80
    log.close()


def test_group_commit_writes_everything_waiting_in_one_transaction(db_url, monkeypatch):
    from medlens.service.committer import GroupCommitter

    log = AuditLog(db_url)
    gate, calls = threading.Event(), []
    real = log.insert_rows

    def slow_first(rows):  # hold the first commit until every other row is queued: they form one batch
        calls.append(len(rows))
        if len(calls) == 1:
            gate.wait(10)
        return real(rows)

    monkeypatch.setattr(log, "insert_rows", slow_first)
    writer = GroupCommitter(log)
    futures = [writer.submit(log.prepare(request_id="g0", action="predict", status=200))]
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the writer is now inside the first commit
        time.sleep(0.01)
    futures += [writer.submit(log.prepare(request_id=f"g{i}", action="predict", status=200)) for i in range(1, 40)]
    futures.append(writer.submit(log.prepare(request_id="g3", action="predict", status=200)))  # a retry
    gate.set()
    results = [f.result(timeout=20) for f in futures]
    writer.close()
    assert results == [True] * 40 + [False]  # each answered only after its commit; the duplicate not written
    assert calls == [1, 40] and writer.commits == 2 and writer.rows == 41
    assert log.count() == 40
    log.close()


def test_group_commit_survives_a_request_that_gave_up(db_url, monkeypatch):
    from medlens.service.committer import GroupCommitter

    log = AuditLog(db_url)
    gate, calls = threading.Event(), []
    real = log.insert_rows

    def slow(rows):
        calls.append(len(rows))
        gate.wait(10)
        return real(rows)

    monkeypatch.setattr(log, "insert_rows", slow)
    writer = GroupCommitter(log)
    first = writer.submit(log.prepare(request_id="c0", action="predict", status=200))
    while not calls:
        time.sleep(0.01)
    assert first.cancel()  # the request was cancelled while its row was being committed
    gate.set()
    later = writer.submit(log.prepare(request_id="c1", action="predict", status=200))
    assert later.result(timeout=20) is True  # the writer is alive
    writer.close()
    assert log.get("c0") is not None  # a request that gave up is still audited
    refused = writer.submit(log.prepare(request_id="c2", action="predict", status=200))
    with pytest.raises(RuntimeError, match="stopped"):
        refused.result(timeout=5)
    log.close()


def test_group_commit_isolates_a_bad_row(db_url):
    from medlens.service.committer import GroupCommitter

    log = AuditLog(db_url)
    writer = GroupCommitter(log)
    good = log.prepare(request_id="ok-1", action="predict", status=200)
    bad = dict(log.prepare(request_id="bad-1", action="predict", status=200), status=None)  # NOT NULL
    futures = [writer.submit(good), writer.submit(bad), writer.submit(dict(good, request_id="ok-2"))]
    assert futures[0].result(timeout=20) is True and futures[2].result(timeout=20) is True
    with pytest.raises(Exception):  # noqa: B017 - the driver's integrity error, whichever database
        futures[1].result(timeout=20)
    writer.close()
    assert log.count() == 2 and log.get("bad-1") is None
    log.close()


def test_export_csv_round_trip(db_url, tmp_path):
    log = AuditLog(db_url, hash_key=KEY)
    t0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    _record(log, "a", time=t0, dicom={"Modality": "CR", "PatientID": "X1"})
    _record(log, "b", time=t0 + timedelta(seconds=1), status=400, output=None, latency_ms=None,
            error='bad "file",\nline two; é', input_sha256=None, user=None, role=None)
    _record(log, "c", time=t0 + timedelta(seconds=2), output={"probability": 0.25, "refer": True})
    out = tmp_path / "export" / "audit.csv"
    assert log.export_csv(out) == 3
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS
    records = log.list(newest_first=False)
    assert [r["request_id"] for r in rows] == ["a", "b", "c"]
    for row, rec in zip(rows, records, strict=True):
        assert int(row["id"]) == rec.id and row["time"] == rec.time and int(row["status"]) == rec.status
        for name in ("request_id", "user", "role", "action", "input_sha256", "model_id", "policy_hash",
                     "weights_sha256", "error"):
            assert row[name] == (getattr(rec, name) or "")
        assert (float(row["latency_ms"]) if row["latency_ms"] else None) == rec.latency_ms
        for name in ("dicom", "output"):
            assert (json.loads(row[name]) if row[name] else None) == getattr(rec, name)
    assert rows[1]["error"] == 'bad "file",\nline two; é'
    assert log.export_csv_text(since=t0 + timedelta(seconds=1)).count("\n") == 1 + 3  # header, b (2 lines), c
    log.close()


# ------------------------------------------------------------------------------------ de-identification


def _dicoms() -> list[Path]:
    files = sorted(require_shared("dicom").glob("*.dcm"))
    assert len(files) >= 4
    return files


def _phi(ds: pydicom.Dataset) -> list[str]:
    """Values from a real file that must never appear in clear."""
    values: list[str] = []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                    "SeriesInstanceUID", "SOPInstanceUID"):
        text = str(ds.get(keyword) or "").strip()
        if text:
            values.append(text)
        if keyword == "PatientName":
            values += [part for part in text.split("^") if len(part) >= 4]
    return values


def test_deidentify_keeps_technical_fields_and_hashes_identifiers():
    ds = pydicom.dcmread(next(p for p in _dicoms() if p.name == "RG1_J2KI.dcm"), stop_before_pixels=True)
    out = deidentify_dicom_fields(ds, KEY)
    assert out["Modality"] == "CR" and out["BodyPartExamined"] == "CHEST" and out["ViewPosition"] == "PA"
    assert out["StudyYear"] == "2004" and "StudyDate" not in out
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID"):
        assert out[keyword] == keyed_hash(keyword, str(ds.get(keyword)), KEY)
        assert out[keyword].startswith("hmac-sha256:") and len(out[keyword]) == len("hmac-sha256:") + 64
    assert "InstitutionName" not in out and "ReferringPhysicianName" not in out
    assert deidentify_dicom_fields(out, KEY) == out  # idempotent
    assert deidentify_dicom_fields(ds, KEY) == out  # stable: the same patient keeps the same pseudonym
    assert deidentify_dicom_fields(ds, b"another key, 16+ bytes")["PatientID"] != out["PatientID"]
    assert deidentify_dicom_fields({"PatientAge": "093Y"}, KEY) == {"PatientAge": "090Y+"}
    assert deidentify_dicom_fields({"patient_id": "9RG1", "modality": "CR"}, KEY) == {
        "Modality": "CR", "PatientID": keyed_hash("PatientID", "9RG1", KEY)}
    with pytest.raises(ValueError):
        deidentify_dicom_fields(ds, b"short")


def test_no_patient_identifier_reaches_the_database_file(tmp_path):
    from medlens.data.dicom import read_dicom

    db = tmp_path / "audit.db"
    log = AuditLog(f"sqlite:///{db}", hash_key=KEY)
    phi: list[str] = []
    for i, path in enumerate(_dicoms()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        phi += _phi(ds)
        # raw metadata handed to record() is de-identified there; so is a pre-processed dict
        _record(log, f"raw-{i}", dicom=dicom_fields(ds))
        _record(log, f"pre-{i}", dicom=deidentify_dicom_fields(ds, KEY))
    _, meta = read_dicom(next(p for p in _dicoms() if p.name == "CT_small.dcm"))
    _record(log, "read-dicom", dicom=meta)
    assert len(set(phi)) >= 15
    rec = log.get("raw-0")
    assert rec.dicom["PatientID"].startswith("hmac-sha256:") and rec.dicom["Modality"]
    assert log.get("read-dicom").dicom["PatientID"] == keyed_hash("PatientID", "1CT1", KEY)
    data = _db_bytes(db) + log.export_csv_text().encode()
    log.close()
    data += _db_bytes(db)  # after the last connection closed (WAL checkpointed into the file)
    for value in set(phi):
        for encoding in ("utf-8", "utf-16-le"):
            assert value.encode(encoding) not in data, f"{value!r} found in the audit database"


# ------------------------------------------------------------------------------------------------ settings


def test_settings_defaults_and_generated_key(tmp_path):
    run = tmp_path / "run"
    s = ServiceSettings.load(run, env={})
    assert s.database_url == f"sqlite:///{(run / 'audit.db').resolve()}"
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_image_pixels == 50_000_000
    assert s.cors_origins == () and s.rate_limit_per_minute > 0 and s.batch_max_size >= 1
    key_file = run / "audit.key"
    assert s.audit_key_file == key_file and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(s.audit_key) >= 32 and s.audit_key.decode() not in repr(s)
    assert "audit_key" not in s.public_dict()
    assert ServiceSettings.load(run, env={}).audit_key == s.audit_key  # stable across restarts


def test_generated_key_is_shared_by_racing_processes(tmp_path):
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(tmp_path / "k" / "audit.key")))
               for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["audit.key"]  # no temporary files left


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_settings_file_and_env_override(tmp_path, suffix):
    file = tmp_path / f"service{suffix}"
    if suffix == ".yaml":
        file.write_text("max_upload_bytes: 1000\ncors_origins: [https://pacs.example.org]\n"
                        "database_url: data/audit.db\nbatch_max_wait_ms: 2.5\n")
    else:
        file.write_text('max_upload_bytes = 1000\ncors_origins = ["https://pacs.example.org"]\n'
                        'database_url = "data/audit.db"\nbatch_max_wait_ms = 2.5\n')
    env = {"MEDLENS_SETTINGS": str(file), "MEDLENS_MAX_UPLOAD_BYTES": "2000", "MEDLENS_MAX_IMAGE_PIXELS": "1e6",
           "MEDLENS_AUDIT_KEY": "k" * 20, "MEDLENS_REQUEST_TIMEOUT_S": "7.5", "MEDLENS_DB_POOL_SIZE": "4"}
    s = ServiceSettings.load(tmp_path / "run", env=env)
    assert s.max_upload_bytes == 2000 and s.max_image_pixels == 1_000_000 and s.request_timeout_s == 7.5
    assert s.db_pool_size == 4
    assert s.cors_origins == ("https://pacs.example.org",) and s.batch_max_wait_ms == 2.5
    assert s.database_url == f"sqlite:///{(tmp_path / 'data' / 'audit.db').resolve()}"  # relative to the file
    assert s.audit_key == b"k" * 20 and s.audit_key_file is None
    assert not (tmp_path / "data" / "audit.key").exists()
    explicit = ServiceSettings.load(tmp_path / "run", database=tmp_path / "other.db", env=env)
    assert explicit.database_url.endswith("other.db")


def test_settings_errors_name_the_file_or_variable(tmp_path):
    file = tmp_path / "service.yaml"
    file.write_text("max_upload_bytes: 1000\nmax_uplod_bytes: 5\n")
    with pytest.raises(ConfigError, match=r"service\.yaml.*max_uplod_bytes"):
        ServiceSettings.load(tmp_path, env={"MEDLENS_SETTINGS": str(file)})
    with pytest.raises(ConfigError, match="MEDLENS_RATE_LIMIT_PER_MINUTE"):
        ServiceSettings.load(tmp_path, env={"MEDLENS_RATE_LIMIT_PER_MINUTE": "lots"})
    with pytest.raises(ConfigError, match="MEDLENS_DB_POOL_SIZE"):
        ServiceSettings.load(tmp_path, env={"MEDLENS_DB_POOL_SIZE": "0"})
    with pytest.raises(ConfigError, match="MEDLENS_CORS_ORIGINS"):
        ServiceSettings.load(tmp_path, env={"MEDLENS_CORS_ORIGINS": "pacs.example.org"})
    with pytest.raises(ConfigError, match="too short"):
        ServiceSettings.load(tmp_path, env={"MEDLENS_AUDIT_KEY": "short"})
    with pytest.raises(ConfigError, match="cannot be read"):
        read_settings_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="AUDIT_KEY"):  # PostgreSQL and no run dir: nowhere to keep a key
        ServiceSettings.load(env={"MEDLENS_DATABASE_URL": "postgresql://u@h/db"})
    pg = ServiceSettings.load(tmp_path / "run", env={"MEDLENS_DATABASE_URL": "postgresql://u:secret@h/db"})
    assert pg.audit_key_file == tmp_path / "run" / "audit.key"
    assert "secret" not in json.dumps(pg.public_dict())


def test_engine_url_errors():
    with pytest.raises(ConfigError, match="not valid"):
        create_engine("not a url ::")
    assert utc_iso("2024-05-01") == "2024-05-01T00:00:00.000000+00:00"
    with pytest.raises(ConfigError, match="ISO 8601"):
        utc_iso("yesterday")
