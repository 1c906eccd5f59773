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


#: set on a model by :func:`inference_form`: its forward passes take channels-last input (``medlens.forward``)
CHANNELS_LAST = "_medlens_channels_last"


def inference_form(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode, in place) as a CPU predictor runs it: each BatchNorm that directly follows a
    convolution in an ``nn.Sequential`` is folded into that convolution's weights and bias (and becomes an
    ``nn.Identity``, so module names such as a card's ``cam_layer`` still resolve), and a 2-D network's weights
    are made channels-last, with :data:`CHANNELS_LAST` set so the forward code gives it channels-last input
    (1-D and 3-D networks keep their memory format).

    Why: with one thread per model worker, PyTorch's NCHW CPU max-pooling took 42% of the reference CNN's
    forward pass (``max_pool2d_with_indices``), and in channels-last the separate BatchNorm pass is the next cost;
    together this form runs the 128 px reference CNN ~1.9x faster at batch 4 with logits equal to 2e-6. Only
    for inference: the folded BatchNorm no longer normalises by batch statistics in training mode (MC dropout
    switches only the dropout layers, so it is unaffected). torch's ``fuse_conv_bn_eval`` does the folding;
    the walk over ``nn.Sequential`` pairs is ours, because torch.fx's fusion needs a traceable model and
    renames modules (a hook on a BatchNorm named in a card would break).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[first], seq._modules[second]
            if (type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                    and bn.track_running_stats and bn.running_mean is not None
                    and bn.num_features == conv.out_channels):
                seq._modules[first] = fuse_conv_bn_eval(conv, bn)
                seq._modules[second] = nn.Identity()
    if any(p.dim() == 4 for p in model.parameters()) and not any(p.dim() == 5 for p in model.parameters()):
        model.to(memory_format=torch.channels_last)  # 2-D networks only (3-D weights would need channels_last_3d)
        setattr(model, CHANNELS_LAST, True)
    return model
