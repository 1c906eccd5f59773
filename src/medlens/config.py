"""Run configuration: one dataclass per stage, recipes (YAML presets) and ``--set key=value`` overrides.

A recipe names only what differs from the defaults below. The resolved config (defaults + recipe + overrides)
is written to ``RUN/config.yaml`` so a run can always be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medlens.errors import ConfigError


@dataclass
class DataConfig:
    image_size: int = 224
    val_fraction: float = 0.15  # share of train patients held out for model selection
    test_fraction: float = 0.15  # share of patients held out for testing, when the source brings no test split
    foreground_name: str = "foreground"  # segmentation: what the mask's foreground is (e.g. lung)
    patient_pattern: str | None = None  # regex with one group (or a group named `patient`) over the file name
    strict: bool = False  # fail on the first unreadable image instead of skipping and listing it
    cache_dir: str | None = None  # decoded-tensor cache; default ~/.cache/medlens/tensors
    # contrast equalisation of each decoded image before the resize (``medlens.data.cache.preprocess``), recorded
    # in the model card so prediction does the same: none | hist (global histogram) | clahe (contrast-limited
    # adaptive: ``clahe_clip`` is the clip limit in (0, 1], higher = more contrast; ``clahe_tiles`` the tiles
    # per side, each contextual region 1/tiles of the height and width)
    equalize: str = "none"
    clahe_clip: float = 0.01
    clahe_tiles: int = 8
    # anatomy-aware crop: a lung segmentation run (``medlens.seg.crop``); each image is cut to the lungs' box plus
    # this margin (share of the box per side) before the resize. "" = no crop
    lung_crop: str = ""
    lung_crop_margin: float = 0.05

    def preprocess_options(self) -> dict[str, Any]:
        """The ``preprocess`` options of these settings (what the model card's ``preprocess`` records): ``{}`` for
        none, ``{"equalize": "hist"}``, ``{"equalize": "clahe", "clip": ..., "tiles": ...}``. Bad values raise
        ``ConfigError`` naming the ``data.*`` key."""
        from medlens.data.cache import EQUALIZE, preprocess_options

        if self.equalize not in EQUALIZE:
            close = difflib.get_close_matches(str(self.equalize), EQUALIZE, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown value data.equalize={self.equalize!r}",
                              hint=f"{hint}choose one of {', '.join(EQUALIZE)}")
        if self.equalize == "clahe" and not 0 < self.clahe_clip <= 1:
            raise ConfigError(f"data.clahe_clip={self.clahe_clip} must be in (0, 1]",
                              hint="0.01 is the usual clip limit; higher values give more contrast")
        if self.equalize == "clahe" and self.clahe_tiles < 1:
            raise ConfigError(f"data.clahe_tiles={self.clahe_tiles} must be >= 1", hint="8 tiles per side is usual")
        return preprocess_options({"equalize": self.equalize, "clip": self.clahe_clip, "tiles": self.clahe_tiles})


@dataclass
class AugmentConfig:
    """Batch augmentation a radiologist would accept: small geometry changes and exposure changes, no flips
    (left-right flips move the heart to the wrong side)."""

    enabled: bool = True
    rotate_deg: float = 10.0
    translate: float = 0.06  # fraction of the image size
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.08  # additive, on [0, 1] intensities
    contrast: float = 0.15  # multiplicative around the image mean
    gamma: float = 0.2  # log-uniform gamma in [exp(-g), exp(g)]
    noise_std: float = 0.015
    p: float = 0.9  # probability that an image is augmented at all


@dataclass
class ModelConfig:
    name: str = "seed_cnn"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    imbalance: str = "class_weights"  # class_weights | focal | balanced_sampler | none
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    early_stopping_patience: int = 8
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model (CUDA)
    num_threads: int = 0  # CPU threads for torch; 0 = all cores
    eval_batch_size: int = 256
    # deep ensemble: members trained with seeds seed, seed+1, ... on the same split (`--ensemble K`)
    ensemble: int = 1
    # start from these weights (a .safetensors file matching model.name / model.args) instead of a random init:
    # the fine-tune after `medlens prune`
    init_weights: str = ""
    # keep these weights at zero while training (a .safetensors of 0/1 masks by parameter name): the fine-tune
    # after unstructured `medlens prune`
    weight_masks: str = ""
    # knowledge distillation (`medlens distill`): a teacher run whose softened logits the student also learns
    teacher: str = ""
    distill_temperature: float = 4.0
    distill_alpha: float = 0.7  # weight of the teacher term; 1 - alpha on the labels
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class EvalConfig:
    threshold_policy: str = "sensitivity"  # sensitivity | youden | fixed
    target_sensitivity: float = 0.95  # for policy `sensitivity`; the threshold itself for `fixed`
    # share of validation patients held apart to fit the temperature (not used to choose the epoch/threshold)
    calibration_fraction: float = 0.5
    n_bootstrap: int = 1000
    ece_bins: int = 15
    n_error_examples: int = 8  # per error type in the report gallery
    # referral ("refer to a radiologist"): keep this share of held-apart validation images, refer the rest
    refer_coverage: float = 0.9
    mc_passes: int = 20
    tta_passes: int = 8
    # explanations in the report: method, images per kind in the CAM gallery, images sampled for faithfulness
    cam_method: str = "gradcam"
    n_cam_examples: int = 4
    n_faithfulness: int = 64
    faithfulness_steps: int = 20
    # out-of-domain refusal: the learned in-domain score's threshold keeps this share of held-apart validation
    # images in domain (``medlens.domain``)
    domain_coverage: float = 0.99


@dataclass
class Config:
    recipe: str = "default"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Free-form mappings: keys inside them are passed through (model.args goes to the model constructor, which
# reports unknown arguments itself).
_FREE_FORM = {("model", "args")}


def list_recipes() -> list[str]:
    folder = resources.files("medlens") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _recipe_text(name: str) -> tuple[str, str]:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path.stem, path.read_text()
    file = resources.files("medlens") / "recipes" / f"{name}.yaml"
    if not file.is_file():
        known = list_recipes()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown recipe '{name}'",
            hint=f"{hint}known recipes: {', '.join(known)} (or pass a path to a .yaml file)",
        )
    return name, file.read_text()


def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a nested mapping, refusing keys the dataclass does not have."""
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"did you mean '{(where + '.') if where else ''}{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown config key '{path}'",
                hint=f"{hint}valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}",
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; set one of its keys, e.g. '{path}.<key>=...'")
            _merge(current, value, path)
        else:
            setattr(obj, key, _coerce(value, current, path))


def _coerce(value: Any, current: Any, path: str) -> Any:
    if current is None or value is None or isinstance(current, dict):
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}' takes true or false, got {value!r}")
    if isinstance(current, (int, float)) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            value = float(value)
        except ValueError:
            kind = "a whole number" if isinstance(current, int) else "a number"
            raise ConfigError(f"config key '{path}' takes {kind}, got {value!r}") from None
    if isinstance(current, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key '{path}' takes a whole number, got {value!r}")
        return type(current)(value)
    if isinstance(current, str) and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{path}' takes a {type(current).__name__}, got {value!r}")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"cannot read --set '{item}'", hint="write it as key=value, e.g. --set train.epochs=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(recipe: str = "default", overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe YAML <- ``key=value`` overrides (dotted keys, YAML-typed values)."""
    name, text = _recipe_text(recipe)
    cfg = Config(recipe=name)
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe '{name}' is not valid YAML: {exc}") from None
    _merge(cfg, values, "")
    apply_overrides(cfg, overrides or [])
    cfg.recipe = name
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides in place (``train.epochs=5``, ``model.args.dropout=0.2``)."""
    for item in overrides:
        keys, value = parse_override(item)
        if tuple(keys[:2]) in _FREE_FORM and len(keys) > 2:
            cfg.model.args[".".join(keys[2:])] = value
            continue
        nested: Any = value
        for k in reversed(keys[1:]):
            nested = {k: nested}
        _merge(cfg, {keys[0]: nested}, "")
    cfg.data.preprocess_options()  # a bad data.equalize fails here, not after minutes of decoding
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, values, "")
    cfg.data.preprocess_options()
    return cfg
