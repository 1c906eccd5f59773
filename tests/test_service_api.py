"""The REST API end to end, on a small model really trained on Kermany chest X-rays: predictions from PNG, JPEG
and DICOM, heat maps, access control, upload limits and bad input (each a clear 4xx with an audit row), the
audit row of every request, metrics, the OpenAPI schema, micro-batching, privacy of DICOM patient fields, and
a schemathesis fuzz of the whole schema that must find no 5xx."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import require_shared
from helpers import copy_run, require_module

require_module("fastapi")
require_module("httpx")
schemathesis = require_module("schemathesis")

with warnings.catch_warnings():  # starlette's TestClient asks for httpx2 instead of httpx: not a test concern
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from medlens.cli import build_parser  # noqa: E402
from medlens.models.card import ModelCard  # noqa: E402
from medlens.service.app import create_app  # noqa: E402
from medlens.service.auth import KeyStore  # noqa: E402
from medlens.service.batching import MicroBatcher  # noqa: E402
from medlens.service.settings import ServiceSettings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette's TestClient on httpx

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
UPLOAD_LIMIT = 1024 * 1024  # bytes: small, so the 413 test sends little


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """This module's own copy of the session's tiny Kermany run (the service may write beside it)."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("api-run") / "r")


@pytest.fixture(scope="module")
def service_settings(run_dir, tmp_path_factory) -> ServiceSettings:
    db = tmp_path_factory.mktemp("api-db") / "audit.db"
    loaded = ServiceSettings.load(run_dir, database=db, env={})  # env={}: the caller's MEDLENS_* are ignored
    # no limit for clients without a key, and an own audit row for each of them: these tests count on both
    # (the limit and the summary rows of a flood: test_service_limits)
    return dataclasses.replace(loaded, rate_limit_per_minute=0, max_upload_bytes=UPLOAD_LIMIT, batch_max_wait_ms=50,
                               anonymous_rate_per_minute=0, anonymous_audit_sample=10**9)


@pytest.fixture(scope="module")
def keys(service_settings) -> dict[str, str]:
    with KeyStore(service_settings.database_url) as store:
        return {role: store.create(f"test-{role}", role) for role in ("viewer", "clinician", "admin")}


@pytest.fixture(scope="module")
def app(run_dir, service_settings, keys):
    return create_app(run_dir, service_settings)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def state(app, client):
    return app.state.service


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _cxr(kermany: Path, cls: str = "PNEUMONIA", k: int = 0) -> Path:
    return sorted(p for p in (kermany / "test" / cls).iterdir() if not p.name.startswith("."))[k]


def _png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("L").save(buf, format="PNG")
    return buf.getvalue()


def _row(state, response):
    """The audit row of a response (by its X-Request-ID); asserts there is exactly one."""
    request_id = response.headers["x-request-id"]
    row = state.audit.get(request_id)
    assert row is not None, f"no audit row for {response.request.method} {response.request.url}"
    assert row.status == response.status_code
    return row


def _clear_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "Traceback" not in body["detail"]
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body["detail"]


# ----------------------------------------------------------------------------------------------- predictions


def test_predict_png_and_jpeg_then_read_back_and_heatmap(client, state, keys, kermany):
    jpeg_path = _cxr(kermany, "PNEUMONIA")
    uploads = {"jpeg": (jpeg_path.read_bytes(), "a.jpeg"), "png": (_png_bytes(_cxr(kermany, "NORMAL")), "b.png")}
    for fmt, (data, name) in uploads.items():
        r = client.post("/v1/predictions", files={"file": (name, data)}, headers=_auth(keys["clinician"]))
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["id"] == r.headers["x-request-id"]
        assert 0.0 <= p["probability"] <= 1.0 and isinstance(p["refer"], bool) and p["refer_reason"]
        card = state.card
        assert p["label"] == card.class_names[card.positive_class if p["probability"] >= card.threshold
                                              else 1 - card.positive_class]
        assert p["positive"] == (p["probability"] >= card.threshold) == (p["positive_class"] == p["label"])
        assert p["threshold"] == pytest.approx(card.threshold, abs=1e-6)
        assert p["uncertainty"]["method"] == "softmax" and p["uncertainty"]["passes"] == 1
        # refer is the card's policy: decision entropy above the threshold chosen on held-apart validation (the
        # calibration half of tiny_run's validation split, which also fitted the temperature)
        calibration = card.metrics["calibration"]
        assert card.refer["n"] == calibration["n"] >= 20 and "held-apart" in card.refer["data"]
        assert card.temperature == pytest.approx(calibration["temperature"]) and card.temperature != 1.0
        assert p["refer"] == (p["uncertainty"]["decision_entropy"] > card.refer["thresholds"]["softmax"])
        assert f"of {calibration['n']} held-apart validation images" in p["refer_reason"]
        assert p["model_id"] == card.model_id and p["weights_sha256"] == card.weights_sha256 and p["version"]
        assert p["input"]["format"] == fmt and p["input"]["sha256"] == hashlib.sha256(data).hexdigest()
        row = _row(state, r)  # acknowledged = audited
        assert (row.action, row.user, row.role) == ("predict", "test-clinician", "clinician")
        assert row.input_sha256 == p["input"]["sha256"] and row.model_id == card.model_id
        assert row.weights_sha256 == card.weights_sha256 and row.output == p and row.latency_ms > 0
        again = client.get(f"/v1/predictions/{p['id']}", headers={"X-API-Key": keys["clinician"]})  # its owner
        assert again.status_code == 200 and again.json() == p
        assert _row(state, again).action == "get_prediction"
        heat = client.get(p["heatmap_url"], headers=_auth(keys["clinician"]))
        assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(heat.content)) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            assert img.size == (p["input"]["width"], p["input"]["height"])  # <= 512 px: the upload's size
        assert _row(state, heat).action == "heatmap"


def test_prediction_and_its_audit_row_carry_the_policy_hash(client, state, keys, kermany, run_dir):
    """The card's operating-policy hash (threshold, temperature, referral) is in every prediction, its audit
    row, the audit listing and the model info, and is the hash of the card file being served."""
    card_on_disk = json.loads((run_dir / "model.card.json").read_text())
    expected = ModelCard.from_dict(card_on_disk).compute_policy_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", expected) and state.card.policy_hash == expected
    for method in ("softmax", "tta"):
        r = client.post(f"/v1/predictions?uncertainty={method}", files={"file": ("x.jpeg", _cxr(kermany).read_bytes())},
                        headers=_auth(keys["clinician"]))
        assert r.status_code == 200, r.text
        assert r.json()["policy_hash"] == expected
        row = _row(state, r)
        assert row.policy_hash == expected and row.output["policy_hash"] == expected
        again = client.get(f"/v1/predictions/{r.json()['id']}", headers=_auth(keys["clinician"]))
        assert again.json()["policy_hash"] == expected
    page = client.get("/v1/audit?limit=1&action=predict", headers=_auth(keys["admin"])).json()
    assert page["items"][0]["policy_hash"] == expected
    info = client.get("/v1/models", headers=_auth(keys["viewer"])).json()["models"][0]
    assert info["policy_hash"] == expected
    r = client.get("/v1/models")  # a 401 is audited with the served policy too: every row names it
    assert r.status_code == 401 and _row(state, r).policy_hash == expected


def test_models_shows_the_domain_section(client, keys, state):
    info = client.get("/v1/models", headers=_auth(keys["viewer"])).json()["models"][0]
    domain, card = info["domain"], state.card.domain
    assert domain["learned_score"] is True and domain["threshold"] == pytest.approx(card["score"]["threshold"])
    assert domain["coverage"] == card["score"]["coverage"] and domain["dicom"]["modalities"] == ["CR", "DX"]
    assert domain["content"]["min_side"] == 64 and domain["intended_use"] == card["intended_use"]["text"]


def test_predict_uncertainty_methods(client, keys, kermany):
    data = _cxr(kermany).read_bytes()
    r = client.post("/v1/predictions?uncertainty=tta", files={"file": ("x.jpeg", data)}, headers=_auth(keys["admin"]))
    assert r.status_code == 200 and r.json()["uncertainty"]["passes"] == 8
    r = client.post("/v1/predictions", data={"uncertainty": "tta"}, files={"file": ("x.jpeg", data)},
                    headers=_auth(keys["clinician"]))
    assert r.status_code == 200 and r.json()["uncertainty"]["method"] == "tta"
    r = client.post("/v1/predictions?uncertainty=ensemble", files={"file": ("x.jpeg", data)},
                    headers=_auth(keys["clinician"]))
    _clear_error(r, 422, "ensemble")
    r = client.post("/v1/predictions?uncertainty=bogus", files={"file": ("x.jpeg", data)},
                    headers=_auth(keys["clinician"]))
    _clear_error(r, 422, "uncertainty")


def test_predict_real_dicom_is_deidentified(client, state, keys, shared_data):
    path = shared_data / "dicom" / SIIM
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    r = client.post("/v1/predictions", files={"file": (path.name, path.read_bytes(), "application/dicom")},
                    headers=_auth(keys["clinician"]))
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["input"]["format"] == "dicom" and (p["input"]["width"], p["input"]["height"]) == (ds.Columns, ds.Rows)
    fields = p["input"]["dicom"]
    assert fields["Modality"] == "CR" and fields["PatientName"].startswith("hmac-sha256:")
    assert fields["PatientID"].startswith("hmac-sha256:")
    row = _row(state, r)
    assert row.dicom == fields and row.dicom["PatientID"] != str(ds.PatientID)
    heat = client.get(p["heatmap_url"], headers=_auth(keys["clinician"]))
    with Image.open(io.BytesIO(heat.content)) as img:
        assert img.size == (512, 512)  # a 1024 x 1024 image is shown at most 512 px wide


def test_get_unknown_and_expired_predictions(client, state, keys, kermany):
    r = client.get("/v1/predictions/00000000-0000-4000-8000-000000000000", headers=_auth(keys["clinician"]))
    _clear_error(r, 404, "no prediction")
    assert _row(state, r).status == 404
    _clear_error(client.get("/v1/predictions/not-a-uuid", headers=_auth(keys["clinician"])), 404, "UUID")
    r = client.post("/v1/predictions", files={"file": ("x.jpeg", _cxr(kermany).read_bytes())},
                    headers=_auth(keys["clinician"]))
    state.inputs.clear()  # as if 256 newer predictions (or a restart) had pushed it out
    r = client.get(r.json()["heatmap_url"], headers=_auth(keys["clinician"]))
    _clear_error(r, 404, "no longer held", "submit the image again")
    assert _row(state, r).action == "heatmap"


# ------------------------------------------------------------------------------------ access control, limits


def test_access_control(client, state, keys, kermany):
    data = _cxr(kermany).read_bytes()
    r = client.post("/v1/predictions", files={"file": ("x.jpeg", data)})
    _clear_error(r, 401, "missing API key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert _row(state, r).user is None
    r = client.post("/v1/predictions", files={"file": ("x.jpeg", data)}, headers=_auth("mlk_" + "x" * 43))
    _clear_error(r, 401, "invalid")
    _row(state, r)
    r = client.post("/v1/predictions", files={"file": ("x.jpeg", data)}, headers={"X-API-Key": keys["viewer"]})
    _clear_error(r, 403, "clinician")
    assert (_row(state, r).user, _row(state, r).role) == ("test-viewer", "viewer")
    r = client.get("/v1/audit", headers=_auth(keys["clinician"]))
    _clear_error(r, 403, "admin")
    _row(state, r)
    r = client.get("/v1/models", headers=_auth(keys["viewer"]))
    assert r.status_code == 200 and r.json()["models"][0]["model_id"] == state.card.model_id
    r = client.get("/v1/audit?limit=5&action=predict", headers=_auth(keys["admin"]))
    assert r.status_code == 200
    page = r.json()
    assert page["total"] >= 1 and 1 <= len(page["items"]) <= 5
    assert all(item["action"] == "predict" for item in page["items"])
    _clear_error(client.get("/v1/audit?since=yesterday", headers=_auth(keys["admin"])), 422, "yesterday")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_rate_limit_and_no_batching(run_dir, service_settings, keys, kermany):
    """A second app on the same database: 2 requests a minute per key, one forward pass per request, and a
    connection pool of the configured size."""
    limited = dataclasses.replace(service_settings, rate_limit_per_minute=2, db_pool_size=3)
    app = create_app(run_dir, limited, batching=False)
    data = _cxr(kermany).read_bytes()
    with TestClient(app) as c:
        st = app.state.service
        assert st.audit.engine.pool.size() == 3
        assert c.post("/v1/predictions", files={"file": ("x.jpeg", data)}, headers=_auth(keys["clinician"])
                      ).status_code == 200
        assert st.runner.stats.batches == 1 and type(st.runner).__name__ == "DirectRunner"
        assert c.get("/v1/models", headers=_auth(keys["clinician"])).status_code == 200
        r = c.post("/v1/predictions", files={"file": ("x.jpeg", data)}, headers=_auth(keys["clinician"]))
        _clear_error(r, 429, "rate limit")
        assert int(r.headers["retry-after"]) >= 1
        assert _row(st, r).user == "test-clinician"
        assert c.get("/v1/models", headers=_auth(keys["viewer"])).status_code == 200  # limits are per key


def test_upload_too_large(client, state, keys):
    r = client.post("/v1/predictions", files={"file": ("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(UPLOAD_LIMIT))},
                    headers=_auth(keys["clinician"]))
    _clear_error(r, 413, "larger than the limit")
    assert _row(state, r).action == "predict"


def test_not_an_image(client, state, keys):
    r = client.post("/v1/predictions", files={"file": ("scan.png", b"patient notes, not an image\n" * 10)},
                    headers=_auth(keys["clinician"]))
    _clear_error(r, 415, "not a PNG, JPEG or DICOM", "text")
    _row(state, r)
    r = client.post("/v1/predictions", content=b"raw bytes", headers={**_auth(keys["clinician"]),
                                                                        "Content-Type": "image/png"})
    _clear_error(r, 415, "multipart/form-data")
    r = client.post("/v1/predictions", files={"other": ("x.png", b"x")}, headers=_auth(keys["clinician"]))
    _clear_error(r, 422, "'file' is missing")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb(client, state, keys):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 grey pixels claimed
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b""))
    r = client.post("/v1/predictions", files={"file": ("bomb.png", bomb)}, headers=_auth(keys["clinician"]))
    _clear_error(r, 413, "100000 x 100000", "decompression-bomb")
    assert _row(state, r).input_sha256 == hashlib.sha256(bomb).hexdigest()


def _without_pixels(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_without_pixels(client, state, keys, shared_data):
    data = _without_pixels(shared_data / "dicom" / "CT_small.dcm")
    r = client.post("/v1/predictions", files={"file": ("CT_small.dcm", data)}, headers=_auth(keys["clinician"]))
    _clear_error(r, 422, "no pixel data")
    row = _row(state, r)
    assert row.dicom["Modality"] == "CT" and row.dicom["PatientName"].startswith("hmac-sha256:")


def test_request_timeout(client, state, keys, kermany):
    settings = state.settings
    state.settings = dataclasses.replace(settings, request_timeout_s=0.001)
    try:
        r = client.post("/v1/predictions", files={"file": ("x.jpeg", _cxr(kermany).read_bytes())},
                        headers=_auth(keys["clinician"]))
    finally:
        state.settings = settings
    _clear_error(r, 504, "timeout")
    assert _row(state, r).status == 504


# ------------------------------------------------------------------------------- metrics, schema, batching


def test_metrics(client, keys, kermany):
    client.post("/v1/predictions", files={"file": ("x.jpeg", _cxr(kermany).read_bytes())},
                headers=_auth(keys["clinician"]))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'medlens_http_requests_total{method="POST",route="/v1/predictions",status="200"}' in text
    for series in ("medlens_http_request_duration_seconds_bucket", "medlens_batch_size_bucket", "medlens_model_info"):
        assert series in text, series
    # what was predicted: only for an admin's scrape (test_service_scoping reproduces the leak it closes)
    assert "medlens_prediction_probability" not in text and "medlens_predictions_referred_total" not in text
    text = client.get("/metrics", headers=_auth(keys["admin"])).text
    for series in ("medlens_prediction_probability_bucket", "medlens_predictions_referred_total",
                   "medlens_http_request_duration_seconds_bucket"):
        assert series in text, series


def test_openapi_lists_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in (("/v1/predictions", "post"), ("/v1/predictions/{id}", "get"),
                         ("/v1/predictions/{id}/heatmap.png", "get"), ("/v1/models", "get"), ("/v1/audit", "get"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")):
        assert method in paths[path], path
        assert paths[path][method].get("tags") and paths[path][method].get("description")
    post = paths["/v1/predictions"]["post"]
    assert "file" in post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"401", "403", "413", "415", "422", "429"} <= set(post["responses"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])


def test_viewer_page_has_the_banner(client):
    r = client.get("/")
    assert r.status_code == 200 and "not for diagnostic use" in r.text.lower()


def test_micro_batching_serves_concurrent_requests_in_fewer_forward_passes(client, state, keys, kermany):
    images = [_cxr(kermany, cls, k).read_bytes() for cls in ("NORMAL", "PNEUMONIA") for k in range(2)]
    before_batches, before_rows = state.runner.stats.batches, state.audit.count(action="predict")

    def post(i: int):
        return client.post("/v1/predictions", files={"file": (f"{i}.jpeg", images[i % len(images)])},
                           headers=_auth(keys["clinician"]))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.json()["id"] for r in responses}) == 16
    batches = state.runner.stats.batches - before_batches
    assert 1 <= batches < 16, f"16 concurrent requests took {batches} forward passes"
    assert state.audit.count(action="predict") - before_rows == 16


def test_batcher_groups_by_method_isolates_failures_and_drops_abandoned_requests():
    """The micro-batcher on its own, with a fake model: one call per method group, results back in order,
    a failing group fails only its own requests, and a request that gave up is not computed."""
    calls: list[tuple[str, int]] = []

    def fake(images, method):
        calls.append((method, len(images)))
        if method == "mc":
            raise ValueError("boom")
        return {"probability": images.float().mean(dim=(1, 2, 3)).numpy(), "passes": np.ones(len(images), int)}

    images = [torch.full((1, 1, 2, 2), i, dtype=torch.uint8) for i in range(6)]

    async def scenario():
        with MicroBatcher(fake, max_size=8, max_wait_ms=100, workers=2) as batcher:
            results = await asyncio.gather(*(batcher.submit(im, "softmax") for im in images),
                                           batcher.submit(images[1], "mc"), return_exceptions=True)
            abandoned = asyncio.ensure_future(batcher.submit(images[2], "softmax"))
            await asyncio.sleep(0.02)
            abandoned.cancel()
            await asyncio.sleep(0.2)
            return results, batcher.stats

    results, stats = asyncio.run(scenario())
    assert [r["probability"] for r in results[:6]] == [float(i) for i in range(6)]
    assert isinstance(results[6], ValueError)
    assert sorted(calls) == [("mc", 1), ("softmax", 6)]
    assert (stats.requests, stats.batches, stats.dropped) == (8, 2, 1)


# ------------------------------------------------------------------------------------------------- privacy


def test_no_patient_identifiers_in_audit_db_or_logs(client, state, keys, shared_data, caplog, capsys,
                                                   service_settings):
    caplog.set_level(logging.DEBUG)
    folder = require_shared("dicom")
    secrets: set[str] = set()
    for name in (SIIM, "CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        secrets |= {str(ds.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate") if ds.get(k)}
        secrets.add(name)
        r = client.post("/v1/predictions", files={"file": (name, (folder / name).read_bytes())},
                        headers=_auth(keys["clinician"]))
        assert r.status_code == 200, r.text
        assert client.get(r.json()["heatmap_url"], headers=_auth(keys["clinician"])).status_code == 200
    r = client.post("/v1/predictions", files={"file": ("MR_small.dcm", _without_pixels(folder / "MR_small.dcm"))},
                    headers=_auth(keys["clinician"]))
    assert r.status_code == 422
    assert state.audit.list(limit=5, action="predict")  # rows were written
    db = Path(service_settings.database_url.split("///", 1)[1])
    blob = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # audit.db, -wal, -shm
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err
    for secret in sorted(secrets):
        assert secret.encode() not in blob, f"{secret!r} is in the audit database"
        assert secret not in logs, f"{secret!r} is in the logs"


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_has_serve_and_the_admin_commands(run_dir):
    args = build_parser().parse_args(["serve", str(run_dir), "--port", "9000", "--no-batching", "--db", "x.db"])
    assert (args.port, args.no_batching, args.db, args.host) == (9000, True, "x.db", "127.0.0.1")
    assert build_parser().parse_args(["keys", "list"]).func.__name__ == "cmd_keys_list"


# ------------------------------------------------------------------------------------------ property fuzz


def test_fuzz_the_api_finds_no_server_error(app, client, keys):
    """Schemathesis generates requests from /openapi.json, valid and deliberately invalid ones, for every
    operation (30 each), with an admin key; none may get a 5xx."""
    from schemathesis.python import asgi

    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts its own lifespan of the app
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8
        for operation in operations:
            strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                 operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=strategy)
            @settings(max_examples=30, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case):
                case.call_and_validate(headers=_auth(keys["admin"]), checks=[not_a_server_error])

            no_server_error()
    finally:
        asgi.shutdown_lifespans()  # schemathesis would keep it running until the interpreter exits
