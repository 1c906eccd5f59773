"""Visual explanations: class activation maps, overlays, and checks that a map is faithful to the model.

    with GradCAM(model) as cam:          # a forward hook on model.cam_layer until the block ends
        maps = cam(x)                    # (B, *spatial) float in [0, 1], explaining the predicted class
    result = explain(model, x, "scorecam", target=1)   # maps + explained classes + their probabilities

``x`` is network input (``normalize_batch`` output), ``(B, C, H, W)`` or ``(B, C, D, H, W)``: nothing here
depends on the number of spatial dimensions. Maps come back at the input size (bilinear / trilinear), ReLU-ed
and min-max scaled to [0, 1] per image (a constant map becomes all zeros), detached, on ``x``'s device.

One base class, ``CAM``, does the plumbing: the hook on the target layer (released by ``close()`` or the
``with`` block), choosing the class, one forward pass (plus, for the gradient methods, a backward pass that
stops at the target layer: ``torch.autograd.grad`` w.r.t. the activations, so no parameter ``.grad`` is
touched and the layers below are not back-propagated), resizing and normalising. A method overrides
``weights(activations, gradients, x, targets)``, the per-channel weights of the map; ``Occlusion``, which
needs neither activations nor gradients, overrides ``raw_maps`` instead.

What is explained: the **logit** of one class per image, the predicted class (argmax) unless ``target`` is
given (an int for the whole batch, or one class per image). For the usual 2-logit (normal / pneumonia) head
that is the predicted class's own logit, not the logit difference, as in Selvaraju et al. and pytorch-grad-cam;
for a single-logit (sigmoid) head it is that logit whatever the prediction. The model is put in eval mode for
the call (dropout off, BatchNorm statistics untouched) and its modes restored afterwards.

Faithfulness (Petsiuk et al. 2018; Adebayo et al. 2018): ``deletion_insertion``, ``randomisation_check``,
``mask_energy_fraction``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import itertools
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import ConfigError

__all__ = [
    "CAM", "GradCAM", "GradCAMPlusPlus", "ScoreCAM", "Occlusion", "Explanation", "METHODS",
    "make_explainer", "explain", "normalize_maps", "overlay", "save_overlay",
    "deletion_insertion", "randomisation_check", "randomised_copy", "mask_energy_fraction",
]

#: the class(es) to explain: None = the prediction; an int for every image; or one class per image
Target = int | Sequence[int] | torch.Tensor | None


# ---------------------------------------------------------------------------------------------------------
# plumbing shared by every method


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then each module's own mode back (a partly frozen model stays partly frozen)."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _spatial_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def _resize(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, *s)`` -> ``(N, *size)``: linear / bilinear / trilinear by the number of spatial dimensions."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[1:]) == size:
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, align_corners=False).squeeze(1)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then min-max to [0, 1] per map (first dimension = map index); a (near-)constant map becomes zeros."""
    maps = maps.float().clamp_min(0)
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (maps.ndim - 1)
    # relative floor: interpolating a constant map leaves rounding noise that min-max would blow up to [0, 1]
    varies = (hi - lo) > 1e-6 * hi.abs().clamp_min(1e-30)
    scaled = (maps - lo.view(shape)) / (hi - lo).clamp_min(1e-30).view(shape)
    return torch.where(varies.view(shape), scaled, torch.zeros_like(maps))


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _resolve_targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    batch, n_classes = logits.shape
    if target is None:
        targets = logits.argmax(dim=1)
    else:
        targets = torch.as_tensor(target, device=logits.device).long().flatten()
        if targets.numel() == 1:
            targets = targets.expand(batch)
        if targets.numel() != batch:
            raise ConfigError(
                f"target has {targets.numel()} classes for a batch of {batch} images",
                hint="give one class for all images, or one per image",
            )
    bad = (targets < 0) | (targets >= n_classes)
    if bad.any():
        raise ConfigError(
            f"target class {int(targets[bad][0])} is out of range for a model with {n_classes} output(s)",
            hint=f"use a class index from 0 to {n_classes - 1}",
        )
    return targets


@dataclass
class Explanation:
    """Maps and what they explain, one entry per image."""

    #: ``(B, *spatial)`` float32 in [0, 1], at the input size, on the input's device
    maps: torch.Tensor
    #: ``(B,)`` the explained class of each image
    targets: torch.Tensor
    #: ``(B,)`` the model's probability of that class (softmax; sigmoid for a single logit)
    probabilities: torch.Tensor
    method: str


class CAM:
    """Base class: a forward hook on ``layer`` (default ``model.cam_layer``) and the steps every method shares.

    Subclasses override ``weights`` (the Grad-CAM family, Score-CAM) or ``raw_maps`` (perturbation methods).
    Release the hook with ``close()`` or use the explainer as a context manager (an explainer that is simply
    dropped also releases it when collected). While it is open the hook records only during the explainer's
    own forward pass, so other forward passes of the model store nothing.
    """

    name = "cam"
    #: back-propagate the explained logit to the layer
    needs_gradients = True
    #: hook the layer (False: the method perturbs the input only and touches no module)
    needs_activations = True

    def __init__(self, model: nn.Module, *, layer: str | None = None):
        self.model = model
        self.layer_name = layer if layer is not None else getattr(model, "cam_layer", "")
        self._handle = None
        self._activation: torch.Tensor | None = None
        self._recording = False
        self._closed = False
        if self.needs_activations:
            if not self.layer_name:
                raise ConfigError(
                    f"{type(model).__name__} has no cam_layer", hint="pass layer='dotted.module.name'"
                )
            try:
                module = model.get_submodule(self.layer_name)
            except AttributeError:
                raise ConfigError(
                    f"model {type(model).__name__} has no layer {self.layer_name!r}",
                    hint="give a dotted module name as printed by `print(model)`, e.g. the default model.cam_layer",
                ) from None
            # The hook holds the explainer weakly: an explainer dropped without close() is collected and
            # its __del__ takes the hook off the model, instead of the model keeping both alive.
            explainer = weakref.ref(self)

            def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
                live = explainer()
                return None if live is None else live._keep(module, inputs, output)

            self._handle = module.register_forward_hook(hook)

    # -- hook lifecycle
    def _keep(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not self._recording:
            return None
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"layer {self.layer_name!r} returns {type(output).__name__}, not a tensor",
                hint="choose a layer whose output is a single feature map",
            )
        if self._activation is not None:
            raise ConfigError(
                f"layer {self.layer_name!r} runs more than once per forward pass",
                hint="choose a module that is used once (not a shared activation module)",
            )
        self._activation = output
        # The rest of the network gets a copy: an in-place op after the layer (ReLU(inplace=True)) would
        # otherwise overwrite the activations being explained and the graph their gradient comes from.
        return output.clone()

    def close(self) -> None:
        """Remove the hook; the explainer cannot be used afterwards. Safe to call twice."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activation = None
        self._closed = True

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.remove()

    def __enter__(self) -> CAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public call
    def __call__(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        """Maps ``(B, *spatial)`` in [0, 1] at the input size; see ``explain`` for the classes explained."""
        return self.explain(x, target).maps

    def explain(self, x: torch.Tensor, target: Target = None) -> Explanation:
        """Explain ``target`` (default: each image's predicted class) for the batch ``x``."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed; create a new explainer")
        if x.ndim < 3:
            raise ConfigError(
                f"expected a batch (B, C, *spatial), got shape {tuple(x.shape)}", hint="add batch/channel axes"
            )
        x = x.detach()
        with _eval_mode(self.model):
            logits, maps, targets = self.raw_maps(x, target)
        maps = normalize_maps(_resize(maps.detach().float(), x.shape[2:]))
        probs = _probabilities(logits.detach().float())
        probs = probs[:, :1] if probs.shape[1] == 1 else probs.gather(1, targets[:, None])
        return Explanation(maps=maps, targets=targets, probabilities=probs.squeeze(1), method=self.name)

    # -- what methods override
    def raw_maps(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, maps (B, *spatial'), targets)`` before ReLU, resizing and normalisation."""
        with torch.set_grad_enabled(self.needs_gradients):
            # a fresh leaf that needs a gradient: the graph exists even when every parameter is frozen
            inputs = x.detach().requires_grad_(True) if self.needs_gradients else x
            activations, logits = self._forward(inputs)
            targets = _resolve_targets(logits, target)
            gradients = None
            if self.needs_gradients:
                # Sum over the batch: in eval mode the images do not interact, so each image's part of the
                # gradient is the gradient of its own logit.
                score = logits.gather(1, targets[:, None]).sum()
                (gradients,) = torch.autograd.grad(score, activations)
        activations = activations.detach()
        weights = self.weights(activations, gradients, x=x, targets=targets)
        weights = weights.view(*weights.shape, *([1] * (activations.ndim - 2)))
        return logits.detach(), (weights * activations).sum(dim=1), targets

    def weights(
        self, activations: torch.Tensor, gradients: torch.Tensor | None, *, x: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Per-channel weights ``(B, K)`` for activations ``(B, K, *spatial')``."""
        raise NotImplementedError

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._activation = None
        self._recording = True
        try:
            logits = self.model(x)
        finally:
            self._recording = False
        activation, self._activation = self._activation, None  # hold nothing between calls
        if activation is None:
            raise ConfigError(
                f"layer {self.layer_name!r} did not run in the forward pass",
                hint="choose a module on the path from the input to the logits",
            )
        return activation, logits


# ---------------------------------------------------------------------------------------------------------
# the methods


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weight = spatial mean of the logit's gradient."""

    name = "gradcam"

    def weights(self, activations, gradients, *, x, targets):
        return gradients.mean(dim=_spatial_dims(gradients))


class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted per position by alpha.

    The closed form for an exponential score S = exp(logit), as usually implemented: with g the logit's
    gradient and A the activations, alpha = g^2 / (2 g^2 + sum(A) g^3) (0 where that is 0/0), and
    weight_k = sum over positions of alpha * relu(g). The factor exp(logit) is common to all channels of an
    image and vanishes in the normalisation.
    """

    name = "gradcam++"

    def weights(self, activations, gradients, *, x, targets):
        dims = _spatial_dims(gradients)
        g2 = gradients.pow(2)
        denominator = 2 * g2 + activations.sum(dim=dims, keepdim=True) * g2 * gradients
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where(denominator != 0, g2 / safe, torch.zeros_like(g2))
        return (alpha * gradients.clamp_min(0)).sum(dim=dims)


class ScoreCAM(CAM):
    """Score-CAM (Wang et al. 2020): no gradients; each channel is weighted by what it shows the model.

    Each activation channel is upsampled to the input size, min-max scaled to [0, 1] and multiplies the
    input (for z-scored input, masked-out pixels become the image mean, 0); the target logit of each masked
    image, softmax-ed over the channels, is the channel's weight. That is one forward pass per channel,
    ``batch_size`` masked images at a time.

    ``max_channels=k`` scores only the k channels with the highest mean activation in each image (the
    others get weight 0): cost falls from K to k forward passes, at the price of ignoring weakly active
    channels that might still carry class evidence; the map can change where those channels matter.
    """

    name = "scorecam"
    needs_gradients = False

    def __init__(
        self, model: nn.Module, *, layer: str | None = None, batch_size: int = 32, max_channels: int | None = None
    ):
        if int(batch_size) < 1 or (max_channels is not None and int(max_channels) < 1):
            raise ConfigError(
                f"scorecam: batch_size={batch_size} and max_channels={max_channels} must be >= 1",
                hint="max_channels=None scores every channel",
            )
        super().__init__(model, layer=layer)
        self.batch_size = int(batch_size)
        self.max_channels = None if max_channels is None else int(max_channels)

    @torch.no_grad()
    def weights(self, activations, gradients, *, x, targets):
        batch, channels = activations.shape[:2]
        weights = torch.zeros(batch, channels, device=activations.device)
        for i in range(batch):
            chosen = torch.arange(channels, device=activations.device)
            if self.max_channels is not None and self.max_channels < channels:
                chosen = activations[i].flatten(1).mean(dim=1).topk(self.max_channels).indices
            scores = []
            for part in chosen.split(self.batch_size):
                masks = _resize(activations[i, part].float(), x.shape[2:])
                lo = masks.flatten(1).min(1).values.view(-1, *([1] * (masks.ndim - 1)))
                hi = masks.flatten(1).max(1).values.view_as(lo)
                masks = torch.where(hi > lo, (masks - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(masks))
                scores.append(self.model(x[i : i + 1] * masks.unsqueeze(1).to(x.dtype))[:, targets[i]].float())
            weights[i, chosen] = torch.softmax(torch.cat(scores), dim=0)
        return weights


class Occlusion(CAM):
    """Occlusion sensitivity (Zeiler & Fergus 2014): no hooks, no gradients, forward passes only.

    A ``patch`` (default 1/8 of each side) of the image's mean value slides over the image with ``stride``
    (default half the patch; the last position is moved in so the far edge is covered). A pixel's value is
    the mean drop of the target probability over the patches that cover it. ``batch_size`` occluded
    images per forward pass; cost = number of positions (225 with the defaults) forward passes per image.
    """

    name = "occlusion"
    needs_gradients = False
    needs_activations = False

    def __init__(
        self,
        model: nn.Module,
        *,
        patch: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        batch_size: int = 32,
    ):
        if int(batch_size) < 1:
            raise ConfigError(f"occlusion: batch_size={batch_size} must be >= 1")
        super().__init__(model)
        self.patch, self.stride, self.batch_size = patch, stride, int(batch_size)

    def _windows(self, size: tuple[int, ...]) -> list[tuple[slice, ...]]:
        def per_dim(value, default):
            values = default if value is None else ([value] * len(size) if isinstance(value, int) else list(value))
            if len(values) != len(size) or min(values) < 1:
                raise ConfigError(f"occlusion: patch/stride {value} does not fit an input of size {size}")
            return [int(v) for v in values]

        patch = [min(p, s) for p, s in zip(per_dim(self.patch, [max(1, s // 8) for s in size]), size, strict=True)]
        stride = per_dim(self.stride, [max(1, p // 2) for p in patch])
        starts = []
        for s, p, st in zip(size, patch, stride, strict=True):
            begin = list(range(0, s - p + 1, st))
            if begin[-1] != s - p:
                begin.append(s - p)
            starts.append(begin)
        return [
            tuple(slice(b, b + p) for b, p in zip(corner, patch, strict=True))
            for corner in itertools.product(*starts)
        ]

    @torch.no_grad()
    def raw_maps(self, x, target):
        logits = self.model(x)
        targets = _resolve_targets(logits, target)
        reference = _probabilities(logits.float()).gather(1, targets[:, None]).squeeze(1)
        size = tuple(x.shape[2:])
        windows = self._windows(size)
        coverage = torch.zeros(size, device=x.device)
        for window in windows:
            coverage[window] += 1
        fill = x.mean(dim=_spatial_dims(x), keepdim=True)  # (B, C, 1, ...): the image's mean, per channel
        maps = torch.zeros(x.shape[0], *size, device=x.device)
        for i in range(x.shape[0]):
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start : start + self.batch_size]
                occluded = x[i : i + 1].repeat(len(chunk), *([1] * (x.ndim - 1)))
                for j, window in enumerate(chunk):
                    occluded[(j, slice(None), *window)] = fill[i]
                drop = reference[i] - _probabilities(self.model(occluded).float())[:, targets[i]]
                for j, window in enumerate(chunk):
                    maps[(i, *window)] += drop[j]
        return logits, maps / coverage, targets


METHODS: dict[str, type[CAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "occlusion": Occlusion,
}


def make_explainer(name: str, model: nn.Module, **kwargs: Any) -> CAM:
    """The explainer called ``name`` (see ``METHODS``) for ``model``; unknown names or options raise ``ConfigError``."""
    key = name.lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, METHODS, n=2, cutoff=0.6)
        hint = f"known methods: {', '.join(METHODS)}"
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " + hint
        raise ConfigError(f"unknown explanation method {name!r}", hint=hint)
    cls = METHODS[key]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "model")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"explanation method {key!r} has no option {', '.join(repr(k) for k in unknown)}",
            hint=f"options of {key}: {', '.join(accepted) or '(none)'}",
        )
    if cls.needs_activations and isinstance(getattr(model, "members", None), nn.ModuleList):
        return MemberAverage(cls, model, **kwargs)
    return cls(model, **kwargs)


class MemberAverage:
    """A hooked method on an ensemble (``medlens.models.ensemble.Ensemble``): the mean of the members' maps.

    There is no single layer to hook in an ensemble, so each member gets its own explainer; every member
    explains the ensemble's class (its prediction unless ``target``), and the mean map is re-normalised.
    Same interface as ``CAM`` (call, ``explain``, ``close``, context manager)."""

    def __init__(self, cls: type[CAM], model: nn.Module, **kwargs: Any):
        self.model = model
        self.name = cls.name
        self.explainers = [cls(member, **kwargs) for member in model.members]

    def explain(self, x: torch.Tensor, target: Target = None) -> Explanation:
        x = x.detach()
        with _eval_mode(self.model), torch.no_grad():
            logits = self.model(x).float()
        targets = _resolve_targets(logits, target)
        maps = normalize_maps(torch.stack([e.explain(x, targets).maps for e in self.explainers]).mean(dim=0))
        probs = _probabilities(logits).gather(1, targets[:, None]).squeeze(1)
        return Explanation(maps=maps, targets=targets, probabilities=probs, method=self.name)

    def __call__(self, x: torch.Tensor, target: Target = None) -> torch.Tensor:
        return self.explain(x, target).maps

    def close(self) -> None:
        for e in self.explainers:
            e.close()

    def __enter__(self) -> MemberAverage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def explain(model: nn.Module, x: torch.Tensor, method: str = "gradcam", *, target: Target = None, **kwargs: Any) -> Explanation:
    """One-shot: build the explainer, explain ``x``, release the hooks."""
    with make_explainer(method, model, **kwargs) as explainer:
        return explainer.explain(x, target)


# ---------------------------------------------------------------------------------------------------------
# pictures


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


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
