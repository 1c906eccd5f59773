"""The service over real HTTP: a uvicorn server on loopback (in a thread of this process) serving a small model
really trained on Kermany chest X-rays, driven with httpx.

- a revoked API key is refused (401) at once, and malformed ``Authorization`` / ``X-API-Key`` headers (no
  token, another scheme, no scheme, spaces, garbage, non-ASCII bytes, overlong) are a 401 with one clear
  ``{"detail"}``, audited, never a 500;
- CORS: with the default settings no response carries ``Access-Control-Allow-Origin`` (preflight or not); with
  ``MEDLENS_CORS_ORIGINS`` set, the listed origins get it and others do not;
- the whole app on a real PostgreSQL server (``service_pg.py``): a prediction, a 401 and a 415 over HTTP, and
  their audit rows read back from PostgreSQL directly, with the right statuses and the card's policy hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import copy_run, require_module, serve_in_thread

require_module("fastapi")
require_module("uvicorn")
httpx = require_module("httpx")

from medlens.service.app import create_app  # noqa: E402
from medlens.service.auth import KeyStore  # noqa: E402
from medlens.service.settings import ServiceSettings  # noqa: E402

pytest_plugins = ["service_pg"]  # fixtures pg_url, pg_server: one PostgreSQL server per session

ORIGIN = "https://viewer.example.org"
OTHER_ORIGIN = "https://elsewhere.example.com"


# ------------------------------------------------------------------------------------------------ helpers


@dataclasses.dataclass
class Served:
    url: str
    app: object

    @property
    def state(self):
        return self.app.state.service


@contextlib.contextmanager
def serving(app) -> Iterator[Served]:
    """``app`` on a real uvicorn server on a free loopback port, for the block; stopped gracefully after."""
    with serve_in_thread(app) as url:
        yield Served(url, app)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _xray(kermany: Path, k: int = 0) -> bytes:
    return sorted(p for p in (kermany / "test" / "PNEUMONIA").iterdir() if not p.name.startswith("."))[k].read_bytes()


def _predict(http: httpx.Client, headers: dict, data: bytes) -> httpx.Response:
    return http.post("/v1/predictions", files={"file": ("x.jpeg", data)}, headers=headers)


def _clear_401(r: httpx.Response, *words: str) -> str:
    assert r.status_code == 401, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "Traceback" not in body["detail"], body
    for word in words:
        assert word in body["detail"], body["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    return body["detail"]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """This module's own copy of the session's tiny Kermany run (on PostgreSQL the service keeps its audit key
    in the run folder)."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("http-run") / "r")


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-db") / "audit.db"


@pytest.fixture(scope="module")
def settings(run_dir, db) -> ServiceSettings:
    loaded = ServiceSettings.load(run_dir, database=db, env={})  # env={}: the caller's MEDLENS_* are ignored
    # each malformed key below must get its 401 and its own audit row: no per-address limit or summary rows here
    return dataclasses.replace(loaded, rate_limit_per_minute=0, anonymous_rate_per_minute=0,
                               anonymous_audit_sample=10**9)


@pytest.fixture(scope="module")
def server(run_dir, settings) -> Iterator[Served]:
    """The service with its default settings (CORS off), on a real server."""
    with serving(create_app(run_dir, settings)) as served:
        yield served


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


# ------------------------------------------------------------------------------------------ access control


def test_revoked_key_gets_401_over_http(server, http, settings, kermany):
    with KeyStore(settings.database_url) as store:
        doomed = store.create("http-soon-revoked", "clinician")
        other = store.create("http-still-valid", "clinician")
    assert _predict(http, _auth(doomed), _xray(kermany)).status_code == 200
    assert http.get("/v1/models", headers={"X-API-Key": doomed}).status_code == 200
    with KeyStore(settings.database_url) as store:  # as `medlens keys revoke` does, while the server runs
        assert store.revoke("http-soon-revoked") is True
    for r in (_predict(http, _auth(doomed), _xray(kermany)), http.get("/v1/models", headers=_auth(doomed)),
              http.get("/v1/models", headers={"X-API-Key": doomed})):
        _clear_401(r, "invalid or revoked")
        row = server.state.audit.get(r.headers["x-request-id"])
        assert row is not None and row.status == 401 and row.user is None and row.role is None
    assert http.get("/v1/models", headers=_auth(other)).status_code == 200  # only that key is revoked


MALFORMED_HEADERS = [  # (headers, what the detail says)
    ({"Authorization": "Bearer"}, "malformed Authorization header"),  # the scheme without a token
    ({"Authorization": ""}, "missing API key"),  # an empty header is no key
    ({"Authorization": "Bearer  mlk_two-spaces"}, "invalid or revoked"),
    ({"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}, "malformed Authorization header"),  # another scheme
    ({"Authorization": "Token mlk_abc"}, "malformed Authorization header"),
    ({"Authorization": "mlk_" + "x" * 43}, "malformed Authorization header"),  # a key without a scheme
    ({"Authorization": "Bearer mlk_abc def ghi"}, "invalid or revoked"),  # spaces inside the key
    ({"Authorization": "Bearer ,;=\"'<>{}[]\\%00"}, "invalid or revoked"),  # punctuation garbage
    ({"Authorization": "Bearer " + "A" * 5000}, "invalid or revoked"),  # far longer than any key
    ({"Authorization": "Bearer mlk_Ünïcødé-ключ".encode()}, "invalid or revoked"),  # non-ASCII (UTF-8)
    ({"Authorization": b"Bearer mlk_\xff\xfe\x80\x81"}, "invalid or revoked"),  # non-ASCII, not even UTF-8
    ({"X-API-Key": "not a key at all"}, "invalid or revoked"),
    ({"X-API-Key": "☃ mlk_".encode()}, "invalid or revoked"),
    ({"Authorization": "Basic abc", "X-API-Key": ""}, "malformed Authorization header"),
]


@pytest.mark.parametrize("headers, words", MALFORMED_HEADERS,
                         ids=[f"{i}-{list(h)[0]}" for i, (h, _) in enumerate(MALFORMED_HEADERS)])
def test_malformed_authorization_gets_a_clear_401(server, http, kermany, headers, words):
    for r in (http.get("/v1/models", headers=headers), _predict(http, headers, _xray(kermany))):
        detail = _clear_401(r, words)
        assert "mlk_" not in detail and "dXNlcjpwYXNzd29yZA" not in detail  # the credential is never echoed
        row = server.state.audit.get(r.headers["x-request-id"])
        assert row is not None and row.status == 401 and row.user is None


def test_no_server_error_was_counted(http):
    """After malformed headers (sent here as well: under xdist the tests above may run in another worker, with
    another server): not one 5xx in this server's request metrics."""
    for headers, _words in MALFORMED_HEADERS:
        assert http.get("/v1/models", headers=headers).status_code == 401
    text = http.get("/metrics").text
    assert 'status="401"' in text
    assert not [line for line in text.splitlines()
                if line.startswith("medlens_http_requests_total") and 'status="5' in line], text


# --------------------------------------------------------------------------------------------------- CORS


def _preflight(http: httpx.Client, path: str, origin: str, method: str = "GET") -> httpx.Response:
    return http.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers": "authorization"})


def test_cors_is_off_by_default(server, http, settings, kermany):
    assert settings.cors_origins == ()
    with KeyStore(settings.database_url) as store:
        key = store.create("http-cors-off", "clinician")
    responses = [_preflight(http, "/v1/models", ORIGIN), _preflight(http, "/v1/predictions", ORIGIN, "POST"),
                 http.get("/v1/models", headers={**_auth(key), "Origin": ORIGIN}),
                 http.post("/v1/predictions", files={"file": ("x.jpeg", _xray(kermany))},
                           headers={**_auth(key), "Origin": ORIGIN}),
                 http.get("/healthz", headers={"Origin": ORIGIN})]
    assert [r.status_code for r in responses[2:]] == [200, 200, 200]
    for r in responses:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], (r.request, r.headers)
    assert responses[0].status_code >= 400  # no CORS handling: OPTIONS is not an allowed method


def test_cors_for_the_configured_origins(run_dir, db, kermany):
    env = {"MEDLENS_CORS_ORIGINS": f"{ORIGIN}, https://pacs.example.org:8443/"}
    configured = ServiceSettings.load(run_dir, database=db, env=env)
    assert configured.cors_origins == (ORIGIN, "https://pacs.example.org:8443")
    configured = dataclasses.replace(configured, rate_limit_per_minute=0)
    with KeyStore(configured.database_url) as store:
        key = store.create("http-cors-on", "clinician")
    with serving(create_app(run_dir, configured)) as served, \
            httpx.Client(base_url=served.url, timeout=60.0) as http:
        for path, method in (("/v1/models", "GET"), ("/v1/predictions", "POST")):
            ok = _preflight(http, path, ORIGIN, method)
            assert ok.status_code == 200, ok.text
            assert ok.headers["access-control-allow-origin"] == ORIGIN
            assert method in ok.headers["access-control-allow-methods"]
            assert "authorization" in ok.headers["access-control-allow-headers"].lower()
            refused = _preflight(http, path, OTHER_ORIGIN, method)
            assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        r = http.get("/v1/models", headers={**_auth(key), "Origin": ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = http.post("/v1/predictions", files={"file": ("x.jpeg", _xray(kermany))},
                      headers={**_auth(key), "Origin": "https://pacs.example.org:8443"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://pacs.example.org:8443"
        r = http.get("/v1/models", headers={**_auth(key), "Origin": OTHER_ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------------------------------- PostgreSQL


def test_the_app_on_postgresql(run_dir, pg_url, kermany):
    """The whole service with its audit trail and keys on a real PostgreSQL server; the rows are read back
    from PostgreSQL directly, after the server has stopped."""
    settings = dataclasses.replace(ServiceSettings.load(run_dir, database=pg_url, env={}), rate_limit_per_minute=0)
    assert settings.database_url.startswith("postgresql")
    with KeyStore(settings.database_url) as store:
        key = store.create("pg-clinician", "clinician")
    app = create_app(run_dir, settings)
    with serving(app) as served, httpx.Client(base_url=served.url, timeout=60.0) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] is True
        assert served.state.audit.engine.dialect.name == "postgresql"
        card = served.state.card
        ok = _predict(http, _auth(key), _xray(kermany))
        assert ok.status_code == 200, ok.text
        prediction = ok.json()
        denied = _predict(http, {}, _xray(kermany))
        _clear_401(denied, "missing API key")
        refused = http.post("/v1/predictions", files={"file": ("x.png", b"not an image\n" * 20)},
                            headers=_auth(key))
        assert refused.status_code == 415
        again = http.get(f"/v1/predictions/{prediction['id']}", headers=_auth(key))  # read back from PostgreSQL
        assert again.status_code == 200 and again.json() == prediction

    engine = sa.create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rows = {r.request_id: r for r in conn.execute(sa.text(
                'SELECT request_id, action, status, "user", role, model_id, policy_hash, output FROM audit'))}
    finally:
        engine.dispose()
    assert len(rows) == 4
    row = rows[ok.headers["x-request-id"]]
    assert (row.action, row.status, row.user, row.role) == ("predict", 200, "pg-clinician", "clinician")
    assert row.model_id == card.model_id and row.policy_hash == card.policy_hash == prediction["policy_hash"]
    assert json.loads(row.output) == prediction
    row = rows[denied.headers["x-request-id"]]
    assert (row.action, row.status, row.user) == ("predict", 401, None) and row.policy_hash == card.policy_hash
    assert (rows[refused.headers["x-request-id"]].status, rows[again.headers["x-request-id"]].action) == (
        415, "get_prediction")
