"""Evaluation as external validation: the out-of-domain gates applied to every evaluated image.

``medlens evaluate`` on any labelled data (the training layout, another site's image folder, a CSV
``path,label[,patient_id]``) is an external check of the model's envelope. For each evaluated image this module
applies the three gates of :mod:`medlens.domain` (DICOM metadata where the file is DICOM, the content gate on
the decoded image, the learned in-domain score when the card has one) and the card's softmax referral policy
(as ``predictions.csv`` computes it), and reports:

* the share judged out of domain (with its count and the most common reasons);
* the metrics on the in-domain images, with the same patient-level intervals as the metrics on all images;
* the **silent error** rate: wrong label at the operating threshold, judged in domain and not referred (the
  errors nothing warns the user about), over all evaluated images, with a Wilson interval; and the silent
  *miss* rate (a positive image called negative, in domain, not referred) over the positive images.

An image judged out of domain is referred with no label (``medlens.domain.apply_verdict``), so it can never be a
silent error; a wrong label that is referred is not silent either.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import torch

from medlens.data.readers import read_image
from medlens.domain import DomainGate
from medlens.errors import DataError
from medlens.metrics import metrics_with_ci

log = logging.getLogger("medlens.external")
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> dict[str, Any]:
    """``{"value", "ci_low", "ci_high", "k", "n", "method"}``: a proportion with its Wilson 95 % interval."""
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0, "method": "wilson"}
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return {"value": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half),
            "k": int(k), "n": int(n), "method": "wilson"}


def _decoded(item: str, fallback: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    """The decoded image and its metadata for the content and DICOM gates; items that are not files (MedMNIST
    rows) fall back to the network input (already resized: the size check cannot apply to them)."""
    try:
        return read_image(item)
    except (DataError, OSError, ValueError):
        return fallback[0].numpy().astype(np.float32) / 255.0, {}


def verdicts(predictor: Any, items: list[str], images: torch.Tensor) -> list[dict[str, Any]]:
    """One verdict per evaluated image (``in_domain``, ``domain_score``, ``domain_reason``): the DICOM metadata
    and content gates on the decoded file, the learned score on the network input ``images`` (N, 1, S, S)."""
    gate = predictor.gate or DomainGate(predictor.card.domain)
    scores = gate.scores(predictor.model, images, predictor.card.intensity, device=predictor.device)
    out = []
    for j, item in enumerate(items):
        image, meta = _decoded(item, images[j])
        out.append(gate.combine(gate.gate_reason(image, meta), None if scores is None else float(scores[j])))
    return out


def softmax_refer(predictor: Any, images: torch.Tensor) -> np.ndarray | None:
    """The card's softmax referral (``refer`` of a single pass, as ``predictions.csv`` and ``predict`` compute
    it), or ``None`` when the card has no softmax referral threshold."""
    if ((predictor.card.refer or {}).get("thresholds") or {}).get("softmax") is None:
        return None
    return np.asarray(predictor.predict_with_uncertainty(images, "softmax")["refer"], dtype=bool)


def _intended_use(domain: dict[str, Any]) -> str:
    use = (domain or {}).get("intended_use")
    if isinstance(use, dict):
        return str(use.get("text", ""))
    return str(use) if use else ("not recorded in this model card (trained before medlens recorded it): the "
                                 "population, view and modality it was validated on are unknown")


def assess(predictor: Any, items: list[str], images: torch.Tensor, y: np.ndarray, prob: np.ndarray,
           pred: np.ndarray, threshold: float, *, patients: list[str] | None, n_boot: int, seed: int
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``domain`` section of ``metrics.json`` and per-image columns (``in_domain``, ``domain_score``,
    ``refer``: the softmax referral, true for every out-of-domain image) for ``predictions.csv``."""
    card = predictor.card
    found = verdicts(predictor, items, images)
    in_domain = np.array([v["in_domain"] for v in found], dtype=bool)
    score = np.array([np.nan if v["domain_score"] is None else v["domain_score"] for v in found], dtype=float)
    refer_soft = softmax_refer(predictor, images)
    n = len(y)
    wrong = np.asarray(pred) != np.asarray(y)
    # out of domain: no label, referred; a wrong label is silent only when in domain and not referred
    not_referred = ~refer_soft if refer_soft is not None else np.ones(n, dtype=bool)
    silent = wrong & in_domain & not_referred
    positive = np.asarray(y) == card.positive_class
    silent_miss = silent & positive
    reasons = Counter(_reason_kind(v["domain_reason"]) for v in found if not v["in_domain"])
    section: dict[str, Any] = {
        "intended_use": _intended_use(card.domain),
        "gates": {"dicom metadata": True, "content": True,
                  "learned score": bool((predictor.gate or DomainGate(card.domain)).has_score)},
        "score_threshold": ((card.domain or {}).get("score") or {}).get("threshold"),
        "n": int(n),
        "out_of_domain": {**wilson(int((~in_domain).sum()), n), "reasons": dict(reasons.most_common())},
        "in_domain_n": int(in_domain.sum()),
        "referral": ("the card's softmax referral policy (decision entropy above its threshold) plus every "
                     "out-of-domain image" if refer_soft is not None else
                     "the card has no softmax referral policy: only out-of-domain images are referred"),
        "referred": wilson(int((~not_referred | ~in_domain).sum()), n),
        "silent_error": {**wilson(int(silent.sum()), n),
                         "definition": "wrong label at the operating threshold, in domain, not referred; "
                                       "over all evaluated images"},
        "silent_miss": {**wilson(int(silent_miss.sum()), int(positive.sum())),
                        "definition": f"a {card.class_names[card.positive_class]} image called "
                                      f"{card.class_names[1 - card.positive_class]}, in domain, not referred; "
                                      f"over the {card.class_names[card.positive_class]} images"},
        "in_domain_metrics": None,
    }
    if in_domain.any():
        keep = np.flatnonzero(in_domain)
        groups = [patients[i] for i in keep] if patients is not None else None
        section["in_domain_metrics"] = metrics_with_ci(y[keep], prob[keep], threshold, n_boot=n_boot, seed=seed,
                                                       groups=groups)
    log.info("domain: %d of %d images out of domain; %d silent errors (wrong, in domain, not referred)",
             int((~in_domain).sum()), n, int(silent.sum()))
    refer_all = ~not_referred | ~in_domain if refer_soft is not None else ~in_domain
    return section, {"in_domain": in_domain, "domain_score": score, "refer": refer_all}


def _reason_kind(reason: str | None) -> str:
    """A reason without its numbers, for counting (``"the image is unlike the training images"``)."""
    return re.sub(r"\d+(\.\d+)?", "#", str(reason or "").split(" (")[0])


def summary(section: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """The report's "Domain" section: the intended use quoted, the out-of-domain share and the silent errors."""
    def pct(e: dict[str, Any]) -> str:
        if e["value"] is None:
            return "n/a (none)"
        return f"{e['value']:.1%} ({e['k']} of {e['n']}; 95% CI {e['ci_low']:.1%}-{e['ci_high']:.1%}, Wilson)"

    out: dict[str, Any] = {"intended use (model card)": section["intended_use"],
                           "gates applied": ", ".join(k for k, v in section["gates"].items() if v),
                           "judged out of domain": pct(section["out_of_domain"]),
                           "images in domain": section["in_domain_n"],
                           "referred (softmax policy or out of domain)": pct(section["referred"]),
                           "silent errors (wrong, in domain, not referred)": pct(section["silent_error"]),
                           "silent misses (over positive images)": pct(section["silent_miss"])}
    for reason, count in section["out_of_domain"]["reasons"].items():
        out[f"out of domain: {reason}"] = count
    m = section.get("in_domain_metrics")
    if m:
        for key in ("auc", "sensitivity", "specificity", "accuracy"):
            e = m[key]
            out[f"in-domain {key}"] = (f"{e['value']:.4f} (95% CI {e['ci_low']:.4f}-{e['ci_high']:.4f}, "
                                       f"{m['bootstrap']['unit']}-level bootstrap)")
    return out
