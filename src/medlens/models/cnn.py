"""Seed CNNs: small 2-D networks trained from scratch, the reference point for the bigger backbones.

All three share one skeleton (``SeedNet``): four stages that each halve the resolution, global average
pooling, dropout, a linear head. They differ only in the stage:

- ``seed_cnn``     ConvBlock: Conv3x3-BN-ReLU-MaxPool2
- ``seed_resnet``  ResidualBlock: two Conv3x3-BN with an identity / 1x1-projection shortcut, ReLU, MaxPool2
- ``seed_cbam``    ConvBlock followed by CBAM attention (Woo et al., 2018)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medlens.errors import ConfigError
from medlens.models.base import ImageClassifier, global_avg_pool
from medlens.models.registry import register_model

DEFAULT_WIDTHS = (32, 64, 128, 256)


class ConvBlock(nn.Sequential):
    """Conv3x3-BN-ReLU-MaxPool2: halves the resolution."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )


class ResidualBlock(nn.Module):
    """Two Conv3x3-BN with a shortcut (identity, or 1x1 conv-BN when the width changes), ReLU, MaxPool2."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_chans == out_chans
            else nn.Sequential(
                nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False), nn.BatchNorm2d(out_chans)
            )
        )
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.pool(self.act(out + self.shortcut(x)))


# CBAM is written here because MONAI has no CBAM block (it has squeeze-and-excitation only).
class ChannelAttention(nn.Module):
    """Which channels matter: a shared MLP over the average- and max-pooled channel descriptors."""

    def __init__(self, chans: int, reduction: int = 16, min_hidden: int = 8):
        super().__init__()
        # A floor on the bottleneck: with r=16 the 32-channel first stage would squeeze to 2 units.
        hidden = max(chans // reduction, min_hidden)
        self.mlp = nn.Sequential(nn.Linear(chans, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, x.ndim))
        weights = torch.sigmoid(self.mlp(x.mean(dim=spatial)) + self.mlp(x.amax(dim=spatial)))
        return x * weights.reshape(*weights.shape, *([1] * len(spatial)))


class SpatialAttention(nn.Module):
    """Where to look: a 7x7 conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps))


class CBAM(nn.Sequential):
    """Convolutional Block Attention Module: channel attention, then spatial attention (Woo et al., 2018)."""

    def __init__(self, chans: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__(ChannelAttention(chans, reduction), SpatialAttention(kernel_size))


class SeedNet(ImageClassifier):
    """Stages that each halve the resolution, global average pooling, dropout, linear head."""

    default_input_size = 224
    cam_layer = "features"

    @property
    def min_input_size(self) -> int:  # each stage halves the resolution, the stem divides by its factor
        return 2 ** len(self.features) * self.stem_factor

    def __init__(
        self,
        *,
        num_classes: int = 2,
        in_chans: int = 1,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        dropout: float = 0.3,
        block: str = "conv",
        attention: bool = False,
        stem: int = 1,
    ):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        block_type = {"conv": ConvBlock, "residual": ResidualBlock}[block]
        # stem > 1: space-to-depth (PixelUnshuffle) folds each stem x stem patch into channels, so a 128 px image
        # costs what a 64 px one does while every pixel still reaches the first convolution. On a CPU the
        # full-resolution first block is memory-bound and dominates the step; this removes it.
        self.stem_factor = int(stem)
        self.stem = nn.PixelUnshuffle(self.stem_factor) if self.stem_factor > 1 else nn.Identity()
        stages = []
        for c_in, c_out in zip([in_chans * self.stem_factor**2, *widths[:-1]], widths, strict=True):
            stage = block_type(c_in, c_out)
            stages.append(nn.Sequential(stage, CBAM(c_out)) if attention else stage)
        self.features = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(global_avg_pool(features)))


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        raise ConfigError(
            f"model option widths={list(widths)} is invalid",
            hint="give positive channel counts, e.g. [32, 64, 128, 256]",
        )
    return widths


def _check_stem(stem: int) -> int:
    if int(stem) < 1:
        raise ConfigError(f"model option stem={stem} is invalid", hint="1 (no stem) or a downscale factor like 2")
    return int(stem)


@register_model
def seed_cnn(
    *, num_classes: int = 2, in_chans: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS, dropout: float = 0.3,
    stem: int = 1,
) -> SeedNet:
    """Reference CNN: four Conv3x3-BN-ReLU-MaxPool blocks (32-64-128-256), GAP, dropout, linear."""
    return SeedNet(num_classes=num_classes, in_chans=in_chans, widths=_check_widths(widths), dropout=dropout,
                   stem=_check_stem(stem))


@register_model
def seed_resnet(
    *, num_classes: int = 2, in_chans: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS, dropout: float = 0.3,
    stem: int = 1,
) -> SeedNet:
    """Seed CNN with residual blocks (two conv-BN + projection shortcut per block)."""
    return SeedNet(
        num_classes=num_classes,
        in_chans=in_chans,
        widths=_check_widths(widths),
        dropout=dropout,
        block="residual",
        stem=_check_stem(stem),
    )


@register_model
def seed_cbam(
    *, num_classes: int = 2, in_chans: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS, dropout: float = 0.3,
    stem: int = 1,
) -> SeedNet:
    """Seed CNN with CBAM channel + spatial attention after each block (Woo et al. 2018)."""
    return SeedNet(
        num_classes=num_classes,
        in_chans=in_chans,
        widths=_check_widths(widths),
        dropout=dropout,
        attention=True,
        stem=_check_stem(stem),
    )
