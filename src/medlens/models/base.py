"""The interface every medlens classifier shares.

``forward(x)`` is always ``forward_head(forward_features(x))`` and returns logits; thresholds and
calibration are applied elsewhere (see ``models.card``). ``cam_layer`` names the module whose output is
the tensor ``forward_features`` returns, so Grad-CAM hooks, embeddings and fine-tuning work the same
way on every architecture.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Base class: subclasses implement ``forward_features`` and ``forward_head``."""

    #: dotted name (for ``model.get_submodule``) of the module that outputs the last spatial feature map
    cam_layer: str = ""
    #: side length of the square input the architecture was designed for
    default_input_size: int = 224
    #: smallest square input that runs (e.g. densenet121 fails below 32 px: MedMNIST's 28 px is too small)
    min_input_size: int = 32
    num_classes: int
    in_chans: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch ``(B, in_chans, *spatial)`` -> feature map ``(B, C, *spatial')``."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map from ``forward_features`` -> logits ``(B, num_classes)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def global_avg_pool(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)``; a reduction, so it works for any memory format and 2-D or 3-D."""
    return features.mean(dim=tuple(range(2, features.ndim)))
