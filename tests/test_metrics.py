"""Known-answer and property tests for medlens.metrics."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medlens.errors import ConfigError, DataError
from medlens.metrics import (
    CI_METRICS,
    UndefinedMetricWarning,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    expected_calibration_error,
    metrics_with_ci,
    reliability_curve,
    subgroup_sensitivity,
)


def _synthetic(n: int, seed: int = 0, prevalence: float = 0.625) -> tuple[np.ndarray, np.ndarray]:
    """A moderately good classifier: positives score higher on average (n=624 mimics the chest X-ray test set)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0.0, 1.0)
    return y, p


# ------------------------------------------------------------------------------------------ binary_metrics
def test_binary_metrics_known_answer():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = binary_metrics(y, p, 0.5)
    assert m["auc"] == pytest.approx(0.75)
    assert m["pr_auc"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)  # thresholds 0.8 (P=1, R=.5), 0.35 (P=2/3, R=1)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 0, 2, 1)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["ppv"] == pytest.approx(1.0)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert (m["n"], m["n_pos"], m["n_neg"], m["threshold"]) == (4, 2, 2, 0.5)
    # two bins: [0, .5) holds p=.1,.4,.35 with one positive -> |1 - .85|; [.5, 1] holds p=.8, y=1 -> |1 - .8|
    assert binary_metrics(y, p, 0.5, n_bins=2)["ece"] == pytest.approx((0.15 + 0.2) / 4)
    assert all(type(v) in (int, float) for v in m.values())  # plain Python numbers, JSON-friendly


def test_binary_metrics_ties_and_threshold_boundary():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.5, 0.5, 0.2, 0.9])
    m = binary_metrics(y, p, 0.5)
    assert m["auc"] == pytest.approx(3.5 / 4)  # the tied (0.5, 0.5) pair counts one half
    assert m["pr_auc"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)  # tied scores form one threshold
    assert (m["tp"], m["fp"]) == (2, 1)  # p == threshold is predicted positive


@pytest.mark.filterwarnings("ignore::medlens.metrics.UndefinedMetricWarning")  # NPV when all are called positive
def test_binary_metrics_match_sklearn_on_random_data_with_ties():
    rng = np.random.default_rng(42)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        p = np.round(rng.random(n) * (0.5 + 0.5 * y), int(rng.integers(1, 4)))  # rounding makes many ties
        t = float(rng.choice(p))
        m = binary_metrics(y, p, t)
        pred = (p >= t).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert m["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))
        if tp + fp:
            assert m["ppv"] == pytest.approx(precision_score(y, pred))
        assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0.0) if tp else 0.0)
        checked += 1
    assert checked > 40


def test_single_class_gives_nan_and_warning_not_exception():
    y = np.ones(20, dtype=int)
    p = np.linspace(0.1, 0.9, 20)
    with pytest.warns(UndefinedMetricWarning, match="one class"):
        m = binary_metrics(y, p, 0.5)
    assert math.isnan(m["auc"]) and math.isnan(m["pr_auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(10 / 20)  # still defined
    assert (m["n_pos"], m["n_neg"]) == (20, 0)

    with pytest.warns(UndefinedMetricWarning):
        m0 = binary_metrics(np.zeros(10, dtype=int), np.full(10, 0.2), 0.5)
    assert math.isnan(m0["auc"]) and math.isnan(m0["pr_auc"]) and math.isnan(m0["sensitivity"])
    assert math.isnan(m0["ppv"])  # nothing predicted positive
    assert m0["specificity"] == 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ci = bootstrap_ci(y, p, 0.5, n_boot=50)
        full = metrics_with_ci(y, p, 0.5, n_boot=50)
    assert all(math.isnan(v) for v in ci["auc"]) and all(math.isnan(v) for v in ci["pr_auc"])
    assert not math.isnan(ci["sensitivity"][0])
    assert math.isnan(full["auc"]["value"]) and full["n"] == 20


def test_malformed_input_raises_value_error():
    with pytest.raises(ValueError, match="same length"):
        binary_metrics([0, 1, 1], [0.2, 0.8], 0.5)
    with pytest.raises(ValueError, match="only 0 and 1"):
        binary_metrics([0, 2], [0.2, 0.8], 0.5)
    with pytest.raises(ValueError, match=r"y_prob\[:, 1\]"):
        binary_metrics([0, 1], [[0.8, 0.2], [0.3, 0.7]], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binary_metrics([0, 1], [0.2, np.nan], 0.5)


# ------------------------------------------------------------------------------------------ calibration
def test_ece_near_zero_for_calibrated_and_exact_for_constant_predictions():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)  # y ~ Bernoulli(p): perfectly calibrated
    assert expected_calibration_error(y, p) < 0.01
    # an overconfident model: true frequency is p**2 -> gap E[p - p**2] = 1/6 averaged over U(0, 1)
    y_over = (rng.random(p.size) < p**2).astype(int)
    assert expected_calibration_error(y_over, p) == pytest.approx(1 / 6, abs=0.01)
    # constant prediction 0.7, all positives: one bin with gap exactly 0.3
    assert expected_calibration_error(np.ones(50, int), np.full(50, 0.7)) == pytest.approx(0.3)


def test_reliability_curve_consistent_with_ece():
    y, p = _synthetic(624, seed=1)
    rc = reliability_curve(y, p, n_bins=10)
    assert rc["bin_edges"].shape == (11,) and rc["counts"].shape == (10,)
    assert rc["counts"].sum() == 624
    filled = rc["counts"] > 0
    assert np.isnan(rc["mean_predicted"][~filled]).all()
    inside = (rc["mean_predicted"][filled] >= rc["bin_edges"][:-1][filled]) & (
        rc["mean_predicted"][filled] <= rc["bin_edges"][1:][filled])
    assert inside.all()
    gap = np.abs(rc["observed_frequency"][filled] - rc["mean_predicted"][filled])
    ece = float((rc["counts"][filled] * gap).sum() / 624)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(ece)
    assert reliability_curve([1], [1.0], n_bins=10)["counts"][-1] == 1  # p = 1.0 lands in the last bin


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_contains_point_estimate_and_is_deterministic():
    y, p = _synthetic(624, seed=0)
    point = binary_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, n_boot=1000, seed=0)
    assert set(ci) == set(CI_METRICS)
    for k, (lo, hi) in ci.items():
        assert lo <= point[k] <= hi, k
        assert lo < hi, k
    assert bootstrap_ci(y, p, 0.5, n_boot=200, seed=3) == bootstrap_ci(y, p, 0.5, n_boot=200, seed=3)
    assert bootstrap_ci(y, p, 0.5, n_boot=200, seed=3) != bootstrap_ci(y, p, 0.5, n_boot=200, seed=4)
    # a 50% interval sits inside the 95% one
    narrow = bootstrap_ci(y, p, 0.5, n_boot=1000, seed=0, alpha=0.5)
    assert ci["auc"][0] < narrow["auc"][0] < narrow["auc"][1] < ci["auc"][1]


def test_bootstrap_ci_narrows_with_n():
    widths = {}
    for n in (150, 600, 2400):
        y, p = _synthetic(n, seed=n)
        ci = bootstrap_ci(y, p, 0.5, n_boot=500)
        widths[n] = {k: ci[k][1] - ci[k][0] for k in ("auc", "sensitivity", "accuracy")}
    for k in ("auc", "sensitivity", "accuracy"):
        assert widths[150][k] > widths[600][k] > widths[2400][k], k
        # roughly 1 / sqrt(n): quadrupling n about halves the width
        assert 1.4 < widths[150][k] / widths[600][k] < 2.8, k


def test_vectorised_batch_metrics_match_sklearn_per_row():
    """The (n_boot, n) kernel behind bootstrap_ci gives, row by row, sklearn's AUC and AP (ties included)."""
    from medlens.metrics import _batch_metrics, _bin_index

    y, p = _synthetic(300, seed=5)
    p = np.round(p, 2)
    idx = np.random.default_rng(0).integers(0, 300, (40, 300))
    m = _batch_metrics(p[idx], y[idx], _bin_index(p, 15)[idx], 0.5, 15)
    for r in range(40):
        yr, pr = y[idx[r]], p[idx[r]]
        assert m["auc"][r] == pytest.approx(roc_auc_score(yr, pr), abs=1e-12)
        assert m["pr_auc"][r] == pytest.approx(average_precision_score(yr, pr), abs=1e-12)
        assert m["ece"][r] == pytest.approx(expected_calibration_error(yr, pr), abs=1e-12)
        assert m["brier"][r] == pytest.approx(brier_score_loss(yr, pr), abs=1e-12)


def test_stratified_bootstrap_keeps_auc_defined_with_few_positives():
    y = np.r_[np.ones(2, int), np.zeros(60, int)]
    p = np.r_[0.9, 0.4, np.linspace(0.0, 0.6, 60)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)  # no resample lacks a class
        ci = bootstrap_ci(y, p, 0.5, n_boot=300, stratified=True)
    assert 0.0 <= ci["auc"][0] <= ci["auc"][1] <= 1.0
    with pytest.warns(UndefinedMetricWarning) as record:
        bootstrap_ci(y, p, 0.5, n_boot=300, stratified=False)  # ~13% of resamples draw no positive
    messages = [str(w.message) for w in record]
    assert any("auc undefined in" in m for m in messages) and any("sensitivity undefined in" in m for m in messages)


def test_bootstrap_speed_624_samples_1000_resamples():
    y, p = _synthetic(624, seed=0)
    bootstrap_ci(y, p, 0.5, n_boot=10)  # warm-up (imports, allocator)
    start = time.perf_counter()
    bootstrap_ci(y, p, 0.5, n_boot=1000)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"bootstrap took {elapsed:.2f} s"


def test_metrics_with_ci_structure_and_json():
    y, p = _synthetic(624, seed=2)
    out = metrics_with_ci(y, p, 0.4, n_boot=200, seed=1)
    point = binary_metrics(y, p, 0.4)
    for k in CI_METRICS:
        assert set(out[k]) == {"value", "ci_low", "ci_high"}
        assert out[k]["value"] == point[k]
        assert out[k]["ci_low"] <= out[k]["ci_high"]
    assert out["n"] == 624 and out["threshold"] == 0.4
    assert out["tp"] + out["fn"] == out["n_pos"]
    assert out["bootstrap"]["resamples"] == 200 and out["bootstrap"]["seed"] == 1
    assert out["bootstrap"]["unit"] == "image" and out["bootstrap"]["n_units"] == len(y)
    assert json.loads(json.dumps(out))["auc"]["value"] == pytest.approx(point["auc"])


# ------------------------------------------------------------------------------------------ thresholds
def _sens(y, p, t):
    return ((p >= t) & (y == 1)).sum() / (y == 1).sum()


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_choose_threshold_sensitivity_is_highest_achieving(target):
    y, p = _synthetic(624, seed=7)
    p = np.round(p, 2)  # ties
    t = choose_threshold(y, p, "sensitivity", target)
    assert binary_metrics(y, p, t)["sensitivity"] >= target
    assert t in set(p[y == 1])
    higher = np.unique(p[p > t])
    assert all(_sens(y, p, h) < target for h in higher)  # no higher threshold reaches the target
    assert all(_sens(y, p, h) < target for h in (np.nextafter(t, 1.0), t + 1e-9))


def test_choose_threshold_sensitivity_small_known_answer():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.1])
    assert choose_threshold(y, p, "sensitivity", 0.75) == 0.6  # 3 of 4 positives
    assert choose_threshold(y, p, "sensitivity", 0.76) == 0.3  # needs all 4
    assert choose_threshold(y, p, "sensitivity", 0.5) == 0.8


def test_choose_threshold_youden_brute_force_and_ties():
    y, p = _synthetic(400, seed=11)
    p = np.round(p, 2)
    t = choose_threshold(y, p, "youden")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        js = {c: binary_metrics(y, p, c)["sensitivity"] + binary_metrics(y, p, c)["specificity"] - 1
              for c in np.unique(p)}
    best = max(js.values())
    assert js[t] == pytest.approx(best)
    assert t == max(c for c, j in js.items() if j >= best - 1e-12)  # highest of tied maxima
    assert choose_threshold([1, 1, 0, 0], [0.9, 0.7, 0.6, 0.1], "youden") == 0.7  # J = 1, perfect split
    y3 = np.array([1, 0, 1, 0])
    p3 = np.array([0.9, 0.8, 0.6, 0.1])
    assert choose_threshold(y3, p3, "youden") == 0.9  # J(0.9) = J(0.6) = 0.5: the higher wins


def test_choose_threshold_fixed_and_errors():
    y, p = _synthetic(50)
    assert choose_threshold(y, p, "fixed", 0.42) == 0.42
    with pytest.raises(ConfigError, match="unknown threshold policy"):
        choose_threshold(y, p, "f1")
    with pytest.raises(ConfigError):
        choose_threshold(y, p, "sensitivity", 1.5)
    with pytest.raises(ConfigError):
        choose_threshold(y, p, "fixed", -0.1)
    with pytest.raises(DataError, match="no positive"):
        choose_threshold(np.zeros(5, int), np.linspace(0, 1, 5), "sensitivity", 0.9)
    with pytest.raises(DataError, match="no negative"):
        choose_threshold(np.ones(5, int), np.linspace(0, 1, 5), "youden")


# ------------------------------------------------------------------------------------------ subgroups
def test_subgroup_sensitivity_known_answer():
    y = [1, 1, 1, 1, 1, 0, 0, 0]
    pred = [1, 1, 0, 1, 0, 0, 1, 0]
    groups = ["bacteria", "bacteria", "bacteria", "virus", "virus", "normal", "normal", "normal"]
    out = subgroup_sensitivity(y, pred, groups)
    assert list(out) == ["bacteria", "normal", "virus"]
    assert out["bacteria"]["sensitivity"] == pytest.approx(2 / 3) and out["bacteria"]["n"] == 3
    assert out["virus"]["sensitivity"] == pytest.approx(0.5) and out["virus"]["n_pos"] == 2
    assert math.isnan(out["normal"]["sensitivity"]) and out["normal"]["specificity"] == pytest.approx(2 / 3)
    lo, hi = out["bacteria"]["ci_low"], out["bacteria"]["ci_high"]
    assert 0.0 < lo < 2 / 3 < hi < 1.0  # Wilson interval around 2/3 with n=3 is wide
    assert (lo, hi) == pytest.approx((0.2077, 0.9385), abs=1e-3)
    with pytest.raises(ValueError):
        subgroup_sensitivity(y, pred, groups[:-1])
