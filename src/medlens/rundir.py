"""The run directory: the one module that knows what a run folder holds and where.

Everything that reads or writes a run (training, evaluation, recalibration, prediction, the service, the
benchmarks) asks this module for paths instead of spelling file names, so the layout can change in one place::

    RUN/config.yaml          the resolved configuration (reproduce the run from its own folder)
    RUN/split.json           patient ids per split and the split hash
    RUN/metrics.jsonl        one line per training epoch
    RUN/train.log            the training log
    RUN/skipped.txt          files training could not read, with the reason
    RUN/val_predictions.csv  the validation split's calibrated probabilities (with the policy hash)
    RUN/model.safetensors    the chosen weights (+ model.card.json, the self-describing model card)
    RUN/model.domain.safetensors  the learned in-domain score's mean and precision (``medlens.domain``)
    RUN/last.ckpt            the resume checkpoint (``medlens train --resume``)
    RUN/members/K/           ensemble members, each a complete run
    RUN/eval/SPLIT/          metrics.json, predictions.csv, report.html of ``medlens evaluate``
    RUN/evaluations.jsonl    append-only: one line per ``medlens evaluate``, never rewritten or deleted
    RUN/audit.db             the service's audit trail (SQLite default; ``medlens.service.settings``)

The card and weights file names (``model.card.json``, ``model.safetensors``) belong to ``medlens.models.card``.

``evaluations.jsonl`` is the trace that lets a reader see how often, and under which operating policy, a
split (above all the test split) was looked at: ``recalibrate`` reads it and never touches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medlens.errors import DataError

CONFIG = "config.yaml"
SPLIT = "split.json"
EPOCH_METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
RESUME = "last.ckpt"
SKIPPED = "skipped.txt"
VAL_PREDICTIONS = "val_predictions.csv"
AUDIT_DB = "audit.db"
MEMBERS = "members"
EVAL = "eval"
EVALUATIONS = "evaluations.jsonl"


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def split_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SPLIT


def epoch_metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EPOCH_METRICS


def train_log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRAIN_LOG


def resume_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESUME


def member_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / MEMBERS / str(k)


def eval_name(split: str, backend: str = "torch") -> str:
    """The name an evaluation is kept under: the split, or ``SPLIT-BACKEND`` for an ONNX backend (so it never
    overwrites the torch evaluation of the same split)."""
    return split if backend == "torch" else f"{split}-{backend}"


def eval_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / EVAL / split


def evaluations_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVALUATIONS


def existing_run(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; a clear error when it does not exist (commands that serve a run start here)."""
    from medlens.errors import MedlensError

    run = Path(run_dir)
    if not run.exists():
        raise MedlensError(f"run directory '{run}' does not exist", hint="pass the --out folder of `medlens train`")
    return run


def is_run(run_dir: str | Path) -> bool:
    return config_path(run_dir).is_file()


def run_config(run_dir: str | Path):
    """The run's resolved :class:`~medlens.config.Config` (``RUN/config.yaml``)."""
    import yaml

    from medlens.config import config_from_dict

    path = config_path(run_dir)
    if not path.exists():
        raise DataError(f"{run_dir}: not a medlens run directory (no {CONFIG})",
                        hint="pass the --out folder of a finished `medlens train`")
    return config_from_dict(yaml.safe_load(path.read_text()))


def append_evaluation(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``RUN/evaluations.jsonl`` (opened in append mode, flushed and fsynced: a line
    once written is never rewritten; nothing in medlens truncates or deletes this file)."""
    from medlens.models.card import jsonable

    line = json.dumps(jsonable(record), sort_keys=True, allow_nan=False)
    with open(evaluations_path(run_dir), "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every recorded evaluation of the run, oldest first (``[]`` when there is none). A damaged line is
    reported by number, not skipped: the trace is evidence."""
    path = evaluations_path(run_dir)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg})",
                            hint="the evaluation trace is append-only; restore the file from a backup") from None
    return out
