"""Issue 8's anatomy bars, measured as a user would run them, from a cold tensor cache.

    python bench/lung.py --stage seg --seg-run runs/lung_unet        # bar 1: lung segmentation
    python bench/lung.py --stage cxr --seg-run runs/lung_unet --cxr-run runs/cxr_lung   # bar 3: anatomy-aware CXR

``seg``: ``medlens train ../shared/data/segmentation --recipe lung_unet`` then ``medlens evaluate --split test``
(held-out patients), timed together -> ``bench/results/lung_unet-cpu.json``.

``cxr``: ``medlens train ../shared/data/chest_xray --recipe cxr_lung_cpu --set data.lung_crop=SEG_RUN``, then
``medlens evaluate --split test --masks ../shared/data/segmentation`` (Grad-CAM lung energy on the hand-drawn
masks), and the lung energy again on the *predicted* lung masks of Kermany test images (the segmentation run's
masks, written to a folder and read back by the same check) -> ``bench/results/cxr_lung-kermany.json``. The
threshold is the one chosen on validation at training; the test split is evaluated once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medlens import rundir
from medlens.cli import main as medlens
from medlens.models.card import jsonable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def _device() -> str:
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def stage_seg(args) -> dict:
    data = str(SHARED / "segmentation")
    t0 = time.perf_counter()
    assert medlens(["train", data, "--out", args.seg_run, "--recipe", "lung_unet", "--no-progress"]) == 0
    t_train = time.perf_counter() - t0
    assert medlens(["evaluate", args.seg_run, "--data", data, "--split", "test"]) == 0
    wall = time.perf_counter() - t0
    m = json.loads((rundir.eval_dir(args.seg_run, "test") / "metrics.json").read_text())
    card = json.loads((Path(args.seg_run) / "model.card.json").read_text())
    dice = m["metrics"]["dice"]
    return {"benchmark": "lung_unet", "written_by": "bench/lung.py --stage seg", "data": data,
            "device": _device(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_id": card["model_id"], "best_epoch": card["epoch"], "val": card["metrics"]["val"],
            "postprocess": card["metrics"]["postprocess"], "test": {k: m[k] for k in ("n", "n_patients", "bootstrap",
                                                                                      "units", "metrics")},
            "worst": m["gallery"]["worst"], "train_seconds": round(t_train, 1), "wall_seconds": round(wall, 1),
            "bar1": {"dice_mean": dice["mean"]["value"], "dice_median": dice["median"]["value"],
                     "mean_ok": dice["mean"]["value"] >= 0.93, "median_ok": dice["median"]["value"] >= 0.95,
                     "time_ok": wall <= 15 * 60}}


def _predicted_mask_folder(seg_run: str, test_dir: Path, out: Path, n: int, seed: int) -> Path:
    """``out/images`` (symlinks to ``n`` Kermany test images) + ``out/masks`` (the segmentation run's masks)."""
    from medlens.data.readers import read_image
    from medlens.seg.predict import Segmenter

    seg = Segmenter.from_run(seg_run)
    files = sorted(p for c in ("NORMAL", "PNEUMONIA") for p in (test_dir / c).iterdir())
    random.Random(seed).shuffle(files)
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for f in files[:n]:
        image, _ = read_image(f)
        mask = seg.segment(image)
        name = f"{f.parent.name}-{f.stem}"
        (out / "images" / f"{name}{f.suffix}").symlink_to(f.resolve())
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{name}.png")
    return out


def stage_cxr(args) -> dict:
    from medlens.config import load_config
    from medlens.inference import Predictor
    from medlens.trust import lung_energy

    data = str(SHARED / "chest_xray")
    sets = ["--set", f"data.lung_crop={args.seg_run}"]
    t0 = time.perf_counter()
    assert medlens(["train", data, "--out", args.cxr_run, "--recipe", "cxr_lung_cpu", *sets, "--no-progress"]) == 0
    t_train = time.perf_counter() - t0
    assert medlens(["evaluate", args.cxr_run, "--data", data, "--split", "test", "--masks",
                    str(SHARED / "segmentation"), "--no-progress"]) == 0
    wall = time.perf_counter() - t0
    m = json.loads((rundir.eval_dir(args.cxr_run, "test") / "metrics.json").read_text())
    card = json.loads((Path(args.cxr_run) / "model.card.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = _predicted_mask_folder(args.seg_run, Path(data) / "test", Path(tmp) / "pred", args.n_predicted, 0)
        predicted = lung_energy(Predictor.from_run(args.cxr_run), folder, load_config("cxr_lung_cpu"))
    predicted["source"] = f"{args.n_predicted} Kermany test images (seeded sample), masks predicted by {args.seg_run}"
    keys = ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1", "ece")
    faith = m.get("faithfulness") or {}
    energy = m.get("lung_energy") or {}
    test = {k: m[k] for k in keys}
    return {"benchmark": "cxr_lung", "written_by": "bench/lung.py --stage cxr", "data": data, "device": _device(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "recipe": "cxr_lung_cpu",
            "overrides": sets[1::2], "model_id": card["model_id"], "preprocess": card["preprocess"],
            "threshold": m["threshold"], "threshold_policy": card["threshold_policy"], "val": card["metrics"]["val"],
            "test": test, "bootstrap": m["bootstrap"], "domain": m.get("domain"), "faithfulness": faith,
            "lung_energy_hand_masks": energy, "lung_energy_predicted_masks": predicted,
            "train_seconds": round(t_train, 1), "wall_seconds": round(wall, 1),
            "bar3": {"auc": test["auc"]["value"], "specificity": test["specificity"]["value"],
                     "sensitivity": test["sensitivity"]["value"],
                     "lung_energy_ratio_hand_masks": energy.get("ratio_to_area"),
                     "lung_energy_ratio_predicted_masks": predicted.get("ratio_to_area"),
                     "targets": {"auc": 0.96, "specificity": 0.75, "sensitivity": 0.95, "lung_energy_ratio": 1.2}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["seg", "cxr"], required=True)
    p.add_argument("--seg-run", default="runs/lung_unet")
    p.add_argument("--cxr-run", default="runs/cxr_lung")
    p.add_argument("--n-predicted", type=int, default=128, help="Kermany test images for the predicted-mask check")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="medlens-bench-"))
    os.environ["MEDLENS_CACHE"] = str(work / "cache")  # cold cache: decoding counts against the bar
    result = stage_seg(args) if args.stage == "seg" else stage_cxr(args)
    name = "lung_unet-cpu.json" if args.stage == "seg" else "cxr_lung-kermany.json"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    print(json.dumps(result.get("bar1") or result.get("bar3"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
