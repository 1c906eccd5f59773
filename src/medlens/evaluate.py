"""Evaluation of a trained run on a named split: metrics with bootstrap intervals, subgroups and the report.

The threshold comes from the model card (chosen on validation during training) and is applied unchanged here.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import medlens
from medlens import external, rundir
from medlens.config import Config
from medlens.data.cache import TensorCache
from medlens.data.sources import SampleTable, discover
from medlens.data.split import patient_grouped_split, split_manifest
from medlens.errors import ConfigError, DataError
from medlens.forward import predict_logits, probabilities, shown_class
from medlens.inference import Predictor
from medlens.metrics import expected_calibration_error, metrics_with_ci, subgroup_sensitivity
from medlens.models.card import ModelCard, jsonable, record_evaluation
from medlens.report import write_report

log = logging.getLogger("medlens.evaluate")
SPLITS = ("test", "val", "train", "all")


def split_indices(table: SampleTable, cfg: Config, split: str, run_dir: Path) -> np.ndarray:
    """Indices of `split`; the official test folder when the source has one, else the run's own split.

    ``all``: every row (external validation on another site's data). ``test`` on a source with no split
    information at all (a CSV without a ``split`` column, a folder without train/test sub-folders) that is not
    the run's training source means every row too, with a log line saying so: such data was never split."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'", hint=f"choose one of {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(len(table.labels))
    if split == "test" and "test" in table.splits:
        return np.flatnonzero(np.asarray(table.splits) == "test")
    if split == "test" and not any(table.splits) and not _is_training_source(table, run_dir):
        log.info("%s has no split information and is not the run's training data: --split test evaluates all "
                 "%d rows (an external validation)", table.source, len(table.labels))
        return np.arange(len(table.labels))
    parts = patient_grouped_split(table, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed)
    saved = rundir.split_path(run_dir)
    if saved.exists() and split_manifest(table, parts)["hash"] != json.loads(saved.read_text())["hash"]:
        raise DataError(f"{table.source}: the {split} split made from this data differs from the run's {rundir.SPLIT}",
                        hint="evaluate on the same data the run was trained on (or use --split test)")
    return parts[split]


def _is_training_source(table: SampleTable, run_dir: Path) -> bool:
    """Whether ``table`` is the data the run was trained on (the card's data fingerprint): only then has it a
    test split of the run's own making. Other data sharing patients with training gets a leakage warning."""
    try:
        card = json.loads((run_dir / "model.card.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(card.get("data_fingerprint")) and card["data_fingerprint"] == table.fingerprint()


def _patients_seen_in_training(run_dir: Path) -> set[str]:
    path = rundir.split_path(run_dir)
    if not path.exists():
        return set()
    manifest = json.loads(path.read_text())
    return set(manifest.get("train", {}).get("patients", [])) | set(manifest.get("val", {}).get("patients", []))


def _calibration_summary(card: ModelCard, logits: torch.Tensor, y: np.ndarray, prob: np.ndarray, cfg: Config) -> dict:
    """ECE on this split without and with the card's temperature, said plainly either way."""
    if card.temperature == 1.0:
        return {}
    raw = probabilities(logits, 1.0)[:, card.positive_class]
    before = expected_calibration_error(y, raw, cfg.eval.ece_bins)
    after = expected_calibration_error(y, prob, cfg.eval.ece_bins)
    fitted = card.metrics.get("calibration", {})
    verdict = ("temperature scaling improved calibration on this split" if after < before else
               "temperature scaling, fitted on in-distribution validation data, made calibration on this split "
               "WORSE: a sign that this split is shifted from the training data (see the reliability diagram)")
    return {"temperature": round(card.temperature, 4), "ECE without scaling": round(before, 4),
            "ECE with scaling": round(after, 4), "verdict": verdict,
            "fitted on": f"{fitted.get('n', '?')} held-apart validation images (ECE there "
                         f"{fitted.get('ece_before', float('nan')):.4f} -> {fitted.get('ece_after', float('nan')):.4f})"}


def _trust(predictor: Predictor, images: torch.Tensor, y: np.ndarray, prob: np.ndarray, paths: list[str],
           cfg: Config, masks: str | Path | None) -> dict:
    """Uncertainty / referral, CAM gallery, faithfulness and (with ``masks``) lung energy: see medlens.trust."""
    from medlens import trust

    out = {"selective": trust.selective_prediction(predictor, images, y, cfg)}
    log.info("selective prediction: %s", {m: round(e["gain"], 4) for m, e in out["selective"]["methods"].items()})
    out["cam_gallery"] = trust.cam_gallery(predictor, images, y, prob, paths, cfg)
    if cfg.eval.n_faithfulness > 0:
        out["faithfulness"] = trust.faithfulness(predictor, images, prob, cfg)
    if masks is not None:
        out["lung_energy"] = trust.lung_energy(predictor, masks, cfg)
    return out


HEADLINE = ("auc", "pr_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "ece")


def _append_trace(run_dir: Path, card: ModelCard, split: str, data, fingerprint: str, images: torch.Tensor,
                  y: np.ndarray, metrics: dict) -> None:
    """One line in ``RUN/evaluations.jsonl`` (append-only; see ``medlens.rundir``): which weights, under which
    operating policy, looked at which data, and what they scored there."""
    digest = hashlib.sha256(memoryview(images.contiguous().numpy()))  # hashed in place, no copy
    digest.update(np.asarray(y, dtype=np.int64).tobytes())
    rundir.append_evaluation(run_dir, {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "split": split, "data": str(data),
        "data_fingerprint": fingerprint, "data_sha256": digest.hexdigest(), "n": int(len(y)),
        "model_id": card.model_id, "weights_sha256": card.weights_sha256, "policy_hash": card.policy_hash,
        "policy": card.operating_policy(), "medlens": medlens.__version__, "bootstrap": metrics["bootstrap"],
        "metrics": {k: metrics[k] for k in HEADLINE},
    })


def evaluate(run_dir: str | Path, data: str | Path, split: str = "test", *, progress: bool = True,
             n_bootstrap: int | None = None, masks: str | Path | None = None, trust: bool = True,
             backend: str = "torch") -> dict:
    """Metrics with intervals, calibration, uncertainty and referral, explanations and their faithfulness
    (``trust=False`` skips the last two), written to ``RUN/eval/SPLIT`` (metrics.json, predictions.csv,
    report.html). ``masks``: a folder of chest X-rays with lung masks for the lung-energy check.
    ``backend``: ``onnx`` / ``onnx-int8`` (``medlens export``) computes the metrics with ONNX Runtime and writes
    ``RUN/eval/SPLIT-BACKEND``; the trust checks (MC dropout, heat maps and their faithfulness) need the torch
    network and run on it, as the report says."""
    run_dir = Path(run_dir)
    cfg = rundir.run_config(run_dir)
    predictor = Predictor.from_run(run_dir, backend=backend)
    card = predictor.card
    table = discover(data, patient_pattern=cfg.data.patient_pattern, strict=cfg.data.strict)
    if list(table.classes) != list(card.class_names):
        raise DataError(f"{data}: classes {table.classes} differ from the model's {card.class_names}",
                        hint="evaluate on data with the same class folders the model was trained on")
    idx = split_indices(table, cfg, split, run_dir)
    if len(idx) == 0:
        raise DataError(f"{data}: the '{split}' split is empty")
    if split in ("test", "all") and table.kind != "npz":
        overlap = _patients_seen_in_training(run_dir) & {table.patient_ids[i] for i in idx}
        if overlap:
            log.warning("%d test patient ids also occur in training/validation (e.g. %s): check for leakage",
                        len(overlap), sorted(overlap)[:3])
    cache = TensorCache(Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)
    loaded = cache.load(table, idx, card.input_size, strict=cfg.data.strict, progress=progress,
                        options=card.preprocess, crop=predictor.crop)
    y = table.labels[loaded.keep].astype(int)
    logits = predict_logits(predictor.model, loaded.images, intensity=card.intensity, device=predictor.device)
    prob = probabilities(logits, card.temperature)[:, card.positive_class]
    threshold = card.threshold
    n_boot = n_bootstrap if n_bootstrap is not None else cfg.eval.n_bootstrap
    # intervals resample patients where patients are known (their images are not independent), else images
    patients = ([table.patient_ids[i] for i in loaded.keep]
                if table.patient_id_source not in ("", "per-file") else None)
    metrics = metrics_with_ci(y, prob, threshold, n_boot=n_boot, seed=cfg.train.seed, groups=patients)

    calibration = _calibration_summary(card, logits, y, prob, cfg)
    pred = shown_class(prob, threshold, card.positive_class)
    domain, per_image = external.assess(predictor, [table.items[i] for i in loaded.keep], loaded.images, y, prob,
                                        pred, threshold, patients=patients, n_boot=n_boot, seed=cfg.train.seed)
    subtypes = [table.meta[i].get("subtype") for i in loaded.keep]
    subgroups = None
    if any(subtypes):
        positive = y == 1
        subgroups = {"sensitivity by pneumonia subtype": subgroup_sensitivity(
            y[positive], pred[positive], [subtypes[i] or "unknown" for i in np.flatnonzero(positive)])}

    gallery = []
    k = cfg.eval.n_error_examples
    for kind, mask, order in (("false positive", (pred == 1) & (y == 0), -prob),
                              ("false negative", (pred == 0) & (y == 1), prob)):
        chosen = [i for i in np.argsort(order) if mask[i]][:k]
        gallery += [{"image": loaded.images[i, 0].numpy(), "prob": float(prob[i]), "label": int(y[i]),
                     "path": table.items[loaded.keep[i]], "kind": kind} for i in chosen]

    paths = [table.items[i] for i in loaded.keep]
    trust_predictor = predictor if backend == "torch" else dataclasses.replace(
        predictor, model=predictor.torch_model, backend="torch", torch_model=None)
    checks = _trust(trust_predictor, loaded.images, y, prob, paths, cfg, masks) if trust else {}
    columns = checks.get("selective", {}).pop("columns", {})

    n_params = sum(p.numel() for p in trust_predictor.model.parameters())
    summary = {
        "data": {"source": str(data), "split": split, "images": int(len(y)),
                 "per class": {c: int((y == i).sum()) for i, c in enumerate(card.class_names)},
                 "unreadable skipped": len(loaded.skipped), "data fingerprint": table.fingerprint()[:16]},
        "model": {"architecture": card.model_name, "parameters": f"{n_params:,}", "model id": card.model_id,
                  "input": f"{card.input_size}x{card.input_size}, {card.intensity}", "recipe": card.recipe,
                  "best epoch": card.epoch, "operating threshold": round(threshold, 4),
                  "threshold policy": card.threshold_policy,
                  "validation AUC": round(card.metrics.get("val", {}).get("auc", float("nan")), 4),
                  "split hash": card.split_hash[:16], "backend": backend if backend == "torch" else
                  f"{backend} ({predictor.model.path.name}, ONNX Runtime); uncertainty and heat-map checks on the "
                  "torch network"},
    }
    summary["domain (external validation)"] = external.summary(domain, card.class_names)
    if calibration:
        summary["calibration"] = calibration
    out = rundir.eval_dir(run_dir, rundir.eval_name(split, backend))
    out.mkdir(parents=True, exist_ok=True)
    result = {**metrics, "split": split, "backend": backend, "model_id": card.model_id, "policy_hash": card.policy_hash,
              "weights_sha256": card.weights_sha256, "subgroups": subgroups, "domain": domain,
              "calibration": calibration, "uncertainty": checks.get("selective"),
              "faithfulness": checks.get("faithfulness"), "lung_energy": checks.get("lung_energy"),
              "skipped": [list(s) for s in loaded.skipped]}
    (out / "metrics.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=False))
    _append_trace(run_dir, card, split, data, table.subset(loaded.keep).fingerprint(), loaded.images, y, metrics)
    record_evaluation(run_dir, rundir.eval_name(split, backend), {
        "data fingerprint": table.fingerprint()[:16], "n": int(len(y)),
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{k: metrics[k]["value"] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")},
        "calibration": calibration or None,
        "selective gain": {m: e["gain"] for m, e in (checks.get("selective") or {}).get("methods", {}).items()},
    })
    refer_t = (card.refer or {}).get("thresholds", {}).get("softmax")
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "probability", "predicted", *[f"uncertainty_{m}" for m in columns],
                         *(["refer"] if refer_t is not None and "softmax" in columns else []), "in_domain",
                         "domain_score", "refer_final", "policy_hash"])
        for j, path in enumerate(paths):
            row = [path, int(y[j]), f"{prob[j]:.6f}", int(pred[j]), *[f"{c['uncertainty'][j]:.6f}" for c in columns.values()]]
            if refer_t is not None and "softmax" in columns:
                row.append(int(columns["softmax"]["uncertainty"][j] > refer_t))
            score = per_image["domain_score"][j]
            row += [int(per_image["in_domain"][j]), "" if np.isnan(score) else f"{score:.4f}",
                    int(per_image["refer"][j])]
            writer.writerow([*row, card.policy_hash])
    raw = probabilities(logits, 1.0)[:, card.positive_class] if card.temperature != 1.0 else None
    write_report(out, metrics=metrics, y_true=y, y_prob=prob, threshold=threshold, class_names=card.class_names,
                 errors_gallery=gallery, subgroups=subgroups, summary=summary,
                 title=f"medlens evaluation: {run_dir.name}, {split} split", y_prob_uncalibrated=raw, trust=checks)
    return result
