"""MONAI segmentation networks behind the medlens registry (``task = "segmentation"``).

``unet`` (MONAI ``UNet``, residual units), ``basic_unet`` (``BasicUNet``) and ``attention_unet``
(``AttentionUnet``): ``forward`` maps ``(B, in_chans, *spatial)`` to per-pixel logits ``(B, num_classes,
*spatial)``; ``num_classes`` counts background (2 for lung / not lung). The MONAI network is ``self.net``, so
parameter names are MONAI's own; nothing of MONAI's is copied. ``spatial_dims=3`` gives the volumetric version.

These are not ``ImageClassifier`` objects: code that needs a classifier (Grad-CAM, the in-domain score) checks
``model.task``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medlens.models.registry import register_model


class SegmentationNet(nn.Module):
    """A MONAI segmentation network with the attributes the registry and the run directory expect."""

    task = "segmentation"
    cam_layer = ""

    def __init__(self, net: nn.Module, *, num_classes: int, in_chans: int, divisor: int, default_size: int = 256):
        super().__init__()
        self.net = net
        self.num_classes, self.in_chans = num_classes, in_chans
        #: inputs must be a multiple of this (the product of the strides) in every spatial dimension
        self.divisor = divisor
        self.default_input_size = default_size
        self.min_input_size = divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _divisor(strides: Sequence[int]) -> int:
    out = 1
    for s in strides:
        out *= int(s)
    return out


@register_model(task="segmentation")
def unet(*, num_classes: int = 2, in_chans: int = 1, spatial_dims: int = 2,
         channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
         num_res_units: int = 2, dropout: float = 0.0, norm: str = "instance") -> SegmentationNet:
    """MONAI UNet (residual units; Kerfoot et al. 2018) for segmentation, randomly initialised."""
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=spatial_dims, in_channels=in_chans, out_channels=num_classes, channels=tuple(channels),
               strides=tuple(strides), num_res_units=num_res_units, dropout=dropout, norm=norm)
    return SegmentationNet(net, num_classes=num_classes, in_chans=in_chans, divisor=_divisor(strides))


@register_model(task="segmentation")
def basic_unet(*, num_classes: int = 2, in_chans: int = 1, spatial_dims: int = 2,
               features: Sequence[int] = (16, 16, 32, 64, 128, 16), dropout: float = 0.0) -> SegmentationNet:
    """MONAI BasicUNet (the original U-Net of Ronneberger et al. 2015, 4 poolings) for segmentation."""
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_chans, out_channels=num_classes,
                    features=tuple(features), dropout=dropout)
    return SegmentationNet(net, num_classes=num_classes, in_chans=in_chans, divisor=16)


@register_model(task="segmentation")
def attention_unet(*, num_classes: int = 2, in_chans: int = 1, spatial_dims: int = 2,
                   channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                   dropout: float = 0.0) -> SegmentationNet:
    """MONAI AttentionUnet (Oktay et al. 2018: attention gates on the skip connections) for segmentation."""
    from monai.networks.nets import AttentionUnet

    net = AttentionUnet(spatial_dims=spatial_dims, in_channels=in_chans, out_channels=num_classes,
                        channels=tuple(channels), strides=tuple(strides), dropout=dropout)
    return SegmentationNet(net, num_classes=num_classes, in_chans=in_chans, divisor=_divisor(strides))


def is_segmentation(model: nn.Module) -> bool:
    return getattr(model, "task", "classification") == "segmentation"
