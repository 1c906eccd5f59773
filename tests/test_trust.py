"""The trust checks `medlens evaluate` runs: selective prediction, faithfulness, CAM gallery, lung energy, and
the report sections that show them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import blobs
from PIL import Image

from medlens import trust
from medlens.config import Config
from medlens.errors import DataError
from medlens.inference import Predictor
from medlens.models import create_model
from medlens.models.card import ModelCard, normalize_batch
from medlens.report import write_report
from medlens.uncertainty import predictive

SIZE = 64


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_model("seed_cnn", num_classes=2, widths=[8, 16, 16, 16]).eval()
    card = ModelCard(model_name="seed_cnn", model_args={"widths": [8, 16, 16, 16]},
                     class_names=["NORMAL", "PNEUMONIA"], input_size=SIZE, in_chans=1, threshold=0.5,
                     refer={"measure": "decision_entropy", "coverage": 0.9,
                            "thresholds": {"softmax": 0.69, "tta": 0.6}, "n": 10, "mc_passes": 4, "tta_passes": 3})
    return Predictor(model=model, card=card, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    y = np.array([0, 1] * 20)
    return x, y


def _cfg(**eval_kw) -> Config:
    cfg = Config()
    for k, v in {"n_faithfulness": 12, "faithfulness_steps": 5, "n_cam_examples": 2, **eval_kw}.items():
        setattr(cfg.eval, k, v)
    return cfg


def test_selective_prediction_reports_every_method_and_applies_the_cards_policy(predictor, images):
    x, y = images
    out = trust.selective_prediction(predictor, x, y, _cfg())
    assert list(out["methods"]) == ["softmax", "mc", "tta"]  # seed_cnn has dropout; not an ensemble
    card = predictor.card
    for method, entry in out["methods"].items():
        col = out["columns"][method]
        correct = (col["probability"] >= card.threshold).astype(int) == y
        assert entry["accuracy"] == pytest.approx(correct.mean())
        keep = col["uncertainty"] <= np.quantile(col["uncertainty"], 0.9, method="inverted_cdf")
        assert entry["accuracy_kept"] == pytest.approx(correct[keep].mean())
        assert entry["gain"] == pytest.approx(correct[keep].mean() - correct.mean())
        assert entry["passes"] == {"softmax": 1, "mc": 4, "tta": 3}[method]
        assert len(entry["curve"]["coverage"]) == 11
    # the validation-chosen threshold is applied as it is, whatever share it refers here
    pol = out["methods"]["tta"]["policy"]
    u = out["columns"]["tta"]["uncertainty"]
    assert pol["referred"] == pytest.approx((u > 0.6).mean())
    assert "policy" not in out["methods"]["mc"]  # the card has no mc threshold


def test_softmax_probability_is_the_plain_prediction(predictor, images):
    x, _ = images
    r = predictive(predictor.model, x, "softmax", intensity=predictor.card.intensity)
    np.testing.assert_allclose(r["probability"], predictor.predict_images(x), atol=1e-6)
    assert (r["mutual_information"] == 0).all()


@pytest.mark.parametrize("method", ["mc", "tta"])
def test_the_probability_and_label_do_not_depend_on_the_uncertainty_method(predictor, images, method):
    x, _ = images
    kw = {"intensity": predictor.card.intensity, "threshold": 0.5, "mc_passes": 4, "tta_passes": 3}
    plain = predictive(predictor.model, x, "softmax", **kw)
    other = predictive(predictor.model, x, method, **kw)
    np.testing.assert_allclose(other["probability"], plain["probability"], atol=1e-6)
    assert not np.allclose(other["decision_entropy"], plain["decision_entropy"])  # the passes give the spread


def test_faithfulness_compares_with_a_random_order_and_a_randomised_model(predictor, images):
    x, _ = images
    prob = predictor.predict_images(x)
    f = trust.faithfulness(predictor, x, prob, _cfg())
    assert f["n"] == 12 and f["steps"] == 5
    for k in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random"):
        assert 0.0 <= f[k] <= 1.0
    curves = f["curves"]
    assert len(curves["deletion"]) == 6
    # the reference really is another pixel order: the curves share their ends (nothing / everything removed)
    # and differ in between
    for kind in ("deletion", "insertion"):
        assert curves[kind][0] == pytest.approx(curves[f"{kind}_random"][0])
        assert curves[kind][-1] == pytest.approx(curves[f"{kind}_random"][-1])
        assert not np.allclose(curves[kind][1:-1], curves[f"{kind}_random"][1:-1], rtol=0, atol=1e-6), kind
    assert f["deletion_auc"] != f["deletion_auc_random"] and f["insertion_auc"] != f["insertion_auc_random"]
    # the randomisation check gave a number, not NaN / None: re-initialising the top layers changed the maps
    rho = f["randomisation_spearman_median"]
    assert isinstance(rho, float) and np.isfinite(rho) and -1 <= rho < 0.5, rho
    low, high = f["randomisation_spearman_iqr"]
    assert -1 <= low <= rho <= high <= 1
    again = trust.faithfulness(predictor, x, prob, _cfg())
    assert again["deletion_auc"] == f["deletion_auc"], "seeded: the same sample and order every time"
    assert again["deletion_auc_random"] == f["deletion_auc_random"]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 32 + 96).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def blob_predictor() -> Predictor:
    """seed_cnn trained for 20 steps on the blob task (helpers.blobs) through the card's normalisation, so
    trust.faithfulness sees uint8 images as medlens evaluate does; its maps must find the blob."""
    torch.manual_seed(0)
    args = {"widths": [8, 16, 32, 32], "dropout": 0.0}
    card = ModelCard(model_name="seed_cnn", model_args=args, class_names=["NORMAL", "PNEUMONIA"],
                     input_size=SIZE, in_chans=1, threshold=0.5)
    model = create_model("seed_cnn", num_classes=2, **args)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        x, y, _ = blobs(32, seed=step + 1, size=SIZE)
        loss = torch.nn.functional.cross_entropy(model(normalize_batch(_to_uint8(x), card.intensity)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for m in model.modules():  # BatchNorm statistics for the final weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for k in range(4):
            model(normalize_batch(_to_uint8(blobs(64, seed=500 + k, size=SIZE)[0]), card.intensity))
    return Predictor(model=model.eval(), card=card, device=torch.device("cpu"))


def test_faithfulness_of_maps_that_find_the_evidence(blob_predictor):
    """Maps that point at the blob: deleting their top pixels first lowers the probability much faster than a
    random order, and a randomised model draws other maps (a Spearman rho well below 1)."""
    x, y, _ = blobs(24, seed=1000, size=SIZE)
    images = _to_uint8(x)[y == 1]
    prob = blob_predictor.predict_images(images)
    assert (prob >= 0.5).all(), "the blob model did not learn the task"
    f = trust.faithfulness(blob_predictor, images, prob, _cfg(n_faithfulness=12, faithfulness_steps=10))
    assert f["n"] == 12
    assert f["deletion_auc"] < f["deletion_auc_random"] - 0.05, (f["deletion_auc"], f["deletion_auc_random"])
    assert f["deletion_better_than_random"] >= 0.9
    rho = f["randomisation_spearman_median"]
    assert rho is not None and np.isfinite(rho) and rho < 0.5, rho


def test_cam_gallery_holds_the_most_confident_of_each_kind(predictor, images):
    x, y = images
    prob = np.linspace(0.01, 0.99, len(y))  # made-up probabilities: the selection logic is what is tested
    gallery = trust.cam_gallery(predictor, x, y, prob, [f"img{i}.png" for i in range(len(y))], _cfg())
    kinds = [g["kind"] for g in gallery]
    assert kinds.count("true positive") == 2 and kinds.count("false positive") == 2
    assert kinds.count("false negative") == 2
    tps = [g for g in gallery if g["kind"] == "true positive"]
    assert tps[0]["prob"] >= tps[1]["prob"] and all(g["label"] == 1 and g["prob"] >= 0.5 for g in tps)
    fns = [g for g in gallery if g["kind"] == "false negative"]
    assert fns[0]["prob"] <= fns[1]["prob"] and all(g["label"] == 1 and g["prob"] < 0.5 for g in fns)
    assert all(g["cam"].shape == (SIZE, SIZE) for g in gallery)


def _mask_folder(root: Path, n: int = 3, manifest: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,mask"]
    for i in range(n):
        Image.fromarray(np.full((100, 80), 128, np.uint8)).save(root / "images" / f"c{i}.png")
        mask = np.zeros((100, 80), np.uint8)
        mask[:, :40] = 255  # "lungs": the left half
        mask[:10, 40:] = 127  # an ignore strip on the right
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
        rows.append(f"images/c{i}.png,masks/c{i}.png")
    if manifest:
        (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("manifest", [True, False])
def test_mask_pairs_from_a_manifest_or_matching_names(tmp_path, manifest):
    root = _mask_folder(tmp_path / "m", manifest=manifest)
    pairs = trust.mask_pairs(root)
    assert [(p.name, q.name) for p, q in pairs] == [(f"c{i}.png", f"c{i}.png") for i in range(3)]


def test_mask_folder_without_pairs_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no image/mask pairs"):
        trust.mask_pairs(tmp_path)


def test_lung_energy_measures_the_share_inside_the_mask_and_leaves_out_the_ignore_region(
        predictor, tmp_path, monkeypatch):
    root = _mask_folder(tmp_path / "m")

    class Fake:  # a map with 3/4 of its mass on the left half
        def __init__(self, maps):
            self.maps = maps

    def fake_explain(x, method, target=None):
        maps = torch.zeros(x.shape[0], SIZE, SIZE)
        maps[:, :, : SIZE // 2] = 3.0
        maps[:, :, SIZE // 2 :] = 1.0
        maps[:, : SIZE // 10 - 1, SIZE // 2 :] = 100.0  # inside the ignore strip: must not count
        return Fake(maps)

    monkeypatch.setattr(predictor, "explain", fake_explain)
    out = trust.lung_energy(predictor, root, _cfg())
    assert out["n"] == 3 and out["flat_maps"] == 0
    ignore_rows = round(10 / 100 * SIZE)  # the mask strip after nearest-neighbour resizing
    valid_right = (SIZE - ignore_rows) * SIZE // 2
    left = SIZE * SIZE // 2
    assert out["lung_area_mean"] == pytest.approx(left / (left + valid_right), abs=0.02)
    expected = 3 * left / (3 * left + 1 * valid_right)
    assert out["energy_in_lungs_mean"] == pytest.approx(expected, abs=0.02)
    assert out["ratio_to_area"] > 1 and out["share_above_area"] == 1.0


def test_explanations_use_the_layer_named_in_the_card(predictor, images):
    import dataclasses

    x, _ = images
    from medlens.models.card import normalize_batch

    xn = normalize_batch(x[:2], predictor.card.intensity)
    assert predictor.explain_options("gradcam") == {}  # no layer in this card: the model's default
    other = dataclasses.replace(predictor, card=dataclasses.replace(predictor.card, cam_layer="features.0"))
    assert other.explain_options("gradcam") == {"layer": "features.0"}
    assert other.explain_options("occlusion") == {}  # perturbs the input only
    a = predictor.explain(xn, "gradcam").maps
    b = other.explain(xn, "gradcam").maps
    assert a.shape == b.shape and not torch.equal(a, b)  # a different layer, a different map


def test_report_shows_uncertainty_and_explanation_sections(predictor, images, tmp_path):
    x, y = images
    cfg = _cfg()
    prob = predictor.predict_images(x)
    sel = trust.selective_prediction(predictor, x, y, cfg, methods=["softmax", "tta"])
    sel.pop("columns")
    checks = {"selective": sel, "faithfulness": trust.faithfulness(predictor, x, prob, cfg),
              "cam_gallery": trust.cam_gallery(predictor, x, y, prob, [f"i{i}" for i in range(len(y))], cfg),
              "lung_energy": {"source": "m", "n": 3, "flat_maps": 0, "method": "gradcam", "skipped": [],
                              "energy_in_lungs_mean": 0.7, "energy_in_lungs_median": 0.7, "lung_area_mean": 0.4,
                              "ratio_to_area": 1.75, "share_above_area": 1.0}}
    from medlens.metrics import binary_metrics

    page = write_report(tmp_path, metrics=binary_metrics(y, prob, 0.5), y_true=y, y_prob=prob, threshold=0.5,
                        class_names=["NORMAL", "PNEUMONIA"], trust=checks, y_prob_uncalibrated=prob ** 1.5).read_text()
    for heading in ("Uncertainty and referral", "Explanations", "Are the maps faithful", "Do the maps fall on the lungs",
                    "Reliability diagram before scaling", "test-time augmentation"):
        assert heading in page
    for png in ("selective", "deletion_insertion", "cam_gallery", "reliability_uncalibrated"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    json.dumps(sel)  # what goes into metrics.json is plain JSON
