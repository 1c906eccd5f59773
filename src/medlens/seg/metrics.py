"""Per-image segmentation metrics (MONAI's) and the post-processing of predicted masks (MONAI's transforms).

Metrics: Dice, IoU, HD95 (95th percentile Hausdorff distance) and ASSD (average symmetric surface distance),
for the foreground class, one value per image. The "ignore" region of the reference mask is set to background
in both the prediction and the reference before measuring, so it counts as neither overlap nor error.
Distances are in pixels of the evaluated grid, and in mm when a pixel spacing is given.

An empty prediction (or reference) has no surface: its distances are ``inf`` from MONAI and are reported as
missing (counted in ``n_missing``), never averaged in as a number.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from medlens.seg.data import FOREGROUND, IGNORE

METRICS = ("dice", "iou", "hd95", "assd")
#: post-processing choices, decided on validation (``medlens.seg.train``)
POSTPROCESS = ("none", "largest2_fill")


def postprocess(pred: torch.Tensor, how: str) -> torch.Tensor:
    """``pred`` (N, H, W) labels -> labels after ``how``: ``"largest2_fill"`` keeps the two largest connected
    foreground components (two lungs) and fills holes in them (MONAI ``KeepLargestConnectedComponent`` and
    ``FillHoles``); ``"none"`` returns ``pred``."""
    if how == "none":
        return pred
    if how != "largest2_fill":
        raise ValueError(f"unknown post-processing {how!r}; choose one of {', '.join(POSTPROCESS)}")
    from monai.transforms import FillHoles, KeepLargestConnectedComponent

    keep = KeepLargestConnectedComponent(applied_labels=[FOREGROUND], is_onehot=False, num_components=2)
    fill = FillHoles(applied_labels=[FOREGROUND])
    out = [torch.as_tensor(fill(keep(p[None].cpu())))[0] for p in pred]
    return torch.stack(out).to(pred.dtype) if out else pred


def _onehot(labels: torch.Tensor) -> torch.Tensor:
    fg = (labels == FOREGROUND).float()
    return torch.stack([1 - fg, fg], 1)


def per_image(pred: torch.Tensor, target: torch.Tensor, spacing: Sequence[float] | None = None
              ) -> dict[str, np.ndarray]:
    """``pred`` (N, H, W) labels, ``target`` (N, H, W) or (N, 1, H, W) labels with IGNORE -> one value per image
    for each of :data:`METRICS` (distances in pixels; with ``spacing`` (row, column) in mm also ``hd95_mm`` /
    ``assd_mm``)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric

    target = target.reshape(pred.shape).long().cpu()
    pred = pred.long().cpu().clone()
    ignore = target == IGNORE
    pred[ignore] = 0
    target = torch.where(ignore, torch.zeros_like(target), target)
    p, t = _onehot(pred), _onehot(target)
    out = {
        "dice": DiceMetric(include_background=False, reduction="none")(p, t),
        "iou": MeanIoU(include_background=False, reduction="none")(p, t),
    }
    with warnings.catch_warnings():  # MONAI warns for every empty mask; they are reported as missing instead
        warnings.simplefilter("ignore")
        distances = {"hd95": HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none"),
                     "assd": SurfaceDistanceMetric(include_background=False, symmetric=True, reduction="none")}
        for name, metric in distances.items():
            out[name] = metric(p, t)
            if spacing is not None:
                out[f"{name}_mm"] = metric(p, t, spacing=[float(s) for s in spacing])
    result = {}
    for name, value in out.items():
        v = value.reshape(-1).double().numpy()
        result[name] = np.where(np.isfinite(v), v, np.nan)
    return result
