"""Deep ensembles (`medlens train --ensemble K`) and the referral policy stored in the model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import FAST, _link_subset

from medlens.cli import main
from medlens.inference import Predictor
from medlens.models import create_model
from medlens.models.card import load_checkpoint, save_checkpoint
from medlens.models.ensemble import Ensemble
from medlens.uncertainty import available_methods, predictive


@pytest.fixture(scope="module")
def tiny_cxr(kermany, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cxr-ens")
    _link_subset(kermany, root, {"train": 60, "test": 12})
    return root


@pytest.fixture(autouse=True)
def _cache(tensor_cache_dir, monkeypatch):
    monkeypatch.setenv("MEDLENS_CACHE", str(tensor_cache_dir))


@pytest.fixture(scope="module")
def ensemble_run(tiny_cxr, tmp_path_factory, tensor_cache_dir) -> Path:
    import os

    os.environ["MEDLENS_CACHE"] = str(tensor_cache_dir)
    run = tmp_path_factory.mktemp("ens") / "r"
    assert main(["train", str(tiny_cxr), "--out", str(run), "--recipe", "cxr_cpu", "--ensemble", "2", *FAST]) == 0
    return run


def test_ensemble_forward_is_the_log_of_the_mean_member_probability():
    torch.manual_seed(0)
    members = [create_model("seed_cnn", num_classes=2, widths=[4, 8, 8, 8]).eval() for _ in range(3)]
    ens = Ensemble(members).eval()
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        assert torch.allclose(torch.softmax(ens(x), 1), mean, atol=1e-6)
        assert torch.allclose(ens(x).exp().sum(1), torch.ones(5), atol=1e-5)


def test_ensemble_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    from medlens.models.card import ModelCard
    from medlens.models.ensemble import ENSEMBLE, ensemble_spec

    args = {"widths": [4, 8, 8, 8]}
    ens = Ensemble([create_model("seed_cnn", num_classes=2, **args) for _ in range(2)])
    card = ModelCard(model_name=ENSEMBLE, model_args=ensemble_spec([{"name": "seed_cnn", "args": args}] * 2),
                     class_names=["NORMAL", "PNEUMONIA"], input_size=32, in_chans=1)
    save_checkpoint(ens, card, tmp_path)
    loaded, card2 = load_checkpoint(tmp_path)
    assert isinstance(loaded, Ensemble) and len(loaded.members) == 2
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ens.eval()(x))
    assert card2.model_id.startswith("ensemble-")


def test_train_ensemble_writes_members_and_one_ensemble_card(ensemble_run, tmp_path, tiny_cxr):
    card = json.loads((ensemble_run / "model.card.json").read_text())
    assert card["model_name"] == "ensemble"
    assert [m["name"] for m in card["model_args"]["members"]] == ["seed_cnn", "seed_cnn"]
    assert card["metrics"]["ensemble"]["members"] == 2
    assert card["cam_layer"] == "features"  # the members' layer, recorded for the explainers
    member_ids = []
    for k in (0, 1):
        member = json.loads((ensemble_run / "members" / str(k) / "model.card.json").read_text())
        assert member["metrics"]["ensemble_member"] == {"index": k, "seed": k}
        member_ids.append(member["weights_sha256"])
        assert (ensemble_run / "members" / str(k) / "config.yaml").exists()
    assert member_ids[0] != member_ids[1], "members must differ (different seeds)"
    # member 0 is exactly the single model trained with the same seed
    single = tmp_path / "single"
    assert main(["train", str(tiny_cxr), "--out", str(single), "--recipe", "cxr_cpu", *FAST]) == 0
    assert json.loads((single / "model.card.json").read_text())["weights_sha256"] == member_ids[0]


def test_referral_policy_in_the_card_refers_the_most_uncertain_validation_share(ensemble_run):
    predictor = Predictor.from_run(ensemble_run)
    refer = predictor.card.refer
    assert refer["measure"] == "decision_entropy" and refer["coverage"] == 0.9
    assert set(refer["thresholds"]) == set(available_methods(predictor.model)) >= {"softmax", "tta", "ensemble"}
    for t in refer["thresholds"].values():
        assert 0.0 <= t <= math.log(2) + 1e-9


def test_predict_ensemble_uncertainty_and_refer_flag(ensemble_run, kermany, capsys):
    files = sorted((kermany / "test" / "PNEUMONIA").iterdir())[:3]
    assert main(["predict", str(ensemble_run), *map(str, files), "--uncertainty", "ensemble"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["uncertainty"]["method"] == "ensemble" and row["uncertainty"]["passes"] == 2
        assert isinstance(row["refer"], bool)
        assert row["uncertainty"]["mutual_information"] >= 0
    # the refer flag is exactly the card's rule
    predictor = Predictor.from_run(ensemble_run)
    t = predictor.card.refer["thresholds"]["ensemble"]
    assert [r["refer"] for r in rows] == [r["uncertainty"]["decision_entropy"] > t for r in rows]


def test_ensemble_probability_matches_the_default_prediction(ensemble_run, kermany):
    predictor = Predictor.from_run(ensemble_run)
    from medlens.data.readers import read_image

    files = sorted((kermany / "test" / "NORMAL").iterdir())[:4]
    images = torch.cat([predictor.prepare(read_image(f)[0]) for f in files])
    default = predictor.predict_images(images)
    ens = predictive(predictor.model, images, "ensemble", intensity=predictor.card.intensity,
                     temperature=predictor.card.temperature, threshold=predictor.card.threshold)
    np.testing.assert_allclose(ens["probability"], default, atol=1e-6)
    # away from p = 0.5 the decision entropy of the members differs from that of their mean (at 0.5, with
    # temperature 1, the two are the same number: the entropy of a mean prediction)
    assert abs(predictor.card.threshold - 0.5) > 0.05
    single = predictive(predictor.model, images, "softmax", intensity=predictor.card.intensity,
                        temperature=predictor.card.temperature, threshold=predictor.card.threshold)
    assert not np.allclose(ens["decision_entropy"], single["decision_entropy"])
    assert (ens["mutual_information"] <= ens["predictive_entropy"] + 1e-9).all()


def test_ensemble_uncertainty_on_a_single_model_is_a_clear_error(tmp_path, kermany, capsys):
    args = {"widths": [4, 8, 8, 8]}
    from medlens.models.card import ModelCard

    card = ModelCard(model_name="seed_cnn", model_args=args, class_names=["NORMAL", "PNEUMONIA"], input_size=32,
                     in_chans=1)
    save_checkpoint(create_model("seed_cnn", num_classes=2, **args), card, tmp_path)
    f = sorted((kermany / "test" / "NORMAL").iterdir())[0]
    assert main(["predict", str(tmp_path), str(f), "--uncertainty", "ensemble"]) == 2
    err = capsys.readouterr().err
    assert "ensemble" in err and "--ensemble" in err and "Traceback" not in err
