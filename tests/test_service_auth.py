"""API keys (SQLite and a real PostgreSQL server), roles, the rate limiter and the keys / audit commands."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import threading
from pathlib import Path

import pytest

from medlens.errors import ConfigError, DataError
from medlens.service.audit import AuditLog
from medlens.service.auth import ROLES, Identity, KeyStore, RateLimiter, role_allows
from medlens.service.commands import add_commands

pytest_plugins = ["service_pg"]  # fixtures db_url, pg_url, pg_server: one PostgreSQL server per session


def _db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


# ------------------------------------------------------------------------------------------------ keys


def test_keys_are_stored_only_as_hashes(tmp_path):
    db = tmp_path / "audit.db"
    store = KeyStore(f"sqlite:///{db}")
    plaintext = store.create("alice", "clinician")
    assert plaintext.startswith("mlk_") and len(plaintext) >= 4 + 43
    with store.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT key_hash FROM api_keys WHERE name = 'alice'").scalar()
    assert stored == hashlib.sha256(plaintext.encode()).hexdigest()
    secret = plaintext.encode()
    assert secret not in _db_bytes(db) and secret[4:] not in _db_bytes(db)
    store.close()
    assert secret[4:] not in _db_bytes(db)
    assert KeyStore(f"sqlite:///{db}").create("bob", "viewer") != plaintext  # random, not derived from the name


def test_verify_revoke_and_list(db_url):
    store = KeyStore(db_url)
    admin, viewer = store.create("admin-1", "admin"), store.create("ward.viewer@example.org", "viewer")
    assert store.verify(admin) == Identity("admin-1", "admin") == ("admin-1", "admin")
    assert store.verify(viewer) == ("ward.viewer@example.org", "viewer")
    tampered = admin[:-1] + ("A" if admin[-1] != "A" else "B")
    for bad in (tampered, admin[4:], "", None, "mlk_", "mlk_" + "x" * 1000, admin + " "):
        assert store.verify(bad) is None
    assert store.revoke("admin-1") is True
    assert store.verify(admin) is None and store.verify(viewer) is not None  # at once, and only that key
    assert store.revoke("admin-1") is False
    with pytest.raises(ConfigError, match="no API key named 'ghost'"):
        store.revoke("ghost")
    with pytest.raises(ConfigError, match="already exists"):  # names are never reused, even when revoked
        store.create("admin-1", "admin")
    listed = {k.name: k for k in store.list()}
    assert set(listed) == {"admin-1", "ward.viewer@example.org"}
    assert not listed["admin-1"].active and listed["admin-1"].revoked >= listed["admin-1"].created
    assert listed["ward.viewer@example.org"].active and listed["ward.viewer@example.org"].role == "viewer"
    assert store.get("admin-1").revoked and store.get("ghost") is None
    KeyStore(db_url).close()  # schema creation is idempotent
    store.close()


def test_postgresql_key_lookup_opens_no_transaction(pg_url):
    """Every request looks its key up: on PostgreSQL that is one SELECT in autocommit, so no transaction is open
    after it and none has to be rolled back (a ROLLBACK round trip a request), and the connection goes back to
    the pool in its normal mode for the audit writer."""
    from psycopg.pq import TransactionStatus
    from sqlalchemy import event

    store = KeyStore(pg_url)
    key = store.create("carol", "clinician")
    states = []
    event.listen(store.engine, "after_cursor_execute",  # after the SELECT: is a transaction open on the server?
                 lambda conn, *_: states.append(conn.connection.driver_connection.info.transaction_status))
    for _ in range(3):
        assert store.verify(key) == Identity("carol", "clinician")
    assert states and all(s == TransactionStatus.IDLE for s in states), states
    raw = store.engine.raw_connection()
    assert raw.driver_connection.autocommit is False
    raw.close()
    store.close()


def test_a_burst_of_connections_is_kept_for_the_next_one(db_url):
    """A loaded server process has more than SQLAlchemy's default 5 key lookups and audit commits in flight: the
    pool keeps the connections of a burst of 12 open for the next burst instead of closing all but 5 and opening
    them again (PostgreSQL forks a backend for each new connection)."""
    from sqlalchemy import event

    store = KeyStore(db_url)
    key = store.create("dave", "clinician")
    connects = []
    event.listen(store.engine, "connect", lambda *_: connects.append(1))
    for _ in range(3):  # three bursts of 12 connections held at once, as 12 requests in flight hold them
        held = [store.engine.connect() for _ in range(12)]
        for conn in held:
            conn.close()
        assert store.verify(key) == Identity("dave", "clinician")
    assert len(connects) <= 12, f"{len(connects)} connections opened for bursts of 12"
    store.close()


def test_keys_and_audit_share_one_database(db_url):
    log = AuditLog(db_url)
    store = KeyStore(log.engine)
    key = store.create("alice", "clinician")
    who = store.verify(key)
    log.record(request_id="r1", action="predict", status=200, user=who.name, role=who.role)
    assert KeyStore(db_url).verify(key) == ("alice", "clinician") and log.get("r1").user == "alice"
    log.close()


@pytest.mark.parametrize(("name", "role"), [("", "admin"), ("has space", "admin"), ("x" * 65, "admin"),
                                            ("-lead", "admin"), ("ok", "superuser"), ("ok", "Admin")])
def test_bad_names_and_roles(tmp_path, name, role):
    with pytest.raises(ConfigError):
        KeyStore(f"sqlite:///{tmp_path / 'a.db'}").create(name, role)


def test_role_ordering():
    assert ROLES == ("viewer", "clinician", "admin")
    for i, role in enumerate(ROLES):
        for j, required in enumerate(ROLES):
            assert role_allows(role, required) is (i >= j)
    assert not role_allows(None, "viewer") and not role_allows("root", "viewer")
    with pytest.raises(ValueError):
        role_allows("admin", "root")


# ----------------------------------------------------------------------------------------- rate limiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_token_bucket():
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock)  # 6 a minute: one token every 10 s, bursts of 6
    assert [limiter.allow("a")[0] for _ in range(6)] == [True] * 6
    ok, retry = limiter.allow("a")
    assert not ok and retry == pytest.approx(10.0)
    assert limiter.allow("b") == (True, 0.0)  # keys are independent
    clock.now += 4
    ok, retry = limiter.allow("a")
    assert not ok and retry == pytest.approx(6.0)
    clock.now += 6
    assert limiter.allow("a") == (True, 0.0)
    assert not limiter.allow("a")[0]
    clock.now += 3600  # refills, but never beyond the burst
    assert sum(limiter.allow("a")[0] for _ in range(10)) == 6
    assert all(RateLimiter(0).allow("x")[0] for _ in range(1000))  # 0 = no limit
    burst = RateLimiter(60, burst=2, clock=clock)
    assert [burst.allow("k")[0] for _ in range(3)] == [True, True, False]


def test_rate_limiter_is_thread_safe_and_bounded():
    clock = FakeClock()
    limiter = RateLimiter(100, clock=clock, max_keys=10)
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = [limiter.allow("shared")[0] for _ in range(50)]
        with lock:
            allowed.extend(mine)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(allowed) == 400 and sum(allowed) == 100  # exactly the bucket, no lost updates
    for i in range(50):
        limiter.allow(f"client-{i}")
    clock.now += 3600  # every bucket full again: forgotten when the table grows
    limiter.allow("late")
    assert len(limiter._buckets) <= 11


# --------------------------------------------------------------------------------------------- commands


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medlens")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_keys_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDLENS_SETTINGS", raising=False)
    monkeypatch.delenv("MEDLENS_DATABASE_URL", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    assert _cli(["keys", "create", "alice", "--role", "clinician", "--db", str(run)]) == 0  # a run dir
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("mlk_") and "cannot be shown again" in err and key not in err
    assert KeyStore(f"sqlite:///{run / 'audit.db'}").verify(key) == ("alice", "clinician")

    monkeypatch.setenv("MEDLENS_DATABASE_URL", str(run / "audit.db"))  # the default database: the settings
    assert _cli(["keys", "create", "bob", "--role", "admin"]) == 0
    capsys.readouterr()
    assert _cli(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert "alice" in out and "clinician" in out and "bob" in out and key not in out
    assert _cli(["keys", "revoke", "alice"]) == 0
    assert "revoked" in capsys.readouterr().err
    assert _cli(["keys", "list", "--json"]) == 0
    listed = {d["name"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed["alice"]["revoked"] and listed["bob"]["revoked"] is None and listed["bob"]["role"] == "admin"
    with pytest.raises(ConfigError, match="already exists"):
        _cli(["keys", "create", "alice", "--role", "viewer"])
    with pytest.raises(ConfigError, match="ghost"):
        _cli(["keys", "revoke", "ghost"])
    with pytest.raises(DataError, match="no audit database"):  # a typo does not create an empty database
        _cli(["keys", "list", "--db", str(tmp_path / "typo.db")])
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(SystemExit):
        _cli(["keys", "create", "carol", "--role", "superuser"])
    monkeypatch.delenv("MEDLENS_DATABASE_URL")
    with pytest.raises(ConfigError, match="no database"):
        _cli(["keys", "list"])


def test_audit_export_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(url)
    log.record(request_id="old", action="predict", status=200, time="2023-12-31T23:59:59+00:00")
    log.record(request_id="new", action="predict", status=200, output={"probability": 0.5},
               time="2024-06-01T00:00:00+00:00")
    log.close()
    out = tmp_path / "exports" / "audit.csv"
    assert _cli(["audit", "export", "--out", str(out), "--db", url]) == 0
    assert "wrote 2 audit rows" in capsys.readouterr().err
    with out.open(newline="") as fh:
        assert [r["request_id"] for r in csv.DictReader(fh)] == ["old", "new"]
    assert _cli(["audit", "export", "--out", "-", "--db", url, "--since", "2024-01-01"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["request_id"] for r in rows] == ["new"] and json.loads(rows[0]["output"]) == {"probability": 0.5}
    with pytest.raises(ConfigError, match="ISO 8601"):
        _cli(["audit", "export", "--out", "-", "--db", url, "--since", "last week"])
    with pytest.raises(DataError, match="no audit database"):
        _cli(["audit", "export", "--out", str(out), "--db", str(tmp_path / "nope.db")])
