"""`medlens recalibrate`: refit temperature, threshold and referral policy of a run, keeping its weights."""

from __future__ import annotations

import json

import pytest
from test_cli import FAST, _link_subset

from medlens.cli import main


@pytest.fixture(autouse=True)
def _cache(tensor_cache_dir, monkeypatch):
    monkeypatch.setenv("MEDLENS_CACHE", str(tensor_cache_dir))


def test_recalibrate_keeps_weights_and_refits_the_policy(kermany, tmp_path, capsys):
    data = tmp_path / "cxr"
    _link_subset(kermany, data, {"train": 60, "test": 4})
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--recipe", "cxr_cpu", *FAST]) == 0
    before = json.loads((run / "model.card.json").read_text())
    # as if made by an older medlens: no referral policy
    old = dict(before, refer={})
    (run / "model.card.json").write_text(json.dumps(old))
    assert main(["recalibrate", str(run), "--data", str(data), "--set", "eval.refer_coverage=0.8",
                 "--no-progress"]) == 0
    after = json.loads((run / "model.card.json").read_text())
    assert after["weights_sha256"] == before["weights_sha256"] and after["model_id"] == before["model_id"]
    assert after["threshold"] == pytest.approx(before["threshold"])
    assert after["temperature"] == pytest.approx(before["temperature"])
    assert after["refer"]["coverage"] == 0.8 and set(after["refer"]["thresholds"]) >= {"softmax", "tta"}
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model_id"] == before["model_id"]


def test_recalibrate_refuses_other_data(kermany, tmp_path, capsys):
    data = tmp_path / "cxr"
    _link_subset(kermany, data, {"train": 60, "test": 4})
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--recipe", "cxr_cpu", *FAST]) == 0
    other = tmp_path / "other"
    _link_subset(kermany, other, {"train": 50, "test": 4})
    assert main(["recalibrate", str(run), "--data", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's" in err and "Traceback" not in err


def test_recalibrate_refuses_to_move_the_calibration_split(kermany, tmp_path, capsys):
    from medlens.cli import main as cli

    data = tmp_path / "cxr"
    _link_subset(kermany, data, {"train": 60, "test": 4})
    run = tmp_path / "run"
    assert cli(["train", str(data), "--out", str(run), "--recipe", "cxr_cpu", *FAST]) == 0
    for key in ("eval.calibration_fraction=0.3", "train.seed=3"):
        assert cli(["recalibrate", str(run), "--data", str(data), "--set", key, "--no-progress"]) == 2
        assert "recalibrate cannot change" in capsys.readouterr().err
