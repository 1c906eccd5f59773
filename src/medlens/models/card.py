"""Self-describing checkpoints: weights (safetensors) + a JSON model card.

The card carries everything inference needs (architecture and its arguments, class names, input size,
preprocessing options, intensity convention, operating threshold, temperature) and what a reader needs to trust
the model (validation metrics, data fingerprint, split hash, recipe, full config, versions). Training, evaluation,
prediction and serving all read it, so they cannot drift apart.

``normalize_batch`` is the one place a quantised image batch becomes network input.

On disk, for ``stem="model"``::

    run_dir/model.safetensors   weights
    run_dir/model.card.json     ModelCard, with the sha256 of the weights file
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens.errors import ConfigError, DataError

CARD_SUFFIX = ".card.json"
WEIGHTS_SUFFIX = ".safetensors"

#: how a quantised image becomes network input; see ``normalize_batch``
INTENSITIES = ("per_image_zscore", "unit_range")
ZSCORE_EPS = 1e-6


def _versions() -> dict[str, str]:
    import medlens

    versions = {
        "medlens": medlens.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import monai

        versions["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency, but the card must not need it
        pass
    return versions


@dataclass
class ModelCard:
    """Everything inference needs to use a checkpoint, and the evidence behind it."""

    model_name: str
    #: the keyword arguments of ``create_model`` besides the name (num_classes, in_chans and options)
    model_args: dict[str, Any]
    class_names: list[str]
    input_size: int
    in_chans: int
    #: "classification" (image -> class probabilities) or "segmentation" (image -> per-pixel classes; then
    #: ``class_names`` names the mask classes, e.g. background / lung, and threshold / referral are unused)
    task: str = "classification"
    #: uint8 -> float: "per_image_zscore" (x/255, then (x - mean) / std per image) or "unit_range" (x/255)
    intensity: str = "per_image_zscore"
    #: the options of ``medlens.data.cache.preprocess`` the model was trained with, applied identically wherever an
    #: image is prepared for it (e.g. ``{"equalize": "clahe", "clip": 0.01, "tiles": 8}``); ``{}`` = the plain
    #: resize, which is what cards written before this field mean
    preprocess: dict[str, Any] = field(default_factory=dict)
    #: P(positive_class) >= threshold means positive; applied explicitly, never inside forward()
    threshold: float = 0.5
    threshold_policy: str = ""
    positive_class: int = 1
    #: logits are divided by this before softmax (temperature scaling); 1.0 = uncalibrated
    temperature: float = 1.0
    #: validation metrics of the chosen epoch
    metrics: dict[str, Any] = field(default_factory=dict)
    #: the module whose activations the CAM methods explain (dotted name; for an ensemble, in each member)
    cam_layer: str = ""
    #: the "refer to a radiologist" policy chosen on held-apart validation data: the uncertainty measure,
    #: the target coverage and one threshold per uncertainty method (see ``medlens.train.refer_policy``)
    refer: dict[str, Any] = field(default_factory=dict)
    #: what the model may be asked about (``medlens.domain``): the DICOM gate lists, the content gate and the
    #: learned in-domain score (threshold, coverage, sha256 of its sidecar file); empty for older runs
    domain: dict[str, Any] = field(default_factory=dict)
    #: results of ``medlens evaluate`` per split (written after training; never used to choose anything)
    evaluations: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    split_hash: str = ""
    recipe: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = -1
    created: str = ""
    versions: dict[str, str] = field(default_factory=_versions)
    #: f"{model_name}-{weights_sha256[:12]}", filled by save_checkpoint
    model_id: str = ""
    weights_sha256: str = ""
    #: sha256 (first 16 hex digits) of the operating policy: threshold, temperature, referral, positive class.
    #: Recomputed whenever the card is written; with ``weights_sha256`` it tells two policies on one set of
    #: weights apart (every prediction and audit row carries it)
    policy_hash: str = ""
    #: every change of the operating policy after training (``medlens recalibrate``): time, old and new policy
    #: hash, and which splits had already been evaluated (``after_test_look`` is true once the test split was)
    policy_changes: list[dict[str, Any]] = field(default_factory=list)

    def operating_policy(self) -> dict[str, Any]:
        """The choices that turn logits into what a user is told (not the weights)."""
        policy = {"threshold": float(self.threshold), "temperature": float(self.temperature),
                  "positive_class": int(self.positive_class), "refer": jsonable(self.refer)}
        if self.domain:  # only when present, so the hashes of runs from before the domain gate stay the same
            policy["domain"] = jsonable(self.domain)
        return policy

    def compute_policy_hash(self) -> str:
        text = json.dumps(self.operating_policy(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def validate(self, source: str = "model card") -> None:
        """Raise ``DataError`` naming ``source`` if the card is inconsistent."""
        problems = [
            f"{name} should be {'a number' if isinstance(kind, tuple) else kind.__name__}, found {type(getattr(self, name)).__name__}"
            for name, kind in _FIELD_TYPES.items()
            if not isinstance(getattr(self, name), kind) or isinstance(getattr(self, name), bool)
        ]
        if problems:  # the checks below assume the types
            raise DataError(
                f"{source}: {'; '.join(problems)}", hint="re-export the checkpoint or fix the card"
            )
        if self.task not in ("classification", "segmentation"):
            problems.append(f"task {self.task!r} is not classification or segmentation")
        if self.intensity not in INTENSITIES:
            problems.append(f"intensity {self.intensity!r} is not one of {', '.join(INTENSITIES)}")
        from medlens.data.cache import preprocess_options

        try:
            preprocess_options(self.preprocess)
        except ConfigError as e:
            problems.append(f"preprocess: {e.message} ({e.hint})" if e.hint else f"preprocess: {e.message}")
        if len(self.class_names) < 1:
            problems.append("class_names is empty")
        if not 0 <= self.positive_class < max(len(self.class_names), 1):
            problems.append(f"positive_class={self.positive_class} is not an index into class_names")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} is outside [0, 1]")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0")
        if self.model_args.get("num_classes", len(self.class_names)) != len(self.class_names):
            problems.append(
                f"model_args.num_classes={self.model_args['num_classes']} but there are {len(self.class_names)} class_names"
            )
        if self.model_args.get("in_chans", self.in_chans) != self.in_chans:
            problems.append(f"model_args.in_chans={self.model_args['in_chans']} but in_chans={self.in_chans}")
        if problems:
            raise DataError(
                f"{source}: {'; '.join(problems)}", hint="re-export the checkpoint or fix the card"
            )

    def to_dict(self) -> dict[str, Any]:
        self.policy_hash = self.compute_policy_hash()
        return jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model card") -> ModelCard:
        """Build a card from parsed JSON; missing required fields raise ``DataError`` naming ``source``."""
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object, found {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:  # written by a newer medlens: usable, but say what is being ignored
            warnings.warn(f"{source}: ignoring unknown card fields {unknown}", stacklevel=2)
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise DataError(
                f"{source}: missing required field(s) {', '.join(missing)}",
                hint="is this a medlens model card?",
            )
        card = cls(**{k: v for k, v in data.items() if k in fields})
        card.validate(source)
        actual = card.compute_policy_hash()
        if card.policy_hash and card.policy_hash != actual:
            warnings.warn(f"{source}: the operating policy (threshold / temperature / referral) was edited outside "
                          f"medlens: policy hash {actual}, card says {card.policy_hash}", stacklevel=2)
        card.policy_hash = actual
        return card

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"model card not found: {path}", hint="pass a run directory that holds model.card.json"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(
                f"cannot read model card {path}: {e}", hint="the file is damaged; re-export the checkpoint"
            ) from None
        return cls.from_dict(data, source=str(path))


# fields whose type the checks in ModelCard.validate rely on (int is accepted where a float is expected)
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "model_name": str,
    "model_args": dict,
    "class_names": list,
    "input_size": int,
    "in_chans": int,
    "task": str,
    "intensity": str,
    "preprocess": dict,
    "threshold": (int, float),
    "positive_class": int,
    "temperature": (int, float),
    "metrics": dict,
    "refer": dict,
    "domain": dict,
    "cam_layer": str,
    "evaluations": dict,
    "policy_changes": list,
    "config": dict,
    "epoch": int,
}


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy/torch scalars -> Python numbers, tuples -> lists, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    model: nn.Module, card: ModelCard, dir: str | os.PathLike, stem: str = "model"
) -> tuple[Path, Path]:
    """Write ``dir/{stem}.safetensors`` and ``dir/{stem}.card.json`` atomically; returns both paths.

    Fills ``card.weights_sha256``, ``card.model_id`` and (if empty) ``card.created`` in place, so the
    caller's card describes exactly the weights on disk. Weights go first: a card never points at
    weights that were not written.
    """
    from safetensors.torch import save_file

    card.validate()
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    weights_path, card_path = dir / f"{stem}{WEIGHTS_SUFFIX}", dir / f"{stem}{CARD_SUFFIX}"
    # contiguous CPU copies: safetensors rejects channels-last / strided tensors
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes the metadata map in hash order, which changes from process
    # to process with two or more keys, and then identical weights would get different file checksums.
    metadata = {"format": "pt"}
    _atomic_write(weights_path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    card.weights_sha256 = _sha256(weights_path)
    card.model_id = f"{card.model_name}-{card.weights_sha256[:12]}"
    if not card.created:
        card.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = card.to_json()
    _atomic_write(card_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return weights_path, card_path


def update_card(run_dir: str | os.PathLike, change) -> ModelCard:
    """Load the run's card, apply ``change(card)`` and write it back atomically. The weights are untouched, so
    the weights' checksum and the model id stay the same; the policy hash is recomputed."""
    card_path = _find_card(Path(run_dir))
    card = ModelCard.load(card_path)
    change(card)
    text = card.to_json()
    _atomic_write(card_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return card


def record_evaluation(run_dir: str | os.PathLike, split: str, summary: dict[str, Any]) -> None:
    """Add ``summary`` under ``evaluations[split]`` of the run's card (the latest evaluation of each split;
    the full history is ``RUN/evaluations.jsonl``, see ``medlens.rundir``)."""
    update_card(run_dir, lambda card: card.evaluations.__setitem__(split, jsonable(summary)))


def _find_card(path: Path) -> Path:
    if path.is_dir():
        default = path / f"model{CARD_SUFFIX}"
        if default.is_file():
            return default
        cards = sorted(path.glob(f"*{CARD_SUFFIX}"))
        if len(cards) == 1:
            return cards[0]
        found = f"found {', '.join(c.name for c in cards)}" if cards else "found none"
        raise DataError(
            f"no model card in {path}: expected model{CARD_SUFFIX} ({found})",
            hint="pass the run directory of a finished training run, or the .card.json file itself",
        )
    if path.name.endswith(WEIGHTS_SUFFIX):
        return path.with_name(path.name[: -len(WEIGHTS_SUFFIX)] + CARD_SUFFIX)
    return path


def load_checkpoint(
    dir_or_card_path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model a card describes and load its weights strictly; returns ``(model.eval(), card)``.

    Accepts a run directory (``model.card.json`` in it), a ``.card.json`` or a ``.safetensors`` path.
    Missing or damaged files, weights that do not match the card's sha256, and weights that do not fit
    the architecture all raise ``DataError`` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medlens.models import create_model
    from medlens.models.ensemble import ENSEMBLE, build_ensemble

    card_path = _find_card(Path(dir_or_card_path))
    card = ModelCard.load(card_path)
    weights_path = card_path.with_name(card_path.name[: -len(CARD_SUFFIX)] + WEIGHTS_SUFFIX)
    if not weights_path.is_file():
        raise DataError(
            f"weights file not found: {weights_path} (named by {card_path})",
            hint="copy the .safetensors file next to its card",
        )
    if card.weights_sha256:
        actual = _sha256(weights_path)
        if actual != card.weights_sha256:
            raise DataError(
                f"{weights_path} does not match its card {card_path.name}: sha256 {actual[:12]}..., card says {card.weights_sha256[:12]}...",
                hint="the weights were changed or damaged after saving; copy the pair again",
            )
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(
            f"cannot read weights {weights_path}: {e}", hint="the file is damaged; copy it again"
        ) from None
    args = {"num_classes": len(card.class_names), "in_chans": card.in_chans, **card.model_args}
    try:
        if card.model_name == ENSEMBLE:
            model = build_ensemble(card.model_args, num_classes=len(card.class_names), in_chans=card.in_chans)
        else:
            model = create_model(card.model_name, **args)
    except ConfigError as e:
        raise DataError(f"{card_path}: {e.message}", hint=e.hint) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DataError(
            f"weights {weights_path} do not fit model {card.model_name!r} with {card.model_args}: "
            + " ".join(line.strip() for line in first[:3]),
            hint="the card and weights come from different runs, or from another medlens version",
        ) from None
    return model.to(map_location).eval(), card


def normalize_batch(x: torch.Tensor, intensity: str = "per_image_zscore") -> torch.Tensor:
    """Quantised images ``(B, C, *spatial)`` -> float32 network input; the one place this happens.

    ``x`` is uint8 (0..255), or floating point already scaled to [0, 1] (e.g. after batch augmentation).
    ``"unit_range"``: x / 255. ``"per_image_zscore"``: x / 255, then each image minus its mean, divided
    by its (population) standard deviation, floored at 1e-6 so a blank image becomes all zeros instead of NaN.
    Device and memory format are kept.
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.is_floating_point():
        x = x.float()
    else:
        raise TypeError(f"normalize_batch expects uint8 or floating point images, got {x.dtype}")
    if intensity == "unit_range":
        return x
    if intensity == "per_image_zscore":
        dims = tuple(range(1, x.ndim))
        std, mean = torch.std_mean(x, dim=dims, correction=0, keepdim=True)
        return (x - mean) / std.clamp_min(ZSCORE_EPS)
    raise ConfigError(f"unknown intensity {intensity!r}", hint=f"use one of: {', '.join(INTENSITIES)}")
