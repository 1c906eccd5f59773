"""Are the probabilities honest? Temperature scaling, fitted on validation data held apart for it.

:func:`fit_temperature` fits one scalar ``T`` (Guo et al. 2017, "On Calibration of Modern Neural Networks") on
held-apart validation logits; ``T`` goes into ``ModelCard.temperature`` and is applied by
``medlens.forward.probabilities`` and nowhere else (:func:`nll` reports the fit). Fit it on data the epoch and
threshold were *not* chosen on: :func:`calibration_split` splits the validation set into a selection part and
a calibration part, grouped by patient and stratified by label, with the same carve that makes the
train / val / test split (``medlens.data.split.grouped_stratified_carve``).

Malformed arrays (wrong shapes, NaN) are programming errors and raise ``ValueError``; data that cannot support
the fit (one class only, too few cases or patients) raise :class:`~medlens.errors.DataError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medlens.data.split import grouped_stratified_carve
from medlens.errors import DataError
from medlens.forward import ArrayLike, as_numpy, as_tensor

__all__ = ["MIN_CALIBRATION_SAMPLES", "TEMPERATURE_BOUNDS", "calibration_split", "fit_temperature", "nll"]

#: the fitted temperature is clipped to this range (a T outside it means the logits carry no usable signal)
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
#: fewer calibration cases than this give a temperature that is mostly noise
MIN_CALIBRATION_SAMPLES = 20


# ----------------------------------------------------------------------------------- temperature scaling
def _nll(logits: torch.Tensor, labels: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits / log_t.exp(), labels)


def fit_temperature(logits: ArrayLike, labels: ArrayLike, *, max_iter: int = 200) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on ``labels`` (Guo et al. 2017).

    ``logits``: (N, C) raw network outputs (before any temperature) of held-apart validation cases;
    ``labels``: (N,) integer classes. Optimised over ``log T`` with L-BFGS (float64, strong-Wolfe line search),
    started from the best point of a coarse log-spaced grid, so it cannot run off from a bad start. The NLL is
    unimodal in ``log T`` (convex in ``1/T``), so the result clipped to :data:`TEMPERATURE_BOUNDS` is the
    bounded optimum. ``T > 1`` softens over-confident models, ``T < 1`` sharpens under-confident ones; the
    ranking (AUC) and the argmax never change, but a probability threshold does move: choose the operating
    threshold on probabilities computed with the fitted ``T``.

    Raises :class:`DataError` for fewer than :data:`MIN_CALIBRATION_SAMPLES` cases or a single class present,
    ``ValueError`` for malformed input (shapes, non-finite logits, labels outside ``[0, C)``).
    """
    z = as_tensor(logits, torch.float64)
    y = as_tensor(labels, torch.int64)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"fit_temperature needs logits (N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    n, c = z.shape
    if c < 2:
        raise ValueError(f"fit_temperature needs at least 2 logits per case (softmax head), got {c}")
    if not torch.isfinite(z).all():
        raise ValueError("fit_temperature: logits contain NaN or inf")
    if n and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must be class indices in [0, {c}), found {sorted(set(y.tolist()))[:10]}")
    if n < MIN_CALIBRATION_SAMPLES:
        raise DataError(
            f"cannot fit a temperature on {n} case(s): at least {MIN_CALIBRATION_SAMPLES} are needed for a "
            "temperature that is not mostly noise",
            hint="calibrate on a larger held-apart validation part (raise the calibration fraction), or skip calibration",
        )
    present = torch.unique(y)
    if len(present) < 2:
        raise DataError(
            f"cannot fit a temperature: all {n} calibration cases have label {int(present[0])}, so any "
            "over-confident T fits them; calibration needs both classes",
            hint="calibrate on a part of the validation set stratified by label (see calibration_split)",
        )

    lo, hi = math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])
    with torch.no_grad():
        grid = torch.linspace(lo, hi, 61, dtype=torch.float64)
        nll_grid = torch.stack([_nll(z, y, g) for g in grid])
    start = grid[int(torch.argmin(nll_grid))].clone()
    log_t = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(z, y, log_t)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = log_t.detach().clamp(lo, hi)
    with torch.no_grad():
        if not torch.isfinite(fitted) or _nll(z, y, fitted) > _nll(z, y, start):  # L-BFGS failed: keep the grid point
            fitted = start
    return float(fitted.exp())


def nll(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)`` (what
    :func:`fit_temperature` minimises), to report a fit: e.g. ``nll(z, y)`` against ``nll(z, y, T)``."""
    z = as_tensor(logits, torch.float64)
    return float(_nll(z, as_tensor(labels, torch.int64), torch.tensor(math.log(temperature), dtype=torch.float64)))


# ----------------------------------------------------------------------------------- calibration split
def calibration_split(indices: ArrayLike, labels: ArrayLike, patient_ids: Sequence[str], fraction: float = 0.5,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split validation cases into ``(select_idx, calib_idx)``: whole patients, stratified by label.

    ``indices`` (M,) identify the validation cases (table rows, or positions ``np.arange(M)`` into the
    validation tensors); ``labels`` and ``patient_ids`` are aligned with ``indices`` (entry i describes case
    ``indices[i]``). Use ``select_idx`` to choose the epoch and the operating threshold and ``calib_idx``,
    which those choices never saw, to fit the temperature and the referral threshold.

    The calibration part is carved with ``medlens.data.split.grouped_stratified_carve`` (the carve of the
    train / val / test split) with a generator seeded with ``seed``: ``fraction`` of each label stratum's
    images as closely as whole patients allow, at least one patient in each part for a stratum of two or
    more. Both returned arrays are sorted values of ``indices``; deterministic.
    Raises :class:`DataError` for fewer than two patients.
    """
    idx = np.asarray(indices)
    y = as_numpy(labels, np.int64)
    pids = [str(p) for p in patient_ids]
    if not (idx.ndim == y.ndim == 1 and len(idx) == len(y) == len(pids)):
        raise ValueError(f"indices, labels and patient_ids must be 1-D of one length, got {idx.shape}, {y.shape}, {len(pids)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    n_patients = len(set(pids))
    if n_patients < 2:
        raise DataError(
            f"cannot split {len(idx)} validation case(s) from {n_patients} patient(s) into a selection and a "
            "calibration part: a patient-grouped split needs at least 2 patients",
            hint="use a larger validation split, or skip calibration",
        )
    calib = grouped_stratified_carve(y, pids, fraction, np.random.default_rng(seed))
    return np.sort(idx[~calib]), np.sort(idx[calib])
