"""Trust: temperature scaling, MC dropout / TTA / ensembles, uncertainty summaries, referral, calibration split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medlens.errors import DataError
from medlens.inference import predict_logits, probabilities
from medlens.metrics import expected_calibration_error
from medlens.models import create_model
from medlens.uncertainty import (
    TEMPERATURE_BOUNDS,
    calibration_split,
    choose_refer_threshold,
    ensemble_logits,
    fit_temperature,
    is_dropout,
    mc_dropout_logits,
    member_probabilities,
    selective_curve,
    selective_gain,
    summarise,
    tta_logits,
)


# ------------------------------------------------------------------------------------------ fixtures
def _calibrated(n: int, seed: int, c: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, y


class TinyNet(nn.Module):
    """Conv-BN-ReLU-GAP-Dropout-Linear: the shape of the seed CNNs, small enough for a 2-core CI box."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = (0.2 + 0.5 * xx * (1 - yy))[None, None]
    x = (base + 0.2 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def _normalised(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def _warm_bn(model: nn.Module) -> None:
    """Give BN non-trivial running statistics, as a trained model has."""
    model.train()
    with torch.no_grad():
        model(_normalised(16) * 2 + 1)
    model.eval()


# ------------------------------------------------------------------------------------------ temperature
@pytest.mark.parametrize("true_t", [2.5, 0.5])
def test_temperature_recovers_the_scaling_of_a_calibrated_model(true_t):
    z, y = _calibrated(20000, seed=1)
    fitted = fit_temperature(z * true_t, y)
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_calibrated_logits_give_temperature_near_one_and_numpy_input_works():
    z, y = _calibrated(20000, seed=2)
    assert fit_temperature(z.numpy().astype(np.float32), y.numpy()) == pytest.approx(1.0, rel=0.05)


def test_temperature_lowers_ece_on_held_out_data():
    z, y = _calibrated(8000, seed=3)
    z = z * 3.0  # an over-confident model
    fit_z, fit_y, test_z, test_y = z[:4000], y[:4000], z[4000:], y[4000:]
    t = fit_temperature(fit_z, fit_y)
    before = expected_calibration_error(test_y.numpy(), probabilities(test_z.float())[:, 1])
    after = expected_calibration_error(test_y.numpy(), probabilities(test_z.float(), t)[:, 1])
    assert after < 0.5 * before and after < 0.03


def test_temperature_is_bounded_for_useless_logits():
    z, y = _calibrated(1000, seed=4)
    assert fit_temperature(-z, y) == pytest.approx(TEMPERATURE_BOUNDS[1])  # anti-informative: flattest allowed
    assert TEMPERATURE_BOUNDS[0] <= fit_temperature(z * 1e-4, y) <= TEMPERATURE_BOUNDS[1]


def test_temperature_refuses_one_class_or_too_few_cases():
    z, y = _calibrated(100, seed=5)
    with pytest.raises(DataError, match="both classes"):
        fit_temperature(z, torch.ones(100, dtype=torch.int64))
    with pytest.raises(DataError, match="at least 20"):
        fit_temperature(z[:19], y[:19])
    with pytest.raises(ValueError):
        fit_temperature(z, y[:50])


# ------------------------------------------------------------------------------------------ MC dropout
def test_mc_dropout_varies_keeps_bn_statistics_and_restores_modes():
    model = TinyNet(0.5)
    _warm_bn(model)
    model.train()  # the caller's mode, restored afterwards
    bn_before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    rng_before = torch.get_rng_state()
    out = mc_dropout_logits(model, _normalised(), n=10, seed=0)
    assert out.shape == (10, 6, 2) and out.dtype == torch.float32
    assert out.std(dim=0).mean() > 1e-3  # the passes differ
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, bn_before[k]), k  # BN ran in eval mode: running stats untouched
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched


def test_mc_dropout_uses_bn_running_statistics():
    """Eval-mode BN: a single image gives the same prediction alone or inside a batch (p=0, so no dropout noise)."""
    model = TinyNet(0.0)
    _warm_bn(model)
    x = _normalised()
    with pytest.warns(UserWarning, match="no dropout with p > 0"):
        alone = mc_dropout_logits(model, x[:1], n=1)
        batch = mc_dropout_logits(model, x, n=1)
    assert torch.allclose(alone[0, 0], batch[0, 0], atol=1e-5)


def test_mc_dropout_restores_modes_after_an_exception():
    model = TinyNet(0.5)
    model.eval()
    with pytest.raises(RuntimeError):
        mc_dropout_logits(model, torch.zeros(2, 3, 16, 16), n=2)  # 3 channels: the conv raises
    assert not any(m.training for m in model.modules())
    model.train()
    with pytest.raises(RuntimeError):
        mc_dropout_logits(model, torch.zeros(2, 3, 16, 16), n=2)
    assert all(m.training for m in model.modules())


def test_mc_dropout_with_p_zero_gives_identical_passes_equal_to_eval():
    model = TinyNet(0.0)
    _warm_bn(model)
    x = _normalised()
    with pytest.warns(UserWarning):
        out = mc_dropout_logits(model, x, n=4)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[3])
    with torch.no_grad():
        assert torch.allclose(out[0], model.eval()(x), atol=1e-6)


def test_mc_dropout_is_reproducible_by_seed():
    model = TinyNet(0.5)
    x = _normalised()
    a = mc_dropout_logits(model, x, n=5, seed=7)
    b = mc_dropout_logits(model, x, n=5, seed=7)
    c = mc_dropout_logits(model, x, n=5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mc_dropout_on_a_registered_model_with_uint8_images():
    model = create_model("seed_cnn", widths=[4, 8], dropout=0.5).eval()
    images = _images(4, 16)
    out = mc_dropout_logits(model, images, n=3, intensity="per_image_zscore")
    assert out.shape == (3, 4, 2) and not torch.equal(out[0], out[1])
    assert not model.training and not model.dropout.training


def test_is_dropout_finds_torch_and_named_dropout_layers_only():
    class DropPath(nn.Module):
        pass

    assert is_dropout(nn.Dropout(0.1)) and is_dropout(nn.Dropout2d()) and is_dropout(nn.AlphaDropout())
    assert is_dropout(DropPath())
    assert not is_dropout(nn.BatchNorm2d(3)) and not is_dropout(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ TTA
def test_tta_first_pass_is_plain_prediction_and_others_differ():
    model = create_model("seed_cnn", widths=[4, 8], dropout=0.5)
    model.train()
    images = _images(5, 32)
    out = tta_logits(model, images, n=4, intensity="per_image_zscore", seed=0)
    assert out.shape == (4, 5, 2)
    assert model.training  # mode restored
    plain = predict_logits(model, images, intensity="per_image_zscore")
    assert torch.allclose(out[0], plain, atol=1e-6)  # identity first, eval mode (no dropout)
    for k in range(1, 4):
        assert not torch.allclose(out[k], plain, atol=1e-5)
    again = tta_logits(model, images, n=4, intensity="per_image_zscore", seed=0)
    assert torch.equal(out, again)


class LeftRight(nn.Module):
    """Logit of 'finding on the left' = 10 x (mean of the left half - mean of the right half), unit-range input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        w = x.shape[-1] // 2
        d = self.scale * (x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3)))
        return torch.stack([-d, d], dim=1) / 2


def test_tta_augmentations_are_mild_and_never_flip():
    """A left-right finding survives every TTA pass: same class, logit within 25 % (no flips, small geometry)."""
    x = torch.full((8, 1, 32, 32), 0.2)
    x[..., :16] = 0.8
    x = x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    out = tta_logits(LeftRight(), images, n=8, intensity="unit_range", seed=1)
    margin = out[..., 1] - out[..., 0]
    assert (margin > 0).all()
    assert ((margin[1:] - margin[0]).abs() / margin[0]).max() < 0.25
    assert (margin[1:] - margin[0]).abs().max() > 1e-3  # but the passes are not all the identity


# ------------------------------------------------------------------------------------------ ensemble
def test_ensemble_stacks_members_in_eval_mode():
    models = [TinyNet(0.5), create_model("seed_cnn", in_chans=1, widths=[4, 8], dropout=0.5)]
    models[0].train()
    x = _normalised()
    out = ensemble_logits(models, x)
    assert out.shape == (2, 6, 2)
    with torch.no_grad():
        assert torch.allclose(out[1], models[1].eval()(x), atol=1e-6)
    assert models[0].training
    assert torch.equal(ensemble_logits(models, x), ensemble_logits(models, x))  # no dropout noise


# ------------------------------------------------------------------------------------------ summarise
def test_summarise_math_on_hand_made_arrays():
    # case 0: all members say [0.5, 0.5]; case 1: members disagree confidently; case 2: all agree confidently
    p = np.array([
        [[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]],
        [[0.5, 0.5], [0.0, 1.0], [0.9, 0.1]],
    ])
    s = summarise(p)
    assert s["mean_prob"].shape == (3, 2)
    np.testing.assert_allclose(s["mean_prob"][1], [0.5, 0.5])
    np.testing.assert_allclose(s["positive_prob"], [0.5, 0.5, 0.1])
    ln2 = math.log(2)
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(s["predictive_entropy"], [ln2, ln2, h09])
    np.testing.assert_allclose(s["expected_entropy"], [ln2, 0.0, h09], atol=1e-12)  # 0 log 0 = 0
    np.testing.assert_allclose(s["mutual_information"], [0.0, ln2, 0.0], atol=1e-12)  # agree -> MI = 0
    np.testing.assert_allclose(s["positive_variance"], [0.0, 0.25, 0.0], atol=1e-12)


def test_summarise_accepts_torch_and_rejects_logits():
    logits = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    probs = member_probabilities(logits)
    assert probs.shape == (4, 3, 2)
    s = summarise(torch.from_numpy(probs))
    assert (s["mutual_information"] >= 0).all()
    assert (s["predictive_entropy"] <= math.log(2) + 1e-9).all()
    with pytest.raises(ValueError, match="probabilities"):
        summarise(logits)


def test_member_probabilities_apply_the_temperature_through_inference():
    logits = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1))
    got = member_probabilities(logits, temperature=2.0)
    np.testing.assert_allclose(got[2], probabilities(logits[2], 2.0))


# ------------------------------------------------------------------------------------------ referral
def test_refer_threshold_refers_the_chosen_share_of_validation():
    u = np.random.default_rng(0).random(1000)
    t = choose_refer_threshold(u, coverage=0.9)
    assert (u > t).mean() == pytest.approx(0.10, abs=0.002)
    assert (u > choose_refer_threshold(u, coverage=0.8)).mean() == pytest.approx(0.20, abs=0.002)
    assert not (u > choose_refer_threshold(u, coverage=1.0)).any()


def test_refer_threshold_never_refers_more_than_asked_with_ties():
    u = np.array([0.0] * 50 + [1.0] * 50)
    t = choose_refer_threshold(u, coverage=0.9)
    assert (u > t).mean() <= 0.1
    small = np.arange(10.0)  # 85 % coverage of 10 cases: refer 1 (10 %), not 2 (20 %, over the 15 % asked)
    assert (small > choose_refer_threshold(small, coverage=0.85)).sum() == 1


def _selective_data(n: int, seed: int, informative: bool):
    """A classifier that is wrong on ~20 % of cases; the uncertainty is high on the errors if informative."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    wrong = rng.random(n) < 0.2
    pred = np.where(wrong, 1 - y, y)
    prob = np.where(pred == 1, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.5, n))
    u = rng.random(n) + (1.0 * wrong if informative else 0.0)
    return y, prob, u


def test_selective_curve_rises_when_uncertainty_flags_errors():
    y, prob, u = _selective_data(4000, 0, informative=True)
    curve = selective_curve(y, prob, u, 0.5, points=11)
    assert curve["coverage"][0] == 1.0 and curve["coverage"][-1] == pytest.approx(0.5, abs=0.01)
    assert np.all(np.diff(curve["accuracy"]) >= -1e-9)
    assert curve["accuracy"][-1] > curve["accuracy"][0] + 0.1
    assert set(curve) >= {"coverage", "accuracy", "auc", "n", "target_coverage"}
    assert selective_gain(y, prob, u, 0.5, coverage=0.9) > 0.05


def test_selective_gain_is_about_zero_for_random_uncertainty():
    gains = [selective_gain(*_selective_data(4000, s, informative=False), 0.5, coverage=0.9) for s in range(5)]
    assert abs(np.mean(gains)) < 0.01


def test_selective_gain_with_a_validation_threshold():
    y, prob, u = _selective_data(2000, 1, informative=True)
    t = choose_refer_threshold(u[:1000], coverage=0.9)
    assert selective_gain(y[1000:], prob[1000:], u[1000:], 0.5, refer_threshold=t) > 0.05


# ------------------------------------------------------------------------------------------ calibration split
def _val_set(n_patients: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels, pids = [], []
    for p in range(n_patients):
        label = int(p % 3 != 0)  # 2/3 positive patients, as in Kermany
        for _ in range(rng.integers(1, 5)):
            labels.append(label)
            pids.append(f"pat{p:03d}")
    return np.arange(100, 100 + len(labels)), np.array(labels), pids


def test_calibration_split_is_patient_disjoint_stratified_and_complete():
    idx, labels, pids = _val_set()
    select, calib = calibration_split(idx, labels, pids, fraction=0.5, seed=0)
    assert np.array_equal(np.sort(np.concatenate([select, calib])), idx)  # every case once
    pos = {int(i): k for k, i in enumerate(idx)}
    p_sel = {pids[pos[int(i)]] for i in select}
    p_cal = {pids[pos[int(i)]] for i in calib}
    assert not p_sel & p_cal
    assert len(calib) == pytest.approx(0.5 * len(idx), rel=0.15)
    rate = labels.mean()
    for part in (select, calib):
        part_labels = labels[[pos[int(i)] for i in part]]
        assert part_labels.mean() == pytest.approx(rate, abs=0.08)


def test_calibration_split_is_deterministic_and_follows_the_fraction():
    idx, labels, pids = _val_set(seed=1)
    a = calibration_split(idx, labels, pids, fraction=0.3, seed=4)
    b = calibration_split(idx, labels, pids, fraction=0.3, seed=4)
    c = calibration_split(idx, labels, pids, fraction=0.3, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == pytest.approx(0.3 * len(idx), rel=0.2)


def test_calibration_split_small_sets_keep_both_classes_in_both_parts():
    idx, labels, pids = np.arange(4), np.array([0, 0, 1, 1]), ["a", "b", "c", "d"]
    select, calib = calibration_split(idx, labels, pids, fraction=0.9)
    assert set(labels[select]) == {0, 1} and set(labels[calib]) == {0, 1}
    with pytest.raises(DataError, match="at least 2 patients"):
        calibration_split(idx, labels, ["a"] * 4)


# ------------------------------------------------------------------------------- decision uncertainty
def test_decision_uncertainty_is_centred_on_the_operating_threshold():
    from medlens.uncertainty import decision_uncertainty

    p = np.array([0.5, 0.92, 0.99, 0.2])
    probs = np.stack([1 - p, p], axis=-1)[None]  # one pass
    at_half = decision_uncertainty(probs, 0.5)["decision_entropy"]
    np.testing.assert_allclose(at_half, summarise(probs)["predictive_entropy"], atol=1e-9)
    d = decision_uncertainty(probs, 0.92)["decision_entropy"]
    assert d[1] == pytest.approx(np.log(2))  # on the boundary: maximal
    assert d[0] < d[1] and d[2] < d[1]  # 0.5 is a firm NEGATIVE call at threshold 0.92
    assert d[3] < d[0]  # further from the boundary: more certain


def test_decision_mutual_information_is_zero_when_passes_agree():
    from medlens.uncertainty import decision_uncertainty

    same = np.tile(np.array([[0.3, 0.7], [0.1, 0.9]])[None], (4, 1, 1))
    assert np.allclose(decision_uncertainty(same, 0.8)["decision_mutual_information"], 0, atol=1e-9)
    spread = np.array([[[0.5, 0.5]], [[0.01, 0.99]]])
    assert decision_uncertainty(spread, 0.8)["decision_mutual_information"][0] > 0.05
