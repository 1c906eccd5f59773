"""`medlens evaluate` warns when test patients also occur in the run's training or validation split."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import copy_run, link_subset

from medlens.cli import main

pytestmark = pytest.mark.usefixtures("medlens_cache")

WARNING = "test patient ids also occur in training/validation"


def _evaluate(run, data, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medlens"):
        assert main(["evaluate", str(run), "--data", str(data), "--bootstrap", "20", "--no-trust",
                     "--no-progress"]) == 0
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_evaluate_warns_about_test_patients_seen_in_training(tiny_run, cxr_tiny, kermany, tmp_path, caplog):
    run = copy_run(tiny_run, tmp_path / "run")
    # the run's own data: the official test patients are not among its training / validation patients
    assert not any(WARNING in m for m in _evaluate(run, cxr_tiny, caplog))

    # the same data plus one test image filed under a patient the run trained on
    split = json.loads((run / "split.json").read_text())
    seen = sorted(p for p in split["train"]["patients"] if p.startswith("person"))[0]
    train_file = next(f for f in (cxr_tiny / "train" / "PNEUMONIA").iterdir() if f.name.startswith(seen + "_"))
    data = link_subset(kermany, tmp_path / "leaky", {"train": 200, "test": 20})
    test_image = sorted((kermany / "test" / "PNEUMONIA").iterdir())[-1]  # not among the 20 linked
    (data / "test" / "PNEUMONIA" / train_file.name).symlink_to(test_image)
    messages = _evaluate(run, data, caplog)
    leak = [m for m in messages if WARNING in m]
    assert len(leak) == 1 and leak[0].startswith("1 test patient") and seen in leak[0], messages
    assert json.loads((run / "eval" / "test" / "metrics.json").read_text())["n"] == 41
