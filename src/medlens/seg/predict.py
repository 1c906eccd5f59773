"""Segmenting new images with a segmentation run (``medlens segment RUN FILE... --out DIR``).

``Segmenter.from_run(run).segment(image)`` gives the mask at the image's own size: the network runs on the
card's ``input_size`` grid (``preprocess``, exactly as in training), the foreground probability is resized back
bilinearly, thresholded at 0.5 and post-processed as the card says (chosen on validation). The lung crop of the
anatomy-aware classifier (``medlens.data.cache``) uses the same object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medlens.data.cache import preprocess
from medlens.data.readers import read_image
from medlens.errors import DataError, MedlensError
from medlens.forward import autocast, resolve_device
from medlens.models.card import ModelCard, load_checkpoint, normalize_batch
from medlens.seg.data import FOREGROUND
from medlens.seg.metrics import postprocess


@torch.no_grad()
def predict_labels(model: torch.nn.Module, images: torch.Tensor, *, intensity: str, device: torch.device,
                   batch_size: int = 16, amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, S, S) -> (labels (N, S, S) int64, foreground probability (N, S, S) float32), on CPU."""
    model.eval()
    labels, probs = [], []
    for lo in range(0, len(images), batch_size):
        x = normalize_batch(images[lo:lo + batch_size].to(device), intensity)
        with autocast(x.device, amp):
            p = model(x).float().softmax(1)
        labels.append(p.argmax(1).cpu())
        probs.append(p[:, FOREGROUND].cpu())
    if not labels:
        size = images.shape[-2:]
        return torch.zeros((0, *size), dtype=torch.long), torch.zeros((0, *size))
    return torch.cat(labels), torch.cat(probs)


@dataclass
class Segmenter:
    model: torch.nn.Module
    card: ModelCard
    device: torch.device

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> Segmenter:
        dev = resolve_device(device)
        model, card = load_checkpoint(Path(run_dir), map_location=dev)
        if card.task != "segmentation":
            raise DataError(f"{run_dir} is a {card.task} run, not a segmentation run",
                            hint="train one with `medlens train DATA --recipe lung_unet`")
        return cls(model=model.eval(), card=card, device=dev)

    @property
    def postprocess(self) -> str:
        return (self.card.metrics.get("postprocess") or {}).get("chosen", "none")

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """uint8 (N, 1, S, S) on the card's grid -> foreground probability (N, S, S), float32 on the CPU."""
        return predict_labels(self.model, images, intensity=self.card.intensity, device=self.device,
                              batch_size=batch_size)[1]

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1, S, S) -> post-processed label maps (N, S, S) on the card's grid."""
        return postprocess((self.probabilities(images) >= 0.5).long() * FOREGROUND, self.postprocess)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """A decoded image (float HxW in [0, 1]) -> bool mask HxW at the image's own size."""
        x = torch.from_numpy(preprocess(image, self.card.input_size))[None, None]
        prob = self.probabilities(x)
        h, w = image.shape[:2]
        prob = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        labels = postprocess((prob >= 0.5).long() * FOREGROUND, self.postprocess)
        return labels[0].numpy() == FOREGROUND


def _components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask)[1])


def segment_files(run_dir: str | Path, files: list[str], out_dir: str | Path, device: str = "auto") -> list[dict]:
    """Write ``<stem>.mask.png`` (0 / 255) and ``<stem>.overlay.png`` per file into ``out_dir``; one result dict
    per file (an unreadable file gives ``{"path", "error"}``, the others still run)."""
    from medlens.report.segmentation import save_overlay

    seg = Segmenter.from_run(run_dir, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for f in files:
        try:
            image, _ = read_image(f)
        except MedlensError as e:
            results.append({"path": str(f), "error": e.message})
            continue
        mask = seg.segment(image)
        stem = Path(f).name.split(".")[0] or "image"
        mask_path, overlay_path = out / f"{stem}.mask.png", out / f"{stem}.overlay.png"
        Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
        save_overlay(overlay_path, image if image.ndim == 2 else image.mean(-1), mask.astype(np.uint8) * FOREGROUND)
        results.append({"path": str(f), "mask": str(mask_path), "overlay": str(overlay_path),
                        f"{seg.card.class_names[FOREGROUND]}_area_fraction": round(float(mask.mean()), 6),
                        "components": _components(mask),
                        "size": [int(image.shape[1]), int(image.shape[0])], "model_id": seg.card.model_id})
    return results


def to_json_lines(results: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in results)
