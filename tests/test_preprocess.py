"""Preprocessing options (issue 8): histogram equalisation / CLAHE as a recipe switch (``data.equalize``), keyed
by the tensor cache, recorded in the model card and applied identically at prediction and evaluation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import require_shared as shared
from helpers import read_card, train

from medlens.config import load_config
from medlens.data.cache import TensorCache, preprocess, preprocess_key, preprocess_options
from medlens.data.readers import read_image
from medlens.data.sources import discover
from medlens.errors import ConfigError, DataError
from medlens.models.card import ModelCard, load_checkpoint, normalize_batch

CLAHE = {"equalize": "clahe", "clip": 0.01, "tiles": 8}


@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    """A real Kermany chest X-ray (224 px, float [0, 1])."""
    path = sorted((shared("chest_xray") / "test" / "NORMAL").iterdir())[0]
    return read_image(path)[0]


@pytest.fixture(scope="module")
def low_contrast(xray) -> np.ndarray:
    """The X-ray squeezed into a tenth of the grey range (a badly exposed film)."""
    return (0.45 + 0.1 * xray).astype(np.float32)


# ----------------------------------------------------------------------------------------- the equalisation


def test_clahe_spreads_a_low_contrast_image_and_is_deterministic(low_contrast):
    plain = preprocess(low_contrast, 128).astype(int)
    clahe = preprocess(low_contrast, 128, options=CLAHE)
    assert clahe.dtype == np.uint8 and clahe.shape == (128, 128)
    assert np.ptp(plain) <= 26  # the squeezed input spans ~a tenth of 0..255
    assert np.ptp(clahe) >= 200 and clahe.astype(int).std() > 3 * plain.std()  # contrast restored
    assert np.array_equal(clahe, preprocess(low_contrast, 128, options=dict(CLAHE)))  # deterministic
    # local contrast (mean step between neighbouring pixels) rises with the clip limit: the setting is used
    def local(a):
        return np.abs(np.diff(a.astype(int), axis=1)).mean()

    steps = [local(preprocess(low_contrast, 224, options={**CLAHE, "clip": c})) for c in (0.005, 0.01, 0.05)]
    assert local(preprocess(low_contrast, 224)) < 1 < steps[0] < steps[1] < steps[2], steps
    # uint8 input at the network size is equalised too (the plain path returns it unchanged)
    u8 = preprocess(low_contrast, 224)
    assert np.array_equal(preprocess(u8, 224), u8) and not np.array_equal(preprocess(u8, 224, options=CLAHE), u8)


def test_hist_flattens_the_histogram(low_contrast):
    out = preprocess(low_contrast, 224, options={"equalize": "hist"}).astype(int)
    quartiles = np.percentile(out, [25, 50, 75])
    assert np.allclose(quartiles, [64, 128, 191], atol=16), quartiles  # ~uniform grey levels
    assert out.min() <= 5 and out.max() >= 250


def test_clahe_is_applied_to_the_decoded_image_before_the_resize():
    """CLAHE on the image as decoded (tiles of 1/8 of its own height and width), then the plain resize; not CLAHE
    on the resized image (which differs by ~13 grey levels on average on large radiographs)."""
    from skimage import exposure

    image = read_image(shared("chest_xray") / "val" / "NORMAL" / sorted(
        p.name for p in (shared("chest_xray") / "val" / "NORMAL").iterdir())[0])[0]
    assert min(image.shape) >= 256  # an original (not 224 px) image
    by_hand = exposure.equalize_adapthist(image, kernel_size=(image.shape[0] // 8, image.shape[1] // 8),
                                          clip_limit=0.01, nbins=256)
    out = preprocess(image, 64, options=CLAHE)
    assert np.array_equal(out, preprocess(by_hand.astype(np.float32), 64))


def test_a_blank_image_stays_blank():
    blank = np.full((100, 80), 0.3, np.float32)
    for options in (CLAHE, {"equalize": "hist"}):
        assert np.array_equal(preprocess(blank, 32, options=options), preprocess(blank, 32))


# ------------------------------------------------------------------------------------------- the options


def test_options_are_canonical_and_unknown_ones_are_refused():
    assert preprocess_options(None) == preprocess_options({"equalize": "none", "clip": 0.5}) == {}
    assert preprocess_options({"equalize": "clahe"}) == CLAHE  # defaults filled in
    assert preprocess_options({"equalize": "hist", "tiles": 4}) == {"equalize": "hist"}  # unused keys dropped
    with pytest.raises(ConfigError, match="unknown preprocessing option.*'sharpen'"):
        preprocess(np.zeros((8, 8), np.float32), 8, options={"sharpen": True})
    with pytest.raises(ConfigError, match="equalize='clahee'"):
        preprocess_options({"equalize": "clahee"})
    for bad in ({"clip": 0}, {"clip": 2.0}, {"tiles": 0}, {"tiles": 2.5}):
        with pytest.raises(ConfigError):
            preprocess_options({"equalize": "clahe", **bad})


def test_config_switch_and_its_errors():
    assert load_config("cxr_cpu").data.preprocess_options() == {}
    cfg = load_config("cxr_cpu", ["data.equalize=clahe", "data.clahe_clip=0.02", "data.clahe_tiles=4"])
    assert cfg.data.preprocess_options() == {"equalize": "clahe", "clip": 0.02, "tiles": 4}
    assert load_config("cxr_cpu", ["data.equalize=hist"]).data.preprocess_options() == {"equalize": "hist"}
    with pytest.raises(ConfigError) as err:
        load_config("cxr_cpu", ["data.equalize=clahee"])
    assert "data.equalize='clahee'" in str(err.value) and "did you mean 'clahe'" in str(err.value)
    assert "none, hist, clahe" in str(err.value)
    with pytest.raises(ConfigError, match="data.clahe_clip"):
        load_config("cxr_cpu", ["data.equalize=clahe", "data.clahe_clip=0"])


def test_card_field_defaults_to_none_and_is_validated():
    base = {"model_name": "seed_cnn", "model_args": {}, "class_names": ["NORMAL", "PNEUMONIA"], "input_size": 32,
            "in_chans": 1}
    assert ModelCard.from_dict(dict(base)).preprocess == {}  # a card from before the field
    assert ModelCard.from_dict({**base, "preprocess": CLAHE}).preprocess == CLAHE
    with pytest.raises(DataError, match="preprocess.*'sharpen'"):
        ModelCard.from_dict({**base, "preprocess": {"sharpen": True}})
    with pytest.raises(DataError, match="preprocess should be dict"):
        ModelCard.from_dict({**base, "preprocess": "clahe"})


# ------------------------------------------------------------------------------------------------ the cache


def test_cache_keys_differ_by_options():
    plain = preprocess_key(224)
    assert plain == preprocess_key(224, {}) == preprocess_key(224, {"equalize": "none"})  # old entries still used
    keys = {plain, preprocess_key(224, CLAHE), preprocess_key(224, {**CLAHE, "clip": 0.02}),
            preprocess_key(224, {**CLAHE, "tiles": 4}), preprocess_key(224, {"equalize": "hist"})}
    assert len(keys) == 5
    assert preprocess_key(224, {"tiles": 8, "equalize": "clahe"}) == preprocess_key(224, CLAHE)  # canonical


def test_a_clahe_load_never_reuses_plain_packs(tmp_path):
    table = discover(shared("chest_xray"))
    idx = table.indices("test")[:6]
    cache = TensorCache(tmp_path)
    plain = cache.load(table, idx, 32, progress=False, workers=1)
    clahe = cache.load(table, idx, 32, progress=False, workers=1, options=CLAHE)
    assert plain.n_decoded == 6 and clahe.n_decoded == 6 and clahe.n_cached == 0
    assert (tmp_path / preprocess_key(32)).is_dir() and (tmp_path / preprocess_key(32, CLAHE)).is_dir()
    for k in range(6):
        image = read_image(table.items[idx[k]])[0]
        assert np.array_equal(clahe.images[k, 0].numpy(), preprocess(image, 32, options=CLAHE))
    assert not torch.equal(plain.images, clahe.images)
    again = TensorCache(tmp_path).load(table, idx, 32, progress=False, options=CLAHE)
    assert again.n_decoded == 0 and torch.equal(again.images, clahe.images)


# ------------------------------------------------------------------------------- a tiny run, end to end


@pytest.fixture(scope="module")
def clahe_run(cxr_tiny, tmp_path_factory, tensor_cache_dir):
    from helpers import env

    run = tmp_path_factory.mktemp("clahe-run") / "run"
    with env(MEDLENS_CACHE=str(tensor_cache_dir)):
        train(cxr_tiny, run, "--set", "data.equalize=clahe")
    return run


def _by_hand(model, card, path, options) -> float:
    """P(positive) written out: read, preprocess with ``options``, normalise, forward, temperature, softmax."""
    x = torch.from_numpy(preprocess(read_image(path)[0], card.input_size, options=options))[None, None]
    with torch.no_grad():
        logits = model(normalize_batch(x, card.intensity)).float()
    return float(torch.softmax(logits / card.temperature, dim=1)[0, card.positive_class])


def test_a_clahe_run_records_it_and_prediction_applies_it(clahe_run, cxr_tiny):
    from medlens.inference import Predictor

    card = read_card(clahe_run)
    assert card["preprocess"] == CLAHE and card["config"]["data"]["equalize"] == "clahe"
    files = [*sorted((cxr_tiny / "test" / "PNEUMONIA").iterdir())[:3], *sorted((cxr_tiny / "test" / "NORMAL").iterdir())[:3]]
    results = Predictor.from_run(clahe_run).predict(files)
    model, loaded = load_checkpoint(clahe_run)
    gaps = []
    for path, result in zip(files, results, strict=True):
        assert result["probability"] == pytest.approx(_by_hand(model, loaded, path, CLAHE), abs=2e-6)
        gaps.append(abs(result["probability"] - _by_hand(model, loaded, path, {})))
    assert max(gaps) > 1e-3, gaps  # the plain input would give other probabilities


def test_evaluate_on_a_clahe_run_uses_the_cards_preprocessing(clahe_run, cxr_tiny, tmp_path, tensor_cache_dir):
    from helpers import copy_run, env

    from medlens.evaluate import evaluate
    from medlens.inference import Predictor

    run = copy_run(clahe_run, tmp_path / "run")
    with env(MEDLENS_CACHE=str(tensor_cache_dir)):
        evaluate(run, cxr_tiny, split="test", progress=False, n_bootstrap=20, trust=False)
    eval_dir = next(p for p in run.rglob("predictions.csv"))
    with eval_dir.open(newline="") as f:
        rows = {r["path"]: float(r["probability"]) for r in csv.DictReader(f)}
    files = list(rows)
    assert len(files) == 40
    predicted = Predictor.from_run(run).predict(files)
    for path, result in zip(files, predicted, strict=True):
        assert rows[path] == pytest.approx(result["probability"], abs=2e-6), path
    assert json.loads((run / "model.card.json").read_text())["preprocess"] == CLAHE
