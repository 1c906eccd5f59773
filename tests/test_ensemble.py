"""Deep ensembles (`medlens train --ensemble K`) and the referral policy stored in the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, assert_refers_share, decision_entropy, read_card, validation_halves

from medlens.cli import main
from medlens.data.readers import read_image
from medlens.inference import Predictor
from medlens.models import create_model
from medlens.models.card import load_checkpoint, normalize_batch, save_checkpoint
from medlens.models.ensemble import Ensemble
from medlens.uncertainty import available_methods, predictive

pytestmark = pytest.mark.usefixtures("medlens_cache")


@pytest.fixture(scope="module")
def ensemble_run(tiny_ensemble_run) -> Path:
    """The session's 2-member ensemble, trained on ``cxr_tiny`` with seeds 0 and 1 (read-only)."""
    return tiny_ensemble_run


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


def test_train_ensemble_writes_members_and_one_ensemble_card(ensemble_run, tiny_run):
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
    # member 0 is exactly the single model trained with the same seed on the same data
    assert read_card(tiny_run)["weights_sha256"] == member_ids[0]


def test_referral_policy_in_the_card_refers_the_most_uncertain_held_apart_share(ensemble_run, cxr_tiny):
    """Each referral threshold is the coverage quantile of the decision entropy on the held-apart half of
    validation: recomputed here (the half from the patient ids, the entropies from the members' outputs)."""
    predictor = Predictor.from_run(ensemble_run)
    card = predictor.card
    refer = card.refer
    assert refer["measure"] == "decision_entropy" and refer["coverage"] == 0.9
    assert set(refer["thresholds"]) == set(available_methods(predictor.model)) >= {"softmax", "tta", "ensemble"}
    calib = validation_halves(ensemble_run, cxr_tiny)["calib"]
    n = len(calib["paths"])
    assert n >= 20 and refer["n"] == n == card.metrics["calibration"]["n"]  # the held-apart half is used
    coverage = refer["coverage"]
    # single pass: the calibrated probability the run wrote for each validation image
    assert_refers_share(decision_entropy(calib["probs"], card.threshold), refer["thresholds"]["softmax"], coverage)
    # ensemble: the members' calibrated probabilities, computed here
    images = torch.cat([predictor.prepare(read_image(p)[0]) for p in calib["paths"]])
    x = normalize_batch(images, card.intensity)
    with torch.no_grad():
        logits = torch.stack([m.eval()(x) for m in predictor.model.members])
    # the same images as in training: the ensemble (log of the mean member probability, then the temperature)
    # gives the probabilities the run wrote
    ens = torch.softmax(torch.log(torch.softmax(logits, -1).mean(0)) / card.temperature, -1)
    np.testing.assert_allclose(ens[:, card.positive_class].numpy(), calib["probs"], atol=1e-5)
    members = torch.softmax(logits / card.temperature, -1)[..., card.positive_class].numpy()
    assert_refers_share(decision_entropy(members, card.threshold), refer["thresholds"]["ensemble"], coverage)
    # TTA and MC dropout: the passes as training drew them (same seed, same images in the same order)
    for method in ("tta", "mc"):
        u = predictive(predictor.model, images, method, intensity=card.intensity, temperature=card.temperature,
                       threshold=card.threshold, positive_class=card.positive_class, mc_passes=refer["mc_passes"],
                       tta_passes=refer["tta_passes"], seed=0)["decision_entropy"]
        assert_refers_share(u, refer["thresholds"][method], coverage)


def test_predict_ensemble_uncertainty_and_refer_flag(ensemble_run, kermany, capsys):
    files = sorted((kermany / "test" / "PNEUMONIA").iterdir())[:3]
    assert main(["predict", str(ensemble_run), *map(str, files), "--uncertainty", "ensemble"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["uncertainty"]["method"] == "ensemble" and row["uncertainty"]["passes"] == 2
        assert isinstance(row["refer"], bool)
        assert row["uncertainty"]["mutual_information"] >= 0
    # the refer flag is exactly the card's rule (and an input judged out of domain is always referred)
    predictor = Predictor.from_run(ensemble_run)
    t = predictor.card.refer["thresholds"]["ensemble"]
    assert [r["refer"] for r in rows] == [not r["in_domain"] or r["uncertainty"]["decision_entropy"] > t
                                          for r in rows]


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


def test_ensemble_resume_after_an_interruption_and_on_a_finished_run(cxr_tiny, ensemble_run, tmp_path, monkeypatch):
    """`--ensemble 2` interrupted while member 1 writes its epoch-2 checkpoint, then `--resume`: member 0 is
    loaded (not retrained), member 1 continues from its own epoch-1 checkpoint, and the ensemble ends with the
    weights of the uninterrupted run. `--resume` on the finished run changes nothing."""
    import medlens.train as train_mod

    real_save = train_mod.torch.save
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # member 0: epochs 1, 2; member 1: epoch 1, then epoch 2 before its atomic rename
            raise KeyboardInterrupt

    run = tmp_path / "ens"
    members = run / "members"
    monkeypatch.setattr(train_mod.torch, "save", save_then_die)
    assert main(["train", str(cxr_tiny), "--out", str(run), "--recipe", "cxr_cpu", "--ensemble", "2", *FAST]) == 130
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    assert (members / "0" / "model.card.json").exists() and (members / "1" / "last.ckpt").exists()
    assert not (members / "1" / "model.card.json").exists() and not (run / "model.card.json").exists()
    member0 = (members / "0" / "model.safetensors").stat().st_mtime_ns

    assert main(["train", str(cxr_tiny), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "ensemble member 1/2: already trained" in (run / "train.log").read_text()
    assert (members / "0" / "model.safetensors").stat().st_mtime_ns == member0  # not retrained
    assert "at epoch 1" in (members / "1" / "train.log").read_text()  # resumed from its own checkpoint
    expected = read_card(ensemble_run)
    for k in (0, 1):
        assert read_card(members / str(k))["weights_sha256"] == read_card(ensemble_run / "members" / str(k))[
            "weights_sha256"], k
    card = read_card(run)
    assert card["model_name"] == "ensemble" and card["weights_sha256"] == expected["weights_sha256"]
    assert card["metrics"]["ensemble"] == expected["metrics"]["ensemble"]

    assert main(["train", str(cxr_tiny), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert (run / "train.log").read_text().count("already trained") == 3  # member 0 once, then both
    again = read_card(run)
    assert again["weights_sha256"] == expected["weights_sha256"] and again["threshold"] == card["threshold"]
