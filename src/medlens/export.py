"""Edge deployment: ONNX export, INT8 static quantisation, and the ONNX Runtime backend.

``medlens export RUN --data DATA [--int8] [--calibration N]`` writes ``RUN/export/``:

- ``model.onnx``: fp32, dynamic batch. Input ``image``: float32 ``(N, C, S, S)``, the card's ``intensity``
  normalisation already applied (``medlens.models.card.normalize_batch``, run by the same runtime code that feeds
  the torch model, so both backends get identical input). Outputs ``logits`` ``(N, classes)`` (temperature, threshold
  and the label rule stay in ``medlens.forward``, as for torch) and ``features`` ``(N, D)``, the pooled penultimate
  features the learned in-domain score reads, so one graph call gives the prediction and the domain check.
- ``model.int8.onnx`` (``--int8``): ONNX Runtime static quantisation, QDQ format, per-channel weights, calibrated on
  ``--calibration`` training images only (never validation or test), seeded.
- ``export.card.json``: opset, versions, the input contract, sha256 and size of each file, the source run's
  model id / weights hash / policy hash, and the parity figures measured at export on the run's validation images:
  fp32 max |logit difference| against torch (export fails above 1e-4) and, for INT8, validation AUC and accuracy
  against fp32 (a warning above 0.005 AUC lost).

Backends (``--backend torch|onnx|onnx-int8`` for ``predict``, ``evaluate`` and ``serve``): :class:`OrtClassifier`
stands where the torch module stood, so calibration, threshold, referral and the domain gates run unchanged on its
logits and features. MC dropout needs the torch model's dropout layers and heat maps need its gradients: the
predictor keeps the torch model beside the session for heat maps and says so for MC dropout.

Written here rather than taken from a library: torch.onnx exports and onnxruntime.quantization quantises; this
module only fixes the input/output contract, picks calibration images by the run's own split, and measures parity.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.errors import ConfigError, DataError
from medlens.models.card import _sha256  # the weights' checksum function, for the export files too

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
FP32_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
CARD_NAME = "export.card.json"
BACKENDS = ("torch", "onnx", "onnx-int8")
#: export fails when the fp32 graph's logits differ from torch's by more than this on any validation image
PARITY_TOLERANCE = 1e-4
#: a warning (not a failure) when INT8 loses more validation AUC than this against fp32
INT8_AUC_WARNING = 0.005
#: ... or more validation accuracy at the card's operating threshold: INT8 can keep the ranking (AUC) and still
#: shift the logits enough to move the operating point chosen for fp32 (DenseNet121: 0.963 -> 0.934)
INT8_ACCURACY_WARNING = 0.01


def int8_warnings(parity: dict[str, Any]) -> list[str]:
    """What the INT8 parity figures should warn about: AUC lost, and decisions changed at the threshold."""
    out = []
    if parity["int8_auc_loss"] > INT8_AUC_WARNING:
        out.append(f"INT8 loses {parity['int8_auc_loss']:.4f} validation AUC against fp32 (warning above "
                   f"{INT8_AUC_WARNING})")
    drop = parity["onnx"]["accuracy"] - parity["onnx-int8"]["accuracy"]
    if abs(drop) > INT8_ACCURACY_WARNING:
        out.append(f"INT8 moves the operating point: validation accuracy at the card's threshold "
                   f"{parity['onnx']['accuracy']:.4f} (fp32) -> {parity['onnx-int8']['accuracy']:.4f} (INT8); the "
                   "threshold was chosen for fp32, so serve fp32 or check INT8's sensitivity before using it")
    return out
DEFAULT_OPSET = 17


def export_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EXPORT_DIR


def backend_file(run_dir: str | os.PathLike, backend: str) -> Path:
    """The ONNX file a backend runs; ``DataError`` naming the command to make it when it is missing."""
    if backend not in BACKENDS[1:]:
        raise ConfigError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    path = export_dir(run_dir) / (INT8_NAME if backend == "onnx-int8" else FP32_NAME)
    if not path.is_file():
        flag = " --int8" if backend == "onnx-int8" else ""
        raise DataError(f"{path}: not found: backend {backend!r} needs an exported model",
                        hint=f"run `medlens export {run_dir} --data DATA{flag}` first")
    return path


def check_export(run_dir: str | os.PathLike, card: Any, path: Path) -> dict[str, Any]:
    """The export card beside ``path``, after checking that the ONNX file is the one it describes and that it was
    exported from the run's current weights and policy (a retrained or recalibrated run needs a new export)."""
    card_path = path.parent / CARD_NAME
    try:
        export_card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{card_path}: cannot read the export card ({exc})",
                        hint=f"export again: `medlens export {run_dir} --data DATA`") from None
    entry = next((f for f in export_card.get("files", {}).values() if f.get("file") == path.name), None)
    if entry is None or entry.get("sha256") != _sha256(path):
        raise DataError(f"{path}: does not match its export card (changed or damaged after export)",
                        hint=f"export again: `medlens export {run_dir} --data DATA`")
    source = export_card.get("source", {})
    if source.get("weights_sha256") != card.weights_sha256:
        raise DataError(f"{path}: exported from other weights than the run's ({str(source.get('model_id'))} vs "
                        f"{card.model_id})", hint=f"export again: `medlens export {run_dir} --data DATA`")
    return export_card


class _Graph(nn.Module):
    """What the exported graph computes: normalised input -> (logits, pooled penultimate features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(x)
        return self.model.forward_head(f), f.mean(dim=tuple(range(2, f.ndim)))


class OrtClassifier(nn.Module):
    """An ONNX Runtime session in the place of a torch classifier: ``forward`` gives logits (float32 tensors, as
    the torch module does) for normalised input, ``logits_and_pooled`` logits and in-domain features in one call.
    No parameters, no dropout: ``uncertainty.available_methods`` offers softmax and TTA only."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for damaged or foreign files
            raise DataError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc)[:300]})",
                            hint="export the run again with `medlens export RUN --data DATA`") from None
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x: torch.Tensor, outputs: list[str]) -> list[np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(x.detach().cpu().float().numpy())}
        return self.session.run(outputs, feed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(x, ["logits"])[0])

    def logits_and_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        logits, features = self._run(x, ["logits", "features"])
        return torch.from_numpy(logits), features.astype(np.float64)


# ------------------------------------------------------------------------------------------------ export


def _file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size}


def _ort_logits(path: Path, x_uint8: torch.Tensor, intensity: str, batch_size: int = 64) -> np.ndarray:
    from medlens.models.card import normalize_batch

    model = OrtClassifier(path)
    out = [model(normalize_batch(x_uint8[i:i + batch_size], intensity)).numpy()
           for i in range(0, len(x_uint8), batch_size)]
    return np.concatenate(out)


def _quality(logits: np.ndarray, y: np.ndarray, card: Any) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from medlens.forward import is_positive, probabilities

    p = probabilities(torch.from_numpy(np.asarray(logits, dtype=np.float32)), card.temperature)[:, card.positive_class]
    positive = y == card.positive_class
    return {"auc": float(roc_auc_score(positive, p)),
            "accuracy": float(np.mean(is_positive(p, card.threshold) == positive))}


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over normalised training images, in small batches."""

    def __init__(self, images: torch.Tensor, intensity: str, input_name: str, batch_size: int = 16):
        from medlens.models.card import normalize_batch

        self.batches = iter([{input_name: normalize_batch(images[i:i + batch_size], intensity).numpy()}
                             for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def export_run(run_dir: str | os.PathLike, data: str | os.PathLike, *, int8: bool = False, calibration: int = 256,
               opset: int = DEFAULT_OPSET, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Export a classification run to ``RUN/export/`` (see the module docstring); returns the export card."""
    from medlens import rundir
    from medlens.data.split import split_manifest
    from medlens.forward import predict_logits
    from medlens.models.card import load_checkpoint, normalize_batch
    from medlens.seg.crop import lung_cropper
    from medlens.train import load_split_data

    run_dir = Path(run_dir)
    model, card = load_checkpoint(run_dir, map_location="cpu")
    if card.task != "classification":
        raise ConfigError(f"{run_dir} is a {card.task} run: export handles classifiers",
                          hint="segmentation export is not built yet")
    if hasattr(model, "members"):
        raise ConfigError(f"{run_dir} is an ensemble: export one member run, or distil the ensemble into one "
                          "network first")
    if calibration < 1:
        raise ConfigError("--calibration must be at least 1 image")
    cfg = rundir.run_config(run_dir)
    table, split, loaded = load_split_data(cfg, data, progress=progress, options=card.preprocess,
                                           crop=lung_cropper(card.preprocess, run_dir))
    if card.split_hash and split_manifest(table, split)["hash"] != card.split_hash:
        raise DataError(f"{data}: the split made from this data differs from the run's",
                        hint="export with the data the run was trained on (its validation images check parity)")
    x_val, y_val = loaded["val"].images, table.labels[loaded["val"].keep]
    out_dir = export_dir(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / FP32_NAME
    started = time.perf_counter()
    size = card.input_size
    example = normalize_batch(x_val[:2], card.intensity)
    tmp = fp32.with_suffix(".onnx.tmp")
    with torch.no_grad():
        torch.onnx.export(_Graph(model).eval(), (example,), str(tmp), input_names=["image"],
                          output_names=["logits", "features"], opset_version=opset, dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
    os.replace(tmp, fp32)

    torch_logits = predict_logits(model, x_val, intensity=card.intensity).numpy()
    ort_logits = _ort_logits(fp32, x_val, card.intensity)
    diff = float(np.max(np.abs(torch_logits - ort_logits)))
    parity: dict[str, Any] = {"split": "val", "n": int(len(x_val)), "fp32_max_abs_logit_diff": diff,
                              "tolerance": PARITY_TOLERANCE, "torch": _quality(torch_logits, y_val, card),
                              "onnx": _quality(ort_logits, y_val, card)}
    if not diff <= PARITY_TOLERANCE:
        fp32.unlink(missing_ok=True)
        raise DataError(f"{fp32}: the exported graph's logits differ from torch's by {diff:.2e} on validation "
                        f"images (tolerance {PARITY_TOLERANCE:g}); the file was removed",
                        hint="an operator exports differently: report it with the model name and opset")
    files = {"onnx": _file_entry(fp32)}
    calib_info = None
    if int8:
        int8_path, calib_info = _quantise(fp32, out_dir / INT8_NAME, loaded["train"].images, card.intensity,
                                          n=calibration, seed=seed)
        q_logits = _ort_logits(int8_path, x_val, card.intensity)
        parity["onnx-int8"] = _quality(q_logits, y_val, card)
        parity["int8_auc_loss"] = parity["onnx"]["auc"] - parity["onnx-int8"]["auc"]
        parity["int8_max_abs_logit_diff"] = float(np.max(np.abs(q_logits - ort_logits)))
        warnings = int8_warnings(parity)
        for text in warnings:
            log.warning("%s", text)
        if warnings:
            parity["warning"] = "; ".join(warnings)
        files["onnx-int8"] = _file_entry(int8_path)
    elif (out_dir / INT8_NAME).exists():
        (out_dir / INT8_NAME).unlink()  # an INT8 file from an earlier export no longer matches model.onnx
    import onnxruntime

    export_card = {
        "written_by": "medlens export",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir), "model_id": card.model_id, "model_name": card.model_name,
                   "weights_sha256": card.weights_sha256, "policy_hash": card.policy_hash},
        "opset": opset, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", card.in_chans, size, size],
                  "contract": f"the card's preprocessing (size {size}, options {card.preprocess or {}}) to uint8, then "
                              f"normalize_batch(x, {card.intensity!r}) (medlens.models.card): applied by medlens's "
                              "runtime code before the graph, as for the torch model"},
        "outputs": {"logits": ["batch", len(card.class_names)],
                    "features": "pooled penultimate features (the learned in-domain score's input)"},
        "postprocess": "softmax(logits / card.temperature); positive when P(positive_class) >= card.threshold",
        "files": files,
        "calibration": calib_info,
        "parity": parity,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / CARD_NAME).write_text(json.dumps(export_card, indent=2) + "\n")
    return export_card


def _quantise(fp32: Path, out: Path, train_images: torch.Tensor, intensity: str, *, n: int, seed: int
              ) -> tuple[Path, dict[str, Any]]:
    """Static INT8 (QDQ, per-channel weights) calibrated on ``n`` seeded training images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train_images), size=min(n, len(train_images)), replace=False))
    prepared = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantise the raw graph without it
        log.warning("ONNX quantisation pre-processing failed (%s); quantising the graph as exported", exc)
        source = fp32
    tmp = out.with_suffix(".tmp")
    try:
        quantize_static(str(source), str(tmp), _Calibration(train_images[torch.from_numpy(pick)], intensity, "image"),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        os.replace(tmp, out)
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        for extra in out.parent.glob("*.onnx-augmented*"):
            extra.unlink(missing_ok=True)
    return out, {"split": "train", "n": int(len(pick)), "seed": seed, "method": "MinMax", "format": "QDQ",
                 "weights": "int8 per channel", "activations": "uint8"}
