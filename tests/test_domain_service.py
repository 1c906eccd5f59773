"""Out-of-domain refusal through the REST API (issue 8): a CT slice, a blank PNG and a noise PNG get no label, are
referred with the reason in words, keep the probability for research use, and the audit row records the verdict
in its own columns; a chest X-ray is answered as before, in domain, with its learned in-domain score. An audit
database from before these columns gets them added (nullable, at the end of the table)."""

from __future__ import annotations

import io
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import clinician_app, require_module, require_shared

require_module("fastapi")
require_module("httpx")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from medlens.service.audit import COLUMNS, AuditLog  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    app, key = clinician_app(tiny_run, tmp_path_factory, "domain-api", "test-clinician")
    with TestClient(app) as client:
        yield client, app.state.service, {"Authorization": f"Bearer {key}"}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _post(served, name: str, data: bytes):
    client, state, auth = served
    r = client.post("/v1/predictions", files={"file": (name, data)}, headers=auth)
    assert r.status_code == 200, r.text
    row = state.audit.get(r.headers["x-request-id"])
    assert row is not None
    return r.json(), row


def test_out_of_domain_uploads_are_refused_with_the_reason_and_audited(served, kermany):
    rng = np.random.default_rng(0)
    ct = require_shared("dicom") / "CT_small.dcm"
    cases = [("ct.dcm", ct.read_bytes(), "modality CT is not one this model was validated on (CR, DX)"),
             ("blank.png", _png(np.zeros((224, 224))), "blank or nearly uniform"),
             ("noise.png", _png(rng.random((224, 224))), "looks like noise"),
             ("tiny.png", _png(np.full((8, 8), 0.5) + rng.random((8, 8)) * 0.3), "smaller than 64 px")]
    for name, data, words in cases:
        p, row = _post(served, name, data)
        assert p["in_domain"] is False and words in p["domain_reason"], (name, p)
        assert p["label"] is None and p["positive"] is None and p["refer"] is True
        assert p["refer_reason"] == f"not assessable: {p['domain_reason']}"
        assert 0 <= p["probability"] <= 1 and "research use only" in p["probability_note"]
        assert isinstance(p["domain_score"], float)
        assert row.in_domain is False and row.domain_reason == p["domain_reason"]
        assert row.domain_score == pytest.approx(p["domain_score"])
        assert row.output["label"] is None

    xray = sorted((kermany / "test" / "NORMAL").iterdir())[0]
    p, row = _post(served, "x.jpeg", xray.read_bytes())
    assert p["in_domain"] is True and p["domain_reason"] is None and p["label"] in ("NORMAL", "PNEUMONIA")
    assert isinstance(p["domain_score"], float) and p["probability_note"] is None
    assert row.in_domain is True and row.domain_score == pytest.approx(p["domain_score"])


def test_viewer_shows_not_assessable_instead_of_a_label():
    js = (Path(__file__).resolve().parents[1] / "src" / "medlens" / "service" / "static" / "viewer.js").read_text()
    assert "not assessable: ${p.domain_reason}" in js and "p.in_domain !== false" in js


def test_an_older_audit_database_gets_the_domain_columns(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    old_columns = COLUMNS[: COLUMNS.index("in_domain")]
    assert COLUMNS[-3:] == ("in_domain", "domain_score", "domain_reason")
    conn.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time VARCHAR(40) NOT NULL, "
                  "request_id VARCHAR(128) NOT NULL UNIQUE, user VARCHAR(128), role VARCHAR(32), action VARCHAR(64) "
                  "NOT NULL, input_sha256 VARCHAR(64), dicom TEXT, model_id VARCHAR(256), weights_sha256 "
                  "VARCHAR(64), output TEXT, latency_ms FLOAT, status INTEGER NOT NULL, error TEXT, policy_hash "
                  "VARCHAR(64))")
    conn.execute("INSERT INTO audit (time, request_id, action, status) VALUES ('2026-01-01T00:00:00', 'old', "
                 "'predict', 200)")
    conn.commit()
    conn.close()
    log = AuditLog(f"sqlite:///{db}")
    try:
        assert log.get("old").in_domain is None
        log.record(request_id="new", action="predict", status=200, in_domain=False, domain_score=42.0,
                   domain_reason="the image looks like noise")
        new = log.get("new")
        assert (new.in_domain, new.domain_score, new.domain_reason) == (False, 42.0, "the image looks like noise")
    finally:
        log.close()
    names = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(audit)")]
    assert tuple(names) == COLUMNS and len(old_columns) == 15
