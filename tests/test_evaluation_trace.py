"""Honest numbers: patient-level intervals, the append-only evaluation trace and the policy hash.

A run evaluated on test, then recalibrated, then evaluated again must keep both evaluations (with different
policy hashes) in ``RUN/evaluations.jsonl``, and its card must say that the policy changed after a test look.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medlens import rundir
from medlens.cli import main

FAST = ["--set", "data.image_size=32", "--set", "train.epochs=2", "--set", "train.batch_size=16",
        "--set", "model.args.widths=[8,16,32,64]",
        # a validation split large enough for a held-apart calibration half of >= 20 images
        "--set", "data.val_fraction=0.35", "--no-progress"]


def _link(src: Path, dst: Path, per_class: dict[str, int]) -> None:
    for split, n in per_class.items():
        for cls in ("NORMAL", "PNEUMONIA"):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                (out / f.name).symlink_to(f)


@pytest.fixture(autouse=True)
def _cache(tensor_cache_dir, monkeypatch):
    monkeypatch.setenv("MEDLENS_CACHE", str(tensor_cache_dir))


@pytest.fixture(scope="module")
def data(kermany, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cxr-trace")
    _link(kermany, root, {"train": 80, "test": 30})
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, tensor_cache_dir) -> Path:
    import os

    os.environ["MEDLENS_CACHE"] = str(tensor_cache_dir)
    run = tmp_path_factory.mktemp("trace") / "run"
    assert main(["train", str(data), "--out", str(run), "--recipe", "cxr_cpu", *FAST]) == 0
    return run


def _evaluate(run: Path, data: Path) -> dict:
    assert main(["evaluate", str(run), "--data", str(data), "--split", "test", "--no-trust", "--bootstrap", "100",
                 "--no-progress"]) == 0
    return json.loads(rundir.eval_dir(run, "test").joinpath("metrics.json").read_text())


def test_metrics_json_resamples_patients(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    metrics = _evaluate(run, data)
    boot = metrics["bootstrap"]
    assert boot["unit"] == "patient" and boot["resamples"] == 100 and boot["seed"] == 0
    # Kermany file names carry the patient: 60 test images come from fewer patients
    from medlens.data.sources import discover

    table = discover(data)
    test_patients = {table.patient_ids[i] for i in range(len(table)) if table.splits[i] == "test"}
    assert boot["n_units"] == len(test_patients) < metrics["n"]
    report = (run / "eval" / "test" / "report.html").read_text()
    assert f"resampling patients ({len(test_patients)} patients" in report


def test_evaluate_recalibrate_evaluate_keeps_both_with_different_policies(trained, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    first = _evaluate(run, data)
    card0 = json.loads((run / "model.card.json").read_text())
    assert first["policy_hash"] == card0["policy_hash"] != ""
    assert card0["metrics"]["calibration"]["n"] > 0  # the held-apart half exists: temperature and referral fitted
    capsys.readouterr()
    assert main(["recalibrate", str(run), "--data", str(data), "--set", "eval.refer_coverage=0.7",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["after_test_look"] is True
    assert "changed after a test look" in err
    card1 = json.loads((run / "model.card.json").read_text())
    assert card1["weights_sha256"] == card0["weights_sha256"]
    assert card1["policy_hash"] != card0["policy_hash"]
    change = card1["policy_changes"][-1]
    assert change["after_test_look"] is True and change["evaluations_before"] == {"test": 1}
    assert (change["old_policy_hash"], change["new_policy_hash"]) == (card0["policy_hash"], card1["policy_hash"])
    _evaluate(run, data)
    trace = rundir.read_evaluations(run)
    assert [e["split"] for e in trace] == ["test", "test"]
    assert [e["policy_hash"] for e in trace] == [card0["policy_hash"], card1["policy_hash"]]
    assert trace[0]["weights_sha256"] == trace[1]["weights_sha256"] == card0["weights_sha256"]
    assert trace[0]["data_sha256"] == trace[1]["data_sha256"] and len(trace[0]["data_sha256"]) == 64
    assert trace[0]["metrics"]["auc"]["value"] == pytest.approx(first["auc"]["value"])
    # predictions say which policy made them
    img = next((data / "test" / "PNEUMONIA").iterdir())
    capsys.readouterr()
    assert main(["predict", str(run), str(img)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policy_hash"] == card1["policy_hash"]


def test_recalibrate_before_any_test_look_is_not_flagged(trained, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["recalibrate", str(run), "--data", str(data), "--set", "eval.refer_coverage=0.7",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["after_test_look"] is False
    assert "after a test look" not in err
    assert json.loads((run / "model.card.json").read_text())["policy_changes"][-1]["after_test_look"] is False
    assert not rundir.evaluations_path(run).exists()


def test_hand_edited_policy_is_noticed(trained, tmp_path):
    from medlens.models.card import ModelCard

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "model.card.json"
    card = json.loads(path.read_text())
    card["threshold"] = 0.123
    path.write_text(json.dumps(card))
    with pytest.warns(UserWarning, match="edited outside medlens"):
        loaded = ModelCard.load(path)
    assert loaded.policy_hash != card["policy_hash"] and loaded.policy_hash == loaded.compute_policy_hash()
