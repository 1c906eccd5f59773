"""Evaluation metrics for binary classifiers: pure functions over numpy arrays.

Conventions used by every function here:

* ``y_true`` holds integer labels 0 (negative, e.g. NORMAL) and 1 (positive, e.g. PNEUMONIA).
* ``y_prob`` holds the predicted probability of the positive class, in [0, 1].
* A sample is predicted positive when ``y_prob >= threshold`` (ties with the threshold count as positive).
* Undefined metrics (AUC on a single class, PPV with no predicted positives, ...) are returned as NaN with an
  :class:`UndefinedMetricWarning`, never an exception. Malformed input (lengths differ, labels other than 0/1,
  probabilities outside [0, 1] or NaN) is a programming error and raises ``ValueError``.

The bootstrap evaluates all metrics for all resamples at once on an ``(n_boot, n)`` index matrix: AUC from
tie-averaged ranks (Mann-Whitney U) and average precision from per-threshold precision, both matching
scikit-learn's ``roc_auc_score`` / ``average_precision_score`` exactly (ties included).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from medlens.errors import ConfigError, DataError

__all__ = [
    "CI_METRICS",
    "COUNT_KEYS",
    "UndefinedMetricWarning",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_stats",
    "choose_threshold",
    "expected_calibration_error",
    "metrics_with_ci",
    "reliability_curve",
    "subgroup_sensitivity",
]

#: Metrics that get a confidence interval, in display order.
CI_METRICS: tuple[str, ...] = (
    "auc", "pr_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "ece", "brier",
)
#: Keys of :func:`binary_metrics` that are counts or settings, not estimates (no interval).
COUNT_KEYS: tuple[str, ...] = ("n", "n_pos", "n_neg", "threshold", "tp", "fp", "tn", "fn")
THRESHOLD_POLICIES: tuple[str, ...] = ("sensitivity", "youden", "fixed")

_CHUNK_ELEMENTS = 2_000_000  # bootstrap rows are processed in chunks of about this many elements


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. AUC with one class only) and was returned as NaN."""


# ----------------------------------------------------------------------------------------------- helpers
def _check_inputs(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(
            f"y_prob must be 1-D probabilities of the positive class, got shape {p.shape}; "
            "for an (n, 2) softmax output pass y_prob[:, 1]"
        )
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has shape {y.shape} but y_prob has shape {p.shape}; both must be 1-D, same length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must contain only 0 and 1, found {np.unique(y)[:10].tolist()}")
    if p.size and not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("y_prob must be finite probabilities in [0, 1]")
    return y.astype(np.int64), p


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability: bin i is [i/n_bins, (i+1)/n_bins), the last bin includes 1.0."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _batch_metrics(s: np.ndarray, y: np.ndarray, bins: np.ndarray, threshold: float, n_bins: int) -> dict:
    """All CI metrics for a batch of samples: ``s``, ``y``, ``bins`` have shape (B, n). Returns arrays (B,)."""
    b, n = s.shape
    pos = y.sum(axis=1)
    neg = n - pos
    pred = s >= threshold
    tp = (pred & (y == 1)).sum(axis=1)
    fp = pred.sum(axis=1) - tp
    fn = pos - tp
    tn = neg - fp

    # Ranks with ties averaged: sort each row, then find the first/last index of every run of equal scores.
    order = np.argsort(s, axis=1, kind="stable")
    ss = np.take_along_axis(s, order, axis=1)
    ys = np.take_along_axis(y, order, axis=1)
    idx = np.broadcast_to(np.arange(n), (b, n))
    new_run = np.ones((b, n), dtype=bool)
    new_run[:, 1:] = ss[:, 1:] != ss[:, :-1]
    run_end = np.ones((b, n), dtype=bool)
    run_end[:, :-1] = new_run[:, 1:]
    start = np.maximum.accumulate(np.where(new_run, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(run_end, idx, n)[:, ::-1], axis=1)[:, ::-1]
    rank_sum = ((start + end + 2) * ys).sum(axis=1) / 2.0  # 1-based average ranks of the positives
    auc = _div(rank_sum - pos * (pos + 1) / 2.0, (pos * neg).astype(np.float64))

    # Average precision: each positive adds 1/P recall at the precision of the threshold equal to its score.
    pos_at_or_above = np.cumsum(ys[:, ::-1], axis=1)[:, ::-1]
    precision_at = np.take_along_axis(pos_at_or_above, start, axis=1) / (n - start)
    pr_auc = _div((precision_at * ys).sum(axis=1), pos.astype(np.float64))
    pr_auc[neg == 0] = np.nan  # trivially 1 without negatives: as meaningless as the AUC, so undefined too

    # ECE = sum over bins |sum(y) - sum(p)| / n (the count-weighted |accuracy - confidence| gap).
    flat = (bins + (np.arange(b) * n_bins)[:, None]).ravel()
    gap = np.bincount(flat, weights=(y - s).ravel(), minlength=b * n_bins).reshape(b, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece = np.abs(gap).sum(axis=1) / n
        brier = ((s - y) ** 2).mean(axis=1)
    return {
        "auc": auc, "pr_auc": pr_auc,
        "accuracy": _div((tp + tn).astype(np.float64), np.full(b, n, dtype=np.float64)),
        "sensitivity": _div(tp, pos), "specificity": _div(tn, neg),
        "ppv": _div(tp, tp + fp), "npv": _div(tn, tn + fn), "f1": _div(2 * tp, 2 * tp + fp + fn),
        "ece": ece, "brier": brier,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "pos": pos, "neg": neg,
    }


# ----------------------------------------------------------------------------------------------- metrics
def binary_metrics(y_true, y_prob, threshold: float, *, n_bins: int = 15) -> dict[str, float]:
    """Threshold-free and operating-point metrics of a binary classifier.

    Returns a dict with ``auc`` (ROC AUC), ``pr_auc`` (average precision), ``accuracy``, ``sensitivity``,
    ``specificity``, ``ppv``, ``npv``, ``f1``, ``ece`` (``n_bins`` equal-width bins), ``brier`` and the counts
    ``n``, ``n_pos``, ``n_neg``, ``tp``, ``fp``, ``tn``, ``fn`` plus the ``threshold`` used. Plain Python
    numbers (JSON-serialisable). Undefined values are NaN and raise an :class:`UndefinedMetricWarning`:
    ``auc`` and ``pr_auc`` whenever one class is absent, ``ppv``/``npv`` with no predicted positives/negatives.
    """
    y, p = _check_inputs(y_true, y_prob)
    n = int(y.size)
    if n == 0:
        warnings.warn("binary_metrics: no samples; every metric is NaN", UndefinedMetricWarning, stacklevel=2)
        out = {k: math.nan for k in CI_METRICS}
        out.update(n=0, n_pos=0, n_neg=0, threshold=float(threshold), tp=0, fp=0, tn=0, fn=0)
        return out
    m = _batch_metrics(p[None, :], y[None, :], _bin_index(p, n_bins)[None, :], float(threshold), n_bins)
    out = {k: float(m[k][0]) for k in CI_METRICS}
    undefined = [k for k in CI_METRICS if math.isnan(out[k])]
    if undefined:
        why = " (only one class present)" if m["pos"][0] == 0 or m["neg"][0] == 0 else ""
        warnings.warn(
            f"binary_metrics: {', '.join(undefined)} undefined{why}; returned as NaN",
            UndefinedMetricWarning, stacklevel=2,
        )
    out.update(
        n=n, n_pos=int(m["pos"][0]), n_neg=int(m["neg"][0]), threshold=float(threshold),
        tp=int(m["tp"][0]), fp=int(m["fp"][0]), tn=int(m["tn"][0]), fn=int(m["fn"][0]),
    )
    return out


def _cluster_index(y: np.ndarray, groups: Sequence[Hashable], n_boot: int, rng: np.random.Generator,
                   stratified: bool) -> tuple[list[np.ndarray], int]:
    """Image indices of ``n_boot`` cluster-bootstrap resamples: patients are drawn with replacement and each
    drawn patient brings all of its images (Field & Welsh 2007). ``stratified`` draws patients with and
    without a positive image separately, keeping both counts fixed (so AUC is defined in every resample).
    Returns the per-resample index arrays (their lengths vary) and the number of patients."""
    _, inverse = np.unique(np.asarray([str(g) for g in groups], dtype=object), return_inverse=True)
    inverse = inverse.ravel()
    n_units = int(inverse.max()) + 1 if inverse.size else 0
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(n_units + 1))  # images of unit u: order[starts[u]:starts[u+1]]
    sizes = np.diff(starts)
    positive_unit = np.zeros(n_units, dtype=bool)
    positive_unit[inverse[y == 1]] = True
    strata = [np.flatnonzero(positive_unit), np.flatnonzero(~positive_unit)] if stratified else [np.arange(n_units)]
    draws = np.concatenate([g[rng.integers(0, g.size, (n_boot, g.size))] for g in strata if g.size], axis=1)
    index = []
    for row in draws:
        counts = np.bincount(row, minlength=n_units)  # how often each patient was drawn
        take = np.repeat(np.arange(n_units), counts * sizes)
        # position of each taken image inside its patient's block, then the image index itself
        within = np.arange(take.size) - np.repeat(np.cumsum(counts * sizes) - counts * sizes, counts * sizes)
        index.append(order[starts[take] + within % np.maximum(sizes[take], 1)])
    return index, n_units


def bootstrap_ci(
    y_true, y_prob, threshold: float, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
    stratified: bool = True, n_bins: int = 15, groups: Sequence[Hashable] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` confidence intervals for every metric in :data:`CI_METRICS`.

    ``groups`` (one patient id per image) makes it a cluster bootstrap: *patients* are resampled, each with
    all of their images, because images of one patient are not independent and resampling images would give
    intervals that are too narrow. Without ``groups`` images are resampled.
    ``stratified=True`` resamples positives and negatives (images, or patients with / without a positive
    image) separately, keeping their counts fixed (so AUC is defined in every resample). The threshold is
    held fixed (it is not re-chosen per resample). Resamples in which a metric is undefined are ignored for
    that metric; an interval is NaN when the metric is undefined in every resample. Deterministic for a given
    ``seed``.

    Note: ECE is biased upwards under resampling, so for a well-calibrated model the point estimate can lie
    at or just below the lower end of its percentile interval.
    """
    y, p = _check_inputs(y_true, y_prob)
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    n = y.size
    if n == 0:
        return {k: (math.nan, math.nan) for k in CI_METRICS}
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries but there are {n} samples")
    rng = np.random.default_rng(seed)
    bins = _bin_index(p, n_bins)
    values = {k: np.empty(n_boot) for k in CI_METRICS}
    if groups is not None:
        # resamples differ in length (patients have different numbers of images): one kernel call each
        for row, ix in enumerate(_cluster_index(y, groups, n_boot, rng, stratified)[0]):
            m = _batch_metrics(p[ix][None], y[ix][None], bins[ix][None], float(threshold), n_bins)
            for k in CI_METRICS:
                values[k][row] = m[k][0]
    else:
        if stratified:
            parts = [np.flatnonzero(y == c) for c in (1, 0)]
            index = np.concatenate([g[rng.integers(0, g.size, (n_boot, g.size))] for g in parts if g.size], axis=1)
        else:
            index = rng.integers(0, n, (n_boot, n))
        rows = max(1, _CHUNK_ELEMENTS // n)
        for lo in range(0, n_boot, rows):
            ix = index[lo:lo + rows]
            m = _batch_metrics(p[ix], y[ix], bins[ix], float(threshold), n_bins)
            for k in CI_METRICS:
                values[k][lo:lo + rows] = m[k]

    out: dict[str, tuple[float, float]] = {}
    for k in CI_METRICS:
        v = values[k][~np.isnan(values[k])]
        if v.size == 0:
            out[k] = (math.nan, math.nan)
            continue
        if v.size < 0.95 * n_boot:
            warnings.warn(
                f"bootstrap_ci: {k} undefined in {n_boot - v.size} of {n_boot} resamples; interval uses the rest",
                UndefinedMetricWarning, stacklevel=2,
            )
        lo_q, hi_q = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[k] = (float(lo_q), float(hi_q))
    return out


def metrics_with_ci(y_true, y_prob, threshold: float, *, groups: Sequence[Hashable] | None = None, **kw) -> dict:
    """:func:`binary_metrics` with bootstrap intervals, ready for ``metrics.json``.

    Every metric in :data:`CI_METRICS` becomes ``{"value": v, "ci_low": lo, "ci_high": hi}``; the counts and
    the threshold stay plain numbers; ``"bootstrap"`` records how the intervals were made: ``unit``
    (``"patient"`` when ``groups`` gives patient ids, else ``"image"``), ``resamples``, ``seed``, ``n_units``
    (patients or images resampled), ``alpha``, ``stratified``. ``kw`` goes to :func:`bootstrap_ci`
    (``n_boot``, ``alpha``, ``seed``, ``stratified``, ``n_bins``).
    """
    n_bins = kw.get("n_bins", 15)
    point = binary_metrics(y_true, y_prob, threshold, n_bins=n_bins)
    ci = bootstrap_ci(y_true, y_prob, threshold, groups=groups, **kw)
    out: dict = {k: {"value": point[k], "ci_low": ci[k][0], "ci_high": ci[k][1]} for k in CI_METRICS}
    out.update({k: point[k] for k in COUNT_KEYS})
    out["bootstrap"] = {
        "unit": "patient" if groups is not None else "image",
        "resamples": kw.get("n_boot", 1000), "seed": kw.get("seed", 0),
        "n_units": len({str(g) for g in groups}) if groups is not None else point["n"],
        "method": "percentile", "alpha": kw.get("alpha", 0.05),
        "stratified": kw.get("stratified", True), "ece_bins": n_bins,
    }
    return out


# ------------------------------------------------------------------------------------------- calibration
def expected_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` equal-width bins of the positive-class probability.

    ``sum_b (n_b / n) * |mean(y in b) - mean(p in b)|``; bin i is ``[i/n_bins, (i+1)/n_bins)``, the last bin
    includes 1.0. NaN (with a warning) for empty input.
    """
    y, p = _check_inputs(y_true, y_prob)
    if y.size == 0:
        warnings.warn("expected_calibration_error: no samples", UndefinedMetricWarning, stacklevel=2)
        return math.nan
    gap = np.bincount(_bin_index(p, n_bins), weights=y - p, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)


def reliability_curve(y_true, y_prob, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin calibration data for a reliability diagram (same bins as :func:`expected_calibration_error`).

    Returns ``bin_edges`` (n_bins + 1), ``bin_centers``, ``mean_predicted`` and ``observed_frequency``
    (fraction of positives; both NaN for empty bins) and ``counts`` (int), each of length n_bins.
    """
    y, p = _check_inputs(y_true, y_prob)
    bins = _bin_index(p, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_edges": edges,
        "bin_centers": (edges[:-1] + edges[1:]) / 2,
        "mean_predicted": _div(np.bincount(bins, weights=p, minlength=n_bins), counts),
        "observed_frequency": _div(np.bincount(bins, weights=y, minlength=n_bins).astype(float), counts),
        "counts": counts,
    }


# ---------------------------------------------------------------------------------------- operating point
def choose_threshold(y_true, y_prob, policy: str = "sensitivity", target: float = 0.95) -> float:
    """Choose the operating threshold (predict positive when ``y_prob >= threshold``), usually on validation data.

    Policies:

    * ``"sensitivity"``: the **highest** threshold whose sensitivity is ``>= target``, which keeps specificity
      as high as possible subject to the recall target. The result is always one of the positive samples'
      probabilities; every sample whose probability equals it (a tie) is predicted positive, so ties are
      never split. Any threshold above the returned value misses the target.
    * ``"youden"``: the threshold maximising Youden's J = sensitivity + specificity - 1 over the distinct
      probabilities in ``y_prob`` (compared exactly in integer arithmetic); when several thresholds share the
      maximum J the highest of them is returned.
    * ``"fixed"``: ``target`` itself is the threshold (must lie in [0, 1]); the data are not used.

    Raises :class:`~medlens.errors.ConfigError` for an unknown policy or an impossible target and
    :class:`~medlens.errors.DataError` when the data lack the class(es) the policy needs.
    """
    if policy not in THRESHOLD_POLICIES:
        raise ConfigError(f"unknown threshold policy {policy!r}", hint=f"use one of {', '.join(THRESHOLD_POLICIES)}")
    target = float(target)
    if policy == "fixed":
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"fixed threshold must be in [0, 1], got {target}")
        return target
    y, p = _check_inputs(y_true, y_prob)
    pos_scores = np.sort(p[y == 1])
    neg_scores = np.sort(p[y == 0])
    n_pos, n_neg = pos_scores.size, neg_scores.size
    if n_pos == 0:
        raise DataError(f"cannot choose a threshold by {policy!r}: the data have no positive samples",
                        hint="choose the threshold on a split that contains both classes, or use policy 'fixed'")
    candidates = np.unique(p)[::-1]  # distinct probabilities, highest first
    tp = n_pos - np.searchsorted(pos_scores, candidates, side="left")  # positives with p >= candidate
    if policy == "sensitivity":
        if not 0.0 < target <= 1.0:
            raise ConfigError(f"sensitivity target must be in (0, 1], got {target}")
        ok = tp / n_pos >= target  # same float expression binary_metrics uses for sensitivity
        return float(candidates[np.argmax(ok)])  # first True = highest threshold (ok[-1] is always True)
    if n_neg == 0:
        raise DataError("cannot choose a threshold by 'youden': the data have no negative samples",
                        hint="choose the threshold on a split that contains both classes, or use policy 'fixed'")
    fp = n_neg - np.searchsorted(neg_scores, candidates, side="left")
    j_scaled = tp.astype(np.int64) * n_neg - fp.astype(np.int64) * n_pos  # J * n_pos * n_neg, exact
    return float(candidates[int(np.argmax(j_scaled))])  # argmax takes the first (highest) of tied maxima


# -------------------------------------------------------------------------------------------- subgroups
def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    phat = k / n
    den = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / den
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def subgroup_sensitivity(y_true, y_pred, groups: Sequence[Hashable]) -> dict[Hashable, dict[str, float]]:
    """Sensitivity (and specificity) per subgroup, e.g. bacterial vs viral pneumonia.

    ``y_pred`` are hard 0/1 predictions (``y_prob >= threshold``). For each distinct group value returns
    ``{"sensitivity", "ci_low", "ci_high" (Wilson 95% for the sensitivity), "specificity", "n" (samples in the
    group), "n_pos", "n_neg"}``. Sensitivity is NaN for a group without positives (e.g. the NORMAL group) and
    specificity NaN for one without negatives; no warning, as that is expected. Groups are sorted by ``str``.
    """
    y = np.asarray(y_true)
    yp = np.asarray(y_pred)
    g = np.asarray(groups, dtype=object)
    if not (y.ndim == yp.ndim == g.ndim == 1 and y.size == yp.size == g.size):
        raise ValueError(f"y_true, y_pred and groups must be 1-D of equal length, got {y.shape}, {yp.shape}, {g.shape}")
    if not (np.isin(y, (0, 1)).all() and np.isin(yp, (0, 1)).all()):
        raise ValueError("y_true and y_pred must contain only 0 and 1 (threshold probabilities first)")
    out: dict[Hashable, dict[str, float]] = {}
    for value in sorted(set(g.tolist()), key=str):
        mask = np.array([v == value for v in g.tolist()], dtype=bool)
        yt, ypr = y[mask], yp[mask]
        n_pos, n_neg = int((yt == 1).sum()), int((yt == 0).sum())
        tp, tn = int(((yt == 1) & (ypr == 1)).sum()), int(((yt == 0) & (ypr == 0)).sum())
        lo, hi = _wilson(tp, n_pos)
        out[value] = {
            "sensitivity": tp / n_pos if n_pos else math.nan, "ci_low": lo, "ci_high": hi,
            "specificity": tn / n_neg if n_neg else math.nan,
            "n": int(mask.sum()), "n_pos": n_pos, "n_neg": n_neg,
        }
    return out


def bootstrap_stats(values, groups: Sequence[Hashable] | None = None, *, n_boot: int = 1000, alpha: float = 0.05,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and median of per-image ``values`` with percentile bootstrap intervals; ``groups`` (patient ids)
    makes it a cluster bootstrap that resamples patients with all of their images (as :func:`bootstrap_ci`).

    Non-finite values (e.g. a surface distance of an empty prediction) are left out and counted (``n_missing``).
    Returns ``{"mean": {"value", "ci_low", "ci_high"}, "median": {...}, "n", "n_missing", "n_units"}``."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    g = None if groups is None else [groups[i] for i in np.flatnonzero(ok)]
    v = v[ok]
    out: dict[str, Any] = {"n": int(v.size), "n_missing": int((~ok).sum())}
    if v.size == 0:
        nan = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
        return {**out, "mean": dict(nan), "median": dict(nan), "n_units": 0}
    rng = np.random.default_rng(seed)
    if g is not None:
        index, out["n_units"] = _cluster_index(np.zeros(v.size, dtype=np.int64), g, n_boot, rng, False)
    else:
        index, out["n_units"] = list(rng.integers(0, v.size, (n_boot, v.size))), int(v.size)
    for name, fn in (("mean", np.mean), ("median", np.median)):
        boot = np.array([fn(v[ix]) for ix in index])
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        out[name] = {"value": float(fn(v)), "ci_low": float(lo), "ci_high": float(hi)}
    return out
