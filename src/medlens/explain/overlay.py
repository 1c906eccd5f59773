"""Heat maps over images: RGB arrays and PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.errors import ConfigError
from medlens.explain.cams import _numpy, _resize

# ---------------------------------------------------------------------------------------------------------
# pictures


def overlay(image: Any, cam: Any, *, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """A heat map over a grey image: uint8 ``(H, W, 3)`` RGB.

    ``image``: ``(H, W)`` grey (uint8, or float in [0, 1]; other float ranges are min-max scaled, so a
    z-scored network input works too) or ``(H, W, 3)`` uint8 RGB. ``cam``: a map in [0, 1]; resized
    bilinearly if its shape differs (a map at the network's input size over the original radiograph).
    ``alpha`` is the heat map's share of each pixel.
    """
    import matplotlib  # the colormap registry only; pyplot is never imported

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"overlay alpha={alpha} is outside [0, 1]")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ConfigError(f"unknown colormap {cmap!r}", hint="e.g. jet, turbo, inferno, viridis") from None
    img = _numpy(image)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3]
    elif img.ndim != 2:
        raise ConfigError(f"overlay expects an (H, W) or (H, W, 3) image, got shape {img.shape}")
    if img.dtype == np.uint8:
        base = img.astype(np.float32) / 255
    else:
        base = np.nan_to_num(img.astype(np.float32))
        lo, hi = float(base.min()), float(base.max())
        if lo < 0 or hi > 1:
            base = (base - lo) / (hi - lo) if hi > lo else np.zeros_like(base)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    heat = np.nan_to_num(_numpy(cam).astype(np.float32))
    if heat.ndim != 2:
        raise ConfigError(f"overlay expects an (H, W) map, got shape {heat.shape}")
    if heat.shape != base.shape[:2]:
        heat = _resize(torch.from_numpy(heat)[None], base.shape[:2])[0].numpy()
    colours = colormap(np.clip(heat, 0, 1))[..., :3].astype(np.float32)
    mixed = (1 - alpha) * base + alpha * colours
    return np.clip(np.rint(mixed * 255), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: Any, cam: Any, *, alpha: float = 0.4, cmap: str = "jet") -> Path:
    """Write ``overlay(image, cam)`` as a PNG (parent folders created); returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, cam, alpha=alpha, cmap=cmap), mode="RGB").save(path, format="PNG")
    return path
