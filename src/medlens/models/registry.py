"""The model registry: ``register_model`` (a decorator), ``create_model``, ``list_models``, ``model_info``.

The family modules (``medlens.models.cnn``, ``medlens.models.monai_nets``) register their models with the
decorator from here; importing the package ``medlens.models`` imports them, so every name is registered
before anything is built. Import these functions from ``medlens.models``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from medlens.errors import ConfigError

__all__ = ["register_model", "create_model", "list_models", "model_info", "model_task"]

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


_TASKS: dict[str, str] = {}
TASKS = ("classification", "segmentation")


def register_model(fn: ModelFn | None = None, *, task: str = "classification"):
    """Decorator: register ``fn`` under ``fn.__name__``; ``fn(num_classes=, in_chans=, **options)`` builds it.

    ``@register_model`` registers a classifier; ``@register_model(task="segmentation")`` a segmentation network."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def register(fn: ModelFn) -> ModelFn:
        name = fn.__name__
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(
                f"model {name!r} is registered twice ({_REGISTRY[name].__module__} and {fn.__module__})"
            )
        _REGISTRY[name] = fn
        _TASKS[name] = task
        return fn

    return register(fn) if fn is not None else register


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"seed_*"``), sorted; ``task``
    (``"classification"`` or ``"segmentation"``) lists one kind only."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern) and task in (None, _TASKS[n]))


def model_task(name: str) -> str:
    """``"classification"`` or ``"segmentation"``: what model ``name`` does (unknown names raise ``ConfigError``)."""
    _lookup(name)
    return _TASKS[name]


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.6)
        hint = f"known models: {', '.join(list_models())} (see `medlens models`)"
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " + hint
        raise ConfigError(f"unknown model {name!r}", hint=hint) from None


def _options(fn: Callable[..., nn.Module]) -> dict[str, Any]:
    """The keyword options a model function accepts, with their defaults."""
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def create_model(name: str, *, num_classes: int = 2, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with random weights; unknown names and unknown options raise ``ConfigError``."""
    fn = _lookup(name)
    options = _options(fn)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in options.items() if k not in ("num_classes", "in_chans"))
        raise ConfigError(
            f"model {name!r} has no option {', '.join(repr(k) for k in unknown)}",
            hint=f"options of {name}: {accepted or '(none)'}",
        )
    if int(num_classes) < 1 or int(in_chans) < 1:
        raise ConfigError(
            f"model {name!r}: num_classes={num_classes} and in_chans={in_chans} must both be >= 1",
            hint="num_classes is the number of class names (2 for normal/pneumonia); in_chans is 1 for grey images",
        )
    return fn(num_classes=int(num_classes), in_chans=int(in_chans), **kwargs)


@functools.cache
def _measure(name: str) -> tuple[int, int, int]:
    # Built on the CPU: the largest takes ~0.3 s. (The meta device would skip the allocation, but its
    # Python-level random-init decompositions cost ~2 s on first use.)
    model = create_model(name, num_classes=2, in_chans=1)
    return (
        sum(p.numel() for p in model.parameters()),
        int(model.default_input_size),
        int(model.min_input_size),
    )


def model_info(name: str) -> dict[str, Any]:
    """Description, family, default and minimum input size, parameter count (2 classes, 1 channel) and options of ``name``."""
    fn = _lookup(name)
    params, input_size, min_size = _measure(name)
    doc = inspect.getdoc(fn) or ""
    return {
        "name": name,
        "description": doc.splitlines()[0] if doc else "",
        "family": fn.__module__.rsplit(".", 1)[-1],
        "task": _TASKS[name],
        "default_input_size": input_size,
        "min_input_size": min_size,
        "params": params,
        "options": {k: v for k, v in _options(fn).items() if k not in ("num_classes", "in_chans")},
    }
