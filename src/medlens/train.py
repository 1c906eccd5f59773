"""The training loop, readable top to bottom.

fit(): discover data -> patient-grouped split (train/val only; the test split is never loaded here) -> decoded
tensor cache -> model -> AdamW with warm-up + cosine -> epochs of batch-augmented steps -> validation AUC ->
early stopping and the best checkpoint -> operating threshold chosen on validation -> model card.

The whole uint8 training set lives on the training device (Kermany at 224 px is 260 MB), so a step is an index,
a cast, one batched augmentation and the network: no DataLoader workers and no JPEG decoding in the loop.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import platform
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

import medlens
from medlens import rundir
from medlens.calibration import calibration_split, fit_temperature
from medlens.calibration import nll as calibration_nll
from medlens.config import Config
from medlens.data.augment import BatchAugment
from medlens.data.cache import TensorCache
from medlens.data.sources import SampleTable, discover
from medlens.data.split import assert_patient_disjoint, patient_grouped_split, split_manifest
from medlens.domain import fit_domain, intended_use
from medlens.errors import ConfigError, DataError
from medlens.forward import autocast, predict_logits, probabilities, resolve_device
from medlens.losses import DistillationLoss, make_loss
from medlens.metrics import binary_metrics, choose_threshold, expected_calibration_error
from medlens.models import create_model
from medlens.models.card import ModelCard, load_checkpoint, normalize_batch, save_checkpoint
from medlens.models.ensemble import ENSEMBLE, Ensemble, ensemble_spec
from medlens.seg.crop import LUNG_DIR, install_lung_model, lung_cropper
from medlens.uncertainty import REFER_MEASURE, available_methods, choose_refer_threshold, predictive
from medlens.warmstart import load_init_weights, load_teacher, load_weight_masks

log = logging.getLogger("medlens.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_run_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(rundir.train_log_path(run_dir))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("medlens").addHandler(handler)
    logging.getLogger("medlens").setLevel(logging.INFO)
    return handler


def lr_schedule(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def versions() -> dict[str, str]:
    import monai

    return {"medlens": medlens.__version__, "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version()}


def load_split_data(cfg: Config, data: str | Path, *, progress: bool = True, crop=None, options: dict | None = None):
    """Discover the data set, split it by patient and load train + val through the cache (never test).

    ``options``: the ``preprocess`` options (default: the config's ``data.equalize`` settings; a finished run's
    card's ``preprocess`` when refitting it)."""
    if options is None:
        options = cfg.data.preprocess_options()
    table = discover(data, patient_pattern=cfg.data.patient_pattern, strict=cfg.data.strict)
    if len(table.classes) != 2:
        raise DataError(f"{data}: found {len(table.classes)} classes ({', '.join(table.classes)})",
                        hint="this version trains binary classifiers: give two class folders")
    split = patient_grouped_split(table, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed)
    assert_patient_disjoint(table, split)
    cache = TensorCache(Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)
    loaded = {name: cache.load(table, split[name], cfg.data.image_size, strict=cfg.data.strict, progress=progress,
                               options=options, crop=crop)
              for name in ("train", "val")}
    return table, split, loaded


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, augment: BatchAugment | None,
               loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer, intensity: str, amp: bool = True,
               channels_last: bool = True) -> torch.Tensor:
    """One optimisation step on a uint8 batch already on the device: augment, normalise, forward, backward."""
    x = images.float().div_(255)
    if augment is not None:
        x = augment(x)
    x = normalize_batch(x, intensity)
    if x.device.type == "cuda" and channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp):
        logits = model(x).float()
        loss = loss_fn(logits, labels, x) if getattr(loss_fn, "needs_input", False) else loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _selection_and_calibration(cfg: Config, y_val: np.ndarray, patients: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validation positions for choosing the epoch and threshold, and a patient-disjoint part held apart for
    fitting the temperature. Without enough data (or eval.calibration_fraction=0) all of it selects."""
    everything = np.arange(len(y_val))
    if cfg.eval.calibration_fraction <= 0:
        return everything, everything[:0]
    try:
        select, calib = calibration_split(everything, y_val, patients, fraction=cfg.eval.calibration_fraction,
                                          seed=cfg.train.seed)
    except DataError as exc:
        log.warning("no calibration split (%s): temperature stays 1", exc.message)
        return everything, everything[:0]
    if len(np.unique(y_val[calib])) < 2 or len(np.unique(y_val[select])) < 2 or len(calib) < 20:
        log.warning("validation split too small to hold out a calibration part: temperature stays 1")
        return everything, everything[:0]
    return np.sort(select), np.sort(calib)


def _calibration_patients_hash(d: _Data) -> str:
    """sha256 of the sorted patient ids of the held-apart calibration half: recalibrate checks that it refits on
    the same patients (a changed carve would let the "held-apart" half overlap the selection half)."""
    keep = d.loaded["val"].keep
    patients = sorted({str(d.table.patient_ids[keep[i]]) for i in d.calib})
    return hashlib.sha256("\x1f".join(patients).encode()).hexdigest()


def _fit_calibration(logits: torch.Tensor, y: np.ndarray, calib: np.ndarray, cfg: Config) -> tuple[float, dict]:
    if len(calib) == 0:
        return 1.0, {"temperature": 1.0, "n": 0, "note": "no held-apart calibration data"}
    temperature = fit_temperature(logits[calib], y[calib])
    before = expected_calibration_error(y[calib], probabilities(logits[calib], 1.0)[:, 1], cfg.eval.ece_bins)
    after = expected_calibration_error(y[calib], probabilities(logits[calib], temperature)[:, 1], cfg.eval.ece_bins)
    nll = [calibration_nll(logits[calib], y[calib], t) for t in (1.0, temperature)]
    log.info("temperature %.3f fitted on %d held-apart validation images: NLL %.4f -> %.4f, ECE %.4f -> %.4f",
             temperature, len(calib), nll[0], nll[1], before, after)
    return float(temperature), {"temperature": float(temperature), "n": int(len(calib)),
                                "nll_before": nll[0], "nll_after": nll[1],
                                "ece_before": float(before), "ece_after": float(after),
                                "method": "temperature scaling (NLL, LBFGS) on the held-apart validation half"}


def fit(cfg: Config, data: str | Path, run_dir: str | Path, *, resume: bool = False,
        progress: bool = True) -> ModelCard:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = setup_run_logging(run_dir)
    try:
        return _fit(cfg, data, run_dir, resume=resume, progress=progress)
    finally:
        logging.getLogger("medlens").removeHandler(handler)
        handler.close()


@dataclass
class _Data:
    """What every ensemble member trains and is validated on (loaded once)."""

    table: SampleTable
    loaded: dict
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: np.ndarray
    select: np.ndarray
    calib: np.ndarray
    counts: torch.Tensor


def _fit(cfg: Config, data: str | Path, run_dir: Path, *, resume: bool, progress: bool) -> ModelCard:
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.ensemble < 1:
        raise ConfigError(f"train.ensemble={tc.ensemble} must be >= 1", hint="use --ensemble K with K >= 2")
    seed_everything(tc.seed)
    if device.type == "cpu":
        # Same seed, same machine -> identical metrics; CPU kernels are deterministic once this is on.
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Fail on a wrong model name or option now, not after minutes of decoding (meta device: no allocation).
    with torch.device("meta"):
        create_model(cfg.model.name, num_classes=2, in_chans=1, **cfg.model.args)
    make_loss(tc.imbalance, torch.ones(2))
    preprocess = cfg.data.preprocess_options()  # a bad data.equalize fails before any decoding
    crop = None
    if cfg.data.lung_crop:  # the lung model travels with the run (RUN/lung_seg), named by its weights in the card
        preprocess["lung_crop"] = install_lung_model(cfg.data.lung_crop, run_dir, cfg.data.lung_crop_margin)
        crop = lung_cropper(preprocess, run_dir)
    cfg.save(rundir.config_path(run_dir))

    table, split, loaded = load_split_data(cfg, data, progress=progress, options=preprocess, crop=crop)
    manifest = split_manifest(table, split)
    rundir.split_path(run_dir).write_text(json.dumps(manifest, indent=1))
    skipped = [s for part in loaded.values() for s in part.skipped]
    if skipped:
        (run_dir / rundir.SKIPPED).write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
        names = "; ".join(f"{p} ({why})" for p, why in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        log.warning("skipped %d unreadable image(s): %s. Full list: %s (use --strict to stop instead)",
                    len(skipped), names, run_dir / rundir.SKIPPED)

    y_val = table.labels[loaded["val"].keep]
    select, calib = _selection_and_calibration(cfg, y_val, [table.patient_ids[i] for i in loaded["val"].keep])
    d = _Data(table=table, loaded=loaded, x_train=loaded["train"].images.to(device),
              y_train=torch.from_numpy(table.labels[loaded["train"].keep]).to(device),
              x_val=loaded["val"].images, y_val=y_val, select=select, calib=calib, counts=torch.zeros(0))
    n = len(d.x_train)
    if n < tc.batch_size:
        raise DataError(f"{data}: only {n} training images, fewer than one batch ({tc.batch_size})",
                        hint="lower --set train.batch_size=... or add images")
    d.counts = torch.bincount(d.y_train, minlength=len(table.classes)).cpu()
    log.info("data %s: train %d %s, val %d, classes %s, device %s", data, n, d.counts.tolist(), len(d.x_val),
             table.classes, device)

    def new_card(model_name: str, model_args: dict) -> ModelCard:
        return ModelCard(
            model_name=model_name, model_args=model_args, class_names=list(table.classes),
            input_size=cfg.data.image_size, in_chans=1, positive_class=1, preprocess=dict(preprocess),
            data_fingerprint=table.fingerprint(), split_hash=manifest["hash"], recipe=cfg.recipe,
            config=cfg.to_dict(), versions=versions(),
        )

    intensity = new_card(cfg.model.name, {}).intensity
    if tc.ensemble == 1:
        model, state = _train_member(cfg, d, run_dir, device, seed=tc.seed, resume=resume, progress=progress,
                                     intensity=intensity)
        return _finalise(model, new_card(cfg.model.name, dict(cfg.model.args)), state, cfg, d, run_dir, device)

    # A deep ensemble: members differ only in their seed (initialisation, batch order, augmentation) and share
    # the split, so the selection / calibration halves of validation stay untouched by every member.
    members = []
    for k in range(tc.ensemble):
        member_dir = rundir.member_dir(run_dir, k)
        member_dir.mkdir(parents=True, exist_ok=True)
        # each member is a run of its own: `medlens evaluate` works on it
        for path in (rundir.config_path, rundir.split_path):
            shutil.copyfile(path(run_dir), path(member_dir))
        if crop is not None:
            shutil.copytree(run_dir / LUNG_DIR, member_dir / LUNG_DIR, dirs_exist_ok=True)
        finished = member_dir / "model.card.json"
        if resume and finished.exists():
            model, _ = load_checkpoint(member_dir, map_location=device)
            log.info("ensemble member %d/%d: already trained (%s)", k + 1, tc.ensemble, member_dir)
        else:
            log.info("ensemble member %d/%d: seed %d", k + 1, tc.ensemble, tc.seed + k)
            handler = setup_run_logging(member_dir)
            try:
                model, state = _train_member(cfg, d, member_dir, device, seed=tc.seed + k, resume=resume,
                                             progress=progress, intensity=intensity)
                state["member"] = {"index": k, "seed": tc.seed + k}
                _finalise(model, new_card(cfg.model.name, dict(cfg.model.args)), state, cfg, d, member_dir,
                          device)
            finally:
                logging.getLogger("medlens").removeHandler(handler)
                handler.close()
        members.append(model.to(device))
    spec = ensemble_spec([{"name": cfg.model.name, "args": dict(cfg.model.args)}] * tc.ensemble)
    ensemble = Ensemble(members)
    epochs = [ModelCard.load(rundir.member_dir(run_dir, k) / "model.card.json").epoch for k in range(tc.ensemble)]
    state = {"best_epoch": max(epochs), "member_epochs": epochs}
    return _finalise(ensemble, new_card(ENSEMBLE, spec), state, cfg, d, run_dir, device)


def _train_member(cfg: Config, d: _Data, run_dir: Path, device: torch.device, *, seed: int, resume: bool,
                  progress: bool, intensity: str) -> tuple[torch.nn.Module, dict]:
    """Train one network; returns it with the best epoch's weights loaded, and the training state."""
    tc = cfg.train
    seed_everything(seed)
    n = len(d.x_train)
    model = create_model(cfg.model.name, num_classes=len(d.table.classes), in_chans=1, **cfg.model.args)
    if tc.init_weights:
        load_init_weights(model, Path(tc.init_weights))
    masks = load_weight_masks(model, Path(tc.weight_masks), device) if tc.weight_masks else []
    model.to(device)
    if device.type == "cuda" and tc.channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if tc.compile else model

    steps_per_epoch = n // tc.batch_size
    total_steps = steps_per_epoch * tc.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(max(1, int(tc.warmup_epochs * steps_per_epoch)), total_steps))
    loss_fn = make_loss(tc.imbalance, d.counts, focal_gamma=tc.focal_gamma,
                        label_smoothing=tc.label_smoothing).to(device)
    if tc.teacher:
        loss_fn = DistillationLoss(loss_fn, load_teacher(cfg, Path(tc.teacher), intensity, device),
                                   temperature=tc.distill_temperature, alpha=tc.distill_alpha)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    augment = BatchAugment(tc.augment, aug_gen)
    sample_weights = (1.0 / d.counts.float())[d.y_train.cpu()] if tc.imbalance == "balanced_sampler" else None
    select = d.select

    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights = None
    resume_path = rundir.resume_path(run_dir)
    if resume and resume_path.exists():
        # Loaded on the CPU: generator states must be CPU byte tensors; the optimiser moves its state itself.
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        order_gen.set_state(ckpt["order_gen"])
        aug_gen.set_state(ckpt["aug_gen"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        state = ckpt["state"]
        best_weights = ckpt["best_weights"]
        log.info("resumed from %s at epoch %d", resume_path, state["epoch"])

    # Rewritten from the checkpoint's history, so epochs after the last checkpoint are not listed twice.
    metrics_file = rundir.epoch_metrics_path(run_dir).open("w")
    metrics_file.writelines(json.dumps(r) + "\n" for r in state["history"])
    start = state["epoch"]
    for epoch in range(start, tc.epochs):
        if state["bad_epochs"] >= tc.early_stopping_patience:
            break
        t0 = time.perf_counter()
        model.train()
        if sample_weights is not None:
            order = torch.multinomial(sample_weights, n, replacement=True, generator=order_gen)
        else:
            order = torch.randperm(n, generator=order_gen)
        order = order.to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}",
                   disable=not progress, leave=False, unit="step")
        for step in bar:
            idx = order[step * tc.batch_size : (step + 1) * tc.batch_size]
            loss = train_step(step_model, d.x_train[idx], d.y_train[idx], augment=augment, loss_fn=loss_fn,
                              optimizer=optimizer, intensity=intensity, amp=tc.amp,
                              channels_last=tc.channels_last)
            scheduler.step()
            if masks:  # pruned weights stay pruned: the optimiser's step (momentum, decay) may have moved them
                with torch.no_grad():
                    for param, mask in masks:
                        param.mul_(mask)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        p_val = probabilities(predict_logits(model, d.x_val, intensity=intensity, device=device,
                                             batch_size=tc.eval_batch_size, amp=tc.amp))[:, 1]
        val_auc = _auc(d.y_val[select], p_val[select])
        improved = val_auc > state["best_auc"] + 1e-4
        if improved:
            state.update(best_auc=val_auc, best_epoch=epoch + 1, bad_epochs=0)
            best_weights = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        record = {"epoch": epoch + 1, "train_loss": round(loss.item(), 5), "val_auc": round(val_auc, 5),
                  "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2),
                  "best": improved}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        msg = (f"epoch {epoch + 1:3d}/{tc.epochs}  loss {record['train_loss']:.4f}  val AUC {val_auc:.4f}"
               f"{'  *best*' if improved else ''}  ({record['seconds']:.1f}s)")
        log.info(msg)
        if progress:
            tqdm.write(msg)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "order_gen": order_gen.get_state(),
                    "aug_gen": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "state": state, "best_weights": best_weights},
                   resume_path.with_suffix(".tmp"))
        resume_path.with_suffix(".tmp").replace(resume_path)
    metrics_file.close()
    model.load_state_dict(best_weights)
    return model, state


def refer_policy(model: torch.nn.Module, images: torch.Tensor, card: ModelCard, cfg: Config,
                 device: torch.device, *, data: str) -> dict:
    """The referral thresholds, one per uncertainty method the model supports, chosen on ``images``.

    ``refer = decision entropy > threshold`` (the entropy of the call at the card's operating threshold, see
    ``medlens.uncertainty.decision_uncertainty``), the threshold being the ``eval.refer_coverage`` quantile of
    its values on these (held-apart validation) images: about 10 % of them would be referred."""
    ec = cfg.eval
    thresholds = {}
    for method in available_methods(model):
        u = predictive(model, images, method, intensity=card.intensity, temperature=card.temperature,
                       threshold=card.threshold, positive_class=card.positive_class, mc_passes=ec.mc_passes,
                       tta_passes=ec.tta_passes, device=device, seed=cfg.train.seed)[REFER_MEASURE]
        thresholds[method] = choose_refer_threshold(u, coverage=ec.refer_coverage)
    log.info("referral thresholds (%s, coverage %.2f, %d images): %s", REFER_MEASURE, ec.refer_coverage,
             len(images), {k: round(v, 4) for k, v in thresholds.items()})
    return {"measure": REFER_MEASURE, "coverage": ec.refer_coverage, "thresholds": thresholds,
            "n": int(len(images)), "data": data, "mc_passes": ec.mc_passes, "tta_passes": ec.tta_passes}


def _finalise(model: torch.nn.Module, card: ModelCard, state: dict, cfg: Config, d: _Data, run_dir: Path,
              device: torch.device, before_save: Callable[[ModelCard], None] | None = None) -> ModelCard:
    """Calibrate, choose the operating point and the referral policy, write the checkpoint and its card.

    The temperature and the referral thresholds are fitted on the calibration half of validation (data the
    epoch was not chosen on), then the operating point is chosen on the selection half."""
    tc = cfg.train
    select, calib, y_val = d.select, d.calib, d.y_val
    logits_val = predict_logits(model, d.x_val, intensity=card.intensity, device=device,
                                batch_size=tc.eval_batch_size, amp=tc.amp)
    card.temperature, calibration = _fit_calibration(logits_val, y_val, calib, cfg)
    calibration["patients_sha256"] = _calibration_patients_hash(d)
    p_val = probabilities(logits_val, card.temperature)[:, 1]
    threshold = choose_threshold(y_val[select], p_val[select], policy=cfg.eval.threshold_policy,
                                 target=cfg.eval.target_sensitivity)
    val_metrics = binary_metrics(y_val[select], p_val[select], threshold)
    card.threshold = float(threshold)
    card.threshold_policy = (f"{cfg.eval.threshold_policy} (target {cfg.eval.target_sensitivity})"
                             f" on the patient-grouped validation split, n={len(select)}")
    first = model.members[0] if isinstance(model, Ensemble) else model
    card.cam_layer = str(getattr(first, "cam_layer", "") or "")
    refer_idx, where = (calib, "held-apart validation half") if len(calib) else (select, "validation split")
    card.refer = refer_policy(model, d.x_val[torch.from_numpy(refer_idx)], card, cfg, device, data=where)
    if len(d.x_train):  # the learned in-domain score: training features, threshold on the same held-apart images
        card.domain = fit_domain(model, d.x_train, d.x_val[torch.from_numpy(refer_idx)], intensity=card.intensity,
                                 coverage=cfg.eval.domain_coverage, run_dir=run_dir, data=where,
                                 batch_size=tc.eval_batch_size, device=device)
        card.domain["intended_use"] = intended_use(d.table, d.loaded["train"].keep, d.loaded["val"].keep)
    card.metrics = {"val": {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                            for k, v in val_metrics.items()}, "calibration": calibration}
    if "member" in state:
        card.metrics["ensemble_member"] = state["member"]
    if "member_epochs" in state:
        card.metrics["ensemble"] = {"members": len(state["member_epochs"]), "member_epochs": state["member_epochs"]}
    card.epoch = state["best_epoch"]
    card.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if before_save is not None:  # e.g. recalibrate's policy-change record: written with the policy, in one file
        before_save(card)
    model.cpu()
    save_checkpoint(model, card, run_dir)
    table, keep = d.table, d.loaded["val"].keep
    with (run_dir / rundir.VAL_PREDICTIONS).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "probability", "policy_hash"])
        writer.writerows([table.items[i], int(y), f"{p:.6f}", card.policy_hash]
                         for i, y, p in zip(keep, y_val, p_val, strict=True))
    log.info("best epoch %d, val AUC %.4f, threshold %.4f (%s)", card.epoch,
             card.metrics["val"].get("auc", float("nan")), threshold, card.threshold_policy)
    return card


def _splits_evaluated(run_dir: Path, card: ModelCard) -> dict[str, int]:
    """How often each split was evaluated with these weights (``RUN/evaluations.jsonl``; the card's
    ``evaluations`` too, for runs evaluated before the trace existed)."""
    from medlens.rundir import read_evaluations

    counts: dict[str, int] = {}
    for e in read_evaluations(run_dir):
        if e.get("weights_sha256") in (None, card.weights_sha256):
            counts[e["split"]] = counts.get(e["split"], 0) + 1
    # older evidence of a look: the card's latest evaluations, earlier recalibrations, an eval/ folder
    earlier = {s for c in card.policy_changes for s in c.get("evaluations_before", {})}
    written = {p.parent.name for p in (Path(run_dir) / rundir.EVAL).glob("*/metrics.json")}
    for split in set(card.evaluations) | earlier | written:
        counts.setdefault(split, 1)
    return counts


def recalibrate(run_dir: str | Path, data: str | Path, *, overrides: list[str] | None = None,
                progress: bool = True) -> ModelCard:
    """Refit the temperature, the operating threshold and the referral policy of a finished run on its own
    validation split (the same patients, the same selection / calibration halves), keeping its weights; and the
    learned in-domain score (``medlens.domain``) on its training images, so older runs get one without retraining.

    For runs made by an older medlens (e.g. before the referral policy existed) or to apply changed ``eval.*``
    settings (``overrides``, e.g. ``eval.refer_coverage=0.8``). The split must be the run's: a data set that
    splits differently is refused. Earlier evaluations are dropped from the card (they used the old policy) but
    ``RUN/evaluations.jsonl`` keeps them; when the test split was already evaluated, the change is logged and
    recorded in ``card.policy_changes`` with ``after_test_look: true``."""
    from medlens.config import apply_overrides

    run_dir = Path(run_dir)
    for item in overrides or []:  # only the choices made on validation may change; the split and data may not
        key = item.split("=", 1)[0].strip()
        if not key.startswith("eval.") or key == "eval.calibration_fraction":
            raise ConfigError(f"recalibrate cannot change '{key}'",
                              hint="only eval.* settings (not eval.calibration_fraction, which would move cases "
                                   "between the selection and calibration halves); retrain for anything else")
    cfg = apply_overrides(rundir.run_config(run_dir), overrides or [])
    device = resolve_device(cfg.train.device)
    model, old = load_checkpoint(run_dir, map_location=device)
    table, split, loaded = load_split_data(cfg, data, progress=progress, options=old.preprocess,
                                           crop=lung_cropper(old.preprocess, run_dir))
    if split_manifest(table, split)["hash"] != old.split_hash:
        raise DataError(f"{data}: the validation split made from this data differs from the run's",
                        hint="recalibrate with the data the run was trained on")
    y_val = table.labels[loaded["val"].keep]
    select, calib = _selection_and_calibration(cfg, y_val, [table.patient_ids[i] for i in loaded["val"].keep])
    d = _Data(table=table, loaded=loaded, x_train=loaded["train"].images, y_train=torch.empty(0), x_val=loaded["val"].images,
              y_val=y_val, select=select, calib=calib, counts=torch.zeros(0))
    expected = old.metrics.get("calibration", {}).get("patients_sha256")
    if expected and expected != _calibration_patients_hash(d):
        raise DataError(f"{run_dir}: the held-apart calibration half made now has other patients than the one this "
                        "run was calibrated on (made by another medlens version?)",
                        hint="retrain the run; refitting on other patients could reuse the selection half")
    if not expected:
        log.warning("%s: the card does not record its calibration patients (an older run): cannot check that the "
                    "held-apart half is the same", run_dir)
    state = {"best_epoch": old.epoch}
    if "ensemble" in old.metrics:
        state["member_epochs"] = old.metrics["ensemble"]["member_epochs"]
    if "ensemble_member" in old.metrics:
        state["member"] = old.metrics["ensemble_member"]
    card = copy.deepcopy(old)
    card.evaluations, card.created = {}, ""
    card.config = cfg.to_dict()
    handler = setup_run_logging(run_dir)
    try:
        log.info("recalibrating %s on its validation split", run_dir)
        looked = _splits_evaluated(run_dir, old)

        def record_change(new: ModelCard) -> None:
            new_hash = new.compute_policy_hash()
            changed = new_hash != old.policy_hash
            new.policy_changes = [*old.policy_changes, {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": "medlens recalibrate",
                "old_policy_hash": old.policy_hash, "new_policy_hash": new_hash, "changed": changed,
                "overrides": list(overrides or []), "evaluations_before": looked,
                "after_test_look": changed and "test" in looked}]
            if "test" in looked:
                log.warning("%s: the test split was already evaluated %d time(s) under policy %s; %s "
                            "(evaluations.jsonl keeps every evaluation)", run_dir, looked["test"], old.policy_hash,
                            f"the new policy {new_hash} is recorded as changed after a test look" if changed
                            else "the policy is unchanged")

        card = _finalise(model, card, state, cfg, d, run_dir, device, before_save=record_change)
        cfg.save(rundir.config_path(run_dir))  # only once the new card is written
        return card
    finally:
        logging.getLogger("medlens").removeHandler(handler)
        handler.close()
