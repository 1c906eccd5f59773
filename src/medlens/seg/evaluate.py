"""``medlens evaluate RUN --split test`` for a segmentation run: Dice, IoU, HD95 and ASSD per image, their mean
and median with patient-level bootstrap intervals, subgroups, and a report with the best and worst overlays.

Written to ``RUN/eval/SPLIT/``: ``metrics.json``, ``per_image.csv``, ``overlays/*.png`` and ``report.html``; each
evaluation is appended to ``RUN/evaluations.jsonl`` like a classification one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import medlens
from medlens import rundir
from medlens.data.split import split_manifest
from medlens.errors import DataError
from medlens.forward import resolve_device
from medlens.metrics import bootstrap_stats
from medlens.models.card import ModelCard, jsonable, load_checkpoint, record_evaluation
from medlens.seg.data import FOREGROUND, IGNORE, load_pairs
from medlens.seg.metrics import METRICS, per_image, postprocess
from medlens.seg.predict import predict_labels
from medlens.seg.train import split_segmentation

log = logging.getLogger("medlens.seg")
SPLITS = ("test", "val", "train", "all")
#: manifest columns used for subgroup tables when present
SUBGROUP_COLUMNS = ("view", "finding", "sex")


def _spacings(table, keep: np.ndarray, shapes: list, size: int) -> list[tuple[float, float]] | None:
    """Per image (row, column) mm of the evaluated grid, from a ``pixel_spacing_mm`` manifest column (the
    original image's spacing, "r" or "r\\c"); ``None`` unless every image has one."""
    out = []
    for i, (h, w) in zip(keep, shapes, strict=True):
        raw = str(table.meta[i].get("pixel_spacing_mm", "")).replace("\\", " ").split()
        try:
            r, c = (float(raw[0]), float(raw[-1])) if raw else (None, None)
        except ValueError:
            r = c = None
        if not r or not c or r <= 0 or c <= 0:
            return None
        out.append((r * h / size, c * w / size))
    return out


def evaluate_segmentation(run_dir: str | Path, data: str | Path, split: str = "test", *,
                          n_bootstrap: int | None = None, device: str = "auto", n_worst: int = 5,
                          n_best: int = 3) -> dict:
    from medlens.report.segmentation import save_overlay, write_segmentation_report

    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'", hint=f"choose one of {', '.join(SPLITS)}")
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model, card = load_checkpoint(run_dir, map_location=dev)
    cfg = rundir.run_config(run_dir)
    table, parts = split_segmentation(cfg, data)
    if split == "all":
        idx = np.arange(len(table))
    else:
        if split_manifest(table, parts)["hash"] != card.split_hash:
            raise DataError(f"{data}: the {split} split made from this data differs from the run's",
                            hint="evaluate on the data the run was trained on, or use --split all for another "
                                 "site's data (external validation)")
        idx = parts[split]
    pairs = load_pairs(table, idx, card.input_size, cache_dir=cfg.data.cache_dir)
    labels, _ = predict_labels(model, pairs.images, intensity=card.intensity, device=dev,
                               amp=cfg.train.amp)
    how = (card.metrics.get("postprocess") or {}).get("chosen", "none")
    labels = postprocess(labels, how)
    spacing = _spacings(table, pairs.keep, pairs.original_shapes, card.input_size)
    if spacing is None:
        values = per_image(labels, pairs.masks)
    else:  # per image: MONAI takes one spacing per call
        rows = [per_image(labels[k:k + 1], pairs.masks[k:k + 1], spacing[k]) for k in range(len(labels))]
        values = {m: np.concatenate([r[m] for r in rows]) for m in rows[0]} if rows else per_image(labels, pairs.masks)
    groups = [table.patient_ids[i] for i in pairs.keep]
    per_file = table.patient_id_source == "per-file"
    n_boot = n_bootstrap or cfg.eval.n_bootstrap
    summary = {m: bootstrap_stats(v, None if per_file else groups, n_boot=n_boot, seed=cfg.train.seed)
               for m, v in values.items()}
    ref = pairs.masks[:, 0]
    area_pred = (labels == FOREGROUND).float().mean((1, 2)).numpy()
    area_ref = ((ref == FOREGROUND).float().sum((1, 2)) / (ref != IGNORE).float().sum((1, 2)).clamp(min=1)).numpy()
    subgroups = {}
    for col in SUBGROUP_COLUMNS:
        vals = [str(table.meta[i].get(col, "")) for i in pairs.keep]
        if len(set(vals) - {""}) >= 2:
            subgroups[col] = {g: {"n": int(sum(v == g for v in vals)),
                                  "dice_mean": float(np.nanmean(values["dice"][[v == g for v in vals]]))}
                              for g in sorted(set(vals))}

    out = rundir.eval_dir(run_dir, split)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    order = np.argsort(np.nan_to_num(values["dice"], nan=-1.0))
    shown = {"worst": [int(k) for k in order[:n_worst]], "best": [int(k) for k in order[::-1][:n_best]]}
    gallery = {}
    for kind, ks in shown.items():
        gallery[kind] = []
        for k in ks:
            name = Path(table.items[pairs.keep[k]]).stem
            png = out / "overlays" / f"{kind}-{name}.png"
            save_overlay(png, pairs.images[k, 0].numpy(), labels[k].numpy(), ref[k].numpy())
            gallery[kind].append({"image": table.items[pairs.keep[k]], "overlay": str(png.relative_to(out)),
                                  **{m: float(values[m][k]) for m in METRICS}})
    with (out / "per_image.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "patient", *values, "area_fraction_pred", "area_fraction_ref"])
        for k, i in enumerate(pairs.keep):
            writer.writerow([table.items[i], groups[k], *[f"{values[m][k]:.6f}" for m in values],
                             f"{area_pred[k]:.4f}", f"{area_ref[k]:.4f}"])
    result = {
        "task": "segmentation", "split": split, "data": str(data), "n": int(len(pairs.keep)),
        "n_patients": len(set(groups)), "model_id": card.model_id, "weights_sha256": card.weights_sha256,
        "postprocess": how, "input_size": card.input_size,
        "units": {"distances": "mm (pixel_spacing_mm of the manifest)" if spacing else
                  f"pixels of the {card.input_size}x{card.input_size} grid the masks are compared on (no pixel "
                  "spacing known)"},
        "bootstrap": {"unit": "image" if per_file else "patient", "resamples": n_boot, "seed": cfg.train.seed,
                      "n_units": summary["dice"]["n_units"]},
        "metrics": summary, "subgroups": subgroups, "gallery": gallery,
        "area_fraction": {"pred_mean": float(area_pred.mean()) if len(area_pred) else None,
                          "ref_mean": float(area_ref.mean()) if len(area_ref) else None},
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "medlens": medlens.__version__,
    }
    (out / "metrics.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=False))
    write_segmentation_report(out / "report.html", result, card)
    _record(run_dir, card, split, data, table, pairs, result)
    log.info("%s: Dice mean %.4f median %.4f (n=%d)", split, summary["dice"]["mean"]["value"],
             summary["dice"]["median"]["value"], result["n"])
    return result


def _record(run_dir: Path, card: ModelCard, split: str, data, table, pairs, result: dict) -> None:
    digest = hashlib.sha256(memoryview(pairs.images.contiguous().numpy()))
    digest.update(memoryview(pairs.masks.contiguous().numpy()))
    headline = {m: result["metrics"][m]["mean"] for m in METRICS}
    rundir.append_evaluation(run_dir, {
        "time": result["evaluated"], "split": split, "data": str(data),
        "data_fingerprint": table.subset(pairs.keep).fingerprint(), "data_sha256": digest.hexdigest(),
        "n": result["n"], "model_id": card.model_id, "weights_sha256": card.weights_sha256,
        "policy_hash": card.policy_hash, "policy": {"postprocess": result["postprocess"]},
        "medlens": medlens.__version__, "bootstrap": result["bootstrap"], "metrics": headline})
    record_evaluation(run_dir, split, {"n": result["n"], "evaluated": result["evaluated"],
                                       **{f"{m}_mean": result["metrics"][m]["mean"]["value"] for m in METRICS},
                                       "dice_median": result["metrics"]["dice"]["median"]["value"]})
