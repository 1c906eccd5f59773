"""Trust: temperature scaling, predictive uncertainty and selective prediction (referral).

Three questions a reader of a medical model asks, and the functions that answer them:

* **Are the probabilities honest?** :func:`fit_temperature` fits one scalar ``T`` (Guo et al. 2017, "On
  Calibration of Modern Neural Networks") on held-apart validation logits; ``T`` goes into
  ``ModelCard.temperature`` and is applied by ``medlens.inference.probabilities`` and nowhere else. Fit it on
  data the epoch and threshold were *not* chosen on: :func:`calibration_split` splits the validation set
  into a selection part and a calibration part, grouped by patient and stratified by label.
* **How sure is the model about this image?** Several stochastic predictions per image:
  :func:`mc_dropout_logits` (Gal & Ghahramani 2016), :func:`tta_logits` (test-time augmentation) or
  :func:`ensemble_logits` (deep ensembles, Lakshminarayanan et al. 2017), each ``(S, N, C)`` logits;
  :func:`member_probabilities` turns them into probabilities (temperature applied through
  ``inference.probabilities``), and :func:`summarise` into mean probability, predictive entropy, expected
  entropy, mutual information (BALD) and the variance of the positive-class probability.
* **Which cases should a radiologist see?** :func:`choose_refer_threshold` picks, on validation, the
  uncertainty above which a case is referred (``refer = uncertainty > threshold``) so that a chosen share
  is referred; :func:`selective_curve` and :func:`selective_gain` show what referral buys: accuracy at the
  operating threshold on the cases kept, as the most uncertain are removed.

Conventions follow ``medlens.metrics``: ``y_true`` is 0/1, ``y_prob`` the positive-class probability,
predicted positive when ``y_prob >= threshold``. Logit tensors are ``(N, C)`` per pass, softmax heads,
positive class index 1 for binary models; uncertainty is in nats. Malformed arrays (wrong shapes, NaN) are
programming errors and raise ``ValueError``; data that cannot support the computation (one class only, too
few cases or patients) raise :class:`~medlens.errors.DataError`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.config import AugmentConfig
from medlens.data.augment import BatchAugment
from medlens.errors import DataError
from medlens.models.card import normalize_batch

__all__ = [
    "MIN_CALIBRATION_SAMPLES",
    "TEMPERATURE_BOUNDS",
    "TTA_AUGMENT",
    "calibration_split",
    "choose_refer_threshold",
    "ensemble_logits",
    "fit_temperature",
    "is_dropout",
    "mc_dropout_logits",
    "member_probabilities",
    "selective_curve",
    "selective_gain",
    "summarise",
    "tta_logits",
    "UNCERTAINTY_METHODS",
    "available_methods",
    "predictive",
    "decision_uncertainty",
    "REFER_MEASURE",
]

#: the fitted temperature is clipped to this range (a T outside it means the logits carry no usable signal)
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
#: fewer calibration cases than this give a temperature that is mostly noise
MIN_CALIBRATION_SAMPLES = 20

#: Test-time augmentation: about half the training augmentation, always applied, no noise, so every pass
#: is a plausible re-acquisition of the same X-ray (small rotation / shift / zoom, exposure change).
TTA_AUGMENT = AugmentConfig(
    enabled=True, rotate_deg=5.0, translate=0.03, scale_min=0.95, scale_max=1.05,
    brightness=0.04, contrast=0.08, gamma=0.1, noise_std=0.0, p=1.0,
)

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


# ------------------------------------------------------------------------------------------------ helpers
def _as_numpy(a: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def _as_tensor(a: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().to(dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(device: torch.device, enabled: bool):
    # imported here so that medlens.inference may import this module without a cycle
    from medlens.inference import autocast

    return autocast(device, enabled)


@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Remember every module's train/eval flag and put them all back on exit, also after an exception."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _forward(model: nn.Module, x: torch.Tensor, *, intensity: str | None, batch_size: int,
             device: torch.device, amp: bool) -> torch.Tensor:
    """float32 CPU logits of ``model`` for ``x`` in batches, in whatever mode the model is in now.

    ``intensity`` None: ``x`` is network input already. Otherwise ``x`` is uint8 (or [0, 1] float) images and
    goes through ``normalize_batch(x, intensity)`` first, exactly as ``inference.predict_logits`` does.
    """
    out = []
    channels_last = device.type == "cuda"
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            if intensity is not None:
                xb = normalize_batch(xb, intensity)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                out.append(model(xb).float().cpu())
    if not out:
        raise ValueError("no images: x is empty")
    return torch.cat(out)


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
    z = _as_tensor(logits, torch.float64)
    y = _as_tensor(labels, torch.int64)
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


# ------------------------------------------------------------------------------------------ MC dropout
_DROPOUT_NAMES = ("dropout", "droppath", "dropblock", "stochasticdepth")


def is_dropout(module: nn.Module) -> bool:
    """True for torch dropout layers (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...) and for any
    module whose class name says it drops activations (``*Dropout*``, ``DropPath``, ``DropBlock``,
    ``StochasticDepth``); such modules must read ``self.training`` to decide whether to drop."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    name = type(module).__name__.lower().replace("_", "")
    return any(key in name for key in _DROPOUT_NAMES)


def _fork_rng(device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def mc_dropout_logits(model: nn.Module, x: torch.Tensor, n: int = 20, *, seed: int = 0,
                      intensity: str | None = None, batch_size: int = 256,
                      device: torch.device | None = None, amp: bool = True) -> torch.Tensor:
    """Monte-Carlo dropout: ``n`` stochastic forward passes, float32 CPU logits of shape ``(n, N, C)``.

    The model runs in eval mode except its dropout modules (:func:`is_dropout`), which are switched to train
    mode; BatchNorm stays in eval mode, so its running statistics are used and never updated. Every module's
    mode is restored afterwards, also when the forward pass raises. The passes draw from the global torch
    generator inside ``torch.random.fork_rng`` seeded with ``seed``: the same seed (and batch size) gives the
    same passes, and the caller's random state is left untouched.

    ``x``: network input (normalised float) when ``intensity`` is None; with ``intensity`` (the card's), uint8
    images ``(N, 1, H, W)`` as in ``inference.predict_logits``. Warns when the model has no dropout with
    ``p > 0`` (all passes are then identical).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = device or _device_of(model)
    drop = [m for m in model.modules() if is_dropout(m)]
    if not any(float(getattr(m, "p", getattr(m, "drop_prob", 1.0)) or 0.0) > 0 for m in drop):
        warnings.warn(
            f"mc_dropout_logits: {type(model).__name__} has no dropout with p > 0; all {n} passes are identical "
            "(build the model with dropout > 0, or use tta_logits / ensemble_logits)",
            UserWarning, stacklevel=2,
        )
    with _modes_restored(model), _fork_rng(device):
        model.eval()
        for m in drop:
            m.training = True  # this module only: m.train() would also switch any BatchNorm inside it
        torch.manual_seed(seed)
        passes = [_forward(model, x, intensity=intensity, batch_size=batch_size, device=device, amp=amp)
                  for _ in range(n)]
    return torch.stack(passes)


# ------------------------------------------------------------------------------ test-time augmentation
def tta_logits(model: nn.Module, images: torch.Tensor, n: int = 8, *, intensity: str, seed: int = 0,
               augment: AugmentConfig | None = None, batch_size: int = 256,
               device: torch.device | None = None, amp: bool = True) -> torch.Tensor:
    """Test-time augmentation: ``n`` passes over mildly transformed copies, float32 CPU logits ``(n, N, C)``.

    ``images`` are quantised uint8 images ``(N, 1, H, W)`` (what the tensor cache and ``Predictor.prepare``
    give), not network input: each pass scales them to [0, 1], transforms them with
    ``medlens.data.augment.BatchAugment`` (``augment``, default :data:`TTA_AUGMENT`: small rotation, shift,
    zoom, brightness/contrast/gamma, no noise, no flips) and normalises with ``normalize_batch(x, intensity)``.
    Pass 0 is the identity, so ``out[0]`` equals ``inference.predict_logits(model, images, intensity=...)``.
    The model is in eval mode throughout (modes restored afterwards); the transforms come from a
    ``torch.Generator`` seeded with ``seed`` on the model's device, so a given seed and batch size repeat exactly.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if images.ndim != 4:
        raise ValueError(f"tta_logits needs images (N, C, H, W), got shape {tuple(images.shape)}")
    device = device or _device_of(model)
    cfg = augment or TTA_AUGMENT
    aug = BatchAugment(cfg, torch.Generator(device=device).manual_seed(seed))
    channels_last = device.type == "cuda"
    passes = []
    with _modes_restored(model), torch.no_grad():
        model.eval()
        for k in range(n):
            out = []
            for start in range(0, len(images), batch_size):
                xb = images[start : start + batch_size].to(device, non_blocking=True)
                if k > 0:
                    xb = aug(xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float())
                xb = normalize_batch(xb, intensity)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with _autocast(device, amp):
                    out.append(model(xb).float().cpu())
            if not out:
                raise ValueError("no images: images is empty")
            passes.append(torch.cat(out))
    return torch.stack(passes)


# ------------------------------------------------------------------------------------------- ensembles
def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor, *, intensity: str | None = None,
                    batch_size: int = 256, amp: bool = True) -> torch.Tensor:
    """Logits of every member, float32 CPU ``(K, N, C)``; each model in eval mode on its own device (modes restored).

    ``x`` as in :func:`mc_dropout_logits`: network input, or uint8 images when ``intensity`` is given.
    Members must share classes and preprocessing (e.g. the same recipe trained with different seeds).
    """
    if not models:
        raise ValueError("ensemble_logits needs at least one model")
    outs = []
    for model in models:
        with _modes_restored(model):
            model.eval()
            outs.append(_forward(model, x, intensity=intensity, batch_size=batch_size,
                                 device=_device_of(model), amp=amp))
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) > 1:
        raise ValueError(f"ensemble members disagree on the output shape: {sorted(shapes)}")
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------- summaries
def member_probabilities(member_logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """``(S, N, C)`` logits -> ``(S, N, C)`` probabilities through ``inference.probabilities`` (which applies
    the temperature: the card's ``temperature`` goes here)."""
    from medlens.inference import probabilities

    z = _as_tensor(member_logits, torch.float32)
    if z.ndim != 3:
        raise ValueError(f"member_logits must be (S, N, C), got shape {tuple(z.shape)}")
    return np.stack([probabilities(z[s], temperature) for s in range(z.shape[0])])


def _entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats over the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=-1)


def summarise(member_probs: ArrayLike, *, positive_class: int = 1) -> dict[str, np.ndarray]:
    """Uncertainty summaries of ``S`` stochastic predictions ``(S, N, C)`` (MC dropout, TTA or ensemble members).

    Returns float64 numpy arrays:

    * ``mean_prob`` (N, C): the predictive distribution, mean over members;
    * ``positive_prob`` (N,): its positive-class column (``positive_class``), what thresholds apply to;
    * ``predictive_entropy`` (N,): entropy of ``mean_prob`` (total uncertainty; ln 2 at most for 2 classes);
    * ``expected_entropy`` (N,): mean entropy of the members (aleatoric part);
    * ``mutual_information`` (N,): predictive minus expected entropy, BALD (epistemic part; 0 when all
      members agree, clipped at 0 against rounding);
    * ``positive_variance`` (N,): population variance over members of the positive-class probability.

    Entropies in nats. ``ValueError`` if the input is not (S, N, C) probabilities summing to 1.
    """
    p = _as_numpy(member_probs)
    if p.ndim != 3:
        raise ValueError(f"member_probs must be (S, N, C) probabilities, got shape {p.shape}")
    if p.size and not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0
                       and np.allclose(p.sum(axis=-1), 1.0, atol=1e-3)):
        raise ValueError("member_probs must be finite probabilities in [0, 1] summing to 1 over the last axis "
                         "(pass softmax outputs, e.g. member_probabilities(logits), not logits)")
    if not 0 <= positive_class < p.shape[2]:
        raise ValueError(f"positive_class={positive_class} is not a class index for C={p.shape[2]}")
    mean = p.mean(axis=0)
    predictive = _entropy(mean)
    expected = _entropy(p).mean(axis=0)
    return {
        "mean_prob": mean,
        "positive_prob": mean[:, positive_class],
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": np.clip(predictive - expected, 0.0, None),
        "positive_variance": p[:, :, positive_class].var(axis=0),
    }


# ------------------------------------------------------------------------------------ one entry point
#: uncertainty methods a prediction can use; "softmax" is the single deterministic pass (always available)
UNCERTAINTY_METHODS = ("softmax", "mc", "tta", "ensemble")
#: what the referral policy thresholds (see ``decision_uncertainty``)
REFER_MEASURE = "decision_entropy"


def decision_uncertainty(member_probs: ArrayLike, threshold: float = 0.5, *,
                         positive_class: int = 1) -> dict[str, np.ndarray]:
    """Uncertainty of the DECISION ``p >= threshold`` for ``S`` stochastic binary predictions ``(S, N, 2)``.

    Predictive entropy is centred on p = 0.5; an operating threshold chosen for sensitivity (say 0.92) puts
    the decision boundary elsewhere, and then the most "uncertain" images by entropy (p near 0.5) are calls
    the model makes firmly, while the images near the boundary look certain. Each pass's positive-class
    probability is therefore shifted in logit space so the threshold maps to 0.5,
    ``q = sigmoid(logit(p) - logit(threshold))`` (the posterior under the prior odds that make the threshold
    the Bayes decision), and the entropies are taken of ``q``: ``decision_entropy`` (of the mean ``q``; ln 2
    on the boundary, 0 far from it) and ``decision_mutual_information`` (its epistemic part). With
    ``threshold=0.5`` they equal the ordinary predictive entropy and mutual information.
    """
    p = _as_numpy(member_probs)
    if p.ndim != 3 or p.shape[2] != 2:
        raise ValueError(f"decision_uncertainty needs binary (S, N, 2) probabilities, got shape {p.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    threshold = min(max(float(threshold), 1e-6), 1 - 1e-6)  # a threshold of exactly 0 or 1 is the far edge
    eps = 1e-12
    pos = np.clip(p[:, :, positive_class], eps, 1 - eps)
    shift = math.log(threshold) - math.log1p(-threshold)
    q = 1.0 / (1.0 + np.exp(-(np.log(pos) - np.log1p(-pos) - shift)))
    q2 = np.stack([1 - q, q], axis=-1)
    predictive_ = _entropy(q2.mean(axis=0))
    expected = _entropy(q2).mean(axis=0)
    return {"decision_entropy": predictive_, "decision_mutual_information": np.clip(predictive_ - expected, 0, None)}


def predictive(model: nn.Module, images: torch.Tensor, method: str = "softmax", *, intensity: str,
               temperature: float = 1.0, threshold: float = 0.5, positive_class: int = 1, mc_passes: int = 20,
               tta_passes: int = 8, device: torch.device | None = None, seed: int = 0,
               batch_size: int = 256) -> dict[str, np.ndarray]:
    """Calibrated positive-class probability and its uncertainty for uint8 images ``(N, 1, H, W)``.

    The probability is always the deterministic calibrated prediction (one pass; for an ensemble, the
    calibrated ensemble), so the label at the operating threshold never depends on the method; the method's
    passes give the uncertainty only. ``method``: ``softmax`` (the one pass), ``mc`` (MC dropout,
    ``mc_passes``), ``tta`` (``tta_passes``, the first unchanged) or ``ensemble`` (the members of a
    ``medlens.models.ensemble.Ensemble``: their disagreement). The temperature (the card's) is applied to
    every pass. Returns float64 arrays ``probability``, ``predictive_entropy`` and ``mutual_information``
    (nats, centred on p = 0.5), ``decision_entropy`` (centred on the operating ``threshold``: see
    :func:`decision_uncertainty`; the referral measure), ``variance`` of the positive-class probability over
    the passes, and int ``passes``. Training (the referral policy), ``medlens evaluate``, ``medlens predict``
    and the service all call this, so a threshold chosen on one is valid on the others.
    """
    from medlens.errors import ConfigError
    from medlens.inference import predict_logits, probabilities
    from medlens.models.ensemble import is_ensemble

    device = device or _device_of(model)
    kw = {"intensity": intensity, "device": device, "batch_size": batch_size}
    if method == "softmax":
        members = probabilities(predict_logits(model, images, **kw), temperature)[None]
    elif method == "mc":
        members = member_probabilities(mc_dropout_logits(model, images, mc_passes, seed=seed, **kw), temperature)
    elif method == "tta":
        members = member_probabilities(tta_logits(model, images, tta_passes, seed=seed, **kw), temperature)
    elif method == "ensemble":
        if not is_ensemble(model):
            raise ConfigError("--uncertainty ensemble needs an ensemble run",
                              hint="train one with `medlens train DATA --out RUN --ensemble 5`, or use mc / tta")
        # each member's logits with the card's temperature (fitted on the ensemble's own output: close, and
        # it keeps every method's spread on the scale of the probability the user is shown)
        members = member_probabilities(ensemble_logits(list(model.members), images, intensity=intensity,
                                                       batch_size=batch_size), temperature)
    else:
        raise ConfigError(f"unknown uncertainty method {method!r}",
                          hint=f"choose one of {', '.join(UNCERTAINTY_METHODS)}")
    summary = summarise(members, positive_class=positive_class)
    decision = decision_uncertainty(members, threshold, positive_class=positive_class)
    # The probability (and so the label) is always the deterministic calibrated one, the same whatever the
    # method: the operating threshold was chosen on it. The passes give only the uncertainty.
    if method == "softmax":
        probability = summary["positive_prob"]
    else:
        probability = probabilities(predict_logits(model, images, **kw), temperature)[:, positive_class]
    return {"probability": probability.astype(np.float64), "predictive_entropy": summary["predictive_entropy"],
            "mutual_information": summary["mutual_information"], "decision_entropy": decision["decision_entropy"],
            "variance": summary["positive_variance"], "passes": np.full(len(images), len(members), dtype=np.int64)}


def available_methods(model: nn.Module) -> list[str]:
    """The uncertainty methods ``model`` supports: MC dropout needs dropout, ``ensemble`` an ensemble."""
    from medlens.models.ensemble import is_ensemble

    methods = ["softmax"]
    if any(is_dropout(m) and float(getattr(m, "p", 0.0) or 0.0) > 0 for m in model.modules()):
        methods.append("mc")
    methods.append("tta")
    if is_ensemble(model):
        methods.append("ensemble")
    return methods


# --------------------------------------------------------------------------------- selective prediction
def _check_uncertainty(u: ArrayLike) -> np.ndarray:
    u = _as_numpy(u)
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
    y = _as_numpy(y_true, np.int64)
    p = _as_numpy(y_prob)
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
    from medlens.metrics import UndefinedMetricWarning, binary_metrics

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
    correct = (p >= threshold_prob).astype(np.int64) == y
    if not keep.any():
        return math.nan
    return float(correct[keep].mean() - correct.mean())


# ----------------------------------------------------------------------------------- calibration split
def calibration_split(indices: ArrayLike, labels: ArrayLike, patient_ids: Sequence[str], fraction: float = 0.5,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split validation cases into ``(select_idx, calib_idx)``: whole patients, stratified by label.

    ``indices`` (M,) identify the validation cases (table rows, or positions ``np.arange(M)`` into the
    validation tensors); ``labels`` and ``patient_ids`` are aligned with ``indices`` (entry i describes case
    ``indices[i]``). Use ``select_idx`` to choose the epoch and the operating threshold and ``calib_idx``,
    which those choices never saw, to fit the temperature and the referral threshold.

    Each patient goes to the stratum of its most frequent label (ties: the lowest label); within a stratum
    the patients are shuffled with ``seed`` and taken for calibration until the stratum's ``fraction`` of its
    images is reached as closely as whole patients allow. A stratum with two or more patients always puts at
    least one in each part. Both returned arrays are sorted values of ``indices``; deterministic.
    Raises :class:`DataError` for fewer than two patients.
    """
    idx = np.asarray(indices)
    y = _as_numpy(labels, np.int64)
    pids = [str(p) for p in patient_ids]
    if not (idx.ndim == y.ndim == 1 and len(idx) == len(y) == len(pids)):
        raise ValueError(f"indices, labels and patient_ids must be 1-D of one length, got {idx.shape}, {y.shape}, {len(pids)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for pos, pid in enumerate(pids):
        by_patient[pid].append(pos)
    if len(by_patient) < 2:
        raise DataError(
            f"cannot split {len(idx)} validation case(s) from {len(by_patient)} patient(s) into a selection and a "
            "calibration part: a patient-grouped split needs at least 2 patients",
            hint="use a larger validation split, or skip calibration",
        )
    n_classes = int(y.max()) + 1 if len(y) else 1
    strata: dict[int, list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        strata[int(np.argmax(np.bincount(y[by_patient[pid]], minlength=n_classes)))].append(pid)

    rng = np.random.default_rng(seed)
    calib_pos: list[int] = []
    for label in sorted(strata):
        members = strata[label]
        order = [members[k] for k in rng.permutation(len(members))]
        target = fraction * sum(len(by_patient[p]) for p in members)
        taken, chosen = 0, []
        for pid in order:
            size = len(by_patient[pid])
            if abs(taken + size - target) < abs(taken - target):  # closer to the target: take it, and go on
                chosen.append(pid)
                taken += size
        if len(members) >= 2:
            if not chosen:
                chosen = [order[0]]
            elif len(chosen) == len(members):
                chosen = chosen[:-1]
        for pid in chosen:
            calib_pos.extend(by_patient[pid])
    calib_mask = np.zeros(len(idx), dtype=bool)
    calib_mask[calib_pos] = True
    return np.sort(idx[~calib_mask]), np.sort(idx[calib_mask])
