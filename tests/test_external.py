"""Evaluation as external validation (issue 8): ``medlens evaluate`` on another site's CSV applies the domain gates
to every image and reports the out-of-domain share, the in-domain metrics and the silent errors (wrong, in domain,
not referred); the card states its intended use and the service shows the domain section."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from helpers import copy_run, ood_fixture, require_shared

from medlens.cli import main
from medlens.external import wilson
from medlens.inference import Predictor

pytestmark = pytest.mark.usefixtures("medlens_cache")


def _pid(path: Path) -> str:
    stem = path.stem
    return stem.split("_")[0] if stem.startswith("person") else "-".join(stem.split("-")[:2])


def test_evaluate_on_a_mixed_csv_reports_out_of_domain_share_in_domain_metrics_and_silent_errors(
        tiny_run, cxr_tiny, tmp_path, caplog):
    ood = ood_fixture(require_shared(), tmp_path / "ood", n_kermany=1, n_breast=1)
    rows = [(p, p.parent.name, _pid(p)) for p in sorted((cxr_tiny / "test").glob("*/*"))]
    # inputs the gates refuse whatever the learned score says: real CT / MR DICOM, blank, noise, tiny
    refused = [*ood["dicom"], *[p for p in ood["synthetic_content"] if "one_pixel" not in p.name]]
    rows += [(p, "PNEUMONIA" if k % 2 else "NORMAL", f"ood-{k}") for k, p in enumerate(refused)]
    table = tmp_path / "external.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])  # no split column: --split test means every row
        w.writerows([str(p), label, pid] for p, label, pid in rows)
    run = copy_run(tiny_run, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="medlens.evaluate"):
        assert main(["evaluate", str(run), "--data", str(table), "--split", "test", "--bootstrap", "30",
                     "--no-trust", "--no-progress"]) == 0
    assert "evaluates all" in caplog.text
    out = run / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    dom = metrics["domain"]
    with (out / "predictions.csv").open(newline="") as f:
        evaluated = list(csv.DictReader(f))
    assert len(evaluated) == metrics["n"] == len(rows)  # every row, none skipped

    # recomputed independently through the prediction path (Predictor.predict: its own reads and verdicts)
    truth = {str(p): label for p, label, _ in rows}
    results = Predictor.from_run(run).predict([r["path"] for r in evaluated])
    out_of_domain = [r for r in results if not r["in_domain"]]
    assert {str(p) for p in refused} <= {r["path"] for r in out_of_domain}
    assert dom["out_of_domain"]["k"] == len(out_of_domain) and dom["n"] == len(rows)
    assert dom["out_of_domain"]["value"] == pytest.approx(len(out_of_domain) / len(rows))
    assert dom["in_domain_n"] == len(rows) - len(out_of_domain) == dom["in_domain_metrics"]["n"]
    assert dom["in_domain_metrics"]["bootstrap"]["unit"] == "patient"
    silent = [r for r in results if r["in_domain"] and not r["refer"] and r["label"] != truth[r["path"]]]
    assert dom["silent_error"]["k"] == len(silent)
    assert dom["silent_error"]["ci_low"] <= dom["silent_error"]["value"] <= dom["silent_error"]["ci_high"]
    assert sum(int(r["in_domain"]) for r in evaluated) == dom["in_domain_n"]
    report = (out / "report.html").read_text()
    assert "judged out of domain" in report and "silent errors" in report
    assert "validated on images like the" in report  # the card's intended use, quoted


def test_wilson_interval():
    e = wilson(6, 189)
    assert e["value"] == pytest.approx(6 / 189) and 0.0146 < e["ci_low"] < 0.0147 and 0.0675 < e["ci_high"] < 0.0676
    assert wilson(0, 0)["value"] is None


def test_card_states_its_intended_use_from_the_data(tiny_run):
    use = json.loads((tiny_run / "model.card.json").read_text())["domain"]["intended_use"]
    assert use["n_images"] > 0 and use["n_patients"] > 0 and use["formats"].get("JPEG") == use["n_images"]
    assert "no DICOM headers" in use["text"] and "NORMAL / PNEUMONIA" in use["text"]
