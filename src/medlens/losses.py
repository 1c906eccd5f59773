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


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al., 2015): ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student
    / T)) + (1 - alpha) * label_loss``. The teacher (frozen, eval mode) sees the same augmented, normalised batch
    as the student, so the soft targets describe the image the student is trained on. T^2 keeps the soft term's
    gradients on the scale of the label term's whatever the temperature. Written here: MONAI has no
    distillation loss, and this is the textbook form in a few lines."""

    needs_input = True

    def __init__(self, base: nn.Module, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.7):
        super().__init__()
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation needs temperature > 0 and 0 <= alpha <= 1 (got {temperature}, {alpha})")
        self.base, self.temperature, self.alpha = base, float(temperature), float(alpha)
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule (never saved or trained)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad():
            soft = torch.softmax(self.teacher[0](x).float() / t, dim=1)
        kd = nn.functional.kl_div(torch.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * (t * t)
        return self.alpha * kd + (1.0 - self.alpha) * self.base(logits, labels)


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


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy for segmentation, with an "ignore" label left out of both.

    The Dice part is MONAI's ``DiceLoss``; MONAI has no ignore label, so ignored pixels are zeroed in both the
    softmax output and the one-hot target before it (they then add to neither overlap nor size), and the
    cross-entropy is PyTorch's with ``ignore_index``. ``logits`` (B, C, H, W), ``target`` (B, 1, H, W) integer
    labels in 0..C-1 or ``ignore_index``."""

    def __init__(self, num_classes: int, ignore_index: int, *, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        # include_background=False: the Dice of the foreground classes (background Dice is near 1 whatever)
        self.dice = DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        labels = target[:, 0].long()
        valid = labels != self.ignore_index
        ce = nn.functional.cross_entropy(logits, labels, ignore_index=self.ignore_index)
        onehot = nn.functional.one_hot(torch.where(valid, labels, 0), self.num_classes).permute(0, 3, 1, 2)
        keep = valid[:, None].to(logits.dtype)
        dice = self.dice(logits.softmax(1) * keep, onehot.to(logits.dtype) * keep)
        return self.dice_weight * dice + self.ce_weight * ce
