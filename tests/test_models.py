"""Registry, model interface, checkpoint round trip and input normalisation (medlens.models)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from medlens.errors import ConfigError, DataError
from medlens.models import ImageClassifier, create_model, list_models, model_info
from medlens.models.card import ModelCard, load_checkpoint, normalize_batch, save_checkpoint

ALL_MODELS = list_models(task="classification")
EXPECTED = {"seed_cnn", "seed_resnet", "seed_cbam", "densenet121", "resnet18", "resnet50", "efficientnet_b0"}


@pytest.fixture(scope="module")
def models():
    """One instance per architecture, built on first use (construction dominates the cost of these tests)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = create_model(name)
        return cache[name]

    return get


def _x(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_every_model():
    assert EXPECTED <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)
    assert list_models("seed_*") == ["seed_cbam", "seed_cnn", "seed_resnet"]
    assert list_models("resnet*") == ["resnet18", "resnet50"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_gives_logits_and_splits_into_features_and_head(models, name):
    model = models(name).eval()
    assert isinstance(model, ImageClassifier)
    assert model.in_chans == 1 and model.num_classes == 2
    assert isinstance(model.default_input_size, int) and model.default_input_size >= 64
    x = _x()
    cam_outputs = []
    layer = model.get_submodule(model.cam_layer)
    handle = layer.register_forward_hook(lambda _m, _i, out: cam_outputs.append(out.detach().clone()))
    try:
        with torch.no_grad():
            features = model.forward_features(x)
    finally:
        handle.remove()
    with torch.no_grad():
        via_parts = model.forward_head(features)
        logits = model(x)
    assert logits.shape == (2, 2) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, via_parts, rtol=0, atol=0)
    # the two images differ, so their logits must too (catches a head that ignores its input)
    assert not torch.equal(logits[0], logits[1])

    assert features.ndim == 4 and features.shape[0] == 2 and min(features.shape[2:]) >= 1
    # cam_layer: runs once per pass, and its output is exactly the feature map (no in-place op after it)
    assert len(cam_outputs) == 1, f"{model.cam_layer} ran {len(cam_outputs)} times in one forward pass"
    torch.testing.assert_close(cam_outputs[0], features, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter_and_the_cam_layer(models, name):
    model = models(name).train()
    model.zero_grad(set_to_none=True)
    # Grad-CAM's plumbing: keep the cam_layer output and catch the gradient flowing back into it
    cam = {}

    def keep(_module, _inputs, out):
        cam["activation"] = out
        out.register_hook(lambda grad: cam.__setitem__("grad", grad))

    handle = model.get_submodule(model.cam_layer).register_forward_hook(keep)
    try:
        # 32 px keeps the heavy backbones fast; every layer still runs (their last feature map is 1 x 1)
        loss = torch.nn.functional.cross_entropy(model(_x(size=32)), torch.tensor([0, 1]))
        loss.backward()
    finally:
        handle.remove()
    assert cam["grad"].shape == cam["activation"].shape and cam["grad"].abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_min_input_size_runs(models, name):
    model = models(name).eval()
    size = model.min_input_size
    with torch.no_grad():
        assert model(torch.randn(1, 1, size, size)).shape == (1, 2)
    if name == "densenet121":  # the documented reason the attribute exists
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 1, size - 4, size - 4))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_channels_last_gives_same_logits(models, name):
    model = models(name).eval()
    x = _x(size=32)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        try:
            got = model(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_save_load_round_trip(models, name, tmp_path):
    model = models(name).eval()
    card = ModelCard(
        model_name=name,
        model_args={"num_classes": 2, "in_chans": 1},
        class_names=["normal", "pneumonia"],
        input_size=64,
        in_chans=1,
        threshold=0.37,
        metrics={"auroc": 0.91, "ece": float("nan")},
        epoch=3,
    )
    weights_path, card_path = save_checkpoint(model, card, tmp_path / "run")
    assert weights_path == tmp_path / "run" / "model.safetensors"
    assert card_path == tmp_path / "run" / "model.card.json"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.card.json", "model.safetensors"]
    assert len(card.weights_sha256) == 64 and card.model_id == f"{name}-{card.weights_sha256[:12]}"

    on_disk = json.loads(card_path.read_text())
    assert set(on_disk) == {f.name for f in dataclasses.fields(ModelCard)}
    assert on_disk["metrics"] == {"auroc": 0.91, "ece": None}  # NaN is not JSON
    assert on_disk["threshold"] == 0.37 and on_disk["created"]
    assert {"medlens", "torch", "monai", "python"} <= set(on_disk["versions"])

    torch.manual_seed(123)  # loaded weights must not depend on the fresh model's random init
    loaded, loaded_card = load_checkpoint(tmp_path / "run")
    assert not loaded.training
    assert loaded_card.to_dict() == card.to_dict()
    x = _x(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_model_args_travel_with_the_card(tmp_path):
    model = create_model("seed_cnn", num_classes=3, widths=[8, 16], dropout=0.1).eval()
    card = ModelCard(
        "seed_cnn",
        {"num_classes": 3, "in_chans": 1, "widths": [8, 16], "dropout": 0.1},
        ["a", "b", "c"],
        input_size=32,
        in_chans=1,
    )
    weights_path, card_path = save_checkpoint(model, card, tmp_path, stem="best")
    # the card or the weights file identify a checkpoint as well as its directory
    assert load_checkpoint(weights_path)[1].model_id == card.model_id
    loaded, _ = load_checkpoint(card_path)
    assert loaded.forward_features(_x(size=32)).shape == (2, 16, 8, 8)
    assert loaded(_x(size=32)).shape == (2, 3)


def test_options_change_the_model():
    assert create_model("seed_cnn", num_classes=5)(_x()).shape == (2, 5)
    assert create_model("resnet18", in_chans=3)(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    small = create_model("seed_cnn", widths=[8, 16, 32])
    assert small.forward_features(_x()).shape == (2, 32, 8, 8)
    assert create_model("seed_cnn", dropout=0.5).dropout.p == 0.5
    assert create_model("seed_cnn")(_x(size=28)).shape == (2, 2)  # MedMNIST's 28 x 28 (1 x 1 feature map)
    assert create_model("seed_cnn").min_input_size == 16 and small.min_input_size == 8
    assert create_model("efficientnet_b0", dropout=0.0).net._dropout.p == 0.0


def test_monai_models_build_in_3d():
    model = create_model("resnet18", spatial_dims=3).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 1, 32, 32, 32))
        assert model.forward_head(features).shape == (1, 2)
    assert features.ndim == 5 and model.get_submodule(model.cam_layer) is model.net.layer4


def test_unknown_model_lists_known_models():
    with pytest.raises(ConfigError) as info:
        create_model("resnet_18")
    err = info.value
    assert "unknown model 'resnet_18'" in err.message
    assert "did you mean 'resnet18'" in err.hint
    for name in EXPECTED:
        assert name in err.hint
    with pytest.raises(ConfigError):
        model_info("no_such_model")


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        create_model("seed_cnn", width=[8, 16])
    assert "'width'" in info.value.message and "widths=" in info.value.hint
    with pytest.raises(ConfigError):
        create_model("seed_cnn", num_classes=0)


def test_model_info():
    info = model_info("seed_cnn")
    assert info["params"] == sum(p.numel() for p in create_model("seed_cnn").parameters())
    assert info["default_input_size"] == 224 and info["min_input_size"] == 16
    assert info["family"] == "cnn" and info["description"]
    assert info["options"]["dropout"] == 0.3
    assert model_info("densenet121")["family"] == "monai_nets"
    assert 6_000_000 < model_info("densenet121")["params"] < 8_000_000


def _saved(tmp_path):
    model = create_model("seed_cnn", widths=[8, 16])
    card = ModelCard("seed_cnn", {"widths": [8, 16]}, ["normal", "pneumonia"], input_size=32, in_chans=1)
    return save_checkpoint(model, card, tmp_path)


def test_corrupt_weights_name_the_file(tmp_path):
    weights_path, card_path = _saved(tmp_path)
    weights_path.write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(DataError, match="model.safetensors") as info:
        load_checkpoint(tmp_path)
    assert "sha256" in str(info.value)
    # without a recorded checksum the damage is caught by the safetensors reader instead
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = ""
    card_path.write_text(json.dumps(card))
    with pytest.raises(DataError, match="cannot read weights .*model.safetensors"):
        load_checkpoint(tmp_path)


def test_missing_files_and_bad_cards(tmp_path):
    with pytest.raises(DataError, match="no model card"):
        load_checkpoint(tmp_path)
    weights_path, card_path = _saved(tmp_path)
    weights_path.unlink()
    with pytest.raises(DataError, match="weights file not found"):
        load_checkpoint(tmp_path)
    card_path.write_text("{not json")
    with pytest.raises(DataError, match="model.card.json"):
        load_checkpoint(card_path)
    card_path.write_text(json.dumps({"model_name": "seed_cnn"}))
    with pytest.raises(DataError, match="missing required field"):
        load_checkpoint(card_path)


def test_weights_from_another_architecture_are_rejected(tmp_path):
    _, card_path = _saved(tmp_path)
    card = json.loads(card_path.read_text())
    card["model_args"] = {"widths": [8, 32]}
    card["weights_sha256"] = card["weights_sha256"]  # file untouched: the checksum still matches
    card_path.write_text(json.dumps(card))
    with pytest.raises(DataError, match="do not fit model 'seed_cnn'"):
        load_checkpoint(tmp_path)


def test_card_validation():
    card = ModelCard("seed_cnn", {"num_classes": 3}, ["normal", "pneumonia"], input_size=64, in_chans=1)
    with pytest.raises(DataError, match="num_classes=3"):
        card.validate()
    with pytest.raises(DataError, match="intensity"):
        dataclasses.replace(card, model_args={}, intensity="minmax").validate()
    with pytest.raises(DataError, match="threshold should be a number, found NoneType"):
        dataclasses.replace(card, model_args={}, threshold=None).validate()  # a NaN threshold saved as null
    with pytest.raises(DataError, match="threshold=1.5"):
        dataclasses.replace(card, model_args={}, threshold=1.5).validate()


def test_normalize_batch_per_image_zscore():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=g)
    x[1] = (x[1] // 4) + 100  # a low-contrast, bright image: normalised like any other
    x[2] = 7  # a blank image: zeros, not NaN
    out = normalize_batch(x, "per_image_zscore")
    assert out.dtype == torch.float32 and out.shape == x.shape
    for i in (0, 1, 3):
        assert abs(out[i].mean().item()) < 1e-5
        assert abs(out[i].std(correction=0).item() - 1) < 1e-4
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # uint8 and the same images already scaled to [0, 1] give the same result
    torch.testing.assert_close(normalize_batch(x.float() / 255, "per_image_zscore"), out)
    expected0 = (x[0].double() / 255 - (x[0].double() / 255).mean()) / (x[0].double() / 255).std(correction=0)
    torch.testing.assert_close(out[0].double(), expected0, rtol=1e-5, atol=1e-5)


def test_normalize_batch_other_modes():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    torch.testing.assert_close(normalize_batch(x, "unit_range"), torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]))
    with pytest.raises(ConfigError, match="unknown intensity"):
        normalize_batch(x, "imagenet")
    with pytest.raises(TypeError):
        normalize_batch(x.long(), "unit_range")


# ------------------------------------------------------------------------------- the CPU inference form
def _with_running_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms, so folding them into the convolutions is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["seed_cnn", "seed_resnet", "seed_cbam"])
def test_inference_form_keeps_logits_and_features(name):
    """The served CPU form (BatchNorm folded into the convolution before it, channels-last) computes what the
    checkpoint's network computes: logits and pooled features equal to float32 rounding."""
    from medlens.forward import predict_logits
    from medlens.models.base import CHANNELS_LAST, inference_form

    torch.manual_seed(0)
    model = _with_running_stats(create_model(name))
    x = (torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    expected = predict_logits(model, x, intensity="unit_range")
    expected_features = model.forward_features(x.float() / 255).mean(dim=(2, 3))
    served = inference_form(copy.deepcopy(model))
    assert getattr(served, CHANNELS_LAST) is True
    got = predict_logits(served, x, intensity="unit_range")
    with torch.no_grad():
        got_features = served.forward_features((x.float() / 255).contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert torch.allclose(got_features.mean(dim=(2, 3)), expected_features.detach(), atol=1e-4)


def test_inference_form_folds_each_conv_batchnorm_pair():
    """Every BatchNorm right after a convolution in a Sequential is gone (an Identity keeps its name), the
    convolutions are channels-last, and the other layers are untouched."""
    from medlens.models.base import inference_form

    model = inference_form(_with_running_stats(create_model("seed_cnn")))
    for block in model.features:
        assert isinstance(block[0], torch.nn.Conv2d) and block[0].bias is not None
        assert isinstance(block[1], torch.nn.Identity)
        assert isinstance(block[2], torch.nn.ReLU) and isinstance(block[3], torch.nn.MaxPool2d)
        assert block[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.get_submodule(model.cam_layer) is model.features


def test_inference_form_gradcam_matches_the_checkpoint_network():
    """Heat maps from the served form equal those of the checkpoint's network (Grad-CAM hooks ``cam_layer``)."""
    import copy

    from medlens.explain import explain
    from medlens.models.base import inference_form

    torch.manual_seed(0)
    model = _with_running_stats(create_model("seed_cnn"))
    served = inference_form(copy.deepcopy(model))
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    a = explain(model, x, "gradcam", layer=model.cam_layer)
    b = explain(served, x.contiguous(memory_format=torch.channels_last), "gradcam", layer=served.cam_layer)
    assert torch.equal(a.targets, b.targets)
    assert torch.allclose(a.maps, b.maps, atol=1e-4), (a.maps - b.maps).abs().max()


def test_cpu_predictor_serves_the_inference_form(tiny_run):
    """``Predictor.from_run`` on the CPU serves the folded channels-last form, and its probabilities are the
    checkpoint network's (the service, ``medlens predict`` and the DICOM node all go through it)."""
    from medlens.forward import predict_logits, probabilities
    from medlens.inference import Predictor
    from medlens.models.base import CHANNELS_LAST

    predictor = Predictor.from_run(tiny_run, device="cpu")
    assert getattr(predictor.model, CHANNELS_LAST, False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    reference, card = load_checkpoint(tiny_run)
    size = card.input_size
    x = (torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    expected = probabilities(predict_logits(reference.eval(), x, intensity=card.intensity), card.temperature)
    got = predictor.predict_images(x)
    assert abs(got - expected[:, card.positive_class]).max() < 1e-5


@pytest.mark.parametrize("dims", [1, 3])
def test_inference_form_of_1d_and_3d_networks_folds_and_keeps_their_layout(dims):
    """An ECG (1-D) or volume (3-D) network is folded too, keeps its memory format (channels-last is a 2-D
    layout) and computes the same output."""
    from medlens.models.base import CHANNELS_LAST, inference_form

    conv, bn = {1: (torch.nn.Conv1d, torch.nn.BatchNorm1d), 3: (torch.nn.Conv3d, torch.nn.BatchNorm3d)}[dims]
    torch.manual_seed(0)
    model = _with_running_stats(torch.nn.Sequential(conv(1, 4, 3), bn(4), torch.nn.ReLU(), conv(4, 2, 3)))
    x = torch.randn(2, 1, *([8] * dims))
    with torch.no_grad():
        expected = model(x)
        served = inference_form(copy.deepcopy(model))
        got = served(x)
    assert isinstance(served[1], torch.nn.Identity) and not getattr(served, CHANNELS_LAST, False)
    assert torch.allclose(got, expected, atol=1e-5)
