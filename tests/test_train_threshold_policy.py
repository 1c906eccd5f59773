"""`eval.threshold_policy` end to end: the operating threshold in the model card is the one the policy asks for,
chosen on the selection half of validation (recomputed here with scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import train, validation_halves
from sklearn.metrics import roc_curve

pytestmark = pytest.mark.usefixtures("medlens_cache")

ONE_EPOCH = ["--set", "train.epochs=1"]  # a model that does not separate validation perfectly


def _youden(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the highest of tied maxima)."""
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)  # thresholds decrease
    return float(thresholds[int(np.argmax(tpr - fpr))])


def _sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target``."""
    return float(max(t for t in np.unique(p[y == 1]) if (p[y == 1] >= t).mean() >= target))


def test_youden_threshold_is_chosen_on_the_selection_half(cxr_tiny, tmp_path):
    run = tmp_path / "youden"
    card = train(cxr_tiny, run, *ONE_EPOCH, "--set", "eval.threshold_policy=youden")
    assert card["threshold_policy"].startswith("youden")
    halves = validation_halves(run, cxr_tiny)
    sel, cal = halves["select"], halves["calib"]
    assert len(cal["labels"]) == card["metrics"]["calibration"]["n"] > 0  # the held-apart half exists
    assert len(sel["labels"]) == card["metrics"]["val"]["n"]
    expected = _youden(sel["labels"], sel["probs"])
    assert card["threshold"] == pytest.approx(expected, abs=2e-6)  # val_predictions.csv keeps 6 decimals
    # the test tells the policies and the halves apart: these would give other thresholds
    assert abs(_sensitivity(sel["labels"], sel["probs"], 0.95) - expected) > 1e-4
    everything = (np.concatenate([sel["labels"], cal["labels"]]), np.concatenate([sel["probs"], cal["probs"]]))
    assert abs(_youden(*everything) - expected) > 1e-4
    assert abs(_youden(cal["labels"], cal["probs"]) - expected) > 1e-4


def test_fixed_threshold_is_the_target(cxr_tiny, tmp_path):
    card = train(cxr_tiny, tmp_path / "fixed", *ONE_EPOCH, "--set", "eval.threshold_policy=fixed",
                 "--set", "eval.target_sensitivity=0.37")
    assert card["threshold"] == 0.37 and card["threshold_policy"].startswith("fixed")
    assert card["metrics"]["calibration"]["n"] > 0 and card["temperature"] != 1.0
    # the operating point is applied as given: the validation metrics are those of p >= 0.37
    halves = validation_halves(tmp_path / "fixed", cxr_tiny)
    y, p = halves["select"]["labels"], halves["select"]["probs"]
    assert card["metrics"]["val"]["sensitivity"] == pytest.approx((p[y == 1] >= 0.37).mean())
    assert card["metrics"]["val"]["specificity"] == pytest.approx((p[y == 0] < 0.37).mean())
