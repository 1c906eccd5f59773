"""Prediction from a run directory: load the card and weights, preprocess exactly as in training, predict.

``Predictor.from_run(run_dir).predict(paths)``: calibrated probability, the label at the operating threshold,
uncertainty and ``refer``. The forward pass, the temperature and the label rule are ``medlens.forward``'s and
the uncertainty is ``medlens.uncertainty.predictive``, the same functions training, evaluation and the service
use, so the network sees identically prepared input everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medlens.data.cache import preprocess
from medlens.data.readers import read_image
from medlens.domain import DomainGate, apply_verdict, logits_and_pooled
from medlens.errors import ConfigError, DataError
from medlens.forward import decide, predict_logits, probabilities, resolve_device
from medlens.models.base import inference_form
from medlens.models.card import ModelCard, load_checkpoint
from medlens.seg.crop import LungCropper, lung_cropper
from medlens.uncertainty import UNCERTAINTY_METHODS, predictive


@dataclass
class Predictor:
    model: nn.Module
    card: ModelCard
    device: torch.device
    #: the out-of-domain gates (``medlens.domain``): DICOM metadata, content and the learned in-domain score
    gate: DomainGate | None = None
    #: the lung crop of an anatomy-aware run (``medlens.seg.crop``), else ``None``
    crop: LungCropper | None = None
    #: ``torch``, or ``onnx`` / ``onnx-int8`` (``medlens.export``): then ``model`` is an ONNX Runtime session and
    #: ``torch_model`` the run's torch network, kept for heat maps (they need gradients)
    backend: str = "torch"
    torch_model: nn.Module | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", backend: str = "torch") -> Predictor:
        """``backend``: ``torch`` (the run's weights), ``onnx`` or ``onnx-int8`` (``RUN/export/``, made by
        ``medlens export``; ONNX Runtime on the CPU)."""
        from medlens.export import BACKENDS

        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
        dev = resolve_device(device) if backend == "torch" else torch.device("cpu")
        model, card = load_checkpoint(Path(run_dir), map_location=dev)
        if card.task != "classification":
            raise ConfigError(f"{run_dir} is a {card.task} run: it gives masks, not labels",
                              hint="use `medlens segment RUN FILE... --out DIR` for a segmentation run")
        model.to(dev).eval()
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        elif backend == "torch":  # BatchNorm folded, channels-last: the CPU's fast form (not the ONNX backends'
            inference_form(model)  # torch_model, which keeps the checkpoint's own form for heat maps)
        common = {"card": card, "device": dev, "gate": DomainGate.for_run(run_dir, card.domain),
                  "crop": lung_cropper(card.preprocess, run_dir)}
        if backend == "torch":
            return cls(model=model, **common)
        from medlens.export import OrtClassifier, backend_file, check_export

        path = backend_file(run_dir, backend)
        check_export(run_dir, card, path)
        return cls(model=OrtClassifier(path), backend=backend, torch_model=model, **common)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """float [0, 1] HxW image -> uint8 (1, 1, S, S) network input, as in training (the card's size and
        ``preprocess`` options, e.g. CLAHE)."""
        return torch.from_numpy(preprocess(image, self.card.input_size, options=self.card.preprocess,
                                           crop=self.crop))[None, None]

    def crop_box(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        """Where ``prepare`` cuts ``image`` (top, bottom, left, right), or ``None`` when it keeps all of it."""
        return self.crop.box(image) if self.crop is not None else None

    def predict_images(self, images: torch.Tensor) -> np.ndarray:
        """Positive-class probabilities for uint8 images (N, 1, S, S)."""
        logits = predict_logits(self.model, images, intensity=self.card.intensity, device=self.device)
        return probabilities(logits, self.card.temperature)[:, self.card.positive_class]

    def predict_with_uncertainty(self, images: torch.Tensor, method: str = "softmax", passes: int | None = None,
                                 *, logits: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Calibrated positive-class probability plus its uncertainty (``medlens.uncertainty.predictive``).

        ``softmax``: one pass; ``mc``: MC dropout (20 passes); ``tta``: test-time augmentation (8 passes, the
        first unchanged); ``ensemble``: the members of an ensemble run. Adds ``refer`` (bool) where the card
        holds a referral threshold for ``method``."""
        if method == "mc" and self.backend != "torch":
            raise ConfigError(f"MC dropout runs the torch network's dropout layers; the {self.backend} backend's "
                              "graph has none", hint="use --backend torch for MC dropout, or softmax / tta here")
        refer = self.card.refer or {}
        out = predictive(self.model, images, method, intensity=self.card.intensity,
                         temperature=self.card.temperature, threshold=self.card.threshold,
                         positive_class=self.card.positive_class,
                         mc_passes=passes or int(refer.get("mc_passes", 20)),
                         tta_passes=passes or int(refer.get("tta_passes", 8)), device=self.device, logits=logits)
        threshold = (refer.get("thresholds") or {}).get(method)
        if threshold is not None:
            out["refer"] = out[refer.get("measure", "predictive_entropy")] > float(threshold)
        return out

    def predict_and_score(self, images: torch.Tensor, method: str = "softmax") -> dict[str, np.ndarray]:
        """:meth:`predict_with_uncertainty` plus ``domain_score`` (the learned in-domain distance; NaN without
        one), sharing one forward pass between the prediction and the score (ensembles: two passes, as their
        features are member 0's)."""
        gate, card = self.gate, self.card
        if gate is not None and gate.has_score and len(images) and not hasattr(self.model, "members"):
            logits, features = logits_and_pooled(self.model, images, intensity=card.intensity, device=self.device)
            out = self.predict_with_uncertainty(images, method, logits=logits)
            out["domain_score"] = gate.score_features(features)
            return out
        out = self.predict_with_uncertainty(images, method)
        scores = gate.scores(self.model, images, card.intensity, self.device) if gate else None
        out["domain_score"] = np.full(len(images), np.nan) if scores is None else scores
        return out

    def explain_options(self, method: str) -> dict:
        """Options for ``medlens.explain`` methods: the card's ``cam_layer`` for the methods that hook a layer."""
        from medlens.explain import METHODS

        cls = METHODS.get(method.lower())
        if cls is not None and cls.needs_activations and self.card.cam_layer:
            return {"layer": self.card.cam_layer}
        return {}

    def explain(self, x: torch.Tensor, method: str = "gradcam", target=None):
        """``medlens.explain.explain`` on this model with the layer named in its card; ``x`` is network input."""
        from medlens.explain import explain

        # heat maps need the torch network's gradients: with an ONNX backend, the run's torch model (same weights)
        model = self.torch_model if self.torch_model is not None else self.model
        return explain(model, x, method, target=target, **self.explain_options(method))

    def refer_note(self, method: str) -> str:
        """What ``refer`` means for ``method``, in words (for JSON output and the viewer)."""
        refer = self.card.refer or {}
        threshold = (refer.get("thresholds") or {}).get(method)
        if threshold is None:
            return f"no referral policy for '{method}' in this model card"
        share = 1 - float(refer.get("coverage", 0.9))
        measure = str(refer.get("measure", "predictive_entropy")).replace("_", " ")
        return (f"refer when the {measure} ({method}) exceeds {float(threshold):.4g} nats: the most "
                f"uncertain {share:.0%} of {refer.get('n', '?')} held-apart validation images")

    def predict(self, paths: list[str | Path], uncertainty: str | None = None, *,
                read: Callable[[Any], tuple[np.ndarray, dict]] = read_image) -> list[dict]:
        """One result per file: calibrated probability, label at the operating point, threshold, model id,
        ``refer`` (the card's referral policy for the chosen uncertainty method; ``softmax`` by default) and,
        with ``uncertainty`` (mc | tta | ensemble), the spread over the passes. Unreadable files give a result
        with an ``error`` field instead of stopping the batch. An unknown method raises ``ConfigError`` at once.

        Every result says whether the input is assessable (``in_domain``, ``domain_score``, ``domain_reason``,
        see ``medlens.domain``); when it is not, ``label`` and ``positive`` are null, ``refer`` is true, the
        ``refer_reason`` says why and the probability is kept for research use only (``probability_note``).
        ``read`` decodes one path (default :func:`read_image`; the DICOM node passes the image it already has)."""
        method = uncertainty or "softmax"
        if method not in UNCERTAINTY_METHODS:
            raise ConfigError(f"unknown uncertainty method {method!r}",
                              hint=f"choose one of {', '.join(UNCERTAINTY_METHODS)}")
        results: list[dict] = []
        batch, where, images, metas = [], [], [], []
        for path in paths:
            try:
                image, meta = read(path)
            except DataError as exc:
                results.append({"path": str(path), "error": exc.message})
                continue
            where.append(len(results))
            results.append({"path": str(path)})
            batch.append(self.prepare(image))
            images.append(image)
            metas.append(meta)
        if batch:
            extra = self.predict_and_score(torch.cat(batch), method)  # one pass: prediction + in-domain score
            gate = self.gate or DomainGate(self.card.domain)
            verdicts = [gate.verdict(image, meta, float(score))
                        for image, meta, score in zip(images, metas, extra.pop("domain_score"), strict=True)]
            probs = extra.pop("probability")
            refer = extra.pop("refer", None)
            note = self.refer_note(method)
            for j, (i, p) in enumerate(zip(where, probs, strict=True)):
                positive, label = decide(p, self.card)
                results[i].update({
                    "probability": round(float(p), 6),
                    "label": label,
                    "positive": positive,
                    "threshold": round(float(self.card.threshold), 6),
                    "refer": None if refer is None else bool(refer[j]),
                    "refer_reason": note,
                    "model_id": self.card.model_id,
                    "policy_hash": self.card.policy_hash,
                    "uncertainty": {"method": method, **{
                        k: (int(v[j]) if k == "passes" else round(float(v[j]), 6)) for k, v in extra.items()}},
                })
                apply_verdict(results[i], verdicts[j])
        return results


def to_json_lines(results: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in results)
