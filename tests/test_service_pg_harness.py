"""The PostgreSQL test harness (``service_pg.py``) itself: under ``CI=true`` a test that needs PostgreSQL fails
when the server cannot be had, and is never silently skipped; elsewhere a machine without PostgreSQL skips it,
and a PostgreSQL that is installed but does not start fails everywhere."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import service_pg


def _outcome(fn) -> BaseException | None:
    """What ``fn()`` raised, whatever it was: pytest's skip and fail are exceptions too, and a skip escaping a
    ``pytest.raises(fail.Exception)`` would turn this very test into a skip instead of a failure."""
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the outcome is what is tested
        return exc
    return None


def _fake_bin(folder: Path, initdb_exit: int) -> Path:
    """A folder with an ``initdb`` that prints a message and exits ``initdb_exit``, and a ``pg_ctl`` that fails."""
    folder.mkdir()
    for name, code in (("initdb", initdb_exit), ("pg_ctl", 1)):
        script = folder / name
        script.write_text(f"#!/bin/sh\necho 'fake {name}: cannot create the cluster' >&2\nexit {code}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_postgres_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(service_pg, "find_pg_bin", lambda: None)
    outcome = _outcome(service_pg.start_pg_server)
    assert isinstance(outcome, pytest.fail.Exception), f"expected a failure under CI, got {outcome!r}"
    assert "not installed" in str(outcome) and "CI=true" in str(outcome)


def test_missing_postgres_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(service_pg, "find_pg_bin", lambda: None)
    outcome = _outcome(service_pg.start_pg_server)
    assert isinstance(outcome, pytest.skip.Exception), f"expected a skip outside CI, got {outcome!r}"
    assert "not installed" in str(outcome)


@pytest.mark.parametrize("ci", ["true", None])
def test_postgres_that_does_not_start_fails_everywhere(monkeypatch, tmp_path, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    bindir = _fake_bin(tmp_path / "bin", initdb_exit=1)
    monkeypatch.setattr(service_pg, "find_pg_bin", lambda: bindir)
    monkeypatch.setattr(service_pg, "_run_as", lambda: {})  # the fake scripts need no other user
    outcome = _outcome(service_pg.start_pg_server)
    assert isinstance(outcome, pytest.fail.Exception), f"expected a failure, got {outcome!r}"
    assert re.search("(?s)did not start.*initdb failed.*cannot create the cluster", str(outcome)), str(outcome)
