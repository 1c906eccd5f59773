"""The audit trail: one append-only row per request, in SQLite (the embedded default) or PostgreSQL.

The database plumbing (engines, WAL and ``synchronous=FULL`` on SQLite, schema creation and the append-only
triggers) is :mod:`medlens.service.db`; the de-identification of DICOM fields is :mod:`medlens.service.deid`.
This module holds the table, :class:`AuditRecord` and :class:`AuditLog`; the group-commit writer is in
:mod:`medlens.service.committer`.

Durability. :meth:`AuditLog.record` and :meth:`AuditLog.insert_rows` commit before they return; on SQLite a
commit fsyncs the WAL, so a row the service has acknowledged survives a ``kill -9`` of the server and a power
cut. PostgreSQL commits durably by default (``synchronous_commit=on``).

Append-only. The class has no update or delete method, and the database refuses them too: triggers raise on
``UPDATE`` / ``DELETE`` (and ``TRUNCATE`` on PostgreSQL). Triggers stop mistakes and SQL typed by hand, not the
database's owner, who can drop them: in production give the service's database role INSERT and SELECT only
(on PostgreSQL, and USAGE on the ``audit_id_seq`` sequence); the owner role creates or upgrades the schema
(start medlens once with it), and the service's role then starts without creating anything.

Privacy. The ``dicom`` column holds only :func:`~medlens.service.deid.deidentify_dicom_fields` output: an
allow-list of technical fields kept in clear and patient / study identifiers replaced by keyed HMAC-SHA256
pseudonyms; every other field is dropped. :meth:`AuditLog.prepare` applies it itself, so raw DICOM metadata
passed by mistake never reaches the database in clear.

Idempotency. ``request_id`` is unique: recording the same request id again inserts nothing and returns False
(or raises :class:`DuplicateRequestError` with ``on_duplicate="raise"``), so a retried write cannot duplicate.

Schema changes. ``policy_hash`` (the model card's operating-policy hash) was added after the first release, then
``in_domain`` / ``domain_score`` / ``domain_reason`` (the out-of-domain verdict of a prediction); they are the
table's last columns. Opening an older database adds the column at the end
(:func:`medlens.service.db.add_missing_columns`: only when it is missing; on PostgreSQL with a 5 s lock timeout,
and a clear ConfigError when the service's role may not alter the table), and its old rows read as NULL.
"""

from __future__ import annotations

import builtins
import csv
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from medlens.errors import MedlensError
from medlens.service.db import ROW_ID, create_engine, create_tables, engine_for, utc_iso, write_transaction
from medlens.service.deid import deidentify_dicom_fields, dicom_fields, keyed_hash

__all__ = [
    "COLUMNS", "AuditLog", "AuditRecord", "DuplicateRequestError", "audit_table", "metadata",
    # defined in medlens.service.db / medlens.service.deid; importable from here as before the split
    "create_engine", "deidentify_dicom_fields", "dicom_fields", "keyed_hash", "utc_iso",
]

_log = logging.getLogger("medlens.service.audit")

# -------------------------------------------------------------------------------------------------- schema

metadata = sa.MetaData()

audit_table = sa.Table(
    "audit",
    metadata,
    sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
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
    # Columns added after the first release go LAST, in the order they were added: an older database gets them
    # by ALTER TABLE ... ADD COLUMN, which appends, so new and migrated databases then have the same column
    # order, and the CSV export (columns in this order) keeps every earlier column where it was.
    sa.Column("policy_hash", sa.String(64)),  # the model card's operating-policy hash (NULL in rows before it)
    # the out-of-domain verdict of a prediction (medlens.domain; NULL for other actions and in rows before it)
    sa.Column("in_domain", sa.Boolean),
    sa.Column("domain_score", sa.Float),
    sa.Column("domain_reason", sa.Text),
    sa.Index("ix_audit_time", "time"),
)

COLUMNS: tuple[str, ...] = tuple(c.name for c in audit_table.columns)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POLICY_HASH = re.compile(r"[0-9a-f]{8,64}")


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
    policy_hash: str | None  # the fields in the table's column order (COLUMNS)
    in_domain: bool | None = None
    domain_score: float | None = None
    domain_reason: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditRecord:
        values = dict(row)
        for name in ("dicom", "output"):
            values[name] = None if values[name] is None else json.loads(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    ``target`` is a database URL or an engine from :func:`medlens.service.db.create_engine` (share one engine
    with :class:`medlens.service.auth.KeyStore`). ``hash_key`` keys the DICOM pseudonyms (the settings'
    ``audit_key``); it is needed only to record DICOM fields. The schema is created if missing (and columns
    added since the database was made are added).
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
        policy_hash: str | None = None,
        weights_sha256: str | None = None,
        output: Any = None,
        latency_ms: float | None = None,
        error: str | None = None,
        time: datetime | str | None = None,
        in_domain: bool | None = None,
        domain_score: float | None = None,
        domain_reason: str | None = None,
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
        if policy_hash is not None and not _POLICY_HASH.fullmatch(policy_hash):
            raise ValueError("policy_hash must be 8 to 64 lower-case hex digits (ModelCard.policy_hash)")
        dicom_json = None
        if dicom:
            if self.hash_key is None:
                raise ValueError("AuditLog needs hash_key to record DICOM fields")
            dicom_json = _json(deidentify_dicom_fields(dicom, self.hash_key))
        return {
            "time": utc_iso(time), "request_id": request_id, "user": user, "role": role, "action": action,
            "input_sha256": input_sha256, "dicom": dicom_json, "model_id": model_id, "policy_hash": policy_hash,
            "weights_sha256": weights_sha256, "output": None if output is None else _json(output),
            "latency_ms": None if latency_ms is None else float(latency_ms), "status": status, "error": error,
            "in_domain": None if in_domain is None else bool(in_domain),
            "domain_score": None if domain_score is None else float(domain_score), "domain_reason": domain_reason,
        }

    def insert_rows(self, rows: list[dict[str, Any]]) -> list[bool]:
        """Append prepared rows in ONE transaction (one commit, one fsync for all of them); per row, True if
        written, False if its request id was already there. All or nothing: if it raises, none is written.

        This is what makes group commit possible (:class:`GroupCommitter`): the cost of a durable commit is
        paid once for every row that arrived while the previous commit ran."""
        if not rows:
            return []
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            # one statement, built once, with the row as its parameters: building ``.values(**row)`` for every
            # row cost SQLAlchemy a new statement and cache key each time (~0.3 ms a row, much of the audit's share
            # of a loaded server's CPU)
            stmt = insert(self.table).on_conflict_do_nothing(index_elements=["request_id"])
            with write_transaction(self.engine) as conn:
                if dialect == "sqlite":  # in-process, no round trips: one execute a row, its row count is exact
                    return [conn.execute(stmt, row).rowcount == 1 for row in rows]
                # PostgreSQL: one round trip for the whole group (SQLAlchemy's "insertmanyvalues" makes the
                # executemany one multi-row INSERT), not one a row; the request ids that come back are the rows
                # written. A second row with the same id in one group is not (the conflict skips it).
                written = {r[0] for r in conn.execute(stmt.returning(self.table.c.request_id), rows)}
                out, seen = [], set()
                for row in rows:
                    rid = row["request_id"]
                    out.append(rid in written and rid not in seen)
                    seen.add(rid)
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
        """A successful prediction (action ``predict``, status 2xx) by request id, optionally only ``user``'s
        (and the DICOM node's, role ``dicom``: those belong to the department, not to one key).

        Serves ``GET /v1/predictions/{id}``: the stored ``output`` is the prediction.
        """
        t = self.table
        query = t.select().where(t.c.request_id == request_id, t.c.action == "predict",
                                 t.c.status >= 200, t.c.status < 300)
        if user is not None:
            query = query.where(sa.or_(t.c.user == user, t.c.role == "dicom"))
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
