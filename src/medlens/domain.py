"""Is this input assessable? The one home of the out-of-domain rule.

A model trained on frontal chest radiographs has nothing to say about a CT slice, an MR image, a blank PNG or
noise; without this module it would still answer with a confident label. Three gates, applied in order; the first
that fails gives the reason, in words:

1. **DICOM metadata** (:func:`metadata_reason`): modality in the card's list (default CR, DX), body part examined
   CHEST (or absent), view position PA / AP (or absent), photometric interpretation MONOCHROME1 / 2, pixel spacing
   plausible for a radiograph (0.05-1.0 mm) when the header records it (0 or absent means not recorded).
2. **Content** (:func:`content_reason`) on the decoded float [0, 1] image: tiny (shorter side < 64 px), constant or
   near-constant (standard deviation < 0.02), noise-like (correlation between horizontally and vertically
   neighbouring pixels < 0.5). Measured on the 624 Kermany test images the neighbour correlation is 0.980 at
   the lowest, 0.985 at the 1st percentile, 0.993 at the median (their standard deviation is >= 0.098); uniform
   or Gaussian noise gives -0.003, a 16 px checkerboard 0.88 (not noise: the learned score has to catch it).
   0.5 leaves a wide margin on both sides.
3. **Learned in-domain score** (:func:`mahalanobis`): the Mahalanobis distance of the classifier's pooled
   penultimate features (global average of ``forward_features``; for an ensemble, member 0's) to the training
   images' features: their mean and a Ledoit-Wolf shrunk covariance fitted at the end of training on the training
   images. The threshold is the ``eval.domain_coverage`` (0.99) inverted-CDF quantile of the distances of the
   held-apart validation half (the whole validation split when there is none), so about 99 % of in-domain
   validation images pass. The mean and precision matrix are in a sidecar, ``RUN/model.domain.safetensors``
   (a 256-feature model's precision is 65,536 numbers: too big for the JSON card); the card's ``domain`` section
   holds the gate lists, the threshold and the sidecar's sha256, and is part of the operating-policy hash.

Cards without a ``domain`` section (runs trained before this module) still get the metadata and content gates
with the default lists; their learned score is ``None`` with a note. ``medlens recalibrate RUN DATA`` fits the
learned score for such a run without retraining.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.errors import DataError
from medlens.forward import model_device, modes_restored, wants_channels_last
from medlens.models.card import normalize_batch

#: the DICOM gate a model gets when its card says nothing else (a frontal chest radiograph)
DEFAULT_DICOM = {
    "modalities": ["CR", "DX"],
    "body_parts": ["CHEST"],
    "view_positions": ["PA", "AP"],
    "photometric": ["MONOCHROME1", "MONOCHROME2"],
    "pixel_spacing_mm": [0.05, 1.0],
}
#: the content gate (see the module docstring for how the thresholds were measured)
DEFAULT_CONTENT = {"min_side": 64, "min_std": 0.02, "min_neighbour_correlation": 0.5}
SIDECAR = "model.domain.safetensors"
NO_SCORE_NOTE = ("this model card has no learned in-domain score (trained before medlens had one): only the "
                 "DICOM metadata and content gates apply; `medlens recalibrate RUN DATA` fits it")
RESEARCH_NOTE = "research use only: the input is outside the model's validated domain"


def _listed(values: list[str]) -> str:
    return ", ".join(values)


# --------------------------------------------------------------------------------------------- the gates
def metadata_reason(meta: dict[str, Any], dicom: dict[str, Any] | None = None) -> str | None:
    """Why the DICOM header says the input is not one the model was validated on, or ``None``.
    Non-DICOM inputs (no ``modality`` etc. in ``meta``) pass: there is no header to read."""
    if meta.get("format") != "dicom":
        return None
    rule = {**DEFAULT_DICOM, **(dicom or {})}
    modality = str(meta.get("modality", "")).upper()
    if modality not in rule["modalities"]:
        return (f"modality {modality or '(not recorded)'} is not one this model was validated on "
                f"({_listed(rule['modalities'])})")
    body = str(meta.get("body_part", "")).upper()
    if body and body not in rule["body_parts"]:
        return f"body part examined {body} is not one this model was validated on ({_listed(rule['body_parts'])})"
    view = str(meta.get("view_position", "")).upper()
    if view and view not in rule["view_positions"]:
        return f"view position {view} is not one this model was validated on ({_listed(rule['view_positions'])})"
    photometric = str(meta.get("photometric", "")).upper()
    if photometric not in rule["photometric"]:
        return (f"photometric interpretation {photometric or '(not recorded)'} is not a grey radiograph "
                f"({_listed(rule['photometric'])})")
    lo, hi = rule["pixel_spacing_mm"]
    spacing = [s for s in meta.get("pixel_spacing") or [] if s > 0]  # 0 means "not recorded"
    if spacing and not all(lo <= s <= hi for s in spacing):
        return (f"pixel spacing {' x '.join(f'{s:g}' for s in spacing)} mm is implausible for a chest radiograph "
                f"(expected {lo:g}-{hi:g} mm)")
    return None


def neighbour_correlation(image: np.ndarray, max_side: int = 512) -> float:
    """Mean Pearson correlation between horizontally and vertically neighbouring pixels (near 1 for a
    radiograph, near 0 for noise); large images are strided down to about ``max_side`` first."""
    x = np.asarray(image)
    step = max(1, max(x.shape) // max_side)
    x = np.array(x[::step, ::step], dtype=np.float64)  # at most ~512 x 512: one small float64 copy
    # Pearson's r from sums: the sums over "all pixels but the last (first) column (row)" come from the image's
    # totals, so each direction costs one product, not two centred copies and three products. 2.8x faster on a
    # 224 px upload, 4.7x on a 1300 px one (it ran on every prediction); equal to np.corrcoef within 1e-14.
    sq = x * x
    total, total_sq = float(x.sum()), float(sq.sum())
    out = []
    for a, b, a_left_out, b_left_out in ((x[:, :-1], x[:, 1:], np.s_[:, -1], np.s_[:, 0]),
                                         (x[:-1], x[1:], np.s_[-1], np.s_[0])):
        n = a.size
        ma, mb = (total - x[a_left_out].sum()) / n, (total - x[b_left_out].sum()) / n
        va = (total_sq - sq[a_left_out].sum()) / n - ma * ma
        vb = (total_sq - sq[b_left_out].sum()) / n - mb * mb
        if va <= 1e-12 * ma * ma or vb <= 1e-12 * mb * mb:  # constant (to rounding): no correlation to measure
            out.append(1.0)
            continue
        out.append((float(np.einsum("ij,ij->", a, b)) / n - ma * mb) / float(np.sqrt(va * vb)))
    return float(np.mean(out))


def content_reason(image: np.ndarray, content: dict[str, Any] | None = None) -> str | None:
    """Why the decoded image (float [0, 1], HxW) cannot be a radiograph, or ``None``."""
    rule = {**DEFAULT_CONTENT, **(content or {})}
    h, w = np.asarray(image).shape[:2]
    if min(h, w) < rule["min_side"]:
        return f"the image is {w}x{h} px, smaller than {rule['min_side']} px on its shorter side"
    std = float(np.std(image, dtype=np.float64))  # accumulated in float64 without a float64 copy of the image
    if std < rule["min_std"]:
        return f"the image is blank or nearly uniform (standard deviation {std:.3g} < {rule['min_std']:g})"
    corr = neighbour_correlation(image)
    if corr < rule["min_neighbour_correlation"]:
        return (f"the image looks like noise (neighbouring pixels correlate at {corr:.2f}, a radiograph at "
                f">= {rule['min_neighbour_correlation']:g})")
    return None


# ------------------------------------------------------------------------------------- the learned score
def pooled_features(model: nn.Module, images: torch.Tensor, *, intensity: str, batch_size: int = 256,
                    device: torch.device | None = None) -> np.ndarray:
    """(N, D) float64 pooled penultimate features of uint8 images (N, 1, S, S); ensembles: member 0's."""
    first = model.members[0] if hasattr(model, "members") else model
    if hasattr(first, "logits_and_pooled"):  # an ONNX Runtime session (medlens.export): its graph gives them
        return logits_and_pooled(first, images, intensity=intensity, batch_size=batch_size)[1]
    device = device or model_device(first)
    out = []
    with modes_restored(first), torch.no_grad():
        first.eval()
        for start in range(0, len(images), batch_size):
            x = normalize_batch(images[start:start + batch_size].to(device), intensity)
            f = first.forward_features(x).float()
            out.append(f.mean(dim=tuple(range(2, f.ndim))).cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def logits_and_pooled(model: nn.Module, images: torch.Tensor, *, intensity: str, batch_size: int = 256,
                      device: torch.device | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """One eval pass over uint8 images (N, 1, S, S): float32 CPU logits (as ``forward.predict_logits`` gives)
    and the pooled penultimate features (as :func:`pooled_features`). The service needs both for every image;
    ``forward_head(forward_features(x))`` is what ``forward`` runs, so splitting it costs nothing, where a
    second pass for the features doubled the model's share of a request. Not for ensembles (their features are
    member 0's, their logits the ensemble's)."""
    from medlens.forward import autocast

    if hasattr(model, "logits_and_pooled"):  # an ONNX Runtime session (medlens.export): one graph call
        pairs = [model.logits_and_pooled(normalize_batch(images[i:i + batch_size], intensity))
                 for i in range(0, len(images), batch_size)]
        return torch.cat([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    device = device or model_device(model)
    logits, feats = [], []
    with modes_restored(model), torch.no_grad():
        model.eval()
        for start in range(0, len(images), batch_size):
            x = normalize_batch(images[start:start + batch_size].to(device), intensity)
            if wants_channels_last(model, device) and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                f = model.forward_features(x)
                logits.append(model.forward_head(f).float().cpu())
            feats.append(f.float().mean(dim=tuple(range(2, f.ndim))).cpu().double().numpy())
    return torch.cat(logits), np.concatenate(feats)


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of ``features`` to ``mean`` under ``precision`` (inverse covariance)."""
    d = np.asarray(features, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


def fit_score(train_features: np.ndarray, val_features: np.ndarray, coverage: float
              ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Fit the mean and Ledoit-Wolf precision on training features, the threshold on validation features:
    the ``coverage`` inverted-CDF quantile of their distances. Returns (card summary, mean, precision)."""
    from sklearn.covariance import LedoitWolf

    from medlens.selective import choose_refer_threshold

    if len(train_features) < 2 or len(val_features) < 1:
        raise DataError(f"cannot fit the in-domain score on {len(train_features)} training and "
                        f"{len(val_features)} validation images", hint="train on more images")
    lw = LedoitWolf().fit(train_features)
    mean, precision = lw.location_.astype(np.float64), lw.precision_.astype(np.float64)
    threshold = choose_refer_threshold(mahalanobis(val_features, mean, precision), coverage=coverage)
    return {"method": "mahalanobis", "threshold": float(threshold), "coverage": float(coverage),
            "shrinkage": float(lw.shrinkage_), "dim": int(train_features.shape[1]),
            "n_train": int(len(train_features)), "n_val": int(len(val_features))}, mean, precision


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".dcm": "DICOM", ".dicom": "DICOM",
            ".nii": "NIfTI", ".gz": "NIfTI", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def _dicom_headers(paths: list[str], limit: int = 300) -> tuple[list[str], list[str], list[str]]:
    """Modalities, views and body parts recorded in (up to ``limit``) DICOM headers, most common first."""
    from collections import Counter

    import pydicom

    found: dict[str, Counter] = {"Modality": Counter(), "ViewPosition": Counter(), "BodyPartExamined": Counter()}
    for path in paths[:limit]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - an unreadable header just records nothing
            continue
        for key, counter in found.items():
            value = str(getattr(ds, key, "") or "").strip().upper()
            if value:
                counter[value] += 1
    return tuple([k for k, _ in found[key].most_common()] for key in found)  # type: ignore[return-value]


def intended_use(table: Any, train_idx: Any, val_idx: Any) -> dict[str, Any]:
    """What the model was trained and validated on, derived from the data only (nothing is assumed about the
    population that the data does not record): source name, file formats, DICOM modalities / views / body parts
    where the files are DICOM, images, patients and classes. Stored in the card's ``domain.intended_use``."""
    idx = [int(i) for i in train_idx] + [int(i) for i in val_idx]
    items = [str(table.items[i]) for i in idx]
    if table.kind == "npz":
        formats = {"MedMNIST .npz arrays": len(items)}
    else:
        formats = {}
        for item in items:
            name = _FORMATS.get(Path(item).suffix.lower(), Path(item).suffix.lower().lstrip(".") or "unknown")
            formats[name] = formats.get(name, 0) + 1
    dicom = [it for it in items if _FORMATS.get(Path(it).suffix.lower()) == "DICOM"]
    modalities, views, body_parts = _dicom_headers(dicom) if dicom else ([], [], [])
    patients = len({str(table.patient_ids[i]) for i in idx})
    source = Path(str(table.source)).name or str(table.source)
    fmt = ", ".join(f"{k} {v:,}" for k, v in sorted(formats.items(), key=lambda kv: -kv[1]))
    header = (f"DICOM modality {'/'.join(modalities) or 'not recorded'}, view {'/'.join(views) or 'not recorded'}, "
              f"body part {'/'.join(body_parts) or 'not recorded'}" if dicom else
              "no DICOM headers: modality, view, body part, age and site are not recorded in the data")
    per_patient = "" if table.patient_id_source not in ("", "per-file") else " (patients not known: per file)"
    text = (f"validated on images like the {len(idx):,} training and validation images of '{source}' "
            f"({fmt}; {patients:,} patients{per_patient}; classes {' / '.join(map(str, table.classes))}); "
            f"{header}. The gates refuse DICOM other than {'/'.join(DEFAULT_DICOM['modalities'])} "
            f"{'/'.join(DEFAULT_DICOM['view_positions'])} chest films and inputs unlike the training images.")
    return {"text": text, "source": source, "formats": formats, "n_images": len(idx), "n_patients": patients,
            "classes": [str(c) for c in table.classes], "modalities": modalities, "views": views,
            "body_parts": body_parts}


def sidecar_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return (path if path.is_dir() else path.parent) / SIDECAR


def fit_domain(model: nn.Module, train_images: torch.Tensor, val_images: torch.Tensor, *, intensity: str,
               coverage: float, run_dir: str | Path, data: str, batch_size: int = 256,
               device: torch.device | None = None) -> dict[str, Any]:
    """Fit the learned score, write the sidecar in ``run_dir`` and return the card's ``domain`` section
    (gate lists + score summary + the sidecar's sha256)."""
    from safetensors.numpy import save_file

    kw = {"intensity": intensity, "batch_size": batch_size, "device": device}
    score, mean, precision = fit_score(pooled_features(model, train_images, **kw),
                                       pooled_features(model, val_images, **kw), coverage)
    path = sidecar_path(run_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"mean": mean, "precision": precision}, str(tmp), metadata={"format": "np"})
    tmp.replace(path)
    score.update({"features": "pooled forward_features (ensembles: member 0)", "data": data,
                  "file": SIDECAR, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return {"dicom": dict(DEFAULT_DICOM), "content": dict(DEFAULT_CONTENT), "score": score}


class DomainGate:
    """The three gates for one model: ``assess(images, metas, tensors)`` -> one verdict per input."""

    def __init__(self, domain: dict[str, Any], mean: np.ndarray | None = None,
                 precision: np.ndarray | None = None):
        self.domain = domain or {}
        self.mean, self.precision = mean, precision

    @classmethod
    def for_run(cls, run_dir: str | Path, domain: dict[str, Any]) -> DomainGate:
        """Load the sidecar named by the card's ``domain.score`` (checking its sha256); none: gates only."""
        from safetensors.numpy import load_file

        score = (domain or {}).get("score")
        if not score:
            return cls(domain)
        path = sidecar_path(run_dir)
        if not path.is_file():
            raise DataError(f"in-domain score file not found: {path} (named by the model card)",
                            hint="copy it with the card and weights, or run `medlens recalibrate RUN DATA`")
        if hashlib.sha256(path.read_bytes()).hexdigest() != score.get("sha256"):
            raise DataError(f"{path} does not match its model card (sha256 differs)",
                            hint="copy the run's files together, or run `medlens recalibrate RUN DATA`")
        arrays = load_file(str(path))
        return cls(domain, arrays["mean"], arrays["precision"])

    @property
    def has_score(self) -> bool:
        return self.mean is not None and bool(self.domain.get("score"))

    def scores(self, model: nn.Module, tensors: torch.Tensor, intensity: str,
               device: torch.device | None = None) -> np.ndarray | None:
        """Mahalanobis distances of uint8 network inputs (N, 1, S, S), or ``None`` without a learned score."""
        if not self.has_score or len(tensors) == 0:
            return None
        return self.score_features(pooled_features(model, tensors, intensity=intensity, device=device))

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances of pooled features (:func:`pooled_features` / :func:`logits_and_pooled`)."""
        return mahalanobis(features, self.mean, self.precision)

    def gate_reason(self, image: np.ndarray, meta: dict[str, Any]) -> str | None:
        """The metadata and content gates (no model needed): why the input is not assessable, or ``None``."""
        return metadata_reason(meta, self.domain.get("dicom")) or content_reason(image, self.domain.get("content"))

    def verdict(self, image: np.ndarray, meta: dict[str, Any], score: float | None) -> dict[str, Any]:
        """``{"in_domain", "domain_score", "domain_reason"}`` (+ ``domain_note`` without a learned score)."""
        return self.combine(self.gate_reason(image, meta), score)

    def combine(self, reason: str | None, score: float | None) -> dict[str, Any]:
        """The verdict from the gates' reason and the learned score (``None`` or NaN: no score)."""
        if score is not None and not np.isfinite(score):
            score = None
        if reason is None and score is not None:
            threshold = float(self.domain["score"]["threshold"])
            if score > threshold:
                reason = (f"the image is unlike the training images (in-domain distance {score:.1f} > "
                          f"{threshold:.1f}, which {self.domain['score']['coverage']:.0%} of validation images pass)")
        out: dict[str, Any] = {"in_domain": reason is None,
                               "domain_score": None if score is None else round(float(score), 4),
                               "domain_reason": reason}
        if not self.has_score:
            out["domain_note"] = NO_SCORE_NOTE
        return out


def apply_verdict(result: dict[str, Any], verdict: dict[str, Any]) -> dict[str, Any]:
    """Merge a verdict into a prediction result: out of domain means no label, refer, probability for research."""
    result.update({"domain_note": None, "probability_note": None, **verdict})
    if not verdict["in_domain"]:
        result.update({"label": None, "positive": None, "refer": True,
                       "refer_reason": f"not assessable: {verdict['domain_reason']}",
                       "probability_note": RESEARCH_NOTE})
    return result
