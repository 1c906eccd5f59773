"""Model registry: every architecture is a function ``name(*, num_classes, in_chans, **options) -> nn.Module``.

Register with ``@register_model`` (the function name is the model name), build with ``create_model``.
Classifiers (``task = "classification"``, the default) are ``ImageClassifier`` objects: ``forward`` returns logits
``(B, num_classes)``, and ``forward_features`` / ``forward_head`` / ``cam_layer`` / ``default_input_size`` are
always present. Segmentation networks (``medlens.models.segnets``, ``task = "segmentation"``) return per-pixel
logits ``(B, num_classes, *spatial)``; ``list_models(task=...)`` lists one kind.

    >>> model = create_model("seed_cnn", num_classes=2)          # 1-channel input by default
    >>> list_models("resnet*")
    ['resnet18', 'resnet50']
"""

from __future__ import annotations

# Importing the family modules registers their models (each imports register_model from the registry).
from medlens.models import cnn, monai_nets, segnets  # noqa: F401
from medlens.models.base import ImageClassifier
from medlens.models.registry import create_model, list_models, model_info, model_task, register_model

__all__ = ["register_model", "create_model", "list_models", "model_info", "model_task", "ImageClassifier"]
