"""Issue 9, findings 3, 4 and 6, each reproduced as the attack that found it:

- scoping: a second clinician and a viewer cannot read a clinician's prediction or its heat map (which shows the
  X-ray) given its id; another user's id is a 404 with the same sentence as an unknown id (no probing); an admin
  reads it;
- ``/metrics`` without a key, scraped before and after one prediction, tells nothing about its label or
  probability (the prediction distribution needs an admin key);
- ``/readyz`` says 503 while the audit trail cannot commit (the database write-locked by another process: every
  prediction is refused), not 200 because a ``SELECT 1`` still works.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from helpers import copy_run, require_module

require_module("fastapi")
require_module("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from medlens.service import db as db_module  # noqa: E402
from medlens.service import middleware  # noqa: E402
from medlens.service.app import create_app  # noqa: E402
from medlens.service.auth import KeyStore  # noqa: E402
from medlens.service.settings import ServiceSettings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette's TestClient on httpx


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scoping-db") / "audit.db"


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory, db):
    """(client, state, keys): one app, two clinicians (alice, bob), a viewer and an admin."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("scoping-run") / "r")
    settings = dataclasses.replace(ServiceSettings.load(run, database=db, env={}), rate_limit_per_minute=0)
    with KeyStore(settings.database_url) as store:
        keys = {name: store.create(name, role) for name, role in
                (("alice", "clinician"), ("bob", "clinician"), ("val", "viewer"), ("root", "admin"))}
    app = create_app(run, settings)
    with TestClient(app) as client:
        yield client, app.state.service, keys


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _xray(kermany: Path, k: int = 0) -> bytes:
    return sorted(p for p in (kermany / "test" / "PNEUMONIA").iterdir() if not p.name.startswith("."))[k].read_bytes()


def _predict(client, key: str, data: bytes) -> dict:
    r = client.post("/v1/predictions", files={"file": ("x.jpeg", data)}, headers=_auth(key))
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------- 3: scoping


def test_only_the_owner_and_admins_read_a_prediction_and_its_heat_map(served, kermany):
    client, state, keys = served
    p = _predict(client, keys["alice"], _xray(kermany))
    own, heat = f"/v1/predictions/{p['id']}", p["heatmap_url"]
    unknown = str(uuid.uuid4())
    nothing = client.get(f"/v1/predictions/{unknown}", headers=_auth(keys["bob"]))
    assert nothing.status_code == 404
    # bob, another clinician: 404, word for word the answer for an id that does not exist (ids cannot be probed)
    for url in (own, heat):
        r = client.get(url, headers=_auth(keys["bob"]))
        assert r.status_code == 404, (url, r.status_code, r.text)
        assert r.json()["detail"] == nothing.json()["detail"].replace(unknown, p["id"])
        assert str(p["probability"]) not in r.text and r.headers["content-type"] == "application/json"
        row = state.audit.get(r.headers["x-request-id"])  # the attempt is audited under bob's name
        assert (row.user, row.status) == ("bob", 404)
    # the viewer: model information only (403 whatever the id, so nothing about the id either)
    for url in (own, heat, f"/v1/predictions/{unknown}"):
        r = client.get(url, headers=_auth(keys["val"]))
        assert r.status_code == 403 and "clinician" in r.json()["detail"], (url, r.text)
    assert client.get("/v1/models", headers=_auth(keys["val"])).status_code == 200
    # the owner and an admin read it, heat map included
    for who in ("alice", "root"):
        r = client.get(own, headers=_auth(keys[who]))
        assert r.status_code == 200 and r.json() == p, who
        r = client.get(heat, headers=_auth(keys[who]))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", who


# ------------------------------------------------------------------------------------------- 4: /metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")
# the only series an unauthenticated scrape may see move when a prediction is made: traffic and timing
OPERATIONAL = ("medlens_http_requests", "medlens_http_request_duration_seconds", "medlens_batch_size",
               "medlens_batch_duration_seconds")
_SUFFIX = re.compile(r"_(total|created|bucket|sum|count)$")


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_without_a_key_do_not_give_away_a_prediction(served, kermany):
    client, state, keys = served
    before = _samples(client.get("/metrics").text)
    p = _predict(client, keys["alice"], _xray(kermany, 1))
    after = _samples(client.get("/metrics").text)
    moved = {name: value - before.get(name, 0.0) for name, value in after.items() if value != before.get(name, 0.0)}
    assert moved, "the scrape shows no traffic at all"
    classes = state.card.class_names
    for name, delta in moved.items():
        assert _SUFFIX.sub("", name.split("{")[0]) in OPERATIONAL, \
            f"{name} moved by {delta}: an open scrape can tie it to the prediction"
        assert not any(c in name for c in classes) and "refer" not in name and "probability" not in name, name
        assert abs(delta - p["probability"]) > 1e-6, f"{name} moved by the prediction's probability"
    # an admin's scrape has the prediction distribution; another role's key is refused, a bad key too
    r = client.get("/metrics", headers=_auth(keys["root"]))
    assert r.status_code == 200 and "medlens_prediction_probability_bucket" in r.text
    assert f'label="{p["label"]}"' in r.text
    assert client.get("/metrics", headers=_auth(keys["alice"])).status_code == 403
    assert client.get("/metrics", headers=_auth("mlk_" + "x" * 43)).status_code == 401


# ------------------------------------------------------------------------------------------- 6: /readyz


def _ready(client, want: int, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        r = client.get("/readyz")
        if r.status_code == want or time.monotonic() > deadline:
            assert r.status_code == want, f"/readyz said {r.status_code} ({r.text}), expected {want}"
            return r.json()
        time.sleep(0.2)


def test_readyz_is_503_while_the_audit_trail_cannot_commit(served, db, kermany, monkeypatch):
    client, state, keys = served
    _ready(client, 200, 5)
    # another process takes the database's write lock and keeps it: reads still work, commits cannot happen
    locker = sqlite3.connect(db, timeout=1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        # the waits shortened from 30 s to 2 s: for the audit row's commit, and for a lock (new pool connections)
        monkeypatch.setattr(middleware, "AUDIT_TIMEOUT_S", 2.0)
        monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 2000, raising=False)
        state.audit.engine.dispose()
        r = client.post("/v1/predictions", files={"file": ("x.jpeg", _xray(kermany))}, headers=_auth(keys["alice"]))
        assert r.status_code == 503, r.text  # the prediction is refused ...
        body = _ready(client, 503, 5)  # ... and /readyz says so (it used to stay 200: SELECT 1 still answers)
        assert body["database"] is False and body["model_loaded"] is True
        assert "audit trail cannot commit" in body["detail"] and "locked" in body["detail"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    _ready(client, 200, 10)
    # the probe's write is one row, updated in place: repeated probes do not grow the database
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM heartbeat").fetchone()[0] == 1
