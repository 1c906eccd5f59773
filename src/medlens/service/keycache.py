"""Answering an API key without a thread hop: on PostgreSQL from memory (verified keys, forgotten the moment the
``api_keys`` table changes: :class:`KeyCache`), on SQLite by a lookup that never waits (:class:`SqliteKeyReader`).

Why. Verifying a key is one indexed SELECT. On SQLite that runs in the server's own process; on PostgreSQL it is a
network round trip for every request (measured under load with ``--workers 2``: ~0.5 ms of CPU a request between
the server and PostgreSQL, 5-7% of all the CPU a prediction costs). So on PostgreSQL the service keeps the keys it
has verified, and PostgreSQL tells it when to forget them: a statement-level trigger on ``api_keys``
(:func:`medlens.service.db.create_notify_trigger`) sends ``NOTIFY`` when any change commits (``medlens keys
create`` / ``revoke``, or SQL by hand), and :class:`KeyCache`'s thread, which ``LISTEN``\\ s on its own
connection, clears the cache when the notification arrives.

What that promises. A revoked key is refused from the moment the notification reaches each server process (on one
host 2-3 ms after the revoking transaction commits, measured; the same order as the window a lookup already had,
between its SELECT and the answer). The cache is trusted only while that can hold:

- it is used only while the listener is connected and ``LISTEN``\\ ing and the trigger exists and is enabled
  ALWAYS (checked at connect and every :data:`HEARTBEAT_S`; a database whose owner did not let medlens create it,
  or where it was disabled, gets no cache: every request looks its key up, as before);
- when the listener's connection is lost, the cache is emptied and bypassed until it has reconnected;
- a key is stored only if no change arrived while it was being looked up (a generation counter), so a lookup that
  raced a revocation cannot put the revoked key back;
- an entry is used for at most :data:`MAX_AGE_S` (1 s) whatever happens: the bound when notifications are lost
  without the connection failing (a network path that stalls without closing, a pooler such as PgBouncer in
  transaction mode, which cannot carry LISTEN); a key is then looked up once a second per process;
- only valid keys are stored (never an unknown one: a flood of random keys cannot fill memory), at most
  :data:`MAX_ENTRIES`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from medlens.service.db import notify_channel, notify_trigger_state

log = logging.getLogger(__name__)

MAX_AGE_S = 1.0  # an entry is looked up again after this long, notification or not
MAX_ENTRIES = 4096
HEARTBEAT_S = 1.0  # how often the listener wakes: to stop, and to check that the trigger is still enabled
NO_TRIGGER_RETRY_S = 10.0  # without the trigger, look again this often (its owner may create or enable it)
RECONNECT_S = (0.5, 10.0)  # the listener's wait before reconnecting: first, and at most (doubling)


class KeyCache:
    """Verified keys (digest -> identity) of one process, kept honest by a ``LISTEN`` thread (PostgreSQL).

    :meth:`get` answers a cached identity or None (then look the key up); :meth:`put` stores a lookup's result,
    given the :attr:`generation` read before the lookup began. :meth:`close` stops the thread.
    """

    def __init__(self, engine: Engine, table: str = "api_keys", *, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.table = table
        self.channel = notify_channel(table)
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Any, float]] = {}
        self._generation = 0
        self._active = threading.Event()  # set while listening with the trigger enabled: the cache may be used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="medlens-key-listener", daemon=True)
        self._thread.start()

    # -- used by KeyStore.verify (any thread)

    @property
    def active(self) -> bool:
        return self._active.is_set()

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, digest: str) -> Any | None:
        # nothing to check for "active": going inactive empties the cache, and put stores nothing while inactive
        hit = self._entries.get(digest)
        if hit is None or self._clock() - hit[1] > self.max_age_s:
            return None
        return hit[0]

    def put(self, digest: str, identity: Any, generation: int) -> None:
        with self._lock:
            if not self._active.is_set() or generation != self._generation:  # a change arrived meanwhile
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (identity, self._clock())

    def wait_active(self, timeout: float) -> bool:
        """Wait until the listener is active (True) or ``timeout`` seconds pass (False)."""
        return self._active.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S + 5)

    # -- the listener thread

    def _trigger_fires(self) -> bool:
        with self.engine.connect() as check:
            return notify_trigger_state(check, self.table) == "A"

    def _reset(self, active: bool) -> None:
        """Forget every entry; from now on the cache is used (``active``) or bypassed."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            (self._active.set if active else self._active.clear)()

    def _listen(self) -> None:
        delay = RECONNECT_S[0]
        warned = False
        while not self._stop.is_set():
            conn = None
            try:
                raw = self.engine.raw_connection()
                conn = raw.driver_connection  # psycopg's connection (the engine's settings and credentials)
                raw.detach()  # ours for as long as we listen, not the pool's
                conn.autocommit = True
                conn.execute(f"LISTEN {self.channel}")
                if not self._trigger_fires():
                    if not warned:
                        log.info("API keys are looked up on every request: the table %s has no change trigger "
                                 "enabled ALWAYS (the database owner creates it when medlens starts with the "
                                 "owner's role)", self.table)
                        warned = True
                    self._stop.wait(NO_TRIGGER_RETRY_S)
                    continue
                self._reset(True)
                delay = RECONNECT_S[0]
                while not self._stop.is_set():
                    # list(): the generator runs to its end (stop_after=1 or the timeout), never left suspended
                    if list(conn.notifies(timeout=HEARTBEAT_S, stop_after=1)):
                        self._reset(True)
                    elif not self._trigger_fires():  # disabled or dropped while we listened
                        self._reset(False)
                        break
            except Exception as exc:  # noqa: BLE001 - any failure: bypass the cache, reconnect later
                self._reset(False)
                if not self._stop.is_set():
                    log.warning("API key cache off (lookups go to the database) until the change listener "
                                "reconnects: %s", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
                    self._stop.wait(delay)
                    delay = min(delay * 2, RECONNECT_S[1])
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
        self._reset(False)


class SqliteKeyReader:
    """SQLite: the key lookup as one indexed SELECT on the calling thread's own read-only sqlite3 connection,
    without SQLAlchemy and without waiting for a lock: ``timeout=0`` turns SQLite's busy handler off, so a locked
    database answers :data:`BUSY` at once and the caller looks the key up on a worker thread as before. (SQLite's
    own short retries while another connection resets the WAL, and a recovery after a crash, can still take a
    moment on the calling thread: rare and bounded.)

    Why: every request on SQLite looked its key up through SQLAlchemy on a worker thread; the hop and the ORM's
    statement handling cost more than the lookup (measured under load with ``--workers 2``: PostgreSQL with its
    key cache served 263 req/s, SQLite 230). In WAL mode a read does not wait for writers, so the service's event
    loop can run it. A revocation committed by any process is seen by the next lookup (each SELECT reads the
    latest commit): no cache, nothing to invalidate.
    """

    BUSY = object()
    SQL = "SELECT name, role, key_hash, revoked FROM api_keys WHERE key_hash = ?"

    def __init__(self, path: Path):
        self.uri = Path(path).resolve().as_uri() + "?mode=ro"
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def row(self, digest: str) -> Any:
        """The key's row ``(name, role, key_hash, revoked)``, None if there is none, :data:`BUSY` if the database
        could not answer at once."""
        try:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = sqlite3.connect(self.uri, uri=True, timeout=0, check_same_thread=False)
                with self._lock:
                    self._opened.append(conn)
                self._local.conn = conn
            # the key_hash is unique: sqlite3 steps past the one row, so the statement ends and no read stays open
            # (an open read would stop checkpoints from emptying the WAL; the test checkpoints to check)
            return conn.execute(self.SQL, (digest,)).fetchone()
        except sqlite3.Error:
            return self.BUSY

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
