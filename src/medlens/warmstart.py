"""What a training run starts from besides a random initialisation: initial weights (the fine-tune after
``medlens prune``), weight masks that keep pruned weights at zero, and a distillation teacher. Split from
``medlens.train`` (the loop itself); ``medlens.compress`` writes the files these read."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medlens.config import Config
from medlens.errors import ConfigError, DataError
from medlens.models.card import load_checkpoint

log = logging.getLogger("medlens.train")


def load_init_weights(model: torch.nn.Module, path: Path) -> None:
    """Start from ``path``'s weights (``train.init_weights``); a file that does not fit the network is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path}: cannot read the initial weights ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{path}: the initial weights do not fit model.name / model.args "
                        f"({str(exc).splitlines()[0][:300]})") from None
    log.info("initial weights from %s", path)


def load_weight_masks(model: torch.nn.Module, path: Path, device: torch.device
                       ) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """``(parameter, 0/1 mask)`` pairs from ``train.weight_masks``, applied once now and after every step."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        masks = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path}: cannot read the weight masks ({exc})") from None
    params = dict(model.named_parameters())
    out = []
    for name, mask in masks.items():
        if name not in params or params[name].shape != mask.shape:
            raise DataError(f"{path}: mask {name} {tuple(mask.shape)} does not fit the network")
        params[name].data.mul_(mask)
        out.append((params[name], mask.to(device=device, dtype=params[name].dtype)))
    return out


def load_teacher(cfg: Config, run: Path, intensity: str, device: torch.device) -> torch.nn.Module:
    """The frozen teacher of a distillation; it must see what the student sees (same input size, intensity and
    preprocessing), or its soft targets would describe other images."""
    teacher, card = load_checkpoint(run, map_location=device)
    mine = {"input size": cfg.data.image_size, "intensity": intensity,
            "preprocess": {k: v for k, v in cfg.data.preprocess_options().items() if k != "lung_crop"}}
    theirs = {"input size": card.input_size, "intensity": card.intensity,
              "preprocess": {k: v for k, v in (card.preprocess or {}).items() if k != "lung_crop"}}
    if mine != theirs:
        raise ConfigError(f"the teacher {run} was trained on other inputs than this student ({theirs} vs {mine})",
                          hint="distil with the teacher's data settings (medlens distill copies them)")
    log.info("distilling from %s (%s), temperature %g, alpha %g", run, card.model_id, cfg.train.distill_temperature,
             cfg.train.distill_alpha)
    return teacher.to(device).eval()
