"""Explanations (medlens.explain): CAM methods on one base class, overlays, and faithfulness checks.

Most behaviour is checked on a tiny seed_cnn trained for 20 steps on a synthetic task whose answer is known:
class 1 images hold a bright blob in a random quadrant, class 0 images are noise, so a correct explanation
of class 1 must put most of its mass in the blob's quadrant (chance: a quarter).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch
from helpers import blobs
from torch import nn

from medlens.errors import ConfigError
from medlens.explain import (
    CAM,
    METHODS,
    GradCAM,
    GradCAMPlusPlus,
    Occlusion,
    ScoreCAM,
    deletion_insertion,
    explain,
    make_explainer,
    mask_energy_fraction,
    normalize_maps,
    overlay,
    randomisation_check,
    randomised_copy,
    save_overlay,
)
from medlens.explain.faithfulness import _ranks, _spearman, _top_layers
from medlens.models import create_model, list_models

ALL_MODELS = list_models(task="classification")
SIZE = 64


def _x(batch: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def quadrant_mask(q: int, size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    half, (qy, qx) = size // 2, divmod(int(q), 2)
    mask[qy * half : (qy + 1) * half, qx * half : (qx + 1) * half] = True
    return mask


@pytest.fixture(scope="module")
def blob_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("seed_cnn", widths=[8, 16, 32, 32], dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        x, y, _ = blobs(32, seed=step + 1)
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # 20 steps leave BatchNorm's running statistics behind the weights: re-estimate them for the final ones
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for k in range(4):
            model(blobs(64, seed=500 + k)[0])
    return model.eval()


@pytest.fixture(scope="module")
def positives(blob_model):
    """Class-1 test images (with their blob quadrants), which the model must get right."""
    x, y, quadrant = blobs(16, seed=1000)
    with torch.no_grad():
        predicted = blob_model(x).argmax(1)
    assert torch.equal(predicted, y), "the blob model did not learn the task"
    keep = y == 1
    return x[keep], quadrant[keep]


# ---------------------------------------------------------------------------------------------------------
# every model, the plumbing


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradcam_maps_for_every_model(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = _x()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    # a randomly initialised head can have negative evidence for both classes at every position (Grad-CAM
    # then rightly returns empty maps; densenet121 does at this seed), but not for both methods
    seen_nonzero = False
    for method in (GradCAM, GradCAMPlusPlus):
        with method(model) as cam:
            assert _hooks(model) == 1
            for target in (None, 0, 1):
                result = cam.explain(x, target)
                maps = result.maps
                assert maps.shape == (2, SIZE, SIZE) and maps.dtype == torch.float32
                assert not maps.requires_grad and maps.grad_fn is None
                assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
                for m in maps:  # scaled to [0, 1] per image, or all zero where nothing is positive
                    assert m.max().item() in (0.0, 1.0) and (m.max() == 0 or m.min() == 0)
                seen_nonzero |= bool(maps.amax() == 1)
                expected = predicted if target is None else torch.full((2,), target)
                assert torch.equal(result.targets, expected)
        assert _hooks(model) == 0, "hooks left on the model after the with block"
        assert all(p.grad is None for p in model.parameters()), "explaining must not touch parameter .grad"
    assert seen_nonzero, f"only empty maps for {name}"


def test_hooks_are_released_and_record_only_during_explanations():
    model = create_model("seed_cnn").eval()
    cam = GradCAM(model)
    layer = model.get_submodule(model.cam_layer)
    assert len(layer._forward_hooks) == 1
    with torch.no_grad():
        model(_x())  # an ordinary forward pass while the explainer is open stores nothing
    assert cam._activation is None
    cam(_x())
    assert cam._activation is None  # nothing is held between calls
    cam.close()
    cam.close()  # twice is fine
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        cam(_x())
    dropped = GradCAM(model)
    assert _hooks(model) == 1
    del dropped  # never closed: collected, and the hook goes with it
    gc.collect()
    assert _hooks(model) == 0
    explain(model, _x(), "gradcam++")
    explain(model, _x(), "scorecam", max_channels=4)
    assert _hooks(model) == 0
    occlusion = Occlusion(model)
    assert _hooks(model) == 0  # occlusion perturbs the input only
    occlusion.close()


def test_gradcam_equals_class_activation_mapping_for_a_pooled_linear_head():
    # With global average pooling + linear, the logit's gradient is W_c / (h w) at every position, so
    # Grad-CAM is exactly CAM (Zhou et al. 2016): relu(sum_k W_ck A_k), here for each class.
    torch.manual_seed(1)
    model = create_model("seed_cnn").eval()
    x = _x(batch=3)
    with torch.no_grad():
        features = model.forward_features(x)
    with GradCAM(model) as cam:
        for c in (0, 1):
            expected = torch.einsum("k,bkhw->bhw", model.fc.weight[c].detach(), features)
            expected = normalize_maps(
                nn.functional.interpolate(expected[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0]
            )
            torch.testing.assert_close(cam(x, target=c), expected, rtol=1e-4, atol=1e-5)


def test_gradcam_plus_plus_closed_form():
    torch.manual_seed(2)
    model = create_model("seed_cnn").eval()
    x = _x(batch=2)
    features = model.forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(features)
    (g,) = torch.autograd.grad(logits[:, 1].sum(), features)
    a = features.detach()
    alpha = g**2 / (2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3)
    weights = (torch.nan_to_num(alpha) * g.clamp_min(0)).sum(dim=(2, 3))
    expected = torch.einsum("bk,bkhw->bhw", weights, a)
    expected = normalize_maps(nn.functional.interpolate(expected[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0])
    with GradCAMPlusPlus(model) as cam:
        torch.testing.assert_close(cam(x, target=1), expected, rtol=1e-4, atol=1e-5)


def test_targets_default_to_the_prediction_and_can_be_chosen(blob_model, positives):
    x = torch.cat([positives[0][:2], blobs(2, seed=7)[0][:1]])  # two class-1 images and a class-0 one
    with torch.no_grad():
        logits = blob_model(x)
    assert logits.argmax(1).tolist() == [1, 1, 0]
    with GradCAM(blob_model) as cam:
        default = cam.explain(x)
        assert default.targets.tolist() == [1, 1, 0] and default.method == "gradcam"
        torch.testing.assert_close(default.probabilities, torch.softmax(logits, 1).amax(1))
        per_image = cam.explain(x, target=torch.tensor([1, 1, 0]))
        torch.testing.assert_close(per_image.maps, default.maps)
        other = cam.explain(x, target=[0, 0, 1])
        assert other.targets.tolist() == [0, 0, 1]
        assert not torch.allclose(other.maps[0], default.maps[0])  # the other class's evidence lies elsewhere
        torch.testing.assert_close(cam(x, target=1)[:2], default.maps[:2])
        with pytest.raises(ConfigError, match="out of range"):
            cam(x, target=2)
        with pytest.raises(ConfigError, match="3 images"):
            cam(x, target=[0, 1])


def test_model_state_is_left_alone():
    torch.manual_seed(3)
    model = create_model("seed_cnn", dropout=0.5).train()
    model.features[0].eval()  # a partly frozen model stays partly frozen
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    with GradCAM(model) as cam:
        first, second = cam(_x()), cam(_x())
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout was off: eval mode during the call
    assert model.training and not model.features[0].training and model.features[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), f"{k} changed"  # BatchNorm statistics untouched
    assert all(p.grad is None for p in model.parameters())


class _InPlaceAfterLayer(nn.Module):
    """conv -> ReLU(inplace) -> mean -> linear: the in-place ReLU rewrites the conv layer's output."""

    cam_layer = "conv"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_in_place_op_after_the_layer_does_not_corrupt_the_map():
    torch.manual_seed(4)
    model = _InPlaceAfterLayer().eval()
    x = _x(batch=1, size=16)
    with torch.no_grad():
        a = model.conv(x)  # pre-ReLU activations; the logit's gradient is W_c / (h w) where a > 0
    g = model.fc.weight[1].detach().view(1, 6, 1, 1) * (a > 0) / a[0, 0].numel()
    expected = normalize_maps((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    torch.testing.assert_close(GradCAM(model)(x, target=1), expected, rtol=1e-4, atol=1e-5)


def test_3d_input():
    torch.manual_seed(5)
    # conv1_stride=1: a 2 x 2 x 2 feature map at 32^3, so the map has structure (stride 2 gives 1 x 1 x 1)
    model = create_model("resnet18", spatial_dims=3, conv1_stride=1).eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    for method in (GradCAM, GradCAMPlusPlus):
        with method(model) as cam:
            maps = cam(x)
        assert maps.shape == (1, 32, 32, 32) and maps.max() == 1 and maps.min() == 0
    assert _hooks(model) == 0
    with ScoreCAM(model, max_channels=3) as cam:
        assert cam(x).shape == (1, 32, 32, 32)
    # the default network at 32^3 ends in one voxel: a constant map, which becomes zeros rather than noise
    flat = create_model("resnet18", spatial_dims=3).eval()
    assert torch.equal(GradCAM(flat)(x), torch.zeros(1, 32, 32, 32))


# ---------------------------------------------------------------------------------------------------------
# the methods find the evidence


@pytest.mark.parametrize("method", list(METHODS))
def test_maps_put_most_mass_in_the_blob_quadrant(blob_model, positives, method):
    x, quadrant = positives
    result = explain(blob_model, x, method)
    assert result.targets.tolist() == [1] * len(x)
    fractions = [mask_energy_fraction(m, quadrant_mask(q)) for m, q in zip(result.maps, quadrant, strict=True)]
    assert np.mean(fractions) > 0.5 and min(fractions) > 0.4, f"{method}: {np.round(fractions, 2)}"


def _count_forward_images(model: nn.Module) -> tuple[list[int], object]:
    seen: list[int] = []
    return seen, model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))


def test_scorecam_batches_and_channel_limit(blob_model, positives):
    x = positives[0][:2]
    reference = ScoreCAM(blob_model)(x)
    torch.testing.assert_close(ScoreCAM(blob_model, batch_size=5)(x), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ScoreCAM(blob_model, max_channels=32)(x), reference, rtol=1e-5, atol=1e-6)
    seen, handle = _count_forward_images(blob_model)
    try:
        ScoreCAM(blob_model, batch_size=3, max_channels=7)(x)
    finally:
        handle.remove()
    # one pass for the batch, then per image 7 masked copies in batches of 3
    assert seen == [2, 3, 3, 1, 3, 3, 1]
    with pytest.raises(ConfigError):
        ScoreCAM(blob_model, max_channels=0)


class _RegionModel(nn.Module):
    """2 logits; the second depends only on the mean of one box of the image (any number of spatial dims)."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def forward(self, x):
        region = x[(slice(None), slice(None), *self.box)].mean(dim=tuple(range(1, x.ndim)))
        return torch.stack([torch.zeros_like(region), 4 * region], dim=1)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_occlusion_marks_only_patches_that_touch_the_evidence(spatial):
    box = tuple(slice(4, 8) for _ in spatial)
    model = _RegionModel(box)
    x = torch.randn(2, 1, *spatial, generator=torch.Generator().manual_seed(0))
    x[(slice(None), slice(None), *box)] += 3  # bright evidence: occluding it lowers class 1
    with Occlusion(model, patch=4, stride=2) as occlusion:
        result = occlusion.explain(x, target=1)
    reach = torch.zeros(spatial, dtype=torch.bool)
    reach[tuple(slice(1, 11) for _ in spatial)] = True  # pixels whose covering patches can overlap the box
    for m in result.maps:
        assert m.max() == 1 and mask_energy_fraction(m, reach) == pytest.approx(1.0)
        assert m[box].mean() > 0.9  # the box itself: every covering patch hides part of it
    batched = Occlusion(model, patch=4, stride=2, batch_size=1)(x, target=1)
    torch.testing.assert_close(batched, result.maps)
    # the default patch (1/8 of each side) and stride (half a patch) cover the far edge too
    assert Occlusion(model)._windows((30, 30))[-1] == (slice(27, 30), slice(27, 30))


# ---------------------------------------------------------------------------------------------------------
# factory, pictures, small helpers


def test_make_explainer():
    model = create_model("seed_cnn", widths=[8, 16])
    assert set(METHODS) == {"gradcam", "gradcam++", "scorecam", "occlusion"}
    for name, cls in METHODS.items():
        with make_explainer(name, model) as e:
            assert type(e) is cls and isinstance(e, CAM) and e.name == name
    with make_explainer("GradCAM", model) as e:
        assert type(e) is GradCAM
    with make_explainer("scorecam", model, batch_size=8, max_channels=4) as e:
        assert (e.batch_size, e.max_channels) == (8, 4)
    with pytest.raises(ConfigError) as info:
        make_explainer("gradcam+", model)
    assert "unknown explanation method 'gradcam+'" in info.value.message
    assert "did you mean" in info.value.hint and all(n in info.value.hint for n in METHODS)
    with pytest.raises(ConfigError, match="no option 'patch'"):
        make_explainer("gradcam", model, patch=8)
    with pytest.raises(ConfigError, match="no layer 'features.9'"):
        GradCAM(model, layer="features.9")
    assert _hooks(model) == 0


def test_a_chosen_layer_is_used():
    torch.manual_seed(6)
    model = create_model("seed_cnn", widths=[8, 16]).eval()
    with GradCAM(model, layer="features.0") as early, GradCAM(model) as late:
        fine, coarse = early(_x()), late(_x())
    assert fine.shape == coarse.shape == (2, SIZE, SIZE)
    assert not torch.allclose(fine, coarse)


def test_normalize_maps():
    maps = torch.tensor([[[-1.0, 0.5], [1.5, 2.5]], [[3.0, 3.0], [3.0, 3.0]], [[-2.0, -1.0], [-3.0, -1.0]]])
    out = normalize_maps(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.2], [0.6, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2)) and torch.equal(out[2], torch.zeros(2, 2))


def test_overlay():
    import matplotlib

    pyplot_before = "matplotlib.pyplot" in sys.modules
    image = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # 8 x 16 grey ramp
    cam = np.linspace(0, 1, 8 * 16, dtype=np.float32).reshape(8, 16)
    out = overlay(image, cam)
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, cam, alpha=0.0), np.repeat(image[..., None], 3, axis=2))
    jet = np.rint(matplotlib.colormaps["jet"](cam)[..., :3] * 255)
    np.testing.assert_allclose(overlay(image, cam, alpha=1.0), jet, atol=1)
    expected = 0.6 * image[..., None] + 0.4 * jet
    np.testing.assert_allclose(out, expected, atol=1)
    # a float image in [0, 1] is the same picture; a z-scored one is min-max scaled
    np.testing.assert_allclose(overlay(image / 255.0, cam), out, atol=1)
    z_scored = (image - image.mean()) / image.std()  # min-max scaled: the ramp's 0..240 becomes 0..1
    np.testing.assert_allclose(overlay(z_scored, cam), overlay(image / 240.0, cam), atol=1)
    # a map at another size (the network input over the full-size radiograph) is resized
    small = overlay(image, torch.ones(4, 8))
    np.testing.assert_allclose(small, overlay(image, np.ones((8, 16))), atol=1)
    assert not np.array_equal(overlay(image, cam, cmap="gray"), out)
    with pytest.raises(ConfigError, match="colormap"):
        overlay(image, cam, cmap="no-such-map")
    with pytest.raises(ConfigError, match="alpha"):
        overlay(image, cam, alpha=1.5)
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules


def test_save_overlay(tmp_path):
    from PIL import Image

    image = (np.random.default_rng(0).random((20, 30)) * 255).astype(np.uint8)
    cam = np.random.default_rng(1).random((10, 15))
    path = save_overlay(tmp_path / "out" / "cam.png", image, cam, alpha=0.5)
    assert path == tmp_path / "out" / "cam.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), overlay(image, cam, alpha=0.5))


def test_mask_energy_fraction():
    cam = np.ones((4, 4))
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    assert mask_energy_fraction(cam, mask) == pytest.approx(0.25)
    cam[:2, :2] = 3  # 12 of 24
    assert mask_energy_fraction(torch.from_numpy(cam), torch.from_numpy(mask)) == pytest.approx(0.5)
    assert np.isnan(mask_energy_fraction(np.zeros((4, 4)), mask))
    with pytest.raises(ConfigError, match="shape"):
        mask_energy_fraction(np.ones((4, 5)), mask)


# ---------------------------------------------------------------------------------------------------------
# faithfulness


def test_deletion_and_insertion_beat_a_random_order(blob_model, positives):
    x, _ = positives
    maps = explain(blob_model, x, "gradcam").maps
    with torch.no_grad():
        p = torch.softmax(blob_model(x), 1)[:, 1].numpy()
    for baseline in ("blur", "mean"):
        cam_order = deletion_insertion(blob_model, x, maps, baseline=baseline)
        random = deletion_insertion(blob_model, x, maps, baseline=baseline, random_order=True)
        assert cam_order["deletion_curve"].shape == (len(x), 21) and cam_order["fractions"][[0, -1]].tolist() == [0, 1]
        np.testing.assert_allclose(cam_order["deletion_curve"][:, 0], p, rtol=1e-5)
        np.testing.assert_allclose(cam_order["insertion_curve"][:, -1], p, rtol=1e-5)
        # both orders end on the same all-baseline image
        np.testing.assert_allclose(cam_order["deletion_curve"][:, -1], random["deletion_curve"][:, -1], rtol=1e-5)
        assert (cam_order["deletion_auc"] < random["deletion_auc"]).all(), baseline
        assert (cam_order["insertion_auc"] > random["insertion_auc"]).all(), baseline
        assert cam_order["deletion_auc"].mean() < random["deletion_auc"].mean() - 0.2
    again = deletion_insertion(blob_model, x, maps, random_order=True, seed=0)
    np.testing.assert_array_equal(again["deletion_auc"], deletion_insertion(blob_model, x, maps, random_order=True)["deletion_auc"])


def test_deletion_curve_and_auc_by_hand():
    # the class-1 logit reads one pixel; ranking that pixel first removes it at the first step
    class OnePixel(nn.Module):
        def forward(self, x):
            v = x[:, 0, 0, 0]
            return torch.stack([torch.zeros_like(v), v], dim=1)

    model = OnePixel()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 0, 0] = 2.0
    cams = torch.zeros(1, 8, 8)
    cams[0, 0, 0] = 1.0
    out = deletion_insertion(model, x, cams, steps=4, baseline="mean", target=1)
    p_full, p_gone = torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(2.0 / 64)).item()
    np.testing.assert_allclose(out["deletion_curve"][0], [p_full, p_gone, p_gone, p_gone, p_gone], rtol=1e-6)
    np.testing.assert_allclose(out["insertion_curve"][0], [p_gone, p_full, p_full, p_full, p_full], rtol=1e-6)
    assert out["deletion_auc"][0] == pytest.approx(0.25 * (p_full + p_gone) / 2 + 0.75 * p_gone)
    assert out["insertion_auc"][0] == pytest.approx(0.25 * (p_full + p_gone) / 2 + 0.75 * p_full)
    with pytest.raises(ConfigError, match="baseline"):
        deletion_insertion(model, x, cams, baseline="zeros")
    with pytest.raises(ConfigError, match="expected"):
        deletion_insertion(model, x, cams[:, :4])


def test_randomisation_check(blob_model, positives):
    x, _ = positives
    trained = explain(blob_model, x, "gradcam").maps
    again = explain(blob_model, x, "gradcam").maps
    assert all(_spearman(a.numpy(), b.numpy()) == pytest.approx(1.0) for a, b in zip(trained, again, strict=True))
    rho = randomisation_check(blob_model, x, "gradcam", layers="top", seed=0)
    assert rho.shape == (len(x),) and np.isfinite(rho).all()
    assert rho.max() < 0.9 and rho.mean() < 0.5, np.round(rho, 2)
    np.testing.assert_array_equal(rho, randomisation_check(blob_model, x, "gradcam", layers="top", seed=0))
    with pytest.raises(ConfigError, match="layers"):
        randomisation_check(blob_model, x, layers="bottom")


def test_randomised_copy_reinitialises_only_the_top_layers(blob_model):
    example = _x(batch=1)
    head, stage = _top_layers(blob_model, example)
    assert head == ["fc"] and stage == ["features.3.0", "features.3.1"]
    rng = torch.random.get_rng_state()
    copy = randomised_copy(blob_model, "top", seed=0, example=example)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is not consumed
    original = dict(blob_model.named_parameters())
    for name, p in copy.named_parameters():
        changed = not torch.equal(p, original[name])
        assert changed == name.startswith(("fc.", "features.3.")), name
    # architecture-agnostic choice of the last stage
    resnet = create_model("resnet18")
    head, stage = _top_layers(resnet, example)
    assert head == ["net.fc"] and stage and all(n.startswith("net.layer4.") for n in stage)
    assert {"net.layer4.0.conv1", "net.layer4.1.bn2", "net.layer4.0.downsample.0"} <= set(stage)
    densenet = create_model("densenet121")
    head, stage = _top_layers(densenet, example)
    assert head == ["net.class_layers.out"] and stage[-1] == "net.features.norm5"
    assert all(n.startswith("net.features.denseblock4.") for n in stage[:-1])
    head_only = randomised_copy(blob_model, "head")
    assert [n for n, p in head_only.named_parameters() if not torch.equal(p, original[n])] == ["fc.weight", "fc.bias"]
    everything = randomised_copy(blob_model, "all")
    assert all(not torch.equal(p, original[n]) for n, p in everything.named_parameters() if n.endswith("weight") and p.ndim > 1)


def test_spearman_without_scipy_agrees():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    assert _ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [1.5, 3.0, 1.5, 0.0]
    assert float(np.corrcoef(_ranks(a), _ranks(b))[0, 1]) == pytest.approx(_spearman(a, b), abs=1e-12)
    assert np.isnan(_spearman(np.ones(5), np.arange(5.0)))


# ---------------------------------------------------------------------------------------------------------
# cost


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_500_explanations_do_not_leak():
    torch.manual_seed(0)
    model = create_model("seed_cnn").eval()
    x = torch.randn(1, 1, 224, 224)
    with GradCAM(model) as cam:
        for _ in range(20):
            cam(x)
        start = _rss_mb()
        for _ in range(500):
            cam(x)
        growth = _rss_mb() - start
    assert growth < 50, f"RSS grew {growth:.1f} MB over 500 explanations"


def test_gradcam_costs_no_more_than_a_training_step():
    """GradCAM back-propagates only down to the CAM layer: about one forward pass, well under fwd + bwd."""
    torch.manual_seed(0)
    model = create_model("seed_cnn").eval()
    x = torch.randn(1, 1, 224, 224)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x)[:, 1].sum().backward()

    with GradCAM(model) as cam:
        for _ in range(2):
            forward_backward()
            cam(x)
        step, explanation = [], []
        for _ in range(7):  # interleaved, so a busy neighbour slows both alike
            t0 = time.perf_counter()
            forward_backward()
            t1 = time.perf_counter()
            cam(x)
            t2 = time.perf_counter()
            step.append(t1 - t0)
            explanation.append(t2 - t1)
    model.zero_grad(set_to_none=True)
    ratio = statistics.median(explanation) / statistics.median(step)
    assert ratio <= 1.5, f"GradCAM {statistics.median(explanation) * 1e3:.1f} ms = {ratio:.2f} x forward+backward"
