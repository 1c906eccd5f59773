"""Database plumbing shared by the audit trail and the API keys: engines, schema creation, write transactions.

SQLite (the embedded default) and PostgreSQL are supported. :func:`create_engine` sets SQLite up for a durable,
concurrent audit trail: WAL mode, ``synchronous=FULL`` (a commit fsyncs the WAL, so an acknowledged row survives
``kill -9`` and a power cut), a 30 s busy timeout, and ``BEGIN IMMEDIATE`` for write transactions (see
:func:`write_transaction`). PostgreSQL commits durably by default (``synchronous_commit=on``).

:func:`create_tables` creates missing tables, indexes, append-only triggers and (PostgreSQL) change-notification
triggers, and adds nullable columns that a
newer medlens defines but an existing database lacks (``ALTER TABLE ... ADD COLUMN``, only for a column found
missing; see :func:`add_missing_columns`), so a database written by an older version keeps working. It never
drops or changes a column.
"""

from __future__ import annotations

import logging
import os
import stat
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from medlens.errors import ConfigError

log = logging.getLogger(__name__)
_OUR_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines made by create_engine (pragmas attached)
_WRITE = "medlens_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_SCHEMA_LOCK = 0x6D6C656E  # PostgreSQL advisory lock id serialising schema creation ("mlen")
#: the type of an auto-incrementing row id: BIGINT, but INTEGER on SQLite (INTEGER PRIMARY KEY = the rowid)
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
BUSY_TIMEOUT_MS = 30_000  # SQLite: how long a connection waits for a lock held by another
#: database connections a server process keeps open (as many again may be opened for a burst)
POOL_SIZE = 16


def create_engine(url: str, *, pool_size: int = POOL_SIZE) -> Engine:
    """A SQLAlchemy engine for a database URL, set up for the audit trail.

    ``postgresql://`` / ``postgres://`` URLs use psycopg 3. SQLite files get WAL + ``synchronous=FULL`` + a
    30 s busy timeout on every connection, and write transactions start with ``BEGIN IMMEDIATE`` (the write
    lock is taken up front, so concurrent writers queue instead of failing with "database is locked").
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"database URL '{url}' is not valid ({exc})",
                          hint="use sqlite:////absolute/path/audit.db or postgresql://user@host/dbname") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    db_file = sqlite_file(parsed)
    if backend == "sqlite":
        if db_file is not None:
            create_private_file(db_file)
        kwargs["connect_args"] = {"timeout": 30}
    if backend == "postgresql" or (backend == "sqlite" and parsed.database and parsed.database != ":memory:"):
        # Keep pool_size connections open (the service: the db_pool_size setting). SQLAlchemy's default pool keeps 5 and closes every connection beyond
        # them as soon as it is returned; a server process under load has more than 5 key lookups and audit
        # commits in flight, so it opened and closed connections over and over (PostgreSQL forks a backend for
        # each new one; SQLite runs its PRAGMAs again). Test: bursts of 12 open 25 connections with the default.
        kwargs.update(pool_size=pool_size, max_overflow=pool_size)
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:  # psycopg missing, or an unknown dialect
        raise ConfigError(f"database URL '{parsed.render_as_string()}': driver not installed ({exc})",
                          hint="pip install 'medlens[service]'") from exc
    if backend == "postgresql":
        dialect = engine.dialect
        event.listen(engine, "checkout", lambda conn, record, _proxy: _ping_if_idle(dialect, conn, record))
        event.listen(engine, "checkin", _mark_used)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        if db_file is not None:
            _WRITER_LOCKS[engine] = WriterLock(db_file.with_name(db_file.name + WriterLock.SUFFIX))
    _OUR_ENGINES.add(engine)
    return engine


def sqlite_file(url: sa.engine.URL) -> Path | None:
    """The file of a SQLite database URL; None for other databases, in-memory and ``file:`` URI databases."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


class WriterLock:
    """Queues the write transactions of every medlens process on one SQLite file (``--workers N``, the DICOM
    node) on an advisory lock file beside it, so a writer waits in a short poll instead of in SQLite's busy
    handler.

    Why by hand: SQLite answers a second writer "busy", and its default busy handler then sleeps 1, 2, 5, 10,
    15, 20, 25 ... ms before it looks again. Under load two worker processes committing the audit trail in turns
    (a commit holds the lock for ~0.5 ms: the WAL append and its fsync) spent their p90 BEGIN IMMEDIATE 3-4 ms
    and p99 10-19 ms asleep while the lock had long been free, with requests waiting on those commits. Python's
    sqlite3 module cannot install another busy handler. Here a writer polls ``flock`` at 50 us doubling to 1 ms,
    so it starts within ~1 ms of the lock's release. SQLite's own locking stays the authority: the lock file
    only orders medlens's writers, any other writer still meets the busy timeout, and without ``fcntl`` (not
    POSIX) or ``flock`` the transaction simply goes on to SQLite's lock. A lock held past the timeout fails the
    transaction as "database is locked", as SQLite's busy timeout does. Not re-entrant (nor is SQLite's write
    lock across connections): one write transaction at a time per thread.
    A separate file, not the database: on network file systems ``flock`` is emulated with the byte-range locks
    SQLite itself takes on the database file.
    """

    SUFFIX = "-writer.lock"

    def __init__(self, path: Path):
        import threading

        self.path = path
        self._fd: int | None = None
        self._mutex = threading.Lock()  # flock is per open file: threads of one process queue here first

    def _open(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:  # a read-only folder: go without, SQLite still locks
                return None
        return self._fd

    @contextmanager
    def hold(self, timeout_s: float) -> Iterator[None]:
        """Hold the lock for the block, or go on without it where it cannot be taken (no ``fcntl``, no
        ``flock``, no lock file). Another medlens writer holding it past ``timeout_s`` raises SQLAlchemy's
        ``OperationalError`` ("database is locked"), as SQLite's busy timeout would have: the wait stays bounded
        by the one timeout."""
        import time

        deadline = time.monotonic() + timeout_s
        if not self._mutex.acquire(timeout=max(0.0, timeout_s)):
            raise self._locked(timeout_s)
        try:
            try:
                import fcntl
            except ImportError:
                fcntl = None
            fd = self._open() if fcntl is not None else None
            held, delay = False, 50e-6
            while fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._locked(timeout_s) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 1e-3)
                except OSError:  # a file system without flock
                    break
            try:
                yield
            finally:
                if held:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _locked(self, timeout_s: float) -> sa.exc.OperationalError:
        import sqlite3

        return sa.exc.OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError(
            f"database is locked (another medlens writer held {self.path.name} for over {timeout_s:g} s)"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


#: the writer lock of each SQLite file engine made by create_engine
_WRITER_LOCKS: weakref.WeakKeyDictionary[Engine, WriterLock] = weakref.WeakKeyDictionary()


def create_private_file(path: Path) -> None:
    """Create the SQLite file empty with mode 0600 (its folder 0700) before SQLite opens it, so the audit trail is
    never readable by other users: SQLite gives its -wal and -shm files the database file's mode. An existing
    file is left as it is, with a warning if others can read it."""
    from medlens.service.settings import private_folder

    private_folder(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("audit database %s can be read by other users (mode %o): chmod 600 it", path,
                        stat.S_IMODE(mode))
    except OSError:  # a read-only folder, say: SQLite reports it with its own message when it opens the file
        pass


#: a pooled PostgreSQL connection idle for longer than this is pinged before it is handed out
IDLE_PING_S = 1.0


def _ping_if_idle(dialect: Any, dbapi_conn: Any, record: Any) -> None:
    """Pool checkout (PostgreSQL): ping a connection that has been idle for over :data:`IDLE_PING_S`; a dead one
    (the server restarted, a proxy dropped it) raises ``DisconnectionError``, and the pool replaces it.

    Why not SQLAlchemy's ``pool_pre_ping``: it pings at *every* checkout, a network round trip before each key
    lookup and each audit group, ~1 extra round trip a request under load on connections that were used
    milliseconds ago. A server restart takes seconds, so the connections it drops have been idle by then."""
    import time

    if time.monotonic() - record.info.get("medlens_used", 0.0) <= IDLE_PING_S:
        return
    try:
        alive = dialect.do_ping(dbapi_conn)
    except Exception as exc:  # noqa: BLE001 - any failure of the ping means this connection is unusable
        raise sa.exc.DisconnectionError(f"stale database connection ({type(exc).__name__})") from exc
    if alive is False:
        raise sa.exc.DisconnectionError("stale database connection")


def _mark_used(_dbapi_conn: Any, record: Any) -> None:
    import time

    if record is not None:
        record.info["medlens_used"] = time.monotonic()


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN is turned off (isolation_level None) so that _sqlite_begin decides how
    # each transaction starts, and DDL runs inside transactions too (SQLAlchemy's documented pysqlite recipe).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: durable across power loss
    finally:
        cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def engine_for(target: str | Engine) -> tuple[Engine, bool]:
    """(engine, owned): a new engine for a URL (owned: dispose it when done) or the engine given."""
    if isinstance(target, Engine):
        if target.dialect.name == "sqlite" and target not in _OUR_ENGINES:
            raise ValueError("a SQLite engine must come from medlens.service.db.create_engine "
                             "(it sets WAL, synchronous=FULL and BEGIN IMMEDIATE)")
        return target, False
    return create_engine(target), True


@contextmanager
def write_transaction(engine: Engine, *, lock_timeout_s: float | None = None) -> Iterator[Connection]:
    """A connection in a write transaction: committed when the block ends, rolled back if it raises.

    ``lock_timeout_s``: wait at most this long for a lock (SQLite's busy timeout, PostgreSQL's ``lock_timeout``
    and ``statement_timeout``) instead of the engine's 30 s, for a probe that must answer quickly (``/readyz``).
    """
    lock = _WRITER_LOCKS.get(engine)
    with (lock.hold(BUSY_TIMEOUT_MS / 1000 if lock_timeout_s is None else lock_timeout_s) if lock is not None
          else nullcontext()), engine.connect() as conn:
        conn.execution_options(**{_WRITE: True})
        sqlite = conn.dialect.name == "sqlite" and lock_timeout_s is not None
        if sqlite:  # set on the driver's connection, outside any transaction, and put back after
            conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={max(1, round(lock_timeout_s * 1000))}")
        try:
            with conn.begin():
                if lock_timeout_s is not None and conn.dialect.name == "postgresql":
                    ms = max(1, round(lock_timeout_s * 1000))
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                yield conn
        finally:
            if sqlite:
                try:
                    conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                except Exception:  # noqa: BLE001 - never pool a connection left with the short timeout
                    conn.invalidate()


def create_append_only_triggers(conn: Connection, table: str) -> None:
    """Triggers that make the database itself refuse UPDATE / DELETE (and TRUNCATE) on ``table``."""
    if conn.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'medlens: table {table} is append-only: {op} refused'); END"
            )
    elif conn.dialect.name == "postgresql":
        # Only what is missing is created: creating (or replacing) needs the owner's privileges, and a service
        # role with INSERT and SELECT only must still be able to start on a database that has everything.
        triggers = {
            f"{table}_no_update_delete": f"BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW",
            f"{table}_no_truncate": f"BEFORE TRUNCATE ON {table} FOR EACH STATEMENT",
        }
        missing = [name for name in triggers if conn.execute(
            sa.text("SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = to_regclass(:table)"),
            {"name": name, "table": table},
        ).first() is None]
        if missing and conn.execute(sa.text("SELECT to_regprocedure('medlens_refuse_change()')")).scalar() is None:
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION medlens_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN RAISE EXCEPTION USING MESSAGE = "  # no % placeholders: psycopg would read them as its own
                "'medlens: table ' || TG_TABLE_NAME || ' is append-only: ' || TG_OP || ' refused'; END $$"
            )
        for name in missing:
            conn.exec_driver_sql(f"CREATE TRIGGER {name} {triggers[name]} EXECUTE FUNCTION medlens_refuse_change()")
    else:
        raise ConfigError(f"database '{conn.dialect.name}' is not supported for the audit trail",
                          hint="use SQLite or PostgreSQL")


def notify_channel(table: str) -> str:
    """The PostgreSQL NOTIFY channel on which :func:`create_notify_trigger` announces changes to ``table``."""
    return f"medlens_{table}_changed"


def notify_trigger_state(conn: Connection, table: str) -> str | None:
    """``pg_trigger.tgenabled`` of ``table``'s trigger from :func:`create_notify_trigger` (PostgreSQL): ``"A"``
    (fires always, also for changes made in replica mode), ``"O"`` / ``"R"`` (only in one mode), ``"D"``
    (disabled); None if there is none."""
    return conn.execute(sa.text("SELECT tgenabled FROM pg_trigger WHERE tgname = :name AND tgrelid = "
                                "to_regclass(:table)"), {"name": f"{table}_notify_change", "table": table}).scalar()


def create_notify_trigger(conn: Connection, table: str) -> None:
    """PostgreSQL: a trigger that sends ``NOTIFY`` on :func:`notify_channel` after any statement that changes
    ``table`` (INSERT, UPDATE, DELETE, TRUNCATE; by medlens or by hand), enabled ALWAYS so that changes made in
    replica mode (logical replication, ``pg_restore --disable-triggers``) notify too. Notifications are delivered
    when the transaction commits, and not at all if it rolls back. Created only if missing (see
    :func:`create_append_only_triggers`); a role that may not create it (not the table's owner) starts without it,
    and whoever listens must then not cache (see :mod:`medlens.service.keycache`)."""
    if conn.dialect.name != "postgresql" or notify_trigger_state(conn, table) is not None:
        return
    try:
        with conn.begin_nested():  # a savepoint: a refusal must not abort the schema transaction
            if conn.execute(sa.text("SELECT to_regprocedure('medlens_notify_change()')")).scalar() is None:
                conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION medlens_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN PERFORM pg_notify(TG_ARGV[0], TG_OP); RETURN NULL; END $$"  # the channel: an argument
                )
            conn.exec_driver_sql(f"CREATE TRIGGER {table}_notify_change AFTER INSERT OR UPDATE OR DELETE OR "
                                 f"TRUNCATE ON {table} FOR EACH STATEMENT "
                                 f"EXECUTE FUNCTION medlens_notify_change('{notify_channel(table)}')")
            conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_notify_change")
    except sa.exc.DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _PG_INSUFFICIENT_PRIVILEGE:
            raise
        log.info("no change trigger on %s: this role may not create it (%s); the table's owner creates it when "
                 "medlens starts with the owner's role", table, str(exc.orig).strip().splitlines()[0])


def create_tables(engine: Engine, *tables: sa.Table, append_only: tuple[str, ...] = (),
                  notify: tuple[str, ...] = ()) -> None:
    """Create ``tables`` (and their indexes and triggers) if missing, and add the nullable columns an older
    database lacks (:func:`add_missing_columns`); safe to run from many processes at once.

    The database is inspected first and only what is missing is created: on PostgreSQL even ``CREATE ... IF NOT
    EXISTS`` needs the privilege to create (and ``CREATE INDEX`` the table's ownership), so a service role with
    INSERT and SELECT only can start on a database that is up to date, and fails with a clear error (see
    :func:`add_missing_columns`) on one that the owner role has to upgrade first."""
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":  # concurrent CREATE ... IF NOT EXISTS can still collide
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        for table in tables:
            if sa.inspect(conn).has_table(table.name):
                add_missing_columns(conn, table)
            else:
                conn.execute(CreateTable(table, if_not_exists=True))
            indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in indexes:
                    conn.execute(CreateIndex(index, if_not_exists=True))
        for name in append_only:
            create_append_only_triggers(conn, name)
        for name in notify:
            create_notify_trigger(conn, name)


#: how long an ``ALTER TABLE`` waits for its lock on PostgreSQL before it gives up (it needs an exclusive lock,
#: and while it waits every other query on the table queues behind it)
ALTER_LOCK_TIMEOUT = "5s"
_PG_INSUFFICIENT_PRIVILEGE = "42501"  # SQLSTATE: e.g. "must be owner of table audit"
_PG_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE: lock_timeout expired


def add_missing_columns(conn: Connection, table: sa.Table) -> list[str]:
    """Add ``table``'s columns that the database's table lacks (a database from an older medlens); their names.

    The table is inspected first and ``ALTER TABLE`` runs only for a column that is missing (an up-to-date
    table is never altered, so no ALTER lock is taken on it). Only nullable columns without a server
    default can be added this way (rows already there get NULL); a missing column that is NOT NULL is a
    ConfigError (that needs a real migration). Added columns go at the end of the table, which is why new
    columns are defined last in the table too: a new and a migrated database have the same column order.

    On PostgreSQL the ALTER waits at most :data:`ALTER_LOCK_TIMEOUT` for its lock (``SET LOCAL lock_timeout``):
    a long transaction on the table makes the start fail with a ConfigError instead of stalling every query
    queued behind the ALTER. A role that may not alter the table (not its owner) gets a ConfigError naming the
    column: the owner role has to start medlens once (or run the ALTER) to add it.
    """
    present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    missing = [column for column in table.columns if column.name not in present]
    for column in missing:
        if not column.nullable or column.primary_key:
            raise ConfigError(f"the '{table.name}' table in this database has no column '{column.name}', which "
                              "cannot be added automatically (NOT NULL)",
                              hint="migrate the database, or start the service on a new one")
    if not missing:
        return []
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{ALTER_LOCK_TIMEOUT}'")
    quote = conn.dialect.identifier_preparer.quote
    added = []
    for column in missing:
        sql = f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {column.type.compile(conn.dialect)}"
        try:
            conn.exec_driver_sql(sql)
        except sa.exc.DBAPIError as exc:
            error = _alter_error(exc, table.name, column.name, sql, conn)
            if error is None:
                raise
            raise error from exc
        added.append(column.name)
    if postgres:
        conn.exec_driver_sql("SET LOCAL lock_timeout = DEFAULT")  # the rest of the transaction as before
    return added


def _alter_error(exc: sa.exc.DBAPIError, table: str, column: str, sql: str, conn: Connection) -> ConfigError | None:
    """The ConfigError for a failed ``ALTER TABLE ... ADD COLUMN`` when the role lacks the privilege or the lock
    was not had in time; None for any other failure (the database's own error is raised)."""
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
    role = conn.engine.url.username or "this role"
    if state == _PG_INSUFFICIENT_PRIVILEGE:
        return ConfigError(
            f"the audit database needs one start by the owner role of table '{table}' to add column '{column}' "
            f"(this medlens version writes it; {role} may not alter the table: {detail})",
            hint=f"start medlens once with the owner's database URL (it adds the column), or have the owner run "
                 f"{sql}; then start it again with this role")
    if state == _PG_LOCK_NOT_AVAILABLE:
        return ConfigError(
            f"could not add column '{column}' to table '{table}': another transaction held the table for more "
            f"than {ALTER_LOCK_TIMEOUT} ({detail})",
            hint="start again once long transactions on the table (reports, exports, an open psql session) end")
    return None


def utc_iso(when: datetime | str | None = None) -> str:
    """``when`` (default now) as UTC ISO 8601 with microseconds, the audit trail's sortable time format.

    A naive datetime is taken as UTC; a string is parsed (``2024-05-01``, ``2024-05-01T12:00:00+02:00``, ...).
    """
    if when is None:
        when = datetime.now(timezone.utc)
    elif isinstance(when, str):
        try:
            when = datetime.fromisoformat(when.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"'{when}' is not an ISO 8601 date or time",
                              hint="e.g. 2024-05-01 or 2024-05-01T12:00:00+00:00") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")
