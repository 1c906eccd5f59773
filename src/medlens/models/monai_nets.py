"""MONAI backbones behind the medlens classifier interface.

Each wrapper holds the MONAI network as ``self.net`` (so parameter names are MONAI's own, prefixed
``net.``) and splits its forward pass into ``forward_features`` / ``forward_head`` using the network's
own submodules; nothing of MONAI's is copied. No pretrained weights: the machines this runs on are offline,
and ImageNet RGB weights are a poor start for 1-channel radiographs anyway.

``spatial_dims=3`` gives the volumetric version of each network (input ``(B, C, D, H, W)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from medlens.models.base import ImageClassifier
from medlens.models.registry import register_model

if TYPE_CHECKING:
    from monai.networks import nets as monai_nets


def _monai_nets():
    # Imported when a MONAI model is built, not when medlens.models is: it adds ~4 s to every CLI start.
    from monai.networks import nets

    return nets


class DenseNetClassifier(ImageClassifier):
    """``net.features`` (ending in BN) -> ReLU = feature map; pool, flatten, (dropout), linear = head."""

    cam_layer = "net.class_layers.relu"

    def __init__(self, net: monai_nets.DenseNet, *, num_classes: int, in_chans: int, dropout: float):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.net = net
        # MONAI's final ReLU is in-place and acts on the BN output; a Grad-CAM hook on the feature map
        # would then see its activations overwritten. Out-of-place, it can be the CAM layer itself.
        self.net.class_layers.relu.inplace = False
        self.dropout = nn.Dropout(dropout)
        self.num_features = net.class_layers.out.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.class_layers.relu(self.net.features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        head = self.net.class_layers
        return head.out(self.dropout(head.flatten(head.pool(features))))


class ResNetClassifier(ImageClassifier):
    """conv1-bn1-act-maxpool-layer1..layer4 = feature map; avgpool, flatten, (dropout), fc = head."""

    cam_layer = "net.layer4"

    def __init__(self, net: monai_nets.ResNet, *, num_classes: int, in_chans: int, dropout: float):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.net = net
        self.dropout = nn.Dropout(dropout)
        self.num_features = net.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        # flatten, not MONAI's view(): view fails on some channels-last layouts
        return self.net.fc(self.dropout(self.net.avgpool(features).flatten(1)))


class EfficientNetClassifier(ImageClassifier):
    """stem, MBConv blocks, 1x1 head conv-BN-swish = feature map; pool, flatten, dropout, fc = head."""

    cam_layer = "head_act"

    def __init__(self, net: monai_nets.EfficientNet, *, num_classes: int, in_chans: int):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.net = net
        # MONAI applies one shared ``net._swish`` after both the stem and the head conv, so a hook on it
        # fires twice per forward pass. A separate (parameter-free, identical) swish gives the CAM layer
        # a module of its own.
        self.head_act = type(net._swish)()
        self.num_features = net._fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
        x = net._blocks(x)
        return self.head_act(net._bn1(net._conv_head(net._conv_head_padding(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net._fc(net._dropout(net._avg_pooling(features).flatten(1)))


@register_model
def densenet121(
    *, num_classes: int = 2, in_chans: int = 1, spatial_dims: int = 2, dropout: float = 0.0
) -> DenseNetClassifier:
    """MONAI DenseNet-121 (Huang et al. 2017; the CheXNet backbone), randomly initialised."""
    net = _monai_nets().DenseNet121(spatial_dims=spatial_dims, in_channels=in_chans, out_channels=num_classes)
    return DenseNetClassifier(net, num_classes=num_classes, in_chans=in_chans, dropout=dropout)


def _resnet(factory, num_classes: int, in_chans: int, spatial_dims: int, conv1_stride: int, dropout: float):
    net = factory(
        pretrained=False,
        spatial_dims=spatial_dims,
        n_input_channels=in_chans,
        num_classes=num_classes,
        conv1_t_stride=conv1_stride,
    )
    return ResNetClassifier(net, num_classes=num_classes, in_chans=in_chans, dropout=dropout)


# MONAI's ResNet defaults to conv1 stride 1 (the Med3D convention for small volumes); stride 2 is the
# ImageNet ResNet of He et al. and costs 4x less compute at 224 x 224. conv1_stride=1 restores MONAI's.
@register_model
def resnet18(
    *,
    num_classes: int = 2,
    in_chans: int = 1,
    spatial_dims: int = 2,
    conv1_stride: int = 2,
    dropout: float = 0.0,
) -> ResNetClassifier:
    """MONAI ResNet-18 (He et al. 2016), basic blocks, randomly initialised."""
    return _resnet(_monai_nets().resnet18, num_classes, in_chans, spatial_dims, conv1_stride, dropout)


@register_model
def resnet50(
    *,
    num_classes: int = 2,
    in_chans: int = 1,
    spatial_dims: int = 2,
    conv1_stride: int = 2,
    dropout: float = 0.0,
) -> ResNetClassifier:
    """MONAI ResNet-50 (He et al. 2016), bottleneck blocks, randomly initialised."""
    return _resnet(_monai_nets().resnet50, num_classes, in_chans, spatial_dims, conv1_stride, dropout)


@register_model
def efficientnet_b0(
    *, num_classes: int = 2, in_chans: int = 1, spatial_dims: int = 2, dropout: float = 0.2
) -> EfficientNetClassifier:
    """MONAI EfficientNet-B0 (Tan & Le 2019), randomly initialised."""
    net = _monai_nets().EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,  # MONAI's default is True, which downloads ImageNet weights
        spatial_dims=spatial_dims,
        in_channels=in_chans,
        num_classes=num_classes,
    )
    net._dropout.p = dropout
    return EfficientNetClassifier(net, num_classes=num_classes, in_chans=in_chans)
