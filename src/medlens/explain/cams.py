"""CAM methods on one base class (see the package docstring)."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import itertools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import ConfigError

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


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
