"""Lung crop: the anatomy-aware preprocessing of a classifier (``data.lung_crop: SEG_RUN``).

Before the resize, each decoded radiograph is cut to the bounding box of both lungs as a segmentation run finds
them, plus ``data.lung_crop_margin`` of the box on each side. The classifier then spends its pixels on the lung
fields, and the shoulders, text markers and image edges that shortcut-learning models lean on are mostly gone.

The segmentation model travels with the classification run: training copies it to ``RUN/lung_seg/`` and the card's
``preprocess["lung_crop"]`` names its weights (model id, sha256) and the margin, so prediction, evaluation and the
service crop exactly as training did, and the tensor cache keys the cropped images by those weights.

When no plausible lungs are found (less than ``MIN_AREA`` of the image) the image is not cropped; such images are
typically not chest radiographs at all and the domain gates (``medlens.domain``) judge them.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.data.cache import preprocess
from medlens.errors import DataError
from medlens.models.card import ModelCard, _find_card
from medlens.seg.data import FOREGROUND

#: the folder of a classification run that holds its lung segmentation model
LUNG_DIR = "lung_seg"
#: below this share of the image (on the segmentation grid) the lungs are not trusted and nothing is cropped
MIN_AREA = 0.05


@functools.lru_cache(maxsize=4)
def _segmenter(path: str, weights_sha256: str):
    import multiprocessing

    from medlens.seg.predict import Segmenter

    if multiprocessing.parent_process() is not None:  # a decoding worker: one thread each, the workers fill the CPU
        torch.set_num_threads(1)
    seg = Segmenter.from_run(path, device="cpu")
    if seg.card.weights_sha256 != weights_sha256:
        raise DataError(f"{path}: the lung segmentation model is not the one this run was trained with "
                        f"(weights {seg.card.weights_sha256[:12]}..., expected {weights_sha256[:12]}...)")
    return seg


@dataclass(frozen=True)
class LungCropper:
    """``cropper(image)`` -> the image cut to the lungs' box plus margin (picklable: the model loads lazily, once
    per process, so the tensor cache's decoding workers can use it)."""

    path: str
    weights_sha256: str
    margin: float

    def box(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        """(top, bottom, left, right) of the crop in ``image``'s pixels (bottom / right exclusive), or ``None``
        when no plausible lungs were found."""
        if image.size == 0 or float(np.ptp(image)) == 0.0:  # blank: nothing to find (the domain gate refuses it)
            return None
        seg = _segmenter(self.path, self.weights_sha256)
        size = seg.card.input_size
        with torch.inference_mode():
            mask = seg.masks(torch.from_numpy(preprocess(image, size))[None, None])[0].numpy() == FOREGROUND
        if mask.mean() < MIN_AREA:
            return None
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = image.shape[:2]
        top, bottom = rows[0] / size * h, (rows[-1] + 1) / size * h
        left, right = cols[0] / size * w, (cols[-1] + 1) / size * w
        dh, dw = self.margin * (bottom - top), self.margin * (right - left)
        return (max(0, int(np.floor(top - dh))), min(h, int(np.ceil(bottom + dh))),
                max(0, int(np.floor(left - dw))), min(w, int(np.ceil(right + dw))))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        box = self.box(image)
        if box is None:
            return image
        top, bottom, left, right = box
        return image[top:bottom, left:right]


def install_lung_model(seg_run: str | Path, run_dir: str | Path, margin: float) -> dict[str, Any]:
    """Copy the segmentation run's model into ``run_dir/lung_seg/`` and return the ``lung_crop`` options."""
    card_path = _find_card(Path(seg_run))
    card = ModelCard.load(card_path)
    if card.task != "segmentation":
        raise DataError(f"data.lung_crop={seg_run} is a {card.task} run, not a lung segmentation run",
                        hint="train one with `medlens train ../shared/data/segmentation --recipe lung_unet`")
    dst = Path(run_dir) / LUNG_DIR
    dst.mkdir(parents=True, exist_ok=True)
    weights = card_path.with_name(card_path.name.replace(".card.json", ".safetensors"))
    shutil.copyfile(weights, dst / "model.safetensors")
    shutil.copyfile(card_path, dst / "model.card.json")
    return {"model_id": card.model_id, "weights_sha256": card.weights_sha256, "margin": float(margin)}


def lung_cropper(options: dict[str, Any], run_dir: str | Path) -> LungCropper | None:
    """The cropper a run's ``preprocess`` options ask for (``None`` when they ask for no crop)."""
    spec = (options or {}).get("lung_crop")
    if not spec:
        return None
    path = Path(run_dir) / LUNG_DIR
    if not (path / "model.card.json").is_file():
        raise DataError(f"{run_dir}: the model crops images to the lungs but {path} is missing",
                        hint="copy the whole run directory, lung_seg/ included")
    return LungCropper(str(path.resolve()), spec["weights_sha256"], float(spec["margin"]))
