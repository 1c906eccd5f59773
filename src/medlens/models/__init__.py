"""Model registry: every architecture is a function ``name(*, num_classes, in_chans, **options) -> nn.Module``.

Register with ``@register_model`` (the function name is the model name), build with ``create_model``.
Every registered model is an ``ImageClassifier``: ``forward`` returns logits ``(B, num_classes)``, and
``forward_features`` / ``forward_head`` / ``cam_layer`` / ``default_input_size`` are always present.

    >>> model = create_model("seed_cnn", num_classes=2)          # 1-channel input by default
    >>> list_models("resnet*")
    ['resnet18', 'resnet50']
"""

from __future__ import annotations

# Importing the family modules registers their models (each imports register_model from the registry).
from medlens.models import cnn, monai_nets  # noqa: F401
from medlens.models.base import ImageClassifier
from medlens.models.registry import create_model, list_models, model_info, register_model

__all__ = ["register_model", "create_model", "list_models", "model_info", "ImageClassifier"]
