"""What `medlens evaluate` measures about trust on a split: does the uncertainty find the errors, do the heat
maps depend on the model, and where do they fall.

* :func:`selective_prediction`: per uncertainty method (single pass, MC dropout, TTA, ensemble), accuracy vs
  coverage at the operating threshold, the gain from keeping the 90 % most certain images, and what the
  referral policy chosen on validation (from the model card) does on this split.
* :func:`faithfulness`: on a seeded sample, deletion / insertion AUC of the maps against a random pixel order
  (Petsiuk et al. 2018) and the model-randomisation check (Adebayo et al. 2018).
* :func:`cam_gallery`: maps of the most confident true positives, false positives and false negatives.
* :func:`lung_energy`: where lung masks exist, the share of map energy inside the lung fields, against the
  share a map spread evenly over the image would have (the lungs' area).

All of it explains and scores the label the user is shown: the class at the card's operating threshold.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medlens.config import Config
from medlens.data.readers import read_image
from medlens.errors import DataError
from medlens.explain import deletion_insertion, randomisation_check
from medlens.forward import shown_class
from medlens.inference import Predictor
from medlens.models.card import normalize_batch
from medlens.selective import selective_curve, selective_gain
from medlens.uncertainty import REFER_MEASURE, available_methods, predictive

log = logging.getLogger("medlens.trust")


def selective_prediction(predictor: Predictor, images: torch.Tensor, y: np.ndarray, cfg: Config,
                         methods: list[str] | None = None) -> dict:
    """Uncertainty per method on ``images`` (uint8), and what referring the most uncertain buys.

    Per method: ``accuracy`` on all images at the operating threshold, ``accuracy_kept`` on the
    ``eval.refer_coverage`` most certain share of THIS split and their difference ``gain`` (the selective-
    prediction bar), the ``curve`` (accuracy vs coverage), and ``policy``: the card's referral threshold
    (chosen on validation) applied here: the share referred and the accuracy of the rest."""
    card, ec = predictor.card, cfg.eval
    thresholds = (card.refer or {}).get("thresholds", {})
    measure = (card.refer or {}).get("measure", REFER_MEASURE)
    out: dict = {"coverage": ec.refer_coverage, "measure": measure, "methods": {}, "columns": {}}
    for method in methods or available_methods(predictor.model):
        r = predictive(predictor.model, images, method, intensity=card.intensity, temperature=card.temperature,
                       threshold=card.threshold, positive_class=card.positive_class, mc_passes=int(card.refer.get("mc_passes", ec.mc_passes)),
                       tta_passes=int(card.refer.get("tta_passes", ec.tta_passes)), device=predictor.device,
                       seed=cfg.train.seed)
        prob, u = r["probability"], r[measure]
        correct = shown_class(prob, card.threshold, card.positive_class) == y
        curve = selective_curve(y, prob, u, card.threshold, points=11, min_coverage=0.5)
        gain = selective_gain(y, prob, u, card.threshold, coverage=ec.refer_coverage)
        # the same with the ordinary (p = 0.5 centred) predictive entropy, for comparison
        gain_entropy = selective_gain(y, prob, r["predictive_entropy"], card.threshold, coverage=ec.refer_coverage)
        entry = {"passes": int(r["passes"][0]), "accuracy": float(correct.mean()),
                 "accuracy_kept": float(correct.mean() + gain), "gain": float(gain),
                 "gain_predictive_entropy": float(gain_entropy),
                 "errors_auc": _errors_auc(correct, u),
                 "curve": {k: curve[k].tolist() for k in ("coverage", "accuracy", "sensitivity", "specificity")}}
        if method in thresholds:
            refer = u > float(thresholds[method])
            kept = ~refer
            entry["policy"] = {"refer_threshold": float(thresholds[method]), "referred": float(refer.mean()),
                               "accuracy_not_referred": float(correct[kept].mean()) if kept.any() else None,
                               "errors_referred": int((~correct & refer).sum()), "errors": int((~correct).sum())}
        out["methods"][method] = entry
        out["columns"][method] = {"probability": prob, "uncertainty": u}
    return out


def _errors_auc(correct: np.ndarray, u: np.ndarray) -> float | None:
    """AUROC of the uncertainty for telling errors from correct predictions (0.5 = blind)."""
    from sklearn.metrics import roc_auc_score

    wrong = ~np.asarray(correct, dtype=bool)
    return float(roc_auc_score(wrong, u)) if 0 < wrong.sum() < len(wrong) else None


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, k), replace=False))


def faithfulness(predictor: Predictor, images: torch.Tensor, prob: np.ndarray, cfg: Config) -> dict:
    """Deletion / insertion against a random order and the randomisation check, on a seeded sample."""
    card, ec = predictor.card, cfg.eval
    idx = _sample(len(images), ec.n_faithfulness, cfg.train.seed)
    x = normalize_batch(images[torch.from_numpy(idx)].to(predictor.device), card.intensity)
    targets = torch.from_numpy(shown_class(prob[idx], card.threshold, card.positive_class)).to(x.device)
    maps = torch.cat([predictor.explain(part, ec.cam_method, target=t).maps
                      for part, t in zip(x.split(32), targets.split(32), strict=True)])
    kw = {"steps": ec.faithfulness_steps, "target": targets, "seed": cfg.train.seed}
    cam = deletion_insertion(predictor.model, x, maps, **kw)
    rnd = deletion_insertion(predictor.model, x, maps, random_order=True, **kw)
    rho = randomisation_check(predictor.model, x, ec.cam_method, "top", seed=cfg.train.seed, target=targets,
                              **predictor.explain_options(ec.cam_method))
    finite = rho[np.isfinite(rho)]
    return {
        "method": ec.cam_method, "n": int(len(idx)), "steps": ec.faithfulness_steps, "baseline": "blur",
        "deletion_auc": float(cam["deletion_auc"].mean()), "deletion_auc_random": float(rnd["deletion_auc"].mean()),
        "insertion_auc": float(cam["insertion_auc"].mean()),
        "insertion_auc_random": float(rnd["insertion_auc"].mean()),
        "deletion_better_than_random": float((cam["deletion_auc"] < rnd["deletion_auc"]).mean()),
        "insertion_better_than_random": float((cam["insertion_auc"] > rnd["insertion_auc"]).mean()),
        "randomisation_spearman_median": float(np.median(finite)) if len(finite) else None,
        "randomisation_spearman_iqr": [float(np.percentile(finite, 25)), float(np.percentile(finite, 75))]
        if len(finite) else None,
        "randomisation_layers": "top (head + last feature stage re-initialised)",
        "curves": {"fractions": cam["fractions"].tolist(),
                   "deletion": cam["deletion_curve"].mean(0).tolist(),
                   "deletion_random": rnd["deletion_curve"].mean(0).tolist(),
                   "insertion": cam["insertion_curve"].mean(0).tolist(),
                   "insertion_random": rnd["insertion_curve"].mean(0).tolist()},
    }


def cam_gallery(predictor: Predictor, images: torch.Tensor, y: np.ndarray, prob: np.ndarray, paths: list[str],
                cfg: Config) -> list[dict]:
    """The ``eval.n_cam_examples`` most confident true positives, false positives and false negatives, with
    the map of the label shown (items: image uint8 HxW, cam HxW, kind, prob, label, path)."""
    card = predictor.card
    positive = card.positive_class
    shown_positive = shown_class(prob, card.threshold, positive) == positive
    kinds = (("true positive", shown_positive & (y == positive), -prob),
             ("false positive", shown_positive & (y != positive), -prob),
             ("false negative", ~shown_positive & (y == positive), prob))
    gallery = []
    for kind, mask, order in kinds:
        chosen = [i for i in np.argsort(order, kind="stable") if mask[i]][: cfg.eval.n_cam_examples]
        if not chosen:
            continue
        sel = torch.as_tensor(chosen)
        x = normalize_batch(images[sel].to(predictor.device), card.intensity)
        target = torch.from_numpy(shown_class(prob[chosen], card.threshold, positive)).to(x.device)
        maps = predictor.explain(x, cfg.eval.cam_method, target=target).maps.cpu().numpy()
        gallery += [{"image": images[i, 0].numpy(), "cam": maps[j], "kind": kind, "prob": float(prob[i]),
                     "label": int(y[i]), "path": paths[i]} for j, i in enumerate(chosen)]
    return gallery


# ------------------------------------------------------------------------------------------ lung masks
def mask_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a mask folder: ``manifest.csv`` with ``image`` and ``mask`` columns (paths
    relative to the folder), or ``images/`` and ``masks/`` matched by file stem."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"image", "mask"} <= set(rows[0]):
            raise DataError(f"{manifest}: needs 'image' and 'mask' columns", hint="or use images/ + masks/ folders")
        return [(root / r["image"], root / r["mask"]) for r in rows]
    masks = {p.stem: p for p in (root / "masks").glob("*") if p.is_file()}
    pairs = [(p, masks[p.stem]) for p in sorted((root / "images").glob("*")) if p.stem in masks]
    if not pairs:
        raise DataError(f"{root}: no image/mask pairs found",
                        hint="give a folder with manifest.csv (image,mask) or images/ and masks/ with matching names")
    return pairs


def lung_energy(predictor: Predictor, masks_root: str | Path, cfg: Config, *, limit: int | None = None) -> dict:
    """Share of the map's energy inside the lung fields (mask value 255), over the pixels not marked
    "ignore" (127), against the lungs' share of those pixels (what an evenly spread map would give).

    Images and masks are squashed to the model's input size exactly as ``preprocess`` does (masks with
    nearest-neighbour), so map and mask stay aligned; for an anatomy-aware run the mask is cut to the same lung
    crop as the image first, so the share is measured in the frame the model sees."""
    card = predictor.card
    size = card.input_size
    pairs = mask_pairs(masks_root)[:limit]
    energy, area, skipped, flat = [], [], [], [0]
    batch, lungs, valids = [], [], []

    def flush():
        if not batch:
            return
        images = torch.cat(batch)
        x = normalize_batch(images.to(predictor.device), card.intensity)
        prob = predictor.predict_images(images)
        target = torch.from_numpy(shown_class(prob, card.threshold, card.positive_class)).to(x.device)
        maps = predictor.explain(x, cfg.eval.cam_method, target=target).maps.cpu().numpy()
        for cam, lung, valid in zip(maps, lungs, valids, strict=True):
            cam = np.clip(cam, 0, None) * valid
            if cam.sum() > 0:
                energy.append(float(cam[lung].sum() / cam.sum()))
                area.append(float(lung.sum() / valid.sum()))
            else:  # an all-zero map (nothing positive after the ReLU) has no energy to place
                flat[0] += 1
        batch.clear()
        lungs.clear()
        valids.clear()

    for image_path, mask_path in pairs:
        try:
            image, _ = read_image(image_path)
            full = Image.open(mask_path).convert("L")
            box = predictor.crop_box(image)  # an anatomy-aware run sees the lung crop: cut the mask the same way
            if box is not None:
                top, bottom, left, right = box
                full = full.resize(image.shape[1::-1], Image.NEAREST).crop((left, top, right, bottom))
            mask = np.asarray(full.resize((size, size), Image.NEAREST))
        except (DataError, OSError) as exc:
            skipped.append(f"{image_path.name}: {getattr(exc, 'message', exc)}")
            continue
        if not (mask == 255).any():
            skipped.append(f"{mask_path.name}: no lung pixels (value 255) in the mask")
            continue
        batch.append(predictor.prepare(image))
        lungs.append(mask == 255)
        valids.append(mask != 127)
        if len(batch) == 32:
            flush()
    flush()
    if not energy and not flat[0]:
        raise DataError(f"{masks_root}: no readable image/mask pair", hint="; ".join(skipped[:3]) or None)
    base = {"source": str(masks_root), "n": len(energy), "flat_maps": flat[0], "method": cfg.eval.cam_method,
            "skipped": skipped}
    if not energy:
        return {**base, "energy_in_lungs_mean": None, "energy_in_lungs_median": None, "lung_area_mean": None,
                "ratio_to_area": None, "share_above_area": None}
    e, a = np.asarray(energy), np.asarray(area)
    return {**base, "energy_in_lungs_mean": float(e.mean()), "energy_in_lungs_median": float(np.median(e)),
            "lung_area_mean": float(a.mean()), "ratio_to_area": float(e.mean() / a.mean()),
            "share_above_area": float((e > a).mean())}
