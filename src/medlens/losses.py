"""Classification losses with class-imbalance handling.

Kermany's train split is 74% pneumonia; without correction a model drifts toward the majority class. The choice
is a recipe setting (`train.imbalance`): inverse-frequency class weights, focal loss (MONAI's), a balanced
sampler (handled by the training loop, plain loss here) or nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import FocalLoss

from medlens.errors import ConfigError

IMBALANCE_CHOICES = ("class_weights", "focal", "balanced_sampler", "none")


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights normalised so that a balanced data set gets weight 1 for every class."""
    counts = counts.float().clamp(min=1)
    return counts.sum() / (len(counts) * counts)


class _FocalCE(nn.Module):
    """Adapts MONAI's FocalLoss (which wants (B, C) logits and (B, 1) targets) to integer class targets."""

    def __init__(self, gamma: float, weight: torch.Tensor | None):
        super().__init__()
        self.loss = FocalLoss(gamma=gamma, weight=weight, to_onehot_y=True, use_softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target[:, None])


def make_loss(imbalance: str, counts: torch.Tensor, *, focal_gamma: float = 2.0,
              label_smoothing: float = 0.0) -> nn.Module:
    if imbalance not in IMBALANCE_CHOICES:
        raise ConfigError(
            f"unknown value train.imbalance='{imbalance}'", hint=f"choose one of {', '.join(IMBALANCE_CHOICES)}"
        )
    if imbalance == "focal":
        return _FocalCE(focal_gamma, class_weights(counts))
    weight = class_weights(counts) if imbalance == "class_weights" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
