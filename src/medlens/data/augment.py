"""Augmentation of whole batches on the training device.

MONAI's random transforms work one sample at a time on the CPU inside DataLoader workers; on a GPU that makes the
loader, not the network, the bottleneck. Here one affine grid and a handful of element-wise ops transform the whole
batch where it already lives, so augmentation costs a few percent of a training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medlens.config import AugmentConfig


class BatchAugment:
    """Random rotation, shift and scale, then brightness, contrast, gamma and noise, per image in a batch.

    Input and output: float tensors (B, C, H, W) with intensities in [0, 1]. Randomness comes from the given
    generator only, so a seeded run augments identically every time.
    """

    def __init__(self, cfg: AugmentConfig, generator: torch.Generator):
        self.cfg = cfg
        self.generator = generator

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, device=device)
        return low + (high - low) * u

    def __call__(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        """Augment ``x``; with ``masks`` (integer label maps ``(B, 1, H, W)``) also move each mask with exactly
        its image's geometry (nearest-neighbour, so labels stay labels; intensity changes leave masks alone) and
        return ``(x, masks)``."""
        cfg = self.cfg
        if not cfg.enabled:
            return x if masks is None else (x, masks)
        b, dev = x.shape[0], x.device
        active = (torch.rand(b, generator=self.generator, device=dev) < cfg.p).float()

        angle = self._uniform(b, -1, 1, dev) * math.radians(cfg.rotate_deg) * active
        scale = 1 + (self._uniform(b, cfg.scale_min, cfg.scale_max, dev) - 1) * active
        shift = self._uniform(2 * b, -1, 1, dev).view(b, 2) * (2 * cfg.translate) * active[:, None]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if masks is not None:
            moved = F.grid_sample(masks.to(x.dtype), grid, mode="nearest", padding_mode="border", align_corners=False)
            masks = moved.round().to(masks.dtype)

        shape = (b, 1, 1, 1)
        gamma = torch.exp(self._uniform(b, -cfg.gamma, cfg.gamma, dev) * active).view(shape).to(x.dtype)
        x = x.clamp(0, 1).pow(gamma)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = (1 + self._uniform(b, -cfg.contrast, cfg.contrast, dev) * active).view(shape).to(x.dtype)
        brightness = (self._uniform(b, -cfg.brightness, cfg.brightness, dev) * active).view(shape).to(x.dtype)
        x = (x - mean) * contrast + mean + brightness
        if cfg.noise_std > 0:
            noise = torch.randn(x.shape, generator=self.generator, device=dev, dtype=x.dtype)
            x = x + noise * (cfg.noise_std * active.view(shape).to(x.dtype))
        x = x.clamp(0, 1)
        return x if masks is None else (x, masks)
