"""Out-of-domain refusal (issue 8): the DICOM metadata gate, the content gate, the learned in-domain score and the
output contract of ``Predictor.predict`` (label null, refer true, the reason in words, the probability kept for
research use). The out-of-domain inputs come from ``helpers.ood_fixture`` (real CT / MR DICOM, BreastMNIST
ultrasound, synthetic blank / noise / tiny images, inverted and rotated Kermany X-rays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refers_share, copy_run, ood_fixture, require_shared, validation_halves

from medlens.data.readers import read_image
from medlens.domain import SIDECAR, content_reason, metadata_reason
from medlens.inference import Predictor
from medlens.models.card import update_card

pytestmark = pytest.mark.usefixtures("medlens_cache")


@pytest.fixture(scope="module")
def ood(tmp_path_factory) -> dict[str, list[Path]]:
    return ood_fixture(require_shared(), tmp_path_factory.mktemp("ood"))


def _kermany_test(cxr_tiny: Path) -> list[Path]:
    return sorted((cxr_tiny / "test").glob("*/*"))


def test_metadata_gate_names_the_modality_and_passes_chest_radiographs():
    dicom = require_shared("dicom")
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")):
        _, meta = read_image(dicom / name)
        reason = metadata_reason(meta)
        assert reason == f"modality {modality} is not one this model was validated on (CR, DX)"
    for path in sorted(dicom.glob("*.dcm")):
        if path.name.startswith(("RG1", "siim")):
            _, meta = read_image(path)
            assert metadata_reason(meta) is None, path.name
    chest = {"format": "dicom", "modality": "CR", "photometric": "MONOCHROME2"}
    assert metadata_reason(chest) is None
    assert "body part examined KNEE" in metadata_reason({**chest, "body_part": "KNEE"})
    assert "view position LL" in metadata_reason({**chest, "view_position": "LL"})
    assert "photometric interpretation RGB" in metadata_reason({**chest, "photometric": "RGB"})
    assert "pixel spacing 3 x 3 mm" in metadata_reason({**chest, "pixel_spacing": [3.0, 3.0]})
    assert metadata_reason({**chest, "pixel_spacing": [0.14, 0.14]}) is None
    assert metadata_reason({**chest, "modality": "MG"}, {"modalities": ["MG"]}) is None  # the card's list rules


def test_content_gate_refuses_blank_noise_and_tiny_and_passes_real_xrays(ood, kermany):
    reasons = {p.stem: content_reason(read_image(p)[0]) for p in ood["synthetic_content"]}
    assert "blank or nearly uniform" in reasons["synthetic_content-blank"]
    assert "blank or nearly uniform" in reasons["synthetic_content-white"]
    assert "blank or nearly uniform" in reasons["synthetic_content-near_constant"]
    assert "looks like noise" in reasons["synthetic_content-uniform_noise"]
    assert "looks like noise" in reasons["synthetic_content-gaussian_noise"]
    assert "1x1 px" in reasons["synthetic_content-one_pixel"]
    assert "40x40 px" in reasons["synthetic_content-tiny_40px"]
    for p in ood["breast"]:
        assert "28x28 px" in content_reason(read_image(p)[0])
    xrays = sorted((kermany / "test" / "NORMAL").iterdir())[:25] + sorted((kermany / "test" / "PNEUMONIA").iterdir())[:25]
    assert [p.name for p in xrays if content_reason(read_image(p)[0])] == []


def test_predict_refuses_out_of_domain_inputs_and_answers_chest_xrays(tiny_run, cxr_tiny, ood):
    predictor = Predictor.from_run(tiny_run)
    ood_paths = ood["dicom"] + ood["synthetic_content"] + ood["breast"]
    results = {Path(r["path"]).name: r for r in predictor.predict(ood_paths)}
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")):
        r = results[name]
        assert r["in_domain"] is False and f"modality {modality}" in r["domain_reason"]
    for r in results.values():
        assert r["in_domain"] is False, r
        assert r["label"] is None and r["positive"] is None and r["refer"] is True
        assert r["refer_reason"] == f"not assessable: {r['domain_reason']}"
        assert 0.0 <= r["probability"] <= 1.0 and "research use only" in r["probability_note"]
        assert isinstance(r["domain_score"], float)  # the learned score is reported even when a gate refused
    json.dumps(list(results.values()), allow_nan=False)

    xrays = predictor.predict(_kermany_test(cxr_tiny))
    passed = [r for r in xrays if r["in_domain"]]
    # The tiny run (32 px, 2 epochs) sets its threshold on 30 validation images (the 99 % quantile is their
    # maximum) and the Kermany test split is shifted from train: 35 of these 40 pass (the real run: see
    # bench/results/domain-kermany.json).
    assert len(passed) >= 0.85 * len(xrays), [r["domain_reason"] for r in xrays if not r["in_domain"]]
    threshold = predictor.card.domain["score"]["threshold"]
    for r in xrays:  # real X-rays pass the metadata and content gates: the learned score decides, by its threshold
        assert r["in_domain"] == (r["domain_score"] <= threshold + 1e-3), r
    for r in passed:
        assert r["label"] in ("NORMAL", "PNEUMONIA") and r["domain_reason"] is None
        assert isinstance(r["domain_score"], float) and r["probability_note"] is None


def _features(predictor: Predictor, paths: list[str]) -> np.ndarray:
    """Pooled penultimate features written out here: global average of forward_features on network input."""
    from medlens.models.card import normalize_batch

    x = torch.cat([predictor.prepare(read_image(p)[0]) for p in paths])
    with torch.no_grad():
        f = predictor.model.forward_features(normalize_batch(x, predictor.card.intensity))
    return f.mean(dim=(2, 3)).double().numpy()


def test_learned_threshold_is_the_coverage_quantile_of_held_apart_validation(tiny_run, cxr_tiny):
    from safetensors.numpy import load_file

    card = json.loads((tiny_run / "model.card.json").read_text())
    score = card["domain"]["score"]
    assert score["coverage"] == 0.99 and score["data"] == "held-apart validation half"
    arrays = load_file(str(tiny_run / SIDECAR))
    mean, precision = arrays["mean"], arrays["precision"]
    assert mean.shape == (score["dim"],) and precision.shape == (score["dim"], score["dim"]) and score["dim"] <= 256
    calib = validation_halves(tiny_run, cxr_tiny)["calib"]["paths"]
    assert score["n_val"] == len(calib) == card["refer"]["n"]
    d = _features(Predictor.from_run(tiny_run), calib) - mean
    distances = np.sqrt(np.einsum("ij,jk,ik->i", d, precision, d))
    assert_refers_share(distances, score["threshold"], 0.99, tol=1e-3)


def test_a_card_without_a_domain_section_keeps_the_gates_and_recalibrate_fits_the_score(tiny_run, cxr_tiny, ood,
                                                                                         tmp_path):
    from medlens.train import recalibrate

    run = copy_run(tiny_run, tmp_path / "run")
    original = json.loads((run / "model.card.json").read_text())
    update_card(run, lambda card: setattr(card, "domain", {}))
    (run / SIDECAR).unlink()
    predictor = Predictor.from_run(run)
    ct, xray = predictor.predict([ood["dicom"][0], _kermany_test(cxr_tiny)[0]])
    assert ct["in_domain"] is False and "modality CT" in ct["domain_reason"] and ct["label"] is None
    assert xray["in_domain"] is True and xray["domain_score"] is None and "no learned in-domain score" in xray[
        "domain_note"]

    card = recalibrate(run, cxr_tiny, progress=False)
    assert card.domain["score"]["threshold"] == pytest.approx(original["domain"]["score"]["threshold"], rel=1e-6)
    assert card.policy_changes[-1]["changed"] is True  # the domain policy is part of the policy hash
    assert Predictor.from_run(run).predict([_kermany_test(cxr_tiny)[0]])[0]["domain_score"] is not None


def test_a_changed_sidecar_is_refused(tiny_run, tmp_path):
    from medlens.errors import DataError

    run = copy_run(tiny_run, tmp_path / "run")
    (run / SIDECAR).write_bytes((run / SIDECAR).read_bytes() + b" ")
    with pytest.raises(DataError, match="does not match its model card"):
        Predictor.from_run(run)


def test_the_learned_score_refuses_above_its_threshold_and_says_so():
    from medlens.domain import DomainGate

    gate = DomainGate({"score": {"threshold": 5.0, "coverage": 0.99}}, np.zeros(2), np.eye(2))
    assert gate.combine(None, 4.9) == {"in_domain": True, "domain_score": 4.9, "domain_reason": None}
    out = gate.combine(None, 5.1)
    assert out["in_domain"] is False and "unlike the training images (in-domain distance 5.1 > 5.0" in out[
        "domain_reason"]
    assert gate.combine("modality CT ...", 1.0)["domain_reason"] == "modality CT ..."  # the gates speak first
    no_score = DomainGate({}).combine(None, None)
    assert no_score["in_domain"] is True and no_score["domain_score"] is None and "no learned" in no_score["domain_note"]


def test_prediction_and_domain_score_share_one_forward_pass(tiny_run, cxr_tiny):
    """The service predicts and scores each batch with one pass through the network (a second pass for the
    in-domain features doubled the model's cost per request), and the results equal the two separate calls."""
    import torch

    from medlens.data.readers import read_image
    from medlens.inference import Predictor

    predictor = Predictor.from_run(tiny_run, device="cpu")
    assert predictor.gate is not None and predictor.gate.has_score
    files = sorted((cxr_tiny / "test").rglob("*.jpeg"))[:6]
    images = torch.cat([predictor.prepare(read_image(f)[0]) for f in files])
    calls = []
    real = predictor.model.forward_features

    def counted(x):
        calls.append("features")
        return real(x)

    predictor.model.forward_features = counted
    try:
        one = predictor.predict_and_score(images, "softmax")
    finally:
        del predictor.model.forward_features
    assert calls.count("features") == 1  # one pass over the batch: logits and features together
    separate = predictor.predict_with_uncertainty(images, "softmax")
    scores = predictor.gate.scores(predictor.model, images, predictor.card.intensity)
    np.testing.assert_allclose(one["probability"], separate["probability"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(one["domain_score"], scores, rtol=1e-6)
    np.testing.assert_array_equal(one["refer"], separate["refer"])


@pytest.mark.parametrize("shape", [(64, 80), (1100, 700)])  # the second is strided (step 2) before it is measured
def test_neighbour_correlation_is_the_pearson_correlation_of_neighbours(shape):
    from medlens.domain import neighbour_correlation

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.random(shape, dtype=np.float32), axis=1)
    smooth = (smooth / smooth.max()).astype(np.float32)
    for image in (smooth, rng.random(shape, dtype=np.float32), np.full(shape, 0.5, np.float32)):
        step = max(1, max(shape) // 512)
        x = image[::step, ::step].astype(np.float64)
        pairs = [(x[:, :-1].ravel(), x[:, 1:].ravel()), (x[:-1, :].ravel(), x[1:, :].ravel())]
        expected = np.mean([1.0 if a.std() == 0 or b.std() == 0 else np.corrcoef(a, b)[0, 1] for a, b in pairs])
        assert neighbour_correlation(image) == pytest.approx(expected, abs=1e-9)
