"""A real, throwaway PostgreSQL server for the service tests, and a ``db_url`` fixture over SQLite + PostgreSQL.

``pg_server`` (one per test session, per xdist worker) runs ``initdb`` into a temporary folder and starts
``postgres`` on a free port on 127.0.0.1 with its unix socket in that folder; it is stopped and deleted at the
end. PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (or ``nobody``).
Binaries are found under ``/usr/lib/postgresql/<version>/bin`` (Debian) or on PATH. Without them (or without
psycopg) the tests fail when ``CI=true`` (``.ci/run`` installs them) and are skipped elsewhere; a server that is
installed but does not start fails the tests everywhere (:func:`start_pg_server`).

Test modules load this file as a plugin, ``pytest_plugins = ["service_pg"]``, rather than importing the
fixtures: an imported session fixture is a separate fixture in every module, which would start one server per
module.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import _missing, free_port

PG_USER = "medlens"


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, else PATH."""

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


class PgServer:
    """A running PostgreSQL cluster in a temporary folder."""

    def __init__(self, bindir: Path, root: Path, run_as: dict[str, Any]):
        self.bindir, self.root, self.run_as = bindir, root, run_as
        self.data, self.sockets, self.log = root / "data", root / "sock", root / "server.log"
        self.port = 0

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C", "LANG": "C"}, **self.run_as)

    def init(self) -> None:
        out = self._run(self.bindir / "initdb", "-D", self.data, "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-sync", timeout=120)
        if out.returncode:
            raise RuntimeError(f"initdb failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        self.sockets.mkdir()
        if self.run_as:
            os.chown(self.sockets, self.run_as["user"], self.run_as["group"])

    def start(self, attempts: int = 3, *, fsync: bool = False) -> None:
        """fsync off for tests (a throwaway server); on (PostgreSQL's default durability) for benchmarks."""
        for _ in range(attempts):  # a free port can be taken between the probe and the bind: try another
            self.port = free_port()
            options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                       f"-c fsync={'on' if fsync else 'off'} -c max_connections=60")
            out = self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w",
                            "-t", "60", "start", timeout=90)
            if out.returncode == 0:
                return
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        raise RuntimeError(f"pg_ctl start failed:\n{out.stdout}\n{out.stderr}\n{log[-3000:]}")

    def stop(self) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _run_as() -> dict[str, Any]:
    """subprocess keyword arguments that drop root to an unprivileged user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    pytest.fail("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")
    return {}  # unreachable


def start_pg_server(*, fsync: bool = False) -> PgServer:
    """A running throwaway server (stop it with :func:`stop_pg_server`).

    PostgreSQL or psycopg not installed: the test fails under ``CI=true`` and is skipped elsewhere. Installed
    but the server does not start (initdb or pg_ctl fails): the test fails everywhere, with the server's log,
    since that is a broken set-up or a bug here, not a machine without PostgreSQL.
    """
    bindir = find_pg_bin()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed: pip install -e '.[dev]'")
    run_as = _run_as()
    root = Path(tempfile.mkdtemp(prefix="medlens-pg-"))  # in /tmp: reachable by the unprivileged user
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    server = PgServer(bindir, root, run_as)
    try:
        server.init()
        server.start(fsync=fsync)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        stop_pg_server(server)
        pytest.fail(f"PostgreSQL is installed ({bindir}) but the throwaway server did not start: {exc}")
    return server


def stop_pg_server(server: PgServer) -> None:
    if server.port:
        server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = start_pg_server()
    try:
        yield server
    finally:
        stop_pg_server(server)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, then a PostgreSQL database (the same test runs against both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("pg_url")
