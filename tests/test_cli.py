"""End to end through the `medlens` command: train -> evaluate -> predict on real chest X-rays, and every bad
input the user can give, each answered with one clear message and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import FAST, copy_run, link_subset, read_card, train
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medlens.cli import main

pytestmark = pytest.mark.usefixtures("medlens_cache")

# Older names, imported by other test files (test_service_*, test_viewer_browser): use helpers instead.
_link_subset = link_subset
__all__ = ["FAST", "_link_subset"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_train_writes_a_complete_run(tiny_run):
    for name in ("config.yaml", "split.json", "metrics.jsonl", "train.log", "model.safetensors",
                 "model.card.json", "last.ckpt", "val_predictions.csv"):
        assert (tiny_run / name).exists(), name
    split = json.loads((tiny_run / "split.json").read_text())
    assert split["hash"] and not set(split["train"]["patients"]) & set(split["val"]["patients"])
    assert split["test"]["n"] == 40  # the test folder is listed but never loaded for training
    epochs = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    card = json.loads((tiny_run / "model.card.json").read_text())
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"] and card["input_size"] == 32
    assert 0 < card["threshold"] < 1 and "sensitivity" in card["threshold_policy"]
    assert card["weights_sha256"] and card["model_id"].startswith("seed_cnn-")
    assert card["cam_layer"] == "features"  # the explainers' target layer comes from the card


def test_evaluate_writes_metrics_with_intervals_and_report(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["evaluate", str(run), "--data", str(cxr_tiny), "--split", "test",
                 "--bootstrap", "200", "--no-progress"]) == 0
    out = run / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 40
    card = read_card(run)
    assert metrics["threshold"] == pytest.approx(card["threshold"])  # chosen on val, applied unchanged
    for key in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "pr_auc", "ece"):
        m = metrics[key]  # 20 + 20 test images: every metric is defined
        assert np.isfinite([m["value"], m["ci_low"], m["ci_high"]]).all(), key
        assert m["ci_low"] <= m["value"] + 1e-9 and m["value"] <= m["ci_high"] + 1e-9, key
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "not for diagnostic use" in html.lower()
    # Kermany file names carry the pneumonia subtype: the report has bacterial vs viral sensitivity.
    assert set(metrics["subgroups"]["sensitivity by pneumonia subtype"]) <= {"bacteria", "virus"}
    assert "auc" in capsys.readouterr().out
    # trust: every uncertainty method of this model, faithfulness on a sample, both reliability diagrams
    assert set(metrics["uncertainty"]["methods"]) == {"softmax", "mc", "tta"}
    assert metrics["faithfulness"]["n"] == 40 and metrics["lung_energy"] is None
    # the run's temperature was fitted (on the held-apart half of validation), so the report shows both
    # reliability diagrams and the calibration summary
    assert card["metrics"]["calibration"]["n"] > 0 and card["temperature"] != 1.0
    assert metrics["calibration"]["temperature"] == pytest.approx(card["temperature"], abs=1e-4)
    for section in ("Uncertainty and referral", "Explanations", "Reliability diagram before scaling"):
        assert section in html, section
    # the card records the evaluation; the weights (and so the model id) are untouched
    card_after = read_card(run)
    assert card_after["evaluations"]["test"]["n"] == 40
    assert card_after["evaluations"]["test"]["auc"] == pytest.approx(metrics["auc"]["value"])
    from medlens.models.card import load_checkpoint

    _, loaded = load_checkpoint(run)  # verifies the weights' sha256 against the card
    assert loaded.model_id == f"seed_cnn-{loaded.weights_sha256[:12]}"
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header.startswith("path,label,probability,predicted,uncertainty_softmax,uncertainty_mc,uncertainty_tta")


def test_evaluate_with_lung_masks_reports_cam_energy(tiny_run, cxr_tiny, shared_data, tmp_path, capsys):
    masks = shared_data / "segmentation"
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["evaluate", str(run), "--data", str(cxr_tiny), "--masks", str(masks),
                 "--bootstrap", "50", "--no-progress"]) == 0
    lung = json.loads((run / "eval" / "test" / "metrics.json").read_text())["lung_energy"]
    assert lung["n"] + lung["flat_maps"] + len(lung["skipped"]) == 192
    assert "Do the maps fall on the lungs" in (run / "eval" / "test" / "report.html").read_text()


def test_evaluate_on_the_runs_own_validation_split(tiny_run, cxr_tiny, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["evaluate", str(run), "--data", str(cxr_tiny), "--split", "val", "--bootstrap", "50",
                 "--no-trust", "--no-progress"]) == 0
    split = json.loads((run / "split.json").read_text())
    assert json.loads((run / "eval" / "val" / "metrics.json").read_text())["n"] == split["val"]["n"]
    other = tmp_path / "other"
    link_subset(cxr_tiny, other, {"train": 40, "test": 20})  # different data: a different split
    assert main(["evaluate", str(run), "--data", str(other), "--split", "val", "--no-progress"]) == 2
    assert "differs from the run's split.json" in _err(capsys)


def test_predict_prints_one_json_per_file(tiny_run, kermany, shared_data, capsys):
    jpeg = sorted((kermany / "test" / "PNEUMONIA").iterdir())[0]
    dicom = shared_data / "dicom" / "RG1_J2KI.dcm"
    assert main(["predict", str(tiny_run), str(jpeg), str(dicom)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in lines] == [str(jpeg), str(dicom)]
    card = json.loads((tiny_run / "model.card.json").read_text())
    assert lines[0]["in_domain"] is True  # a Kermany test X-ray; the adult CR film may be judged out of domain
    for r in lines:
        assert 0 <= r["probability"] <= 1 and r["threshold"] == pytest.approx(card["threshold"], abs=1e-6)
        if r["in_domain"]:
            assert r["label"] == ("PNEUMONIA" if r["probability"] >= r["threshold"] else "NORMAL")
        else:  # not assessable (medlens.domain): no label, referred, the reason in words
            assert r["label"] is None and r["refer"] is True and r["refer_reason"].startswith("not assessable: ")
        assert r["model_id"] == card["model_id"]


@pytest.mark.parametrize(("method", "passes"), [("mc", 20), ("tta", 8)])
def test_predict_with_uncertainty_adds_the_spread(tiny_run, kermany, capsys, method, passes):
    files = [str(p) for p in sorted((kermany / "test" / "PNEUMONIA").iterdir())[:3]]
    assert main(["predict", str(tiny_run), *files, "--uncertainty", method]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    for r in lines:
        u = r["uncertainty"]
        assert u["method"] == method and u["passes"] == passes
        assert 0 <= u["predictive_entropy"] <= np.log(2) + 1e-6 and u["variance"] >= 0
        assert u["mutual_information"] <= u["predictive_entropy"] + 1e-6
    assert any(r["uncertainty"]["variance"] > 0 for r in lines)  # the passes really differ


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "occlusion"])
def test_explain_writes_an_overlay_at_the_image_size(tiny_run, kermany, tmp_path, capsys, method):
    from PIL import Image

    src = sorted((kermany / "test" / "PNEUMONIA").iterdir())[0]
    out = tmp_path / f"{method}.png"
    assert main(["explain", str(tiny_run), str(src), "--method", method, "--out", str(out), "--array"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["overlay"] == str(out)
    # the explained class is the label shown at the operating threshold
    assert info["explained_class"] == ("PNEUMONIA" if info["probability"] >= info["threshold"] else "NORMAL")
    picture = np.asarray(Image.open(out))
    assert picture.shape == (*np.asarray(Image.open(src)).shape[:2], 3)
    assert np.abs(picture[..., 0].astype(int) - picture[..., 2].astype(int)).mean() > 1  # coloured, not grey
    cam = np.load(out.with_suffix(".npy"))
    assert cam.shape == (32, 32) and 0 <= cam.min() and cam.max() <= 1


def test_explain_unknown_method_is_one_message(tiny_run, kermany, tmp_path, capsys):
    src = sorted((kermany / "test" / "NORMAL").iterdir())[0]
    assert main(["explain", str(tiny_run), str(src), "--method", "gradcamm", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown explanation method 'gradcamm'" in _err(capsys)


def test_same_seed_on_cpu_gives_identical_weights(cxr_tiny, tmp_path, tiny_run):
    run = tmp_path / "again"
    b = train(cxr_tiny, run)
    assert (run / "metrics.jsonl").read_text().count("val_auc") == 2
    first = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["val_auc"], e["train_loss"]) for e in first] == [(e["val_auc"], e["train_loss"]) for e in again]
    a = read_card(tiny_run)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert (a["temperature"], a["threshold"], a["refer"]) == (b["temperature"], b["threshold"], b["refer"])


def test_resume_after_interruption_matches_an_uninterrupted_run(cxr_tiny, tmp_path, tiny_run, monkeypatch):
    import medlens.train as train_mod

    real_save = train_mod.torch.save
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            # The machine goes away while epoch 2's checkpoint is being written (before its atomic rename).
            raise KeyboardInterrupt

    run = tmp_path / "resumed"
    monkeypatch.setattr(train_mod.torch, "save", save_then_die)
    assert main(["train", str(cxr_tiny), "--out", str(run), "--recipe", "cxr_cpu", *FAST]) == 130
    assert not (run / "model.card.json").exists()
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    assert main(["train", str(cxr_tiny), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "resumed from" in (run / "train.log").read_text() and "at epoch 1" in (run / "train.log").read_text()
    # the same weights, bit for bit, as the uninterrupted run with the same seed (CPU training is deterministic:
    # test_same_seed_on_cpu_gives_identical_weights), and one line per epoch in metrics.jsonl
    assert read_card(run)["weights_sha256"] == read_card(tiny_run)["weights_sha256"]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("seed_cnn", "seed_resnet", "seed_cbam", "densenet121", "resnet18", "resnet50", "efficientnet_b0"):
        assert name in out


# ---------------------------------------------------------------- bad input: one message, exit != 0


def _dicom_without_pixels(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR: no image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientID, ds.Modality = "X", "SR"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _bad_files(tmp: Path, kermany: Path) -> dict[str, tuple[Path, str]]:
    good = sorted((kermany / "test" / "NORMAL").iterdir())[0].read_bytes()
    truncated = tmp / "truncated.jpeg"
    truncated.write_bytes(good[: len(good) // 3])
    empty = tmp / "empty.png"
    empty.write_bytes(b"")
    text = tmp / "notes.png"
    text.write_text("this is a note, not an image\n")
    return {
        "truncated": (truncated, "truncated"),
        "empty": (empty, "empty"),
        "text": (text, "not an image"),
        "no_pixels": (_dicom_without_pixels(tmp / "report.dcm"), "no pixel data"),
    }


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "no_pixels"])
def test_predict_bad_file_names_file_and_problem(tiny_run, kermany, tmp_path, capsys, kind):
    path, problem = _bad_files(tmp_path, kermany)[kind]
    assert main(["predict", str(tiny_run), str(path)]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(path) and path.name in result["error"] and problem in result["error"].lower()


def test_unreadable_images_in_a_folder_are_skipped_and_listed_or_fatal_with_strict(
        cxr_tiny, kermany, tmp_path, capsys):
    data = tmp_path / "data"
    link_subset(cxr_tiny, data, {"train": 60})
    bad = _bad_files(tmp_path, kermany)
    for kind in ("truncated", "text"):
        target = data / "train" / "NORMAL" / f"bad_{bad[kind][0].name}"
        target.write_bytes(bad[kind][0].read_bytes())
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--recipe", "cxr_cpu", *FAST]) == 0
    err = _err(capsys)
    assert "skipped 2 unreadable" in err and "bad_truncated.jpeg" in err and "bad_notes.png" in err
    assert len((run / "skipped.txt").read_text().splitlines()) == 2
    assert main(["train", str(data), "--out", str(tmp_path / "strict"), "--recipe", "cxr_cpu", "--strict",
                 *FAST]) == 2
    err = _err(capsys)
    assert "bad_truncated.jpeg" in err or "bad_notes.png" in err


def _one_class_tree(tmp: Path, kermany: Path, empty_second: bool) -> Path:
    root = tmp / "tree"
    (root / "NORMAL").mkdir(parents=True)
    for f in sorted((kermany / "train" / "NORMAL").iterdir())[:5]:
        (root / "NORMAL" / f.name).symlink_to(f)
    if empty_second:
        (root / "PNEUMONIA").mkdir()
    return root


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "model.name=resnet_9000"], "unknown model 'resnet_9000'"),
        (["--recipe", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
        (["--set", "train.epochz=3"], "unknown config key 'train.epochz'"),
        (["--set", "train.epochs=many"], "train.epochs"),
        (["--set", "model.args.depth=3"], "has no option 'depth'"),
    ],
)
def test_config_mistakes_are_one_clear_message(cxr_tiny, tmp_path, capsys, args, expected):
    code = main(["train", str(cxr_tiny), "--out", str(tmp_path / "r"), "--recipe", "cxr_cpu", "--no-progress",
                 *args]) if "--recipe" not in args else main(
        ["train", str(cxr_tiny), "--out", str(tmp_path / "r"), "--no-progress", *args])
    assert code == 2
    err = _err(capsys)
    assert expected in err and err.startswith("medlens: error:")


@pytest.mark.parametrize(("empty_second", "expected"), [(True, "contains no images"), (False, "only one class")])
def test_folder_structure_mistakes(kermany, tmp_path, capsys, empty_second, expected):
    root = _one_class_tree(tmp_path, kermany, empty_second)
    assert main(["train", str(root), "--out", str(tmp_path / "r"), "--recipe", "cxr_cpu", *FAST]) == 2
    err = _err(capsys)
    assert expected in err and str(root) in err


def test_missing_data_path_says_what_to_give(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert "nowhere" in err and "does not exist" in err


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path, cxr_tiny, capsys):
    assert main(["evaluate", str(tmp_path), "--data", str(cxr_tiny)]) == 2
    assert "not a medlens run directory" in _err(capsys)


def test_main_job_offline_without_data_says_exactly_what_to_do(tmp_path, monkeypatch, capsys):
    """No --data, no env var, no local copy, no cache, no network: one message with the three ways out."""
    import medlens.data.download as download

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(download, "_shared_data_roots", lambda search_from: [])  # as on a user's machine
    monkeypatch.setenv("MEDLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDLENS_OFFLINE", "1")
    for var in ("MEDLENS_DATA", "MEDLENS_DATA_CHEST_XRAY"):
        monkeypatch.delenv(var, raising=False)
    assert main(["run"]) == 2
    err = _err(capsys)
    assert err.count("medlens: error:") == 1
    assert "--data" in err and "MEDLENS_DATA" in err and "medlens data fetch chest_xray" in err


def test_data_list_names_the_public_data_sets(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "chest_xray" in out and "pneumoniamnist" in out


def test_temperature_is_fitted_on_held_apart_validation_and_reported_on_test(cxr_tiny, tiny_run, tmp_path, capsys):
    data = cxr_tiny
    run = copy_run(tiny_run, tmp_path / "run")
    card = read_card(run)
    cal = card["metrics"]["calibration"]
    split = json.loads((run / "split.json").read_text())
    # half of the validation images fit the temperature; the other half chose the epoch and the threshold
    assert cal["n"] >= 20 and cal["n"] + card["metrics"]["val"]["n"] == split["val"]["n"]
    assert card["temperature"] == pytest.approx(cal["temperature"]) and card["temperature"] != 1.0
    assert cal["nll_after"] <= cal["nll_before"] + 1e-6  # what the fit minimises (ECE need not fall on 30 images)
    assert main(["evaluate", str(run), "--data", str(data), "--bootstrap", "50", "--no-trust", "--no-progress"]) == 0
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())["calibration"]
    worse = test["ECE with scaling"] > test["ECE without scaling"]
    assert ("WORSE" in test["verdict"]) == worse
    assert "calibration" in (run / "eval" / "test" / "report.html").read_text().lower()
