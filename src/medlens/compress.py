"""Smaller networks from a trained run: structured pruning and knowledge distillation.

Both give an ordinary run (card, split, calibration, threshold and referral chosen on validation, in-domain
score) that ``evaluate``, ``predict``, ``serve`` and ``export`` accept, trained by the same ``medlens.train.fit`` on
the same patient split as the source run.

- ``medlens prune RUN --sparsity S --structured --data DATA --out NEW``: removes the fraction ``S`` of output
  channels of every convolution by L1 magnitude (torch-pruning's dependency graph keeps each convolution, its
  batch norm and the next layer's inputs consistent), so the network is narrower (fewer multiply-adds and bytes),
  not only zeroed; the pruned network is the architecture's own ``widths`` option, so the card rebuilds it. Then a
  short fine-tune (``train.init_weights``) at a lower learning rate.
- ``medlens distill TEACHER --student NAME --data DATA --out NEW``: trains ``NAME`` on the teacher's data settings
  with the teacher's softened logits plus the labels (``losses.DistillationLoss``).

``macs(model, size)``: multiply-accumulates of one forward pass (torch's FlopCounterMode, FLOPs / 2).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens.errors import ConfigError

log = logging.getLogger(__name__)

PRUNED_INIT = "pruned_init.safetensors"
PRUNED_MASKS = "pruned_masks.safetensors"


def macs(model: nn.Module, size: int, in_chans: int = 1) -> int:
    """Multiply-accumulate operations of one forward pass on one ``size`` x ``size`` image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, size, size))
    return int(counter.get_total_flops() // 2)


def _config(run: Path, changes: dict[str, Any]):
    """The source run's resolved config with ``changes`` (dotted keys) applied; ``model.args`` is replaced whole
    (a student's options are its own, not merged into the teacher's)."""
    import json

    from medlens import rundir
    from medlens.config import apply_overrides

    cfg = rundir.run_config(run)
    changes = dict(changes)
    if "model.args" in changes:
        cfg.model.args = dict(changes.pop("model.args"))
    return apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in changes.items()])


def prune_run(run_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, sparsity: float,
              structured: bool = True, epochs: int = 3, lr_factor: float = 0.25, progress: bool = True):
    """Structured L1 channel pruning of ``run_dir``'s network, then a fine-tune into ``out``; returns its card."""
    import torch_pruning as tp
    from safetensors.torch import save_file

    from medlens.models import create_model
    from medlens.models.card import load_checkpoint, update_card
    from medlens.train import fit

    run_dir, out = Path(run_dir), Path(out)
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"--sparsity {sparsity} must be between 0 and 1 (the share of channels or weights removed)")
    model, card = load_checkpoint(run_dir, map_location="cpu")
    if not structured:
        return _prune_unstructured(model, card, run_dir, data, out, sparsity=sparsity, epochs=epochs,
                                   lr_factor=lr_factor, progress=progress)
    widths = card.model_args.get("widths")
    if hasattr(model, "members") or widths is None and not hasattr(model, "num_features"):
        raise ConfigError(f"{run_dir}: {card.model_name} has no channel-width option to describe a pruned network",
                          hint="structured pruning is built for the seed CNN family (seed_cnn, seed_resnet)")
    if widths is None:
        from medlens.models.cnn import DEFAULT_WIDTHS

        widths = list(DEFAULT_WIDTHS)
    new_widths = [max(1, round(w * (1.0 - sparsity))) for w in widths]
    size = card.input_size
    before = macs(model, size, card.in_chans)
    head = getattr(model, "fc", None)
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, card.in_chans, size, size),
                                  importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=sparsity,
                                  ignored_layers=[head] if head is not None else [], global_pruning=False)
    pruner.step()
    args = {**card.model_args, "widths": new_widths}
    args.pop("num_classes", None), args.pop("in_chans", None)
    reference = create_model(card.model_name, num_classes=len(card.class_names), in_chans=card.in_chans, **args)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:3]
        raise ConfigError(f"{run_dir}: the pruned {card.model_name} is not the architecture with widths "
                          f"{new_widths} (e.g. {bad})", hint="this architecture's blocks cannot be pruned uniformly")
    after = macs(model, size, card.in_chans)
    out.mkdir(parents=True, exist_ok=True)
    init = out / PRUNED_INIT
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(init))
    log.info("pruned %s: widths %s -> %s, MACs %.1fM -> %.1fM; fine-tuning %d epochs", card.model_id, widths,
             new_widths, before / 1e6, after / 1e6, epochs)
    cfg = _config(run_dir, {"model.args": args, "train.init_weights": str(init.resolve()), "train.epochs": epochs,
                            "train.warmup_epochs": 0, "train.lr": _config(run_dir, {}).train.lr * lr_factor,
                            "train.ensemble": 1, "train.teacher": ""})
    fit(cfg, data, out, progress=progress)
    provenance = {"run": str(run_dir), "model_id": card.model_id, "sparsity": sparsity,
                  "widths": [list(widths), new_widths], "macs": [before, after],
                  "method": "structured L1 channel pruning (torch-pruning), then fine-tune"}
    return update_card(out, lambda c: c.metrics.__setitem__("pruned_from", provenance))


def _prune_unstructured(model: nn.Module, card: Any, run_dir: Path, data: Any, out: Path, *, sparsity: float,
                        epochs: int, lr_factor: float, progress: bool):
    """Global L1 magnitude pruning of every convolution and linear weight (torch.nn.utils.prune): the same
    network with the share ``sparsity`` of its weights at zero, kept at zero through the fine-tune
    (``train.weight_masks``). Smaller only once compressed, and no faster on dense kernels: see --structured."""
    import torch.nn.utils.prune as tprune
    from safetensors.torch import save_file

    from medlens.models.card import update_card
    from medlens.train import fit

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    tprune.global_unstructured(layers, pruning_method=tprune.L1Unstructured, amount=sparsity)
    masks = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            masks[f"{name}.weight"] = module.weight_mask.detach().clone().contiguous()
            tprune.remove(module, "weight")
    out.mkdir(parents=True, exist_ok=True)
    init, mask_file = out / PRUNED_INIT, out / PRUNED_MASKS
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(init))
    save_file(masks, str(mask_file))
    zeros = sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    log.info("pruned %.0f%% of %s's conv / linear weights (global L1); fine-tuning %d epochs", 100 * zeros,
             card.model_id, epochs)
    cfg = _config(run_dir, {"train.init_weights": str(init.resolve()), "train.weight_masks": str(mask_file.resolve()),
                            "train.epochs": epochs, "train.warmup_epochs": 0,
                            "train.lr": _config(run_dir, {}).train.lr * lr_factor, "train.ensemble": 1,
                            "train.teacher": ""})
    fit(cfg, data, out, progress=progress)
    provenance = {"run": str(run_dir), "model_id": card.model_id, "sparsity": sparsity, "structured": False,
                  "zero_share_of_pruned_weights": zeros,
                  "method": "global L1 unstructured pruning (torch.nn.utils.prune), masks kept through a fine-tune"}
    return update_card(out, lambda c: c.metrics.__setitem__("pruned_from", provenance))


def distill_run(teacher: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, student: str,
                student_args: dict[str, Any] | None = None, epochs: int | None = None, temperature: float = 4.0,
                alpha: float = 0.7, progress: bool = True):
    """Train ``student`` on the teacher run's data settings and split with distillation; returns its card."""
    from medlens.models import create_model
    from medlens.models.card import load_checkpoint, update_card
    from medlens.train import fit

    teacher = Path(teacher)
    teacher_model, tcard = load_checkpoint(teacher, map_location="cpu")
    changes: dict[str, Any] = {"model.name": student, "model.args": dict(student_args or {}),
                               "train.teacher": str(teacher.resolve()), "train.distill_temperature": temperature,
                               "train.distill_alpha": alpha, "train.ensemble": 1, "train.init_weights": ""}
    if epochs:
        changes["train.epochs"] = epochs
    cfg = _config(teacher, changes)
    try:
        probe = create_model(student, num_classes=len(tcard.class_names), in_chans=tcard.in_chans,
                             **cfg.model.args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--student {student} with {cfg.model.args}: {exc}") from None
    teacher_macs, student_macs = macs(teacher_model, tcard.input_size), macs(probe, tcard.input_size)
    log.info("distilling %s (%.1fM MACs) into %s (%.1fM MACs, %.1fx fewer)", tcard.model_id, teacher_macs / 1e6,
             student, student_macs / 1e6, teacher_macs / max(1, student_macs))
    fit(cfg, data, out, progress=progress)
    provenance = {"run": str(teacher), "model_id": tcard.model_id, "temperature": temperature, "alpha": alpha,
                  "macs": {"teacher": teacher_macs, "student": student_macs}}
    return update_card(out, lambda c: c.metrics.__setitem__("distilled_from", provenance))
