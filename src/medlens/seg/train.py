"""Training a segmentation network (``medlens train DATA --recipe lung_unet``), the classification loop's twin.

discover image / mask pairs -> patient-grouped split (train / val / test; the test split is never loaded here)
-> decoded pair cache -> a registered segmentation network (MONAI UNet / BasicUNet / AttentionUnet) -> AdamW with
warm-up + cosine -> epochs of batch-augmented steps (one affine grid moves image and mask together) -> validation
Dice -> early stopping and the best checkpoint -> post-processing chosen on validation -> model card.

The run directory, card, resume checkpoint and logs are the classification run's (``medlens.rundir``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medlens import rundir
from medlens.config import Config
from medlens.data.augment import BatchAugment
from medlens.data.split import patient_grouped_split, split_manifest
from medlens.errors import ConfigError, DataError
from medlens.forward import autocast, resolve_device
from medlens.losses import SegmentationLoss
from medlens.models import create_model
from medlens.models.card import ModelCard, normalize_batch, save_checkpoint
from medlens.seg.data import IGNORE, Pairs, discover_segmentation, load_pairs
from medlens.seg.metrics import POSTPROCESS, per_image, postprocess
from medlens.seg.predict import predict_labels
from medlens.train import lr_schedule, seed_everything, setup_run_logging, versions

log = logging.getLogger("medlens.seg")



def split_segmentation(cfg: Config, data: str | Path):
    """The pairs of ``data`` and their patient-grouped split (deterministic for the config's seed)."""
    table = discover_segmentation(data)
    split = patient_grouped_split(table, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                                  test_fraction=cfg.data.test_fraction)
    return table, split


def fit_segmentation(cfg: Config, data: str | Path, run_dir: str | Path, *, resume: bool = False,
                     progress: bool = True) -> ModelCard:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = setup_run_logging(run_dir)
    try:
        return _fit(cfg, data, run_dir, resume=resume, progress=progress)
    finally:
        logging.getLogger("medlens").removeHandler(handler)
        handler.close()


def _fit(cfg: Config, data: str | Path, run_dir: Path, *, resume: bool, progress: bool) -> ModelCard:
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.ensemble != 1:
        raise ConfigError("segmentation runs train one network (train.ensemble must be 1)")
    seed_everything(tc.seed)
    with torch.device("meta"):  # a wrong model name or option fails now, not after decoding
        probe = create_model(cfg.model.name, num_classes=2, in_chans=1, **cfg.model.args)
    size = cfg.data.image_size
    if size % probe.divisor:
        raise ConfigError(f"data.image_size={size} is not a multiple of {probe.divisor}, which {cfg.model.name} "
                          "with these strides needs", hint=f"e.g. --set data.image_size={size // probe.divisor * probe.divisor or probe.divisor}")
    cfg.save(rundir.config_path(run_dir))

    table, split = split_segmentation(cfg, data)
    manifest = split_manifest(table, split)
    rundir.split_path(run_dir).write_text(json.dumps(manifest, indent=1))
    train = load_pairs(table, split["train"], size, cache_dir=cfg.data.cache_dir)
    val = load_pairs(table, split["val"], size, cache_dir=cfg.data.cache_dir)
    if len(train.images) < tc.batch_size:
        raise DataError(f"{data}: only {len(train.images)} training pairs, fewer than one batch ({tc.batch_size})",
                        hint="lower --set train.batch_size=... or add images")
    log.info("segmentation data %s: train %d pairs (%d patients), val %d (%d patients), test %d held out; %s",
             data, len(train.keep), manifest["train"]["n_patients"], len(val.keep), manifest["val"]["n_patients"],
             len(split["test"]), device)

    card = ModelCard(model_name=cfg.model.name, model_args=dict(cfg.model.args), class_names=["background", cfg.data.foreground_name],
                     input_size=size, in_chans=1, task="segmentation", data_fingerprint=table.fingerprint(),
                     split_hash=manifest["hash"], recipe=cfg.recipe, config=cfg.to_dict(), versions=versions())
    model, state = _train(cfg, train, val, run_dir, device, card.intensity, resume=resume, progress=progress)

    # post-processing: kept only if it helps on validation (never decided on test)
    labels, _ = predict_labels(model, val.images, intensity=card.intensity, device=device, amp=tc.amp)
    choice = {}
    for how in POSTPROCESS:
        dice = per_image(postprocess(labels, how), val.masks)["dice"]
        choice[how] = {"dice_mean": float(np.nanmean(dice)), "dice_median": float(np.nanmedian(dice))}
    best = max(POSTPROCESS, key=lambda h: (round(choice[h]["dice_mean"], 6), h == "none"))
    log.info("post-processing on validation: %s -> %s", {h: round(v["dice_mean"], 4) for h, v in choice.items()},
             best)
    card.metrics = {"val": {"n": len(val.keep), **choice[best]},
                    "postprocess": {"chosen": best, "on": "validation split", "candidates": choice}}
    card.epoch = state["best_epoch"]
    card.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model.cpu()
    save_checkpoint(model, card, run_dir)
    log.info("best epoch %d, val Dice mean %.4f median %.4f (post-processing %s)", card.epoch,
             choice[best]["dice_mean"], choice[best]["dice_median"], best)
    return card


def _train(cfg: Config, train: Pairs, val: Pairs, run_dir: Path, device: torch.device, intensity: str, *,
           resume: bool, progress: bool) -> tuple[torch.nn.Module, dict]:
    tc = cfg.train
    model = create_model(cfg.model.name, num_classes=2, in_chans=1, **cfg.model.args).to(device)
    x_train, m_train = train.images.to(device), train.masks.to(device)
    n = len(x_train)
    steps_per_epoch = max(1, n // tc.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(max(1, int(tc.warmup_epochs * steps_per_epoch)), steps_per_epoch * tc.epochs))
    loss_fn = SegmentationLoss(2, IGNORE)
    order_gen = torch.Generator().manual_seed(tc.seed)
    augment = BatchAugment(tc.augment, torch.Generator(device=device).manual_seed(tc.seed + 1))

    state = {"epoch": 0, "best_dice": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights = None
    resume_path = rundir.resume_path(run_dir)
    if resume and resume_path.exists():
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        order_gen.set_state(ckpt["order_gen"])
        augment.generator.set_state(ckpt["aug_gen"])
        state, best_weights = ckpt["state"], ckpt["best_weights"]
        log.info("resumed from %s at epoch %d", resume_path, state["epoch"])
    metrics_file = rundir.epoch_metrics_path(run_dir).open("w")
    metrics_file.writelines(json.dumps(r) + "\n" for r in state["history"])
    for epoch in range(state["epoch"], tc.epochs):
        if state["bad_epochs"] >= tc.early_stopping_patience:
            break
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=order_gen).to(device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress,
                   leave=False, unit="step")
        for step in bar:
            idx = order[step * tc.batch_size:(step + 1) * tc.batch_size]
            x, m = augment(x_train[idx].float().div_(255), m_train[idx])
            x = normalize_batch(x, intensity)
            with autocast(x.device, tc.amp):
                loss = loss_fn(model(x), m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        labels, _ = predict_labels(model, val.images, intensity=intensity, device=device, amp=tc.amp)
        dice = float(np.nanmean(per_image(labels, val.masks)["dice"]))
        improved = dice > state["best_dice"] + 1e-4
        if improved:
            state.update(best_dice=dice, best_epoch=epoch + 1, bad_epochs=0)
            best_weights = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        record = {"epoch": epoch + 1, "train_loss": round(loss.item(), 5), "val_dice": round(dice, 5),
                  "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2), "best": improved}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        msg = (f"epoch {epoch + 1:3d}/{tc.epochs}  loss {record['train_loss']:.4f}  val Dice {dice:.4f}"
               f"{'  *best*' if improved else ''}  ({record['seconds']:.1f}s)")
        log.info(msg)
        if progress:
            tqdm.write(msg)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "order_gen": order_gen.get_state(),
                    "aug_gen": augment.generator.get_state(), "state": state, "best_weights": best_weights},
                   resume_path.with_suffix(".tmp"))
        resume_path.with_suffix(".tmp").replace(resume_path)
    metrics_file.close()
    model.load_state_dict(best_weights)
    return model, state
