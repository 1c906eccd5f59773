"""The one forward path: device, autocast, batched logits, calibrated probabilities, the label shown.

Training (validation passes), evaluation, ``medlens predict``, the uncertainty passes (MC dropout, TTA,
ensembles) and the service all run the network through :func:`forward_batches`, so every caller sees
identically prepared input (``normalize_batch`` with the card's intensity, channels-last and bf16 autocast on
CUDA), and turn logits into probabilities with :func:`probabilities`, the one place the temperature is applied.
The operating decision and the label a user is shown come from :func:`is_positive` / :func:`shown_class` /
:func:`decide` and nowhere else.

This module sits below ``medlens.inference``, ``medlens.uncertainty``, ``medlens.calibration``,
``medlens.selective`` and ``medlens.trust`` and imports none of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medlens.errors import DataError
from medlens.models.base import CHANNELS_LAST
from medlens.models.card import normalize_batch

__all__ = [
    "ArrayLike",
    "as_numpy",
    "as_tensor",
    "autocast",
    "decide",
    "forward_batches",
    "is_positive",
    "model_device",
    "modes_restored",
    "predict_logits",
    "probabilities",
    "resolve_device",
    "shown_class",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


# ------------------------------------------------------------------------------------------------ device
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; a named CUDA device that is not there raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"device '{name}' was asked for but no CUDA GPU is available",
                        hint="use --set train.device=cpu (or auto)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op on the CPU, where fp32 is faster for convs."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Remember every module's train/eval flag and put them all back on exit, also after an exception."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ------------------------------------------------------------------------------------------------ logits
def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """True when 4-D input to ``model`` should be channels-last: on CUDA, and for a model in
    :func:`medlens.models.base.inference_form` (a channels-last CPU predictor)."""
    return device.type == "cuda" or bool(getattr(model, CHANNELS_LAST, False))


def forward_batches(model: nn.Module, x: torch.Tensor, *, intensity: str | None, batch_size: int = 256,
                    device: torch.device | None = None, amp: bool = True,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """float32 CPU logits of ``model`` for ``x`` in batches, without gradients, in whatever train/eval mode
    the model is in now (the callers choose: eval for predictions, dropout on for MC dropout).

    ``intensity`` None: ``x`` is network input already. Otherwise ``x`` is quantised images (uint8, or float
    in [0, 1]) and each batch goes through ``normalize_batch(batch, intensity)`` on ``device``, after
    ``transform`` when one is given (test-time augmentation: uint8 or [0, 1] batch in, [0, 1] float out).
    4-D batches are made channels-last on CUDA and for a model in ``inference_form``; the forward pass runs under :func:`autocast`.
    Raises ``ValueError`` for an empty ``x``.
    """
    if len(x) == 0:
        raise ValueError("no images: x is empty")
    device = device or model_device(model)
    channels_last = wants_channels_last(model, device)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            if transform is not None:
                xb = transform(xb)
            if intensity is not None:
                xb = normalize_batch(xb, intensity)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                out.append(model(xb).float().cpu())
    return torch.cat(out)


def predict_logits(model: nn.Module, images: torch.Tensor, *, intensity: str, batch_size: int = 256,
                   device: torch.device | None = None, amp: bool = True) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images (N, C, H, W), in batches, the model in eval mode (every
    module's mode is restored afterwards). No images give an empty ``(0, 0)`` tensor."""
    if len(images) == 0:
        return torch.empty(0, 0)
    with modes_restored(model):
        model.eval()
        return forward_batches(model, images, intensity=intensity, batch_size=batch_size, device=device, amp=amp)


# ------------------------------------------------------------------------------------------ probabilities
def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (N, C) from logits; temperature scaling is applied here and nowhere else."""
    return torch.softmax(logits / temperature, dim=1).numpy()


# ---------------------------------------------------------------------------------- the decision shown
class _Policy(Protocol):  # what decide() reads of a ModelCard
    threshold: float
    positive_class: int
    class_names: list[str]


def is_positive(prob: ArrayLike | float, threshold: float) -> np.ndarray:
    """The operating decision: positive when the calibrated positive-class probability ``>= threshold``
    (a tie is positive). Elementwise; a bool array (0-d for a scalar)."""
    return np.asarray(prob) >= threshold


def shown_class(prob: ArrayLike | float, threshold: float, positive_class: int = 1) -> np.ndarray:
    """The class index a user is shown for each positive-class probability (binary models):
    ``positive_class`` when :func:`is_positive`, else ``1 - positive_class``. int64, same shape as ``prob``."""
    return np.where(is_positive(prob, threshold), positive_class, 1 - positive_class).astype(np.int64)


def decide(prob: float, card: _Policy) -> tuple[bool, str]:
    """``(positive, label)`` for one calibrated positive-class probability under ``card``'s operating point:
    the label is ``card.class_names[shown_class(prob, card.threshold, card.positive_class)]``."""
    positive = bool(is_positive(float(prob), card.threshold))
    return positive, card.class_names[int(shown_class(float(prob), card.threshold, card.positive_class))]


# ------------------------------------------------------------------------------------------------ arrays
def as_numpy(a: ArrayLike, dtype=np.float64) -> np.ndarray:
    """A numpy array of ``dtype`` from a tensor (any device, detached), an array or a sequence."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def as_tensor(a: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    """A detached CPU tensor of ``dtype`` from a tensor, an array or a sequence."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().to(dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype)
