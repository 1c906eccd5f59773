"""Readiness (``GET /readyz``): can the audit trail commit right now?

A ``SELECT 1`` says the database answers, not that it takes writes: with the disk full, or the database
write-locked by another process, every prediction is refused (its audit row cannot be committed, so its answer
is withheld: 503) while a read still succeeds. So readiness is a real write: :class:`ReadinessProbe` upserts
one row of the ``heartbeat`` table in its own transaction and commits it (on SQLite: ``BEGIN IMMEDIATE``, the
write lock, and an fsync of the WAL, like an audit row), waiting at most :data:`WRITE_TIMEOUT_S` for a lock.

Cheap under any probe rate: the result is kept for :data:`CACHE_S` (so at most one write a second per process,
whoever asks), and a probe that arrives while another one is writing gets the last result instead of waiting
(a flood of ``/readyz`` cannot tie up the worker threads). ``heartbeat`` is not part of the audit trail (it is
updated in place, one row per server name): on PostgreSQL the service's role needs INSERT, UPDATE and SELECT
on it (the owner role creates it, as it creates the audit table).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from medlens.service.db import create_tables, utc_iso, write_transaction

log = logging.getLogger(__name__)

#: how long one readiness result is reused (seconds)
CACHE_S = 1.0
#: longest wait for the database's write lock during a probe (a load balancer's probe times out at 1-5 s)
WRITE_TIMEOUT_S = 1.0

heartbeat_table = sa.Table(
    "heartbeat",
    sa.MetaData(),
    sa.Column("name", sa.String(128), primary_key=True),  # host name: one row per machine, however many workers
    sa.Column("time", sa.String(40), nullable=False),  # UTC ISO 8601 of the last successful probe
    sa.Column("pid", sa.Integer),
)


class ReadinessProbe:
    """``check()``: (the audit database committed a write just now, why not); see the module docstring."""

    def __init__(self, engine: Engine, *, cache_s: float = CACHE_S, timeout_s: float = WRITE_TIMEOUT_S):
        self.engine = engine
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.name = socket.gethostname()[:128] or "medlens"
        self._lock = threading.Lock()  # one write at a time
        self._last: tuple[float, bool, str] | None = None  # (monotonic time, ok, reason)
        create_tables(engine, heartbeat_table)

    def check(self) -> tuple[bool, str]:
        """``(True, "")`` if the heartbeat row was committed within the last ``cache_s``, else
        ``(False, reason)``; blocks at most ``timeout_s`` (and not at all while another probe writes)."""
        last = self._last
        if last is not None and time.monotonic() - last[0] < self.cache_s:
            return last[1], last[2]
        if not self._lock.acquire(blocking=False):  # another probe is writing: its predecessor's answer
            return (last[1], last[2]) if last is not None else (False, "the first check is still running")
        try:
            ok, reason = self._write()
            self._last = (time.monotonic(), ok, reason)
            return ok, reason
        finally:
            self._lock.release()

    def _write(self) -> tuple[bool, str]:
        t = heartbeat_table
        row = {"name": self.name, "time": utc_iso(), "pid": os.getpid()}
        dialect = self.engine.dialect.name
        try:
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(t).values(**row)
            stmt = stmt.on_conflict_do_update(index_elements=[t.c.name], set_={"time": row["time"], "pid": row["pid"]})
            with write_transaction(self.engine, lock_timeout_s=self.timeout_s) as conn:
                conn.execute(stmt)
            return True, ""
        except sa.exc.SQLAlchemyError as exc:
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            reason = first[0][:200] if first else type(exc).__name__
            log.warning("readiness: the audit database cannot commit (%s)", reason)
            return False, reason
