"""Which cases should a radiologist see? Referral thresholds and what referral buys (selective prediction).

:func:`choose_refer_threshold` picks, on validation, the uncertainty above which a case is referred
(``refer = uncertainty > threshold``) so that a chosen share is referred; :func:`selective_curve` and
:func:`selective_gain` show what referral buys: accuracy at the operating threshold on the cases kept, as the
most uncertain are removed. The uncertainty itself comes from ``medlens.uncertainty``.

Conventions follow ``medlens.metrics``: ``y_true`` is 0/1, ``y_prob`` the positive-class probability,
predicted positive when ``y_prob >= threshold``; uncertainty is in nats. Malformed arrays raise ``ValueError``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from medlens.forward import ArrayLike, as_numpy, is_positive
from medlens.metrics import UndefinedMetricWarning, binary_metrics

__all__ = ["choose_refer_threshold", "selective_curve", "selective_gain"]


def _check_uncertainty(u: ArrayLike) -> np.ndarray:
    u = as_numpy(u)
    if u.ndim != 1 or u.size == 0:
        raise ValueError(f"uncertainty must be a non-empty 1-D array, got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("uncertainty contains NaN or inf")
    return u


def choose_refer_threshold(uncertainty_val: ArrayLike, *, coverage: float = 0.9) -> float:
    """Uncertainty threshold chosen on VALIDATION cases: ``refer = uncertainty > threshold``.

    The threshold is the ``coverage`` quantile of the validation uncertainties (inverted-CDF quantile: the
    smallest value with at least ``coverage`` of the cases at or below it), so at most ``1 - coverage`` of the
    validation cases (e.g. 10 %) are referred, exactly that share when the values are distinct; ties at the
    threshold are kept, never split. ``coverage=1`` refers nobody. Store it with the uncertainty measure and
    the sampling settings it was computed with: the threshold means nothing for another measure.
    """
    u = _check_uncertainty(uncertainty_val)
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return float(np.quantile(u, coverage, method="inverted_cdf"))


def _selective_inputs(y_true, y_prob, uncertainty) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = as_numpy(y_true, np.int64)
    p = as_numpy(y_prob)
    u = _check_uncertainty(uncertainty)
    if not (y.ndim == p.ndim == 1 and y.shape == p.shape == u.shape):
        raise ValueError(f"y_true, y_prob and uncertainty must be 1-D of one length, got {y.shape}, {p.shape}, {u.shape}")
    return y, p, u


def selective_curve(y_true: ArrayLike, y_prob: ArrayLike, uncertainty: ArrayLike, threshold_prob: float, *,
                    points: int = 20, min_coverage: float = 0.5) -> dict[str, np.ndarray]:
    """Metrics at the operating threshold on the cases kept as the most uncertain are referred.

    For ``points`` target coverages from 1.0 down to ``min_coverage``, cases with
    ``uncertainty > choose_refer_threshold(uncertainty, coverage=target)`` are removed (the same rule as
    referral, ties kept) and :func:`medlens.metrics.binary_metrics` is computed on the rest at
    ``threshold_prob``. Returns arrays of length ``points``: ``target_coverage``, ``coverage`` (the share
    actually kept), ``n``, ``accuracy``, ``sensitivity``, ``specificity`` and ``auc`` (NaN where the kept
    cases hold one class only). A useful uncertainty makes accuracy rise as coverage falls; for the
    evaluation split pass the referral threshold chosen on validation separately (see :func:`selective_gain`).
    """
    y, p, u = _selective_inputs(y_true, y_prob, uncertainty)
    if points < 2 or not 0.0 < min_coverage < 1.0:
        raise ValueError(f"need points >= 2 and 0 < min_coverage < 1, got {points}, {min_coverage}")
    targets = np.linspace(1.0, min_coverage, points)
    keys = ("accuracy", "sensitivity", "specificity", "auc")
    out: dict[str, list] = {k: [] for k in ("coverage", "n", *keys)}
    for target in targets:
        keep = u <= choose_refer_threshold(u, coverage=float(target))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            m = binary_metrics(y[keep], p[keep], threshold_prob)
        out["coverage"].append(keep.mean())
        out["n"].append(int(keep.sum()))
        for k in keys:
            out[k].append(m[k])
    result = {"target_coverage": targets}
    result.update({k: np.asarray(v, dtype=np.int64 if k == "n" else np.float64) for k, v in out.items()})
    return result


def selective_gain(y_true: ArrayLike, y_prob: ArrayLike, uncertainty: ArrayLike, threshold_prob: float, *,
                   coverage: float = 0.9, refer_threshold: float | None = None) -> float:
    """Accuracy on the cases kept minus accuracy on all cases, at the operating threshold ``threshold_prob``.

    Kept = ``uncertainty <= refer_threshold``; by default the threshold is chosen on these same cases with
    :func:`choose_refer_threshold` (the ``coverage`` most certain share, e.g. 90 %). On a test split pass the
    ``refer_threshold`` chosen on validation instead, for an honest estimate. About 0 for an uninformative
    uncertainty, positive when uncertainty flags the errors.
    """
    y, p, u = _selective_inputs(y_true, y_prob, uncertainty)
    t = choose_refer_threshold(u, coverage=coverage) if refer_threshold is None else float(refer_threshold)
    keep = u <= t
    correct = is_positive(p, threshold_prob).astype(np.int64) == y
    if not keep.any():
        return math.nan
    return float(correct[keep].mean() - correct.mean())
