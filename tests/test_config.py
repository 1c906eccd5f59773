"""Recipes, overrides and the errors a user sees for config mistakes."""

from __future__ import annotations

import pytest
import yaml

from medlens.config import apply_overrides, config_from_dict, list_recipes, load_config
from medlens.errors import ConfigError


def test_every_recipe_loads_and_names_a_registered_model():
    from medlens.models import list_models

    names = list_recipes()
    assert {"cxr_cpu", "cxr_gpu", "medmnist"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.recipe == name and cfg.model.name in list_models()


def test_overrides_are_typed_and_nested():
    cfg = load_config("cxr_cpu", ["train.epochs=3", "train.lr=1e-4", "model.args.dropout=0.1",
                                  "train.augment.enabled=false", "data.patient_pattern=p(\\d+)"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.args == {"stem": 2, "dropout": 0.1}
    assert cfg.train.augment.enabled is False
    assert cfg.data.patient_pattern == "p(\\d+)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochz=3", "unknown config key 'train.epochz'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=lots", "takes a whole number"),
        ("train.lr=fast", "takes a number"),
        ("train.epochs=2.5", "whole number"),
        ("train.amp=maybe", "true or false"),
        ("train=3", "is a section"),
        ("epochs", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("cxr_cpu", [override])
    assert message in str(err.value)


def test_close_misspelling_gets_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config("cxr_cpu", ["train.epoch=3"])
    assert "did you mean 'train.epochs'" in str(err.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("cxr_gpuu")
    assert "did you mean 'cxr_gpu'" in str(err.value) and "medmnist" in str(err.value)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("medmnist", ["train.seed=7"])
    cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert apply_overrides(again, ["train.seed=8"]).train.seed == 8


def test_recipe_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: seed_cbam\ntrain:\n  epochs: 1\n")
    cfg = load_config(str(path))
    assert cfg.recipe == "mine" and cfg.model.name == "seed_cbam" and cfg.train.epochs == 1
