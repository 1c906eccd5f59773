"""The audit trail: one append-only row per request, in SQLite (the embedded default) or PostgreSQL.

Durability. On SQLite every connection runs in WAL mode with ``synchronous=FULL``: :meth:`AuditLog.record`
commits (and so fsyncs the WAL) before it returns, so a row the service has acknowledged survives a
``kill -9`` of the server and a power cut. PostgreSQL commits durably by default (``synchronous_commit=on``).

Append-only. The class has no update or delete method, and the database refuses them too: triggers raise on
``UPDATE`` / ``DELETE`` (and ``TRUNCATE`` on PostgreSQL). Triggers stop mistakes and SQL typed by hand, not the
database's owner, who can drop them: in production give the service's database role INSERT and SELECT only.

Privacy. The ``dicom`` column holds only :func:`deidentify_dicom_fields` output: an allow-list of technical
fields (modality, body part, view, study year, ...) kept in clear and patient / study identifiers replaced by
keyed HMAC-SHA256 pseudonyms; every other field is dropped. :meth:`AuditLog.record` applies it itself, so raw
DICOM metadata passed by mistake never reaches the database in clear.

Idempotency. ``request_id`` is unique: recording the same request id again inserts nothing and returns False
(or raises :class:`DuplicateRequestError` with ``on_duplicate="raise"``), so a retried write cannot duplicate.
"""

from __future__ import annotations

import builtins
import csv
import hashlib
import hmac
import io
import json
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

from medlens.errors import ConfigError, MedlensError

_log = logging.getLogger("medlens.service.audit")

# ------------------------------------------------------------------------------------------------- engines

_OUR_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines made by create_engine (pragmas attached)
_WRITE = "medlens_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_SCHEMA_LOCK = 0x6D6C656E  # PostgreSQL advisory lock id serialising schema creation ("mlen")


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
            raise ValueError("a SQLite engine must come from medlens.service.audit.create_engine "
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
    """Create ``tables`` (and their indexes and triggers) if missing; safe to run from many processes at once."""
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":  # concurrent CREATE ... IF NOT EXISTS can still collide
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        for table in tables:
            conn.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))
        for name in append_only:
            create_append_only_triggers(conn, name)


# -------------------------------------------------------------------------------------------------- schema

metadata = sa.MetaData()

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY = the rowid

audit_table = sa.Table(
    "audit",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("time", sa.String(40), nullable=False),  # UTC ISO 8601, microseconds: sorts as text
    sa.Column("request_id", sa.String(128), nullable=False, unique=True),
    sa.Column("user", sa.String(128)),  # API key name
    sa.Column("role", sa.String(32)),
    sa.Column("action", sa.String(64), nullable=False),  # predict / get / list / heatmap / ...
    sa.Column("input_sha256", sa.String(64)),
    sa.Column("dicom", sa.Text),  # JSON: de-identified DICOM fields
    sa.Column("model_id", sa.String(256)),
    sa.Column("weights_sha256", sa.String(64)),
    sa.Column("output", sa.Text),  # JSON: the response body (for predictions: the prediction)
    sa.Column("latency_ms", sa.Float),
    sa.Column("status", sa.Integer, nullable=False),  # HTTP status code
    sa.Column("error", sa.Text),
    sa.Index("ix_audit_time", "time"),
)

COLUMNS: tuple[str, ...] = tuple(c.name for c in audit_table.columns)
_SHA256 = re.compile(r"[0-9a-f]{64}")


# -------------------------------------------------------------------------------------- de-identification

HASH_PREFIX = "hmac-sha256:"
_HASHED_VALUE = re.compile(re.escape(HASH_PREFIX) + r"[0-9a-f]{64}")

# Identifiers: replaced by keyed pseudonyms (same value + same key = same pseudonym, so studies still link up).
HASHED_FIELDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "IssuerOfPatientID",
    "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID",
)
# Technical fields with no patient in them: kept in clear (short values only).
KEPT_FIELDS: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "Laterality", "ImageLaterality", "PatientSex",
    "PhotometricInterpretation", "Rows", "Columns", "BitsStored", "NumberOfFrames", "SOPClassUID",
    "TransferSyntaxUID", "Manufacturer", "ManufacturerModelName",
    # medlens.data.dicom.read_dicom's technical metadata
    "format", "shape", "bits", "photometric", "transfer_syntax", "transfer_syntax_name", "window", "voi", "frames",
)
# read_dicom's metadata names -> DICOM keywords
ALIASES: dict[str, str] = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID", "modality": "Modality"}
_MAX_KEPT_CHARS = 64


def keyed_hash(field: str, value: str, key: bytes) -> str:
    """``hmac-sha256:<hex>`` of a field's value; the field name is mixed in, so equal values in different
    fields (SIIM files have PatientName == PatientID) do not get equal pseudonyms."""
    digest = hmac.new(key, field.encode("utf-8") + b"\x00" + value.encode("utf-8"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest


def dicom_fields(ds: Any) -> dict[str, Any]:
    """The fields :func:`deidentify_dicom_fields` looks at, read from a pydicom ``Dataset``."""
    out: dict[str, Any] = {}
    for keyword in (*HASHED_FIELDS, *KEPT_FIELDS, "StudyDate", "PatientAge"):
        if keyword[0].isupper() and keyword in ds:
            out[keyword] = ds.get(keyword)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        out["TransferSyntaxUID"] = str(file_meta.TransferSyntaxUID)
    return out


def deidentify_dicom_fields(meta: Mapping[str, Any] | Any, key: bytes) -> dict[str, Any]:
    """De-identified DICOM fields, safe to store: nothing that names or dates the patient stays in clear.

    ``meta`` maps DICOM keywords (``PatientName``, ``Modality``, ...) or read_dicom's names (``patient_id``,
    ``study_uid``) to values; a pydicom ``Dataset`` works too. Identifiers (:data:`HASHED_FIELDS`) become
    :func:`keyed_hash` pseudonyms, ``StudyDate`` becomes ``StudyYear``, ``PatientAge`` is kept below 90 years
    (``090Y+`` above, as HIPAA's safe harbour asks), the technical :data:`KEPT_FIELDS` stay, and everything
    else is dropped. Empty values are left out. Applying it twice gives the same result.
    """
    if not isinstance(key, bytes | bytearray) or len(key) < 16:
        raise ValueError("the de-identification key must be at least 16 bytes")
    if not isinstance(meta, Mapping):
        meta = dicom_fields(meta)
    out: dict[str, Any] = {}
    for raw_name, value in meta.items():
        name = ALIASES.get(raw_name, raw_name)
        if name in HASHED_FIELDS:
            text = _as_text(value)
            if text:
                out[name] = text if _HASHED_VALUE.fullmatch(text) else keyed_hash(name, text, bytes(key))
        elif name == "StudyDate":
            year = _as_text(value)[:4]
            if re.fullmatch(r"\d{4}", year):
                out["StudyYear"] = year
        elif name == "StudyYear":
            if re.fullmatch(r"\d{4}", _as_text(value)):
                out["StudyYear"] = _as_text(value)
        elif name == "PatientAge":
            age = _age(_as_text(value))
            if age:
                out["PatientAge"] = age
        elif name in KEPT_FIELDS:
            plain = _plain(value)
            if plain not in (None, "", []):
                out[name] = plain
    return dict(sorted(out.items()))


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a kept value; long text is cut (a technical field holds no free text)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return str(value).strip()[:_MAX_KEPT_CHARS]


def _age(text: str) -> str:
    """A DICOM age string (``062Y``, ``003M``), with ages of 90 years and over pooled as ``090Y+``."""
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", text.upper())
    if not match:
        return ""
    number, unit = int(match.group(1)), match.group(2) or "Y"
    if unit == "Y" and number >= 90:
        return "090Y+"
    return f"{number:03d}{unit}"


# ------------------------------------------------------------------------------------------------- records


class DuplicateRequestError(MedlensError):
    """A request id that is already in the audit trail (HTTP 409)."""


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit trail, with the JSON columns parsed."""

    id: int
    time: str
    request_id: str
    user: str | None
    role: str | None
    action: str
    input_sha256: str | None
    dicom: dict[str, Any] | None
    model_id: str | None
    weights_sha256: str | None
    output: Any
    latency_ms: float | None
    status: int
    error: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditRecord:
        values = dict(row)
        for name in ("dicom", "output"):
            values[name] = None if values[name] is None else json.loads(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):  # numpy arrays and scalars
            return obj.tolist()
        if isinstance(obj, datetime | Path):
            return str(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    return json.dumps(value, sort_keys=True, default=default, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------- audit log


class AuditLog:
    """The append-only audit trail in a SQLite or PostgreSQL database.

    ``target`` is a database URL or an engine from :func:`create_engine` (share one engine with
    :class:`medlens.service.auth.KeyStore`). ``hash_key`` keys the DICOM pseudonyms (the settings'
    ``audit_key``); it is needed only to record DICOM fields. The schema is created if missing.
    Thread-safe: every call uses its own pooled connection.
    """

    def __init__(self, target: str | Engine, *, hash_key: bytes | None = None):
        self.engine, self._owned = engine_for(target)
        self.hash_key = hash_key
        self.table = audit_table
        create_tables(self.engine, audit_table, append_only=(audit_table.name,))

    # -- writing

    def record(self, *, on_duplicate: Literal["ignore", "raise"] = "ignore", **fields: Any) -> bool:
        """Append one row in its own transaction, committed (durable) before this returns.

        ``fields`` are those of :meth:`prepare` (request_id, action, status, user, ...). Returns True if the row
        was written, False if ``request_id`` was already recorded (nothing is written; ``on_duplicate="raise"``
        raises :class:`DuplicateRequestError` instead). ``dicom`` is de-identified with ``hash_key``; ``output``
        is stored as JSON. Bad arguments raise ValueError (unknown field names TypeError).
        """
        row = self.prepare(**fields)
        inserted = self.insert_rows([row])[0]
        if not inserted and on_duplicate == "raise":
            raise DuplicateRequestError(f"request id '{row['request_id']}' is already in the audit trail",
                                        hint="use a new request id for a new request")
        return inserted

    def prepare(
        self,
        *,
        request_id: str,
        action: str,
        status: int,
        user: str | None = None,
        role: str | None = None,
        input_sha256: str | None = None,
        dicom: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        weights_sha256: str | None = None,
        output: Any = None,
        latency_ms: float | None = None,
        error: str | None = None,
        time: datetime | str | None = None,
    ) -> dict[str, Any]:
        """The validated, de-identified row :meth:`record` would write (for :meth:`insert_rows`)."""
        if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
            raise ValueError("request_id must be a non-empty string of at most 128 characters")
        if not isinstance(action, str) or not action:
            raise ValueError("action must be a non-empty string")
        if isinstance(status, bool) or not isinstance(status, int):
            raise ValueError("status must be an HTTP status code (int)")
        for name, digest in (("input_sha256", input_sha256), ("weights_sha256", weights_sha256)):
            if digest is not None and not _SHA256.fullmatch(digest):
                raise ValueError(f"{name} must be 64 lower-case hex digits")
        dicom_json = None
        if dicom:
            if self.hash_key is None:
                raise ValueError("AuditLog needs hash_key to record DICOM fields")
            dicom_json = _json(deidentify_dicom_fields(dicom, self.hash_key))
        return {
            "time": utc_iso(time), "request_id": request_id, "user": user, "role": role, "action": action,
            "input_sha256": input_sha256, "dicom": dicom_json, "model_id": model_id,
            "weights_sha256": weights_sha256, "output": None if output is None else _json(output),
            "latency_ms": None if latency_ms is None else float(latency_ms), "status": status, "error": error,
        }

    def insert_rows(self, rows: list[dict[str, Any]]) -> list[bool]:
        """Append prepared rows in ONE transaction (one commit, one fsync for all of them); per row, True if
        written, False if its request id was already there. All or nothing: if it raises, none is written.

        This is what makes group commit possible (:class:`GroupCommitter`): the cost of a durable commit is
        paid once for every row that arrived while the previous commit ran."""
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            with write_transaction(self.engine) as conn:
                out = []
                for row in rows:
                    stmt = insert(self.table).values(**row).on_conflict_do_nothing(index_elements=["request_id"])
                    if dialect == "sqlite":  # RETURNING needs SQLite >= 3.35; the row count is exact here
                        out.append(conn.execute(stmt).rowcount == 1)
                    else:  # psycopg's row count is not: a row back = inserted
                        out.append(conn.execute(stmt.returning(self.table.c.id)).first() is not None)
                return out
        out = []
        for row in rows:  # other databases: a plain insert each; a duplicate shows as an integrity error
            try:
                with write_transaction(self.engine) as conn:
                    conn.execute(self.table.insert().values(**row))
                out.append(True)
            except IntegrityError:
                if self.get(row["request_id"]) is None:
                    raise
                out.append(False)
        return out

    # -- reading

    def get(self, request_id: str) -> AuditRecord | None:
        """The row for a request id, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(self.table.select().where(self.table.c.request_id == request_id)).mappings().first()
        return None if row is None else AuditRecord.from_row(row)

    def get_prediction(self, request_id: str, *, user: str | None = None) -> AuditRecord | None:
        """A successful prediction (action ``predict``, status 2xx) by request id, optionally only ``user``'s.

        Serves ``GET /v1/predictions/{id}``: the stored ``output`` is the prediction.
        """
        t = self.table
        query = t.select().where(t.c.request_id == request_id, t.c.action == "predict",
                                 t.c.status >= 200, t.c.status < 300)
        if user is not None:
            query = query.where(t.c.user == user)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else AuditRecord.from_row(row)

    def _filtered(self, query: sa.Select, since: datetime | str | None, action: str | None,
                  user: str | None, status: int | None = None) -> sa.Select:
        t = self.table
        if since is not None:
            query = query.where(t.c.time >= utc_iso(since))
        if action is not None:
            query = query.where(t.c.action == action)
        if user is not None:
            query = query.where(t.c.user == user)
        if status is not None:
            query = query.where(t.c.status == status)
        return query

    def list(
        self,
        limit: int = 100,
        offset: int = 0,
        since: datetime | str | None = None,
        *,
        action: str | None = None,
        user: str | None = None,
        status: int | None = None,
        newest_first: bool = True,
    ) -> builtins.list[AuditRecord]:
        """Rows, newest first by default; ``since`` keeps rows at or after a time (UTC if naive)."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        t = self.table
        order = t.c.id.desc() if newest_first else t.c.id.asc()
        query = self._filtered(t.select(), since, action, user, status).order_by(order).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [AuditRecord.from_row(r) for r in conn.execute(query).mappings()]

    def count(self, since: datetime | str | None = None, *, action: str | None = None,
              user: str | None = None, status: int | None = None) -> int:
        """How many rows (with the same filters as :meth:`list`)."""
        query = self._filtered(sa.select(sa.func.count()).select_from(self.table), since, action, user, status)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def export_csv(self, dest: str | os.PathLike | IO[str], since: datetime | str | None = None) -> int:
        """Write rows (oldest first) as CSV with a header of :data:`COLUMNS`; returns the number of rows.

        ``dest`` is a path (written to a temporary file, then renamed into place) or a text file object.
        JSON columns are written as stored; missing values as empty cells.
        """
        if isinstance(dest, str | os.PathLike):
            path = Path(dest)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                    n = self._write_csv(fh, since)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return n
        return self._write_csv(dest, since)

    def _write_csv(self, fh: IO[str], since: datetime | str | None) -> int:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        query = self._filtered(self.table.select(), since, None, None).order_by(self.table.c.id.asc())
        n = 0
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=1000).execute(query)
            for row in result:
                writer.writerow(["" if v is None else v for v in row])
                n += 1
        return n

    def export_csv_text(self, since: datetime | str | None = None) -> str:
        """The CSV export as a string (small trails, tests)."""
        buf = io.StringIO()
        self.export_csv(buf, since)
        return buf.getvalue()

    # -- health

    def ping(self) -> bool:
        """True if the database answers (for ``/readyz``)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    def close(self) -> None:
        """Release the connections (only those of an engine this object created)."""
        if self._owned:
            self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupCommitter:
    """Group commit for the audit trail: one writer thread, one transaction for every row waiting.

    A durable commit (an fsync) costs milliseconds however many rows it holds. Requests hand their prepared row
    to :meth:`submit` and wait on the returned future; the writer takes everything queued, writes it with
    :meth:`AuditLog.insert_rows` in one transaction, and resolves each future only after that commit. So a
    request is still answered only once its own row is durable, while 16 concurrent requests share a commit
    instead of queueing for 16. No deliberate wait: a batch is what arrived during the previous commit. If
    a batch fails, its rows are retried one by one, so one bad row fails only its own request.
    """

    def __init__(self, audit: AuditLog, *, max_rows: int = 256):
        import queue
        import threading

        self.audit = audit
        self.max_rows = max_rows
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = object()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="medlens-audit-writer", daemon=True)
        self._thread.start()
        self.commits = 0
        self.rows = 0

    def submit(self, row: dict[str, Any]):
        """Queue a prepared row; the ``concurrent.futures.Future`` resolves to True/False (inserted / duplicate)
        after the commit that holds it, or to the exception that stopped it."""
        from concurrent.futures import Future

        future: Future = Future()
        if self._closed:
            future.set_exception(RuntimeError("the audit writer has stopped"))
            return future
        self._queue.put((row, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread; rows submitted after this fail at once."""
        self._closed = True
        self._queue.put(self._stop)
        self._thread.join(timeout)

    def _run(self) -> None:
        import queue

        stopping = False
        while not stopping:
            item = self._queue.get()
            stopping = item is self._stop
            batch = [] if stopping else [item]
            while len(batch) < self.max_rows:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is self._stop:
                    stopping = True
                    continue
                batch.append(more)
            if batch:
                try:
                    self._write(batch)
                except BaseException as exc:  # noqa: BLE001 - never let the writer die with requests waiting
                    for _, future in batch:
                        _resolve(future, exc=exc)
        while True:  # anything that raced past the stop marker: refuse it rather than leave it waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not self._stop:
                _resolve(item[1], exc=RuntimeError("the audit writer has stopped"))

    def _write(self, batch: list) -> None:
        try:
            results = self.audit.insert_rows([row for row, _ in batch])
        except Exception as exc:  # noqa: BLE001 - isolate the failing row: retry each in its own transaction
            _log.warning("audit batch of %d rows failed (%s: %s); retrying row by row", len(batch),
                         type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            for row, future in batch:
                try:
                    _resolve(future, result=self.audit.insert_rows([row])[0])
                except Exception as exc2:  # noqa: BLE001 - handed to the waiting request
                    _resolve(future, exc=exc2)
            return
        self.commits += 1
        self.rows += len(batch)
        for (_, future), inserted in zip(batch, results, strict=True):
            _resolve(future, result=inserted)


def _resolve(future, *, result: Any = None, exc: BaseException | None = None) -> None:
    """Settle a future unless its request gave up (cancelled): the row is written either way."""
    from concurrent.futures import InvalidStateError

    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the call
        pass
