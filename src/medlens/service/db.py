"""Database plumbing shared by the audit trail and the API keys: engines, schema creation, write transactions.

SQLite (the embedded default) and PostgreSQL are supported. :func:`create_engine` sets SQLite up for a durable,
concurrent audit trail: WAL mode, ``synchronous=FULL`` (a commit fsyncs the WAL, so an acknowledged row survives
``kill -9`` and a power cut), a 30 s busy timeout, and ``BEGIN IMMEDIATE`` for write transactions (see
:func:`write_transaction`). PostgreSQL commits durably by default (``synchronous_commit=on``).

:func:`create_tables` creates missing tables, indexes and append-only triggers, and adds nullable columns that a
newer medlens defines but an existing database lacks (``ALTER TABLE ... ADD COLUMN``), so a database written by
an older version keeps working. It never drops or changes a column.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from medlens.errors import ConfigError

_OUR_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines made by create_engine (pragmas attached)
_WRITE = "medlens_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_SCHEMA_LOCK = 0x6D6C656E  # PostgreSQL advisory lock id serialising schema creation ("mlen")
#: the type of an auto-incrementing row id: BIGINT, but INTEGER on SQLite (INTEGER PRIMARY KEY = the rowid)
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def create_engine(url: str) -> Engine:
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
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:  # psycopg missing, or an unknown dialect
        raise ConfigError(f"database URL '{parsed.render_as_string()}': driver not installed ({exc})",
                          hint="pip install 'medlens[service]'") from exc
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    _OUR_ENGINES.add(engine)
    return engine


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN is turned off (isolation_level None) so that _sqlite_begin decides how
    # each transaction starts, and DDL runs inside transactions too (SQLAlchemy's documented pysqlite recipe).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=30000")
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
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction: committed when the block ends, rolled back if it raises."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE: True})
        with conn.begin():
            yield conn


def create_append_only_triggers(conn: Connection, table: str) -> None:
    """Triggers that make the database itself refuse UPDATE / DELETE (and TRUNCATE) on ``table``."""
    if conn.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'medlens: table {table} is append-only: {op} refused'); END"
            )
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION medlens_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION USING MESSAGE = "  # no % placeholders: psycopg would read them as its own
            "'medlens: table ' || TG_TABLE_NAME || ' is append-only: ' || TG_OP || ' refused'; END $$"
        )
        triggers = {
            f"{table}_no_update_delete": f"BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW",
            f"{table}_no_truncate": f"BEFORE TRUNCATE ON {table} FOR EACH STATEMENT",
        }
        for name, when in triggers.items():
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = to_regclass(:table)"),
                {"name": name, "table": table},
            ).first()
            if not exists:
                conn.exec_driver_sql(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION medlens_refuse_change()")
    else:
        raise ConfigError(f"database '{conn.dialect.name}' is not supported for the audit trail",
                          hint="use SQLite or PostgreSQL")


def create_tables(engine: Engine, *tables: sa.Table, append_only: tuple[str, ...] = ()) -> None:
    """Create ``tables`` (and their indexes and triggers) if missing, and add the nullable columns an older
    database lacks (:func:`add_missing_columns`); safe to run from many processes at once."""
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":  # concurrent CREATE ... IF NOT EXISTS can still collide
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        for table in tables:
            conn.execute(CreateTable(table, if_not_exists=True))
            add_missing_columns(conn, table)
            for index in table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))
        for name in append_only:
            create_append_only_triggers(conn, name)


def add_missing_columns(conn: Connection, table: sa.Table) -> list[str]:
    """Add ``table``'s columns that the database's table lacks (a database from an older medlens); their names.

    Only nullable columns without a server default can be added this way (rows already there get NULL); a
    missing column that is NOT NULL is a ConfigError (that needs a real migration). Added columns go at the end
    of the table: code selects columns by name, never by position.
    """
    present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        if not column.nullable or column.primary_key:
            raise ConfigError(f"the '{table.name}' table in this database has no column '{column.name}', which "
                              "cannot be added automatically (NOT NULL)",
                              hint="migrate the database, or start the service on a new one")
        kind = column.type.compile(dialect=conn.dialect)
        name = conn.dialect.identifier_preparer.quote(column.name)
        conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table.name)} "
                             f"ADD COLUMN {name} {kind}")
        added.append(column.name)
    return added


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
