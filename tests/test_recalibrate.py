"""`medlens recalibrate`: refit temperature, threshold and referral policy of a run, keeping its weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from helpers import copy_run, link_subset, read_card

from medlens.cli import main

pytestmark = pytest.mark.usefixtures("medlens_cache")


def test_recalibrate_keeps_weights_refits_the_same_policy_and_applies_changed_settings(tiny_run, cxr_tiny,
                                                                                        tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    before = read_card(run)
    # the run really fitted a temperature on a non-empty held-apart half, so "the same temperature" below
    # means refitted to the same value, not 1.0 twice
    assert before["metrics"]["calibration"]["n"] > 0 and before["temperature"] != 1.0
    assert before["refer"]["coverage"] == 0.9
    # as if made by an older medlens: no referral policy (and no policy hash)
    old = {k: v for k, v in before.items() if k not in ("refer", "policy_hash")}
    (run / "model.card.json").write_text(json.dumps(old))

    assert main(["recalibrate", str(run), "--data", str(cxr_tiny), "--no-progress"]) == 0
    same = read_card(run)
    assert same["weights_sha256"] == before["weights_sha256"] and same["model_id"] == before["model_id"]
    # the same validation split, the same halves, the same settings: the same policy, refitted
    assert same["temperature"] == pytest.approx(before["temperature"], rel=1e-6)
    assert same["threshold"] == pytest.approx(before["threshold"], rel=1e-6)
    assert same["metrics"]["calibration"]["n"] == before["metrics"]["calibration"]["n"]
    assert same["refer"]["coverage"] == 0.9 and same["refer"]["n"] == before["refer"]["n"]
    for method, t in before["refer"]["thresholds"].items():
        assert same["refer"]["thresholds"][method] == pytest.approx(t, rel=1e-6), method

    capsys.readouterr()
    assert main(["recalibrate", str(run), "--data", str(cxr_tiny), "--set", "eval.refer_coverage=0.8",
                 "--no-progress"]) == 0
    after = read_card(run)
    assert after["weights_sha256"] == before["weights_sha256"]
    assert after["temperature"] == pytest.approx(before["temperature"], rel=1e-6)  # eval.* only moved referral
    assert after["threshold"] == pytest.approx(before["threshold"], rel=1e-6)
    assert after["refer"]["coverage"] == 0.8 and set(after["refer"]["thresholds"]) >= {"softmax", "tta"}
    # a lower coverage refers more: every threshold is a lower quantile of the same held-apart values
    lower = [after["refer"]["thresholds"][m] < before["refer"]["thresholds"][m] for m in before["refer"]["thresholds"]]
    assert all(after["refer"]["thresholds"][m] <= before["refer"]["thresholds"][m] + 1e-12
               for m in before["refer"]["thresholds"]) and any(lower)
    assert after["policy_hash"] != same["policy_hash"]
    # the config now holds the setting the policy was made with
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["refer_coverage"] == 0.8
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model_id"] == before["model_id"] and printed["refer"]["coverage"] == 0.8


def test_recalibrate_with_another_threshold_policy(tiny_run, cxr_tiny, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = read_card(run)
    assert main(["recalibrate", str(run), "--data", str(cxr_tiny), "--set", "eval.threshold_policy=fixed",
                 "--set", "eval.target_sensitivity=0.42", "--no-progress"]) == 0
    after = read_card(run)
    assert after["threshold"] == 0.42 != before["threshold"] and after["threshold_policy"].startswith("fixed")
    assert after["temperature"] == pytest.approx(before["temperature"], rel=1e-6)
    # the referral measure is centred on the operating threshold: a new threshold, new referral thresholds
    assert not np.allclose(list(after["refer"]["thresholds"].values()), list(before["refer"]["thresholds"].values()))


def test_recalibrate_refuses_other_data(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    other = tmp_path / "other"
    link_subset(cxr_tiny, other, {"train": 150, "test": 4})
    assert main(["recalibrate", str(run), "--data", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's" in err and "Traceback" not in err
    assert read_card(run) == read_card(tiny_run)


def test_recalibrate_refuses_to_move_the_calibration_split(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    for key in ("eval.calibration_fraction=0.3", "train.seed=3"):
        assert main(["recalibrate", str(run), "--data", str(cxr_tiny), "--set", key, "--no-progress"]) == 2
        assert "recalibrate cannot change" in capsys.readouterr().err
    assert read_card(run) == read_card(tiny_run)
