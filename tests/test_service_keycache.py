"""The PostgreSQL key cache (medlens.service.keycache), on a real server: a verified key is looked up once, and
forgotten as soon as the api_keys table changes in any way (revocation by medlens or by hand, another process),
when the listener's connection is lost, when a change races the lookup, and after MAX_AGE_S in any case."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
import sqlalchemy as sa

from medlens.service.auth import Identity, KeyStore
from medlens.service.keycache import MAX_AGE_S, KeyCache

pytest_plugins = ["service_pg"]  # fixtures pg_url, pg_server: one PostgreSQL server per session

ACTIVE_TIMEOUT_S = 10.0


def _count_lookups(store: KeyStore) -> list[str]:
    """The key lookups ``store`` sends to the database from now on (one list item each)."""
    seen: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: seen.append(statement) if "FROM api_keys" in statement else None)
    return seen


def _until(predicate, timeout: float = 2.0) -> float:
    """Seconds until ``predicate()`` holds (polled every millisecond); fails after ``timeout``."""
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout, f"not within {timeout} s"
        time.sleep(0.001)
    return time.perf_counter() - start


def _create(cached: KeyStore, other: KeyStore, name: str) -> str:
    """A key made by the other store, once the cache has heard of it (the INSERT's notification arrives a moment
    after the commit and empties the cache: a test must not count that as a miss of its own)."""
    before = cached.cache.generation
    key = other.create(name, "clinician")
    _until(lambda: cached.cache.generation != before)
    return key


@pytest.fixture
def stores(pg_url):
    """(the service's store, with the cache; another process's store, as `medlens keys` uses)."""
    other = KeyStore(pg_url)
    cached = KeyStore(pg_url, quick=True)
    assert cached.cache is not None and cached.cache.wait_active(ACTIVE_TIMEOUT_S), "the listener did not start"
    yield cached, other
    cached.close()
    other.close()


def test_a_verified_key_is_looked_up_once(stores):
    cached, other = stores
    key = _create(cached, other, "kc-once")
    lookups = _count_lookups(cached)
    assert cached.quick(key) == (False, None)  # not verified yet: the request's dependency calls verify
    for _ in range(5):
        assert cached.verify(key) == Identity("kc-once", "clinician")
    assert cached.quick(key) == (True, Identity("kc-once", "clinician"))  # on the event loop, no lookup
    assert len(lookups) == 1
    for _ in range(3):  # unknown keys are never cached (a flood of random keys cannot fill memory)
        assert cached.verify("mlk_not-a-key") is None
    assert len(lookups) == 4


@pytest.mark.parametrize("how", ["revoke", "sql-update", "sql-delete", "replica-mode"])
def test_a_change_by_anyone_is_seen_at_once(stores, how):
    """Revoked by `medlens keys revoke` in another process, by hand in SQL, or in replica mode: refused within
    milliseconds (the notification), not after the cache's MAX_AGE_S."""
    cached, other = stores
    key = _create(cached, other, f"kc-{how}")
    assert cached.verify(key) is not None and cached.verify(key) is not None  # cached now
    if how == "revoke":
        assert other.revoke(f"kc-{how}") is True
    elif how == "replica-mode":  # as logical replication and pg_restore --disable-triggers write: ENABLE ALWAYS
        with other.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            conn.exec_driver_sql(f"UPDATE api_keys SET revoked = 'now' WHERE name = 'kc-{how}'")
    else:
        with other.engine.begin() as conn:
            sql = "UPDATE api_keys SET revoked = 'now'" if how == "sql-update" else "DELETE FROM api_keys"
            conn.exec_driver_sql(f"{sql} WHERE name = 'kc-{how}'")
    took = _until(lambda: not cached.quick(key)[0] and cached.verify(key) is None, timeout=MAX_AGE_S / 2)
    print(f"{how}: refused {took * 1000:.1f} ms after the commit")
    assert cached.verify(key) is None


def test_a_lost_listener_turns_the_cache_off_until_it_is_back(stores):
    cached, other = stores
    key = _create(cached, other, "kc-lost")
    assert cached.verify(key) is not None
    with other.engine.connect() as conn:  # the database drops the listener's connection
        killed = conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND query LIKE 'LISTEN %'")).all()
    assert killed == [(True,)]
    _until(lambda: not cached.cache.active)
    assert cached.quick(key) == (False, None)  # nobody listens: nothing is answered from memory
    lookups = _count_lookups(cached)
    other.revoke("kc-lost")  # while nobody listens: must not be missed
    assert cached.verify(key) is None
    fresh = other.create("kc-back", "clinician")  # no listener: no notification
    assert cached.cache.wait_active(ACTIVE_TIMEOUT_S), "the listener did not reconnect"
    assert cached.verify(key) is None
    for _ in range(3):
        assert cached.verify(fresh) == Identity("kc-back", "clinician")
    assert len(lookups) == 3, lookups  # the revoked key (twice: never cached), the new key once


def test_a_revocation_during_the_lookup_is_not_cached(stores):
    """The lookup read the key while it was valid; the revocation commits (and its notification arrives) before
    the result is stored: this request may pass (it was checked before the revocation), the next must not."""
    cached, other = stores
    key = _create(cached, other, "kc-race")
    generation = cached.cache.generation
    raced = []

    def revoke_during_lookup(*_):
        if not raced:
            raced.append(other.revoke("kc-race"))
            _until(lambda: cached.cache.generation != generation)  # the notification has arrived

    sa.event.listen(cached.engine, "after_cursor_execute", revoke_during_lookup)
    assert cached.verify(key) == Identity("kc-race", "clinician") and raced == [True]
    assert cached.verify(key) is None


def test_entries_expire_and_need_the_trigger(pg_url):
    now = [0.0]
    store = KeyStore(pg_url)
    key = store.create("kc-age", "clinician")
    cache = KeyCache(store.engine, clock=lambda: now[0])
    try:
        assert cache.wait_active(ACTIVE_TIMEOUT_S)
        cache.put("digest", Identity("kc-age", "clinician"), cache.generation)
        now[0] += cache.max_age_s - 0.1
        assert cache.get("digest") == Identity("kc-age", "clinician")
        now[0] += 0.2
        assert cache.get("digest") is None  # older than MAX_AGE_S: looked up again, notification or not
    finally:
        cache.close()
    with store.engine.begin() as conn:  # a database without the trigger (its owner did not let medlens make it)
        conn.exec_driver_sql("DROP TRIGGER api_keys_notify_change ON api_keys")
    cache = KeyCache(store.engine)
    try:
        assert not cache.wait_active(1.0), "cached with nothing to say when the table changes"
        cache.put("digest", Identity("kc-age", "clinician"), cache.generation)
        assert cache.get("digest") is None
    finally:
        cache.close()
    assert store.verify(key) is not None  # without the cache: looked up
    store.close()




def test_a_trigger_disabled_while_listening_turns_the_cache_off(stores):
    cached, other = stores
    with other.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT tgenabled FROM pg_trigger WHERE tgname = 'api_keys_notify_change'"
                                    ).scalar() == "A"  # ALWAYS: also in replica mode
    with other.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE api_keys DISABLE TRIGGER api_keys_notify_change")
    took = _until(lambda: not cached.cache.active, timeout=5.0)
    print(f"cache off {took:.2f} s after the trigger was disabled")
    key = other.create("kc-disabled", "clinician")  # no notification now
    assert cached.verify(key) is not None and cached.quick(key) == (False, None)  # looked up every time


def test_a_role_that_may_not_create_the_trigger_starts_without_the_cache(pg_server):
    """A database from before the trigger, opened by a service role that does not own api_keys (SELECT, INSERT,
    UPDATE only): it starts, looks every key up, and says why (the owner's next start creates the trigger)."""
    import psycopg

    owner_url = pg_server.create_database()
    owner = KeyStore(owner_url)
    key = owner.create("kc-role", "clinician")
    with owner.engine.begin() as conn:  # as a database made before the trigger existed
        conn.exec_driver_sql("DROP TRIGGER api_keys_notify_change ON api_keys")
    role = "app_" + os.urandom(4).hex()
    url = sa.engine.make_url(owner_url)
    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user=url.username, dbname=url.database,
                         autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON api_keys TO {role}")
    app = KeyStore(url.set(username=role).render_as_string(hide_password=False), quick=True)
    try:
        assert not app.cache.wait_active(1.0)
        for _ in range(2):
            assert app.verify(key) == Identity("kc-role", "clinician") and app.quick(key) == (False, None)
    finally:
        app.close()
    KeyStore(owner_url).close()  # the owner's start creates it
    with owner.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT tgenabled FROM pg_trigger WHERE tgname = 'api_keys_notify_change'"
                                    ).scalar() == "A"
    owner.close()


# --------------------------------------------------------------------------------------------- SQLite


def test_sqlite_answers_on_the_calling_thread_and_sees_a_revocation_at_once(tmp_path):
    """SQLite: quick() is one read on the caller's own connection (no SQLAlchemy statement, no thread), of the
    latest commit: a key revoked by another process is refused by the next call, nothing is cached."""
    db = tmp_path / "audit.db"
    store, other = KeyStore(f"sqlite:///{db}", quick=True), KeyStore(f"sqlite:///{db}")
    key = other.create("kc-sqlite", "clinician")
    lookups = _count_lookups(store)
    assert store.quick(key) == (True, Identity("kc-sqlite", "clinician"))
    assert store.quick("mlk_not-a-key") == (True, None) and store.quick("not ours") == (True, None)
    other.revoke("kc-sqlite")
    assert store.quick(key) == (True, None)
    assert lookups == []  # none through SQLAlchemy's engine
    other.create("kc-sqlite-2", "clinician")
    with sqlite3.connect(db) as conn:  # no read stays open after a lookup: a checkpoint can empty the WAL
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert (db.parent / "audit.db-wal").stat().st_size == 0
    store.close()
    other.close()


def test_sqlite_that_cannot_answer_at_once_falls_back_to_verify(tmp_path):
    """A locked database answers BUSY at once (the event loop never waits on SQLite's busy handler), and any
    error of the reader sends the caller to verify() on a worker thread."""
    from medlens.service.keycache import SqliteKeyReader

    locked = tmp_path / "locked.db"  # a rollback-journal database held exclusively: no reader gets in
    with sqlite3.connect(locked) as conn:
        conn.execute("CREATE TABLE api_keys (name TEXT, role TEXT, key_hash TEXT, revoked TEXT)")
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    reader = SqliteKeyReader(locked)
    started = time.perf_counter()
    assert reader.row("0" * 64) is SqliteKeyReader.BUSY
    assert time.perf_counter() - started < 0.5
    holder.execute("ROLLBACK")
    assert reader.row("0" * 64) is None  # unlocked: no such key
    reader.close()
    holder.close()

    db = tmp_path / "audit.db"
    store = KeyStore(f"sqlite:///{db}", quick=True)
    key = store.create("kc-busy", "clinician")
    assert store.quick(key) == (True, Identity("kc-busy", "clinician"))
    store.reader.uri = (tmp_path / "missing.db").as_uri() + "?mode=ro"  # a reader that cannot open its database
    store.reader._local.conn = None
    assert store.quick(key) == (False, None)
    assert store.verify(key) == Identity("kc-busy", "clinician")
    assert KeyStore(f"sqlite:///{tmp_path / 'other.db'}").reader is None  # without quick=True: no reader
    store.close()
