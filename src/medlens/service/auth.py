"""Access control: API keys with roles, and a per-key rate limiter.

Roles are ordered ``viewer < clinician < admin``: a viewer reads predictions, a clinician also submits
images, an admin also reads the audit trail (:func:`role_allows` answers "may ROLE do what REQUIRED may").

Keys are ``mlk_`` + 32 random bytes (``secrets.token_urlsafe``), shown once when created and stored only as
their SHA-256 digest. A fast hash is right here, unlike for passwords: slow hashes (scrypt, bcrypt) exist to
make guessing low-entropy human passwords expensive, but a 256-bit random key cannot be guessed at any hash
speed, so the digest protects a stolen database just as well, and verifying a key on every request stays a
microsecond instead of tens of milliseconds (a slow hash would also hand attackers a cheap way to load the
server). Names are never reused, even after revocation, because audit rows refer to keys by name.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from medlens.errors import ConfigError
from medlens.service.db import ROW_ID, create_tables, engine_for, sqlite_file, utc_iso, write_transaction

ROLES: tuple[str, ...] = ("viewer", "clinician", "admin")  # in increasing order of rights
KEY_PREFIX = "mlk_"
_MAX_KEY_CHARS = 256  # longer strings are not our keys: refused before hashing
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def role_allows(role: str | None, required: str) -> bool:
    """True if ``role`` has at least the rights of ``required`` (unknown or missing roles: False)."""
    if required not in ROLES:
        raise ValueError(f"unknown required role '{required}' (roles: {', '.join(ROLES)})")
    return role in ROLES and ROLES.index(role) >= ROLES.index(required)


def hash_key(plaintext: str) -> str:
    """The stored form of a key: its SHA-256 hex digest (see the module docstring for why that suffices)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


api_keys_table = sa.Table(
    "api_keys",
    sa.MetaData(),
    sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created", sa.String(40), nullable=False),  # UTC ISO 8601
    sa.Column("revoked", sa.String(40)),  # UTC ISO 8601, or NULL while the key is valid
)


def _looks_like_key(plaintext: object) -> bool:
    return isinstance(plaintext, str) and plaintext.startswith(KEY_PREFIX) and len(plaintext) <= _MAX_KEY_CHARS


def _identity(row: Any, digest: str) -> Identity | None:
    """The identity of a looked-up row ``(name, role, key_hash, revoked)``, or None (no row, revoked, bad role)."""
    # The indexed lookup can at most leak timing about the digest, which does not help forge a key (that would
    # need a SHA-256 preimage); the constant-time comparison is the check that decides.
    if row is None or not hmac.compare_digest(row[2], digest):
        return None
    name, role, _, revoked = row
    if revoked is not None or role not in ROLES:
        return None
    return Identity(name, role)


class Identity(NamedTuple):
    """Who a verified key belongs to: ``(name, role)``."""

    name: str
    role: str


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never its plaintext or hash."""

    name: str
    role: str
    created: str
    revoked: str | None

    @property
    def active(self) -> bool:
        return self.revoked is None


class KeyStore:
    """API keys in the ``api_keys`` table of a SQLite or PostgreSQL database (created if missing).

    ``target`` is a database URL or an engine from :func:`medlens.service.db.create_engine`; pass the
    :class:`~medlens.service.audit.AuditLog`'s ``engine`` to keep keys and audit trail in one database.

    With ``quick=True`` (the service), :meth:`quick` answers most keys without a thread hop: on PostgreSQL from
    verified keys kept in memory and forgotten as soon as the table changes
    (:class:`~medlens.service.keycache.KeyCache`: LISTEN/NOTIFY), on a SQLite file by a read on the calling thread
    that never waits (:class:`~medlens.service.keycache.SqliteKeyReader`).
    """

    def __init__(self, target: str | Engine, *, quick: bool = False):
        self.engine, self._owned = engine_for(target)
        self.table = api_keys_table
        create_tables(self.engine, api_keys_table, notify=(api_keys_table.name,))
        self.cache: Any = None
        self.reader: Any = None
        if quick and self.engine.dialect.name == "postgresql":
            from medlens.service.keycache import KeyCache

            self.cache = KeyCache(self.engine, api_keys_table.name)
        elif quick and (path := sqlite_file(self.engine.url)) is not None:
            from medlens.service.keycache import SqliteKeyReader

            self.reader = SqliteKeyReader(path)

    def create(self, name: str, role: str) -> str:
        """Create a key and return its plaintext: the only time it is ever available.

        Raises :class:`ConfigError` for a bad name or role, or a name in use (also by a revoked key).
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"'{name}' is not a valid key name",
                              hint="1-64 characters: letters, digits and . _ @ - (starting with a letter or digit)")
        if role not in ROLES:
            raise ConfigError(f"unknown role '{role}'", hint=f"roles: {', '.join(ROLES)}")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        row = {"name": name, "role": role, "key_hash": hash_key(plaintext), "created": utc_iso(), "revoked": None}
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(self.table.insert().values(**row))
        except IntegrityError as exc:
            raise ConfigError(f"an API key named '{name}' already exists",
                              hint="names are never reused, even after revocation (audit rows refer to "
                                   "them): pick another name") from exc
        return plaintext

    def quick(self, plaintext: str | None) -> tuple[bool, Identity | None]:
        """``(True, identity or None)`` when the key can be answered without waiting (safe on an event loop):
        PostgreSQL's cache holds it, or SQLite's reader looked it up at once; ``(False, None)``: call
        :meth:`verify` (on a worker thread)."""
        if not _looks_like_key(plaintext):
            return True, None
        digest = hash_key(plaintext)
        if self.cache is not None:
            hit = self.cache.get(digest)
            return hit is not None, hit
        if self.reader is not None:
            row = self.reader.row(digest)
            if row is not self.reader.BUSY:
                return True, _identity(row, digest)
        return False, None

    def verify(self, plaintext: str | None) -> Identity | None:
        """``(name, role)`` for a valid, unrevoked key; None for anything else."""
        if not _looks_like_key(plaintext):
            return None
        digest = hash_key(plaintext)
        cache, generation = self.cache, 0
        if cache is not None:
            if (hit := cache.get(digest)) is not None:
                return hit
            generation = cache.generation  # read before the lookup: a change during it voids the result
        t = self.table
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":  # one statement: no transaction, so no ROLLBACK round trip
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # when the pool takes it back
            row = conn.execute(sa.select(t.c.name, t.c.role, t.c.key_hash, t.c.revoked)
                               .where(t.c.key_hash == digest)).first()
        identity = _identity(row, digest)
        if cache is not None and identity is not None:
            cache.put(digest, identity, generation)
        return identity

    def revoke(self, name: str) -> bool:
        """Revoke a key: True if it was active, False if it was already revoked; unknown name: ConfigError."""
        t = self.table
        with write_transaction(self.engine) as conn:
            done = conn.execute(t.update().where(t.c.name == name, t.c.revoked.is_(None))
                                .values(revoked=utc_iso())).rowcount
            if done:
                return True
            exists = conn.execute(sa.select(t.c.id).where(t.c.name == name)).first()
        if exists is None:
            raise ConfigError(f"no API key named '{name}'", hint="see `medlens keys list`")
        return False

    def get(self, name: str) -> KeyInfo | None:
        """A key's listing by name, or None."""
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.name, t.c.role, t.c.created, t.c.revoked)
                               .where(t.c.name == name)).first()
        return None if row is None else KeyInfo(*row)

    def list(self) -> builtins.list[KeyInfo]:
        """All keys, revoked ones included, oldest first."""
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.name, t.c.role, t.c.created, t.c.revoked).order_by(t.c.id)).all()
        return [KeyInfo(*row) for row in rows]

    def close(self) -> None:
        """Stop the cache's listener, and release the connections (only those of an engine this object created)."""
        for helper in (self.cache, self.reader):
            if helper is not None:
                helper.close()
        if self._owned:
            self.engine.dispose()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RateLimiter:
    """A thread-safe token bucket per key: ``per_minute`` requests a minute, bursts up to ``burst``.

    Each key's bucket holds up to ``burst`` tokens (default ``per_minute``) and refills at ``per_minute / 60``
    tokens a second; a request takes one. ``per_minute = 0`` turns limiting off. Buckets that have refilled
    completely are forgotten once more than ``max_keys`` keys are tracked, so memory stays bounded.
    """

    def __init__(self, per_minute: int, *, burst: int | None = None, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000):
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        self.per_minute = per_minute
        self.capacity = float(burst if burst is not None else per_minute)
        if per_minute and self.capacity < 1:
            raise ValueError("burst must be >= 1")
        self.rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last update)
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, float]:
        """``(True, 0.0)`` and a token taken, or ``(False, seconds until the next token)``."""
        if self.per_minute == 0:
            return True, 0.0
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + max(0.0, now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                result = (True, 0.0)
            else:
                self._buckets[key] = (tokens, now)
                result = (False, (1.0 - tokens) / self.rate)
            if len(self._buckets) > self._max_keys:
                self._forget_full(now)
        return result

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a token (0.0: one is there now); takes nothing."""
        if self.per_minute == 0:
            return 0.0
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + max(0.0, now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.capacity]
        for k in full:
            del self._buckets[k]
