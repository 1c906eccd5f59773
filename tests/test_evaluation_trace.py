"""Honest numbers: patient-level intervals, the append-only evaluation trace and the policy hash.

A run evaluated on test, then recalibrated, then evaluated again must keep both evaluations (with different
policy hashes) in ``RUN/evaluations.jsonl``, and its card must say that the policy changed after a test look.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_run, read_card

from medlens import rundir
from medlens.cli import main


@pytest.fixture(autouse=True)
def _cache(medlens_cache):
    return medlens_cache


def _evaluate(run: Path, data: Path) -> dict:
    assert main(["evaluate", str(run), "--data", str(data), "--split", "test", "--no-trust", "--bootstrap", "100",
                 "--no-progress"]) == 0
    return json.loads(rundir.eval_dir(run, "test").joinpath("metrics.json").read_text())


def _recalibrate(run: Path, data: Path, capsys, *sets: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["recalibrate", str(run), "--data", str(data), *[x for s in sets for x in ("--set", s)],
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def test_metrics_json_resamples_patients(tiny_run, cxr_tiny, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    metrics = _evaluate(run, cxr_tiny)
    boot = metrics["bootstrap"]
    assert boot["unit"] == "patient" and boot["resamples"] == 100 and boot["seed"] == 0
    # Kermany file names carry the patient: the 40 test images come from fewer patients
    from medlens.data.sources import discover

    table = discover(cxr_tiny)
    test_patients = {table.patient_ids[i] for i in range(len(table)) if table.splits[i] == "test"}
    assert boot["n_units"] == len(test_patients) < metrics["n"]
    report = (run / "eval" / "test" / "report.html").read_text()
    assert f"resampling patients ({len(test_patients)} patients" in report
    with (run / "eval" / "test" / "predictions.csv").open() as f:
        header = f.readline().strip().split(",")
        assert header[-1] == "policy_hash" and f.readline().strip().endswith(read_card(run)["policy_hash"])


def test_data_without_patient_ids_falls_back_to_images_and_says_so(shared_data, tmp_path):
    """MedMNIST has no patient ids: the intervals resample images, and metrics.json and the report say so."""
    npz = shared_data / "medmnist" / "pneumoniamnist.npz"
    run = tmp_path / "run"
    assert main(["train", str(npz), "--out", str(run), "--recipe", "medmnist", "--set", "train.epochs=1",
                 "--no-progress"]) == 0
    metrics = _evaluate(run, npz)
    assert metrics["bootstrap"]["unit"] == "image" and metrics["bootstrap"]["n_units"] == metrics["n"] == 624
    assert "no patient ids were known" in (run / "eval" / "test" / "report.html").read_text()


def test_evaluate_recalibrate_evaluate_keeps_both_with_different_policies(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    first = _evaluate(run, cxr_tiny)
    card0 = read_card(run)
    assert first["policy_hash"] == card0["policy_hash"] != ""
    assert card0["metrics"]["calibration"]["n"] > 0  # the held-apart half exists: temperature and referral fitted
    printed, err = _recalibrate(run, cxr_tiny, capsys, "eval.refer_coverage=0.7")
    assert printed["after_test_look"] is True and "changed after a test look" in err
    card1 = read_card(run)
    assert card1["weights_sha256"] == card0["weights_sha256"]
    assert card1["policy_hash"] != card0["policy_hash"]
    change = card1["policy_changes"][-1]
    assert change["after_test_look"] is True and change["changed"] is True
    assert change["evaluations_before"] == {"test": 1}
    assert (change["old_policy_hash"], change["new_policy_hash"]) == (card0["policy_hash"], card1["policy_hash"])
    _evaluate(run, cxr_tiny)
    trace = rundir.read_evaluations(run)
    assert [e["split"] for e in trace] == ["test", "test"]
    assert [e["policy_hash"] for e in trace] == [card0["policy_hash"], card1["policy_hash"]]
    assert trace[0]["weights_sha256"] == trace[1]["weights_sha256"] == card0["weights_sha256"]
    assert trace[0]["data_sha256"] == trace[1]["data_sha256"] and len(trace[0]["data_sha256"]) == 64
    assert trace[0]["metrics"]["auc"]["value"] == pytest.approx(first["auc"]["value"])
    # predictions say which policy made them
    img = next((cxr_tiny / "test" / "PNEUMONIA").iterdir())
    capsys.readouterr()
    assert main(["predict", str(run), str(img)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policy_hash"] == card1["policy_hash"]
    # a later recalibration still knows about the test look from the earlier change and the eval/ folder, even
    # without the trace and the card's latest evaluations (as for a run evaluated by an older medlens)
    (run / rundir.EVALUATIONS).rename(run / "moved-away.jsonl")
    card = read_card(run)
    card["evaluations"] = {}
    (run / "model.card.json").write_text(json.dumps(card))
    printed, _ = _recalibrate(run, cxr_tiny, capsys, "eval.refer_coverage=0.6")
    assert printed["after_test_look"] is True


def test_recalibrate_before_any_test_look_is_not_flagged(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    printed, err = _recalibrate(run, cxr_tiny, capsys, "eval.refer_coverage=0.7")
    assert printed["after_test_look"] is False and "after a test look" not in err
    assert read_card(run)["policy_changes"][-1]["after_test_look"] is False
    assert not rundir.evaluations_path(run).exists()


def test_unchanged_policy_is_not_a_change(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    _evaluate(run, cxr_tiny)
    printed, err = _recalibrate(run, cxr_tiny, capsys)
    change = read_card(run)["policy_changes"][-1]
    assert change["changed"] is False and change["after_test_look"] is False
    assert printed["after_test_look"] is False and "the policy is unchanged" in err


def test_recalibrate_refuses_a_different_calibration_half(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    path = run / "model.card.json"
    card = json.loads(path.read_text())
    card["metrics"]["calibration"]["patients_sha256"] = "0" * 64  # as if calibrated on other patients
    path.write_text(json.dumps(card))
    capsys.readouterr()
    assert main(["recalibrate", str(run), "--data", str(cxr_tiny), "--no-progress"]) == 2
    assert "other patients than the one this run was calibrated on" in capsys.readouterr().err


def test_hand_edited_policy_is_noticed(tiny_run, tmp_path):
    from medlens.models.card import ModelCard

    run = copy_run(tiny_run, tmp_path / "run")
    path = run / "model.card.json"
    card = json.loads(path.read_text())
    card["threshold"] = float(np.clip(card["threshold"] / 2, 0, 1))
    path.write_text(json.dumps(card))
    with pytest.warns(UserWarning, match="edited outside medlens"):
        loaded = ModelCard.load(path)
    assert loaded.policy_hash != card["policy_hash"] and loaded.policy_hash == loaded.compute_policy_hash()

