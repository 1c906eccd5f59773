"""How sure is the model about this image? Stochastic passes, their summaries, and THE prediction entry point.

Several stochastic predictions per image: :func:`mc_dropout_logits` (Gal & Ghahramani 2016),
:func:`tta_logits` (test-time augmentation) or :func:`ensemble_logits` (deep ensembles, Lakshminarayanan et
al. 2017), each ``(S, N, C)`` logits, all run through ``medlens.forward.forward_batches``;
:func:`member_probabilities` turns them into probabilities (temperature applied by
``medlens.forward.probabilities``), :func:`summarise` into mean probability, predictive entropy, expected
entropy, mutual information (BALD) and the variance of the positive-class probability, and
:func:`decision_uncertainty` into the entropy of the call at the operating threshold (the referral measure).
:func:`predictive` is the one entry point: training (the referral policy), ``medlens evaluate``,
``medlens predict`` and the service all call it, with one of :data:`UNCERTAINTY_METHODS`.

The neighbours: ``medlens.calibration`` (is the probability honest? temperature scaling and the held-apart
calibration split) and ``medlens.selective`` (which cases should a radiologist see? referral thresholds and
selective curves). Their names are re-exported here for older imports.

Conventions follow ``medlens.metrics``: ``y_true`` is 0/1, ``y_prob`` the positive-class probability,
predicted positive when ``y_prob >= threshold``. Logit tensors are ``(N, C)`` per pass, softmax heads,
positive class index 1 for binary models; uncertainty is in nats. Malformed arrays (wrong shapes, NaN) are
programming errors and raise ``ValueError``; an unknown method or one the model cannot do raises
:class:`~medlens.errors.ConfigError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medlens.calibration import (
    MIN_CALIBRATION_SAMPLES,
    TEMPERATURE_BOUNDS,
    calibration_split,
    fit_temperature,
)
from medlens.config import AugmentConfig
from medlens.data.augment import BatchAugment
from medlens.errors import ConfigError
from medlens.forward import (
    ArrayLike,
    as_numpy,
    as_tensor,
    forward_batches,
    model_device,
    modes_restored,
    predict_logits,
    probabilities,
)
from medlens.models.ensemble import is_ensemble
from medlens.selective import choose_refer_threshold, selective_curve, selective_gain

__all__ = [
    "REFER_MEASURE",
    "TTA_AUGMENT",
    "UNCERTAINTY_METHODS",
    "available_methods",
    "decision_uncertainty",
    "ensemble_logits",
    "is_dropout",
    "mc_dropout_logits",
    "member_probabilities",
    "predictive",
    "summarise",
    "tta_logits",
    # re-exported from medlens.calibration and medlens.selective
    "MIN_CALIBRATION_SAMPLES",
    "TEMPERATURE_BOUNDS",
    "calibration_split",
    "choose_refer_threshold",
    "fit_temperature",
    "selective_curve",
    "selective_gain",
]

#: uncertainty methods a prediction can use; "softmax" is the single deterministic pass (always available).
#: The one list: the CLI, the service and ``predictive`` take their choices from it.
UNCERTAINTY_METHODS = ("softmax", "mc", "tta", "ensemble")
#: what the referral policy thresholds (see ``decision_uncertainty``)
REFER_MEASURE = "decision_entropy"

#: Test-time augmentation: about half the training augmentation, always applied, no noise, so every pass
#: is a plausible re-acquisition of the same X-ray (small rotation / shift / zoom, exposure change).
TTA_AUGMENT = AugmentConfig(
    enabled=True, rotate_deg=5.0, translate=0.03, scale_min=0.95, scale_max=1.05,
    brightness=0.04, contrast=0.08, gamma=0.1, noise_std=0.0, p=1.0,
)


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
    images ``(N, 1, H, W)`` as in ``forward.predict_logits``. Warns when the model has no dropout with
    ``p > 0`` (all passes are then identical).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = device or model_device(model)
    drop = [m for m in model.modules() if is_dropout(m)]
    if not any(float(getattr(m, "p", getattr(m, "drop_prob", 1.0)) or 0.0) > 0 for m in drop):
        warnings.warn(
            f"mc_dropout_logits: {type(model).__name__} has no dropout with p > 0; all {n} passes are identical "
            "(build the model with dropout > 0, or use tta_logits / ensemble_logits)",
            UserWarning, stacklevel=2,
        )
    with modes_restored(model), _fork_rng(device):
        model.eval()
        for m in drop:
            m.training = True  # this module only: m.train() would also switch any BatchNorm inside it
        torch.manual_seed(seed)
        passes = [forward_batches(model, x, intensity=intensity, batch_size=batch_size, device=device, amp=amp)
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
    Pass 0 is the identity, so ``out[0]`` equals ``forward.predict_logits(model, images, intensity=...)``.
    The model is in eval mode throughout (modes restored afterwards); the transforms come from a
    ``torch.Generator`` seeded with ``seed`` on the model's device, so a given seed and batch size repeat exactly.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if images.ndim != 4:
        raise ValueError(f"tta_logits needs images (N, C, H, W), got shape {tuple(images.shape)}")
    device = device or model_device(model)
    cfg = augment or TTA_AUGMENT
    aug = BatchAugment(cfg, torch.Generator(device=device).manual_seed(seed))

    def transform(xb: torch.Tensor) -> torch.Tensor:
        return aug(xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float())

    with modes_restored(model):
        model.eval()
        passes = [forward_batches(model, images, intensity=intensity, batch_size=batch_size, device=device,
                                  amp=amp, transform=transform if k > 0 else None)
                  for k in range(n)]
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
        with modes_restored(model):
            model.eval()
            outs.append(forward_batches(model, x, intensity=intensity, batch_size=batch_size,
                                        device=model_device(model), amp=amp))
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) > 1:
        raise ValueError(f"ensemble members disagree on the output shape: {sorted(shapes)}")
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------- summaries
def member_probabilities(member_logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """``(S, N, C)`` logits -> ``(S, N, C)`` probabilities through ``forward.probabilities`` (which applies
    the temperature: the card's ``temperature`` goes here)."""
    z = as_tensor(member_logits, torch.float32)
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
    p = as_numpy(member_probs)
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
    p = as_numpy(member_probs)
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
               batch_size: int = 256, logits: torch.Tensor | None = None) -> dict[str, np.ndarray]:
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
    and the service all call this, so a threshold chosen on one is valid on the others. ``logits``: the
    deterministic eval-mode logits of ``images`` when the caller already has them (the service computes them
    with the in-domain features in one pass); they replace that pass, never the method's own passes.
    """
    device = device or model_device(model)
    kw = {"intensity": intensity, "device": device, "batch_size": batch_size}
    if logits is not None and len(logits) != len(images):
        raise ValueError(f"{len(logits)} logits for {len(images)} images")

    def deterministic() -> torch.Tensor:
        return logits if logits is not None else predict_logits(model, images, **kw)

    if method == "softmax":
        members = probabilities(deterministic(), temperature)[None]
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
        probability = probabilities(deterministic(), temperature)[:, positive_class]
    return {"probability": probability.astype(np.float64), "predictive_entropy": summary["predictive_entropy"],
            "mutual_information": summary["mutual_information"], "decision_entropy": decision["decision_entropy"],
            "variance": summary["positive_variance"], "passes": np.full(len(images), len(members), dtype=np.int64)}


def available_methods(model: nn.Module) -> list[str]:
    """The uncertainty methods ``model`` supports: MC dropout needs dropout, ``ensemble`` an ensemble."""
    methods = ["softmax"]
    if any(is_dropout(m) and float(getattr(m, "p", 0.0) or 0.0) > 0 for m in model.modules()):
        methods.append("mc")
    methods.append("tta")
    if is_ensemble(model):
        methods.append("ensemble")
    return methods
