"""Is a map faithful to the model? Deletion / insertion, the randomisation check, mask energy."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import ConfigError
from medlens.explain.cams import (
    Target,
    _eval_mode,
    _numpy,
    _probabilities,
    _resolve_targets,
    _spatial_dims,
    make_explainer,
)

# ---------------------------------------------------------------------------------------------------------
# faithfulness


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` over every spatial axis, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels, nd = x.shape[1], x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    for d in range(nd):
        shape = [1] * nd
        shape[d] = kernel.numel()
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *([1] * nd))
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - d)] = pad[2 * (nd - 1 - d) + 1] = radius  # F.pad lists the last axis first
        x = conv(F.pad(x, pad, mode="replicate"), weight, groups=channels)
    return x


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    cams: Any,
    *,
    steps: int = 20,
    target: Target = None,
    baseline: str = "blur",
    random_order: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    blur_sigma: float | None = None,
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves (Petsiuk et al. 2018) of each image's target-class probability.

    Pixels (all channels of a spatial position together) are ranked by ``cams`` (B, *spatial), most
    important first; ties, e.g. the zeros left by the ReLU, in a random order seeded by ``seed``. At each of
    ``steps + 1`` fractions 0, 1/steps, ..., 1 the top pixels are replaced by the baseline (deletion) or
    copied onto the baseline (insertion). ``baseline``: ``"blur"`` (Gaussian, sigma = ``blur_sigma``, default
    1/8 of the smallest side: strong enough to erase lesion-sized detail, while the coarse intensity layout
    keeps the image closer to what the model was trained on than a flat fill) or ``"mean"`` (the image's
    mean; 0 for z-scored input). ``random_order=True`` ignores the maps and ranks pixels at random
    (seeded): the reference a map must beat. The target defaults to the
    prediction on the unmodified image. A faithful map has a low deletion AUC and a high insertion AUC.

    Returns per image ``deletion_auc`` and ``insertion_auc`` (trapezoid over the fraction, in [0, 1]), the
    curves ``deletion_curve`` / ``insertion_curve`` (B, steps + 1) and ``fractions``.
    """
    if int(steps) < 1:
        raise ConfigError(f"deletion_insertion: steps={steps} must be >= 1")
    cams = torch.as_tensor(_numpy(cams), dtype=torch.float32, device=x.device)
    if cams.shape != (x.shape[0], *x.shape[2:]):
        raise ConfigError(
            f"cams have shape {tuple(cams.shape)}, expected {(x.shape[0], *x.shape[2:])} (one map per image at the input size)"
        )
    x = x.detach()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(1.0, min(x.shape[2:]) / 8)
        reference = _gaussian_blur(x, float(sigma))
    elif baseline == "mean":
        reference = x.mean(dim=_spatial_dims(x), keepdim=True).expand_as(x)
    else:
        raise ConfigError(f"unknown baseline {baseline!r}", hint="use 'blur' or 'mean'")
    generator = torch.Generator().manual_seed(int(seed))
    fractions = np.linspace(0.0, 1.0, int(steps) + 1)
    n_pixels = math.prod(x.shape[2:])
    counts = torch.from_numpy(np.rint(fractions * n_pixels).astype(np.int64)).to(x.device)
    curves = np.zeros((2, x.shape[0], len(fractions)))
    with _eval_mode(model):
        targets = _resolve_targets(model(x), target)
        for i in range(x.shape[0]):
            shuffle = torch.randperm(n_pixels, generator=generator).to(x.device)
            if random_order:
                order = shuffle
            else:  # descending by the map; the stable sort of a shuffled copy breaks ties at random
                order = shuffle[torch.argsort(cams[i].flatten()[shuffle], descending=True, stable=True)]
            rank = torch.empty_like(order)
            rank[order] = torch.arange(n_pixels, device=x.device)
            chosen = (rank[None, :] < counts[:, None]).view(len(fractions), 1, *x.shape[2:])
            deleted = torch.where(chosen, reference[i : i + 1], x[i : i + 1])
            inserted = torch.where(chosen, x[i : i + 1], reference[i : i + 1])
            probs = torch.cat([
                _probabilities(model(part).float())[:, targets[i]]
                for part in torch.cat([deleted, inserted]).split(batch_size)
            ])
            curves[:, i] = probs.view(2, len(fractions)).cpu().numpy()
    widths = np.diff(fractions)
    auc = ((curves[..., 1:] + curves[..., :-1]) / 2 * widths).sum(axis=-1)
    return {
        "deletion_auc": auc[0],
        "insertion_auc": auc[1],
        "deletion_curve": curves[0],
        "insertion_curve": curves[1],
        "fractions": fractions,
    }


def _top_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[str], list[str]]:
    """Names of the parameterised modules of (head, last feature stage), found by running ``example``.

    The last feature stage: the layers at the end of ``forward_features`` that run at the resolution of its
    output (ResNet's layer4, DenseNet's last dense block, EfficientNet's last blocks and head conv), together
    with the subtree holding its last layer (for conv-then-pool stages like seed_cnn's, whose convolution runs
    one step finer). Trace with an input of the size used, larger than the network's total stride.
    """
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ConfigError(
            f"{type(model).__name__} has no forward_features / forward_head",
            hint="layers='top' needs a medlens ImageClassifier; use layers='all'",
        )
    layers = {n: m for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    runs: list[tuple[str, str, int | None]] = []
    phase = ["features"]

    def record(name):
        def hook(_m, _i, out):
            spatial = math.prod(out.shape[2:]) if isinstance(out, torch.Tensor) and out.ndim > 2 else None
            runs.append((name, phase[0], spatial))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), _eval_mode(model):
            features = model.forward_features(example)
            phase[0] = "head"
            model.forward_head(features)
    finally:
        for h in handles:
            h.remove()
    head = list(dict.fromkeys(n for n, p, _ in runs if p == "head"))
    feats = [(n, s) for n, p, s in runs if p == "features"]
    if not feats:
        return head, []
    final = math.prod(features.shape[2:])
    stage = set()
    for name, spatial in reversed(feats):  # the tail of the pass that runs at the feature map's resolution
        if spatial is not None and spatial > final:
            break
        stage.add(name)
    first, last = feats[0][0], feats[-1][0]
    unit, parts = last, last.split(".")
    for k in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:k])
        if first == ancestor or first.startswith(ancestor + "."):
            break
        unit = ancestor
    stage |= {n for n, _ in feats if n == unit or n.startswith(unit + ".")}
    return head, [n for n in dict.fromkeys(n for n, _ in feats) if n in stage]


def _layers_to_randomise(model: nn.Module, layers: str, example: torch.Tensor) -> list[str]:
    if layers == "all":
        return [n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    head, stage = _top_layers(model, example[:1])
    return head if layers == "head" else head + stage


def randomised_copy(model: nn.Module, layers: str = "top", seed: int = 0, example: torch.Tensor | None = None) -> nn.Module:
    """A deep copy of ``model`` with some layers re-initialised by their own ``reset_parameters`` (seeded).

    ``layers``: ``"head"``; ``"top"`` = head + last feature stage (see ``_top_layers``; needs ``example``, an
    input batch, to trace the model); ``"all"``. The original model is not touched; the global RNG neither.
    """
    if layers not in ("head", "top", "all"):
        raise ConfigError(f"unknown layers={layers!r}", hint="use 'head', 'top' or 'all'")
    if example is None:
        size = int(getattr(model, "default_input_size", 224))
        example = torch.zeros(1, int(getattr(model, "in_chans", 1)), size, size)
    if isinstance(getattr(model, "members", None), nn.ModuleList):  # an ensemble: the same layers of every member
        names = [f"members.{k}.{n}" for k, member in enumerate(model.members)
                 for n in _layers_to_randomise(member, layers, example)]
    else:
        names = _layers_to_randomise(model, layers, example)
    randomised = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for name in names:
            module = randomised.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                with torch.no_grad():
                    for p in module.parameters(recurse=False):
                        p.normal_(0.0, float(p.std()) if p.numel() > 1 else 0.02)
    return randomised


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2)[inverse.ravel()]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; NaN when either map is constant (no ranking to compare)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    try:
        from scipy.stats import spearmanr
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b)[0])


def randomisation_check(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradcam",
    layers: str = "top",
    seed: int = 0,
    *,
    target: Target = None,
    **method_kwargs: Any,
) -> np.ndarray:
    """Model-parameter randomisation test (Adebayo et al. 2018), per image.

    Spearman rank correlation between the maps of ``model`` and those of ``randomised_copy(model, layers,
    seed)``, explaining the same classes (the trained model's prediction unless ``target``). A map that
    depends on what the model learned changes when the top layers are re-initialised: values near 1 mean
    the method shows the image rather than the model. NaN where a map is constant.
    """
    randomised = randomised_copy(model, layers, seed, example=x[:1].detach())
    with make_explainer(method, model, **method_kwargs) as explainer:
        trained = explainer.explain(x, target)
    with make_explainer(method, randomised, **method_kwargs) as explainer:
        random_maps = explainer(x, trained.targets)
    return np.array([
        _spearman(_numpy(a), _numpy(b)) for a, b in zip(trained.maps, random_maps, strict=True)
    ])


def mask_energy_fraction(cam: Any, mask: Any) -> float:
    """Share of the map's mass inside a binary ``mask`` of the same shape (NaN for an all-zero map)."""
    cam, mask = _numpy(cam).astype(np.float64), _numpy(mask).astype(bool)
    if cam.shape != mask.shape:
        raise ConfigError(f"cam shape {cam.shape} differs from mask shape {mask.shape}")
    cam = np.clip(cam, 0, None)
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else float("nan")
