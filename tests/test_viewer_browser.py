"""The web viewer in a real browser: Debian's Chromium, headless, driven by Playwright, against a real uvicorn
server on loopback serving a model really trained on Kermany chest X-rays.

It connects with a clinician key, uploads a chest X-ray from the official test split through the file input,
and checks what a radiologist sees: the probability against the threshold, the refer flag, the heat-map
overlay (whose opacity slider works) and the list of recent studies. A screenshot is kept as a test artefact
(MEDLENS_ARTEFACTS, default the test's temporary folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import clinician_app, in_ci, require_module, serve_in_thread

require_module("fastapi")
require_module("uvicorn")
playwright_api = require_module("playwright.sync_api")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _require_chromium() -> str:
    if not Path(CHROMIUM).exists():
        if in_ci():
            pytest.fail("Debian's chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    app, key = clinician_app(tiny_run, tmp_path_factory, "viewer", "dr-test")  # this module's own copy
    with serve_in_thread(app) as url:
        yield {"url": url, "key": key, "app": app}


@pytest.fixture(scope="module")
def browser():
    executable = _require_chromium()
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_viewer_upload_shows_probability_refer_flag_and_heatmap(server, browser, kermany, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server["url"] + "/")
    assert "not for diagnostic use" in page.inner_text("#banner").lower()

    page.fill("#api-key", server["key"])
    page.click("#connect")
    page.wait_for_selector("body[data-connected='true']", timeout=15_000)
    assert "threshold" in page.inner_text("#model")

    xray = sorted((kermany / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    page.set_input_files("#file-input", str(xray))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    page.wait_for_selector("#viewer:not([hidden])", timeout=60_000)

    probability = float(page.inner_text("#probability"))
    threshold = float(page.inner_text("#threshold"))
    assert 0.0 <= probability <= 1.0 and 0.0 <= threshold <= 1.0
    label = page.inner_text("#label")
    assert label == ("PNEUMONIA" if probability >= threshold else "NORMAL")
    refer = page.get_attribute("#refer", "data-refer")
    assert refer in ("true", "false")
    assert page.inner_text("#refer") in ("Refer to a radiologist", "No referral")

    # both layers are real decoded images of the same size, stacked
    for img in ("#image-base", "#heatmap-overlay"):
        page.wait_for_function(f"document.querySelector('{img}').complete && "
                               f"document.querySelector('{img}').naturalWidth > 0", timeout=30_000)
    base = page.eval_on_selector("#image-base", "e => [e.naturalWidth, e.naturalHeight]")
    heat = page.eval_on_selector("#heatmap-overlay", "e => [e.naturalWidth, e.naturalHeight]")
    assert base == heat and min(base) > 32
    assert page.eval_on_selector("#heatmap-overlay", "e => e.hidden") is False
    # the opacity slider drives the overlay
    page.fill("#opacity", "80")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#heatmap-overlay", "e => e.style.opacity") == "0.8"

    # the study is listed; the prediction id shown is the one in the audit trail
    assert xray.name in page.inner_text("#recent")
    prediction_id = page.inner_text("#prediction-id")
    row = server["app"].state.service.audit.get(prediction_id)
    assert row is not None and row.status == 200 and row.user == "dr-test"

    # the worklist tab lists the study with its triage priority; a click opens it
    page.wait_for_selector("#worklist-body tr", timeout=15_000)
    rows = page.eval_on_selector_all("#worklist-body tr", "rs => rs.map(r => r.dataset.priority)")
    assert rows and set(rows) <= {"positive", "refer", "routine"}
    page.click(f"#worklist-body tr[data-prediction='{prediction_id}']")
    page.wait_for_function(f"document.getElementById('prediction-id').textContent === '{prediction_id}'",
                           timeout=15_000)

    artefacts = Path(os.environ.get("MEDLENS_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    page.close()


def test_viewer_wrong_key_says_so(server, browser):
    page = browser.new_page()
    page.goto(server["url"] + "/")
    page.fill("#api-key", "mlk_not-a-key")
    page.click("#connect")
    page.wait_for_selector("#error:not([hidden])", timeout=15_000)
    assert "could not connect" in page.inner_text("#error").lower()
    page.close()


def test_viewer_says_not_assessable_for_a_ct_slice(server, browser, shared_data, tmp_path):
    """Outside the model's envelope the viewer shows the reason instead of a label (issue 8)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server["url"] + "/")
    page.fill("#api-key", server["key"])
    page.click("#connect")
    page.wait_for_selector("body[data-connected='true']", timeout=15_000)
    page.set_input_files("#file-input", str(shared_data / "dicom" / "CT_small.dcm"))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    label = page.inner_text("#label")
    assert label.startswith("not assessable: ") and "modality CT" in label, label
    assert label not in ("PNEUMONIA", "NORMAL")
    assert page.get_attribute("#refer", "data-refer") == "true"
    # the image is shown, but no heat map: an explanation of a call the model cannot make would mislead
    page.wait_for_selector("#viewer:not([hidden])", timeout=60_000)
    assert page.eval_on_selector("#heatmap-overlay", "e => e.hidden") is True
    artefacts = Path(os.environ.get("MEDLENS_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artefacts / "viewer-not-assessable.png"), full_page=True)
    assert not errors, errors
    page.close()
