"""Lung segmentation as a first-class task: data, loss, joint augmentation, metrics, train / evaluate / segment."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.cli import main
from medlens.config import AugmentConfig
from medlens.data.augment import BatchAugment
from medlens.errors import DataError
from medlens.losses import SegmentationLoss
from medlens.metrics import bootstrap_stats
from medlens.seg.data import FOREGROUND, IGNORE, discover_segmentation, read_mask
from medlens.seg.metrics import per_image, postprocess

pytestmark = pytest.mark.usefixtures("medlens_cache")


# ------------------------------------------------------------------ loss, augmentation, metrics (no data needed)


def test_loss_leaves_the_ignore_region_out():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 1, 16, 16))
    target[:, :, :4] = IGNORE
    logits = torch.randn(2, 2, 16, 16)
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 2, 4, 16) * 10  # anything at all inside the ignore region
    loss = SegmentationLoss(2, IGNORE)
    assert loss(changed, target).item() == pytest.approx(loss(logits, target).item(), abs=1e-5)
    outside = logits.clone()
    outside[:, :, 8:] = torch.randn(2, 2, 8, 16) * 10
    assert abs(loss(outside, target).item() - loss(logits, target).item()) > 1e-3


def test_augmentation_moves_image_and_mask_together():
    mask = torch.zeros(8, 1, 64, 64, dtype=torch.uint8)
    mask[:, :, 12:50, 8:28] = FOREGROUND
    mask[:, :, 20:40, 36:56] = IGNORE
    image = (mask == FOREGROUND).float()  # the image is its own mask
    cfg = AugmentConfig(rotate_deg=15, translate=0.1, brightness=0, contrast=0, gamma=0, noise_std=0, p=1.0)
    x, m = BatchAugment(cfg, torch.Generator().manual_seed(0))(image, mask)
    assert m.dtype == torch.uint8 and set(m.unique().tolist()) <= {0, FOREGROUND, IGNORE}
    assert not torch.equal(m, mask), "the geometry must change something"
    moved_image = x > 0.5
    moved_mask = m == FOREGROUND
    iou = (moved_image & moved_mask).sum() / (moved_image | moved_mask).sum()
    assert iou > 0.95, f"image and mask moved differently (IoU {iou:.3f})"


def test_metrics_ignore_region_and_known_distances():
    ref = torch.zeros(1, 64, 64, dtype=torch.long)
    ref[0, 10:40, 10:30] = FOREGROUND
    ref[0, 10:40, 30:34] = IGNORE
    pred = torch.zeros_like(ref)
    pred[0, 10:40, 10:34] = FOREGROUND  # covers the ignore strip too
    m = per_image(pred, ref)
    assert m["dice"][0] == pytest.approx(1.0) and m["iou"][0] == pytest.approx(1.0)
    shifted = torch.zeros_like(ref)
    shifted[0, 13:43, 10:30] = FOREGROUND  # 3 pixels down
    m = per_image(shifted, ref)
    assert m["hd95"][0] == pytest.approx(3.0, abs=0.01)
    assert m["dice"][0] == pytest.approx(2 * 27 * 20 / (2 * 30 * 20), abs=1e-4)
    empty = per_image(torch.zeros_like(ref), ref)
    assert empty["dice"][0] == 0 and np.isnan(empty["hd95"][0])  # no surface: missing, not a number


def test_postprocess_keeps_two_largest_components_and_fills_holes():
    pred = torch.zeros(1, 64, 64, dtype=torch.long)
    pred[0, 5:50, 5:25] = 1
    pred[0, 5:50, 35:60] = 1
    pred[0, 20:24, 10:14] = 0  # a hole
    pred[0, 58:61, 2:5] = 1  # a speck
    out = postprocess(pred, "largest2_fill")
    assert out[0, 59, 3] == 0 and out[0, 21, 11] == 1 and out[0, 30, 15] == 1 and out[0, 30, 40] == 1


def test_patient_bootstrap_is_wider_than_image_bootstrap_when_images_repeat():
    rng = np.random.default_rng(0)
    per_patient = rng.uniform(0.7, 1.0, 20)
    values = np.repeat(per_patient, 5)  # five identical images per patient
    groups = np.repeat(np.arange(20), 5).astype(str).tolist()
    by_patient = bootstrap_stats(values, groups, n_boot=500)
    by_image = bootstrap_stats(values, None, n_boot=500)
    width = lambda s: s["mean"]["ci_high"] - s["mean"]["ci_low"]  # noqa: E731
    assert by_patient["n_units"] == 20 and by_image["n_units"] == 100
    assert width(by_patient) > 1.8 * width(by_image)
    assert by_patient["mean"]["value"] == pytest.approx(values.mean())


# ------------------------------------------------------------------ data


def _tiny_set(root: Path, n: int = 3, manifest: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k in range(n):
        img = np.full((32, 32), 40 * k, dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{k}.png")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        mask[0:2] = 127
        Image.fromarray(mask).save(root / "masks" / f"im{k}.png")
        rows.append({"image": f"images/im{k}.png", "mask": f"masks/im{k}.png", "patientid": f"p{k // 2}"})
    if manifest:
        with (root / "manifest.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "mask", "patientid"])
            w.writeheader()
            w.writerows(rows)
    return root


def test_discovery_reads_patients_and_mask_labels(tmp_path):
    table = discover_segmentation(_tiny_set(tmp_path / "d"))
    assert table.patient_ids == ["p0", "p0", "p1"] and table.patient_id_source == "column"
    labels = read_mask(table.meta[0]["mask"])
    assert (labels[0] == IGNORE).all() and labels[10, 10] == FOREGROUND and labels[30, 30] == 0


def test_discovery_without_manifest_pairs_by_name_and_warns(tmp_path, caplog):
    root = _tiny_set(tmp_path / "d", manifest=False)
    (root / "masks" / "im2.png").unlink()
    table = discover_segmentation(root)
    assert len(table) == 2 and table.patients_per_file
    assert "own patient" in caplog.text and "without a mask" in caplog.text


def test_bad_data_names_the_file(tmp_path, capsys):
    root = _tiny_set(tmp_path / "d")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "im1.png")
    from medlens.seg.data import load_pairs

    with pytest.raises(DataError, match="im1.png.*16x16.*32x32"):
        load_pairs(discover_segmentation(root), [0, 1, 2], 32)
    (root / "masks" / "im0.png").unlink()
    with pytest.raises(DataError, match="line 2: mask .*im0.png does not exist"):
        discover_segmentation(root)
    assert main(["train", str(root), "--out", str(tmp_path / "run"), "--recipe", "lung_unet"]) == 2
    assert "im0.png does not exist" in capsys.readouterr().err


def test_classification_model_on_masks_is_refused(lung_masks, tmp_path, capsys):
    assert main(["train", str(lung_masks), "--out", str(tmp_path / "run"), "--recipe", "cxr_cpu"]) == 2
    assert "segmentation data set" in capsys.readouterr().err


# ------------------------------------------------------------------ a real (small) run


def test_tiny_run_is_a_segmentation_run_split_by_patient(tiny_seg_run, lung_masks):
    card = json.loads((tiny_seg_run / "model.card.json").read_text())
    assert card["task"] == "segmentation" and card["class_names"] == ["background", "lung"]
    assert card["metrics"]["postprocess"]["chosen"] in ("none", "largest2_fill")
    assert card["metrics"]["val"]["dice_mean"] > 0.6, card["metrics"]
    split = json.loads((tiny_seg_run / "split.json").read_text())
    names = ("train", "val", "test")
    for a in names:
        for b in names:
            if a < b:
                assert not set(split[a]["patients"]) & set(split[b]["patients"])
    assert split["test"]["n"] >= 30  # the recipe holds 20% of the patients out for testing


def test_evaluate_writes_metrics_with_patient_intervals_and_a_report(tiny_seg_run, lung_masks, tmp_path, capsys):
    run = shutil.copytree(tiny_seg_run, tmp_path / "run")
    assert main(["evaluate", str(run), "--data", str(lung_masks), "--split", "test", "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "dice" in printed and "hd95" in printed
    out = run / "eval" / "test"
    m = json.loads((out / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert m["n"] == split["test"]["n"] and m["bootstrap"]["unit"] == "patient"
    assert m["bootstrap"]["n_units"] == split["test"]["n_patients"] < m["n"]
    for name in ("dice", "iou", "hd95", "assd"):
        s = m["metrics"][name]
        assert s["mean"]["ci_low"] <= s["mean"]["value"] <= s["mean"]["ci_high"]
    assert m["metrics"]["dice"]["mean"]["value"] > 0.6
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == m["n"]
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(m["metrics"]["dice"]["mean"]["value"], abs=1e-5)
    worst = m["gallery"]["worst"]
    assert len(worst) == 5 and worst[0]["dice"] == pytest.approx(min(float(r["dice"]) for r in rows), abs=1e-6)
    html = (out / "report.html").read_text()
    assert all((out / g["overlay"]).is_file() and g["overlay"] in html for g in worst)
    trace = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert trace[-1]["split"] == "test" and trace[-1]["metrics"]["dice"]["value"] == m["metrics"]["dice"]["mean"]["value"]


def test_evaluate_refuses_data_that_splits_differently(tiny_seg_run, lung_masks, tmp_path, capsys):
    run = shutil.copytree(tiny_seg_run, tmp_path / "run")
    other = tmp_path / "other"
    other.mkdir()
    for sub in ("images", "masks"):
        (other / sub).symlink_to(lung_masks / sub)
    rows = list(csv.DictReader((lung_masks / "manifest.csv").open()))
    with (other / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "mask", "patientid"], extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "patientid": f"x{r['patientid']}"} for r in rows)  # other patient ids
    assert main(["evaluate", str(run), "--data", str(other), "--split", "test"]) == 2
    assert "differs from the run's" in capsys.readouterr().err


def test_segment_writes_masks_overlays_and_lung_area(tiny_seg_run, lung_masks, shared_data, tmp_path, capsys):
    files = [lung_masks / "images" / "00870a9c.jpg", shared_data / "dicom" / "RG1_J2KI.dcm", tmp_path / "nope.png"]
    rc = main(["segment", str(tiny_seg_run), *map(str, files), "--out", str(tmp_path / "out")])
    assert rc == 1  # one file failed, the others were still segmented
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "does not exist" in lines[2]["error"]
    for line, f in zip(lines[:2], files, strict=False):
        mask = np.asarray(Image.open(line["mask"]))
        assert Image.open(line["overlay"]).size == mask.shape[::-1] == tuple(line["size"])
        assert line["lung_area_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
        assert 0.1 < line["lung_area_fraction"] < 0.7, (f, line)
    ref = read_mask(lung_masks / "masks" / "00870a9c.png") == FOREGROUND
    got = np.asarray(Image.open(lines[0]["mask"])) > 0
    assert 2 * (ref & got).sum() / (ref.sum() + got.sum()) > 0.6


def test_predict_on_a_segmentation_run_says_what_to_use(tiny_seg_run, lung_masks, capsys):
    assert main(["predict", str(tiny_seg_run), str(lung_masks / "images" / "00870a9c.jpg")]) == 2
    assert "medlens segment" in capsys.readouterr().err


# ------------------------------------------------------------------ the lung crop of an anatomy-aware classifier


def test_lung_crop_box_holds_the_lungs(tiny_seg_run, lung_masks):
    from medlens.data.readers import read_image
    from medlens.models.card import ModelCard
    from medlens.seg.crop import LungCropper

    card = ModelCard.load(tiny_seg_run / "model.card.json")
    cropper = LungCropper(str(tiny_seg_run), card.weights_sha256, 0.05)
    kept = []
    for name in ("00870a9c", "08d780ae"):
        image, _ = read_image(lung_masks / "images" / f"{name}.jpg")
        top, bottom, left, right = cropper.box(image)
        lungs = read_mask(lung_masks / "masks" / f"{name}.png") == FOREGROUND
        kept.append(lungs[top:bottom, left:right].sum() / lungs.sum())
        assert (bottom - top) * (right - left) < 0.9 * image.size  # it does cut something away
        assert cropper(image).shape == (bottom - top, right - left)
    assert min(kept) > 0.9, kept
    assert cropper.box(np.zeros((256, 256), np.float32)) is None  # no lungs: the image is left whole


def test_lung_crop_run_carries_its_lung_model(tiny_seg_run, cxr_tiny, tmp_path):
    from helpers import train

    from medlens.data.cache import preprocess, preprocess_key
    from medlens.data.readers import read_image
    from medlens.inference import Predictor

    seg_card = json.loads((tiny_seg_run / "model.card.json").read_text())
    card = train(cxr_tiny, tmp_path / "run", "--set", f"data.lung_crop={tiny_seg_run}")
    crop = card["preprocess"]["lung_crop"]
    assert crop["weights_sha256"] == seg_card["weights_sha256"] and crop["margin"] == 0.05
    moved = shutil.move(tmp_path / "run", tmp_path / "elsewhere")  # the run is self-contained
    predictor = Predictor.from_run(moved)
    path = next((cxr_tiny / "test" / "PNEUMONIA").iterdir())
    image, _ = read_image(path)
    top, bottom, left, right = predictor.crop_box(image)
    size = card["input_size"]
    by_hand = preprocess(image[top:bottom, left:right], size)
    assert np.array_equal(predictor.prepare(image)[0, 0].numpy(), by_hand)
    assert not np.array_equal(by_hand, preprocess(image, size))
    assert preprocess_key(size, card["preprocess"]) != preprocess_key(size)
    shutil.rmtree(Path(moved) / "lung_seg")
    with pytest.raises(DataError, match="lung_seg"):
        Predictor.from_run(moved)
