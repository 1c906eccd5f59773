"""Deep ensembles (Lakshminarayanan et al. 2017) as one module, one checkpoint and one model card.

``Ensemble(members)`` returns the log of the members' mean softmax: softmax of that is the averaged
probability, so everything written for a single classifier (``predict_logits``, temperature scaling, the
operating threshold, TTA, MC dropout, deletion/insertion) works on an ensemble unchanged. Its card names
``model_name="ensemble"`` and lists the members' architectures in ``model_args["members"]``; the weights of
all members live in one safetensors file (keys ``members.<k>.<param>``), so the weights' SHA-256 identifies
the whole ensemble.

Not in the model registry on purpose: an ensemble is built from trained members (``medlens train --ensemble
K``), never from scratch by name, and ``medlens models`` lists architectures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ENSEMBLE = "ensemble"


class Ensemble(nn.Module):
    """Averages the members' class probabilities; ``forward`` returns their log (use as logits)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        first = self.members[0]
        self.default_input_size = getattr(first, "default_input_size", 224)
        self.min_input_size = getattr(first, "min_input_size", 1)
        self.in_chans = getattr(first, "in_chans", 1)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, C) logits of every member."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # logsumexp of the members' log-softmax minus log K = log of the mean probability, without underflow
        logp = torch.log_softmax(self.member_logits(x).float(), dim=-1)
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def ensemble_spec(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``model_args`` of an ensemble card: ``{"members": [{"name": ..., "args": {...}}, ...]}``."""
    return {"members": [{"name": m["name"], "args": dict(m.get("args", {}))} for m in members]}


def build_ensemble(model_args: dict[str, Any], *, num_classes: int, in_chans: int) -> Ensemble:
    """Rebuild an (untrained) ensemble from a card's ``model_args``."""
    from medlens.errors import ConfigError
    from medlens.models import create_model

    specs = model_args.get("members")
    if not isinstance(specs, list) or not specs:
        raise ConfigError("ensemble card has no members list in model_args",
                          hint="the card was not written by `medlens train --ensemble K`")
    return Ensemble([create_model(s["name"], num_classes=num_classes, in_chans=in_chans, **s.get("args", {}))
                     for s in specs])


def is_ensemble(model: nn.Module) -> bool:
    return isinstance(model, Ensemble)
