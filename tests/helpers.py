"""Helpers shared by the test files (import with ``from helpers import ...``; tests/ is on sys.path).

* CI rules: :func:`in_ci`; :func:`require_module` (``pytest.importorskip`` for a declared dependency: missing fails
  under CI instead of skipping); :func:`require_shared` / :func:`require_path` (the real data in ../shared/data:
  missing fails under CI, skips elsewhere).
* Tiny runs: :data:`FAST` (the CLI options of a seconds-long CPU training), :data:`TINY_COUNTS`,
  :func:`link_subset` (an image folder of symlinks into the shared Kermany data), :func:`train` (``medlens train``
  that must succeed; returns the card), :func:`read_card`, :func:`copy_run` (a private copy of a shared run, for a
  test that writes into it), :func:`env` (environment variables for a block) and :func:`built_once` (build a
  folder once per test session, shared by every xdist worker).
* What a run chose, recomputed independently: :func:`validation_halves` (the selection and held-apart
  calibration halves of its validation split, with labels and calibrated probabilities),
  :func:`decision_entropy` (the referral measure, written out) and :func:`assert_refers_share` (a referral
  threshold is the coverage quantile of the values).
* :func:`blobs`: the synthetic task whose correct explanation is known (test_explain, test_trust).
* Servers on loopback: :func:`free_port` and :func:`serve_in_thread` (an app on a real uvicorn server in a
  thread, for a block; yields its base URL).

The session fixtures built from them (``cxr_tiny``, ``tiny_run``, ``tiny_ensemble_run``, ``medlens_cache``) are
in conftest.py.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Options for a seconds-long CPU training run: 32 px, 2 epochs, a narrow seed_cnn.
FAST = ["--set", "data.image_size=32", "--set", "train.epochs=2", "--set", "train.batch_size=16",
        "--set", "model.args.widths=[8,16,32,64]", "--set", "eval.n_bootstrap=200", "--no-progress"]

# a small lung segmentation run: 64 px, a narrow UNet, a few epochs (seconds on 2 cores)
SEG_FAST = ["--set", "data.image_size=64", "--set", "train.epochs=6", "--set", "train.batch_size=16",
            "--set", "model.args.channels=[8,16,32,64]", "--set", "model.args.strides=[2,2,2]",
            "--set", "model.args.num_res_units=1", "--set", "eval.n_bootstrap=200"]

# Images per class of the shared tiny data set (``cxr_tiny``). 200 training images per class give a validation
# split of 60 images, so its held-apart calibration half holds 30 (training needs at least 20 there to fit a
# temperature and to choose the referral thresholds; with fewer it silently keeps temperature 1).
TINY_COUNTS = {"train": 200, "test": 20}


def in_ci() -> bool:
    """True under CI (``CI=true``, as GitHub Actions, GitLab and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    """Fail under CI, skip elsewhere (also at module level, as ``pytest.importorskip`` does)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the CI job must provide it, so this is a failure, not a skip)")
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, *, extra: str = "dev") -> ModuleType:
    """``pytest.importorskip`` for a DECLARED dependency (pyproject's dependencies or an extra): the module, or a
    skip on a developer's machine that lacks it, or a failure under CI, where every declared dependency is
    installed and a skip would hide a test that never ran."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _missing(f"{name} is not installed ({exc}); pip install -e '.[{extra}]'")
        raise  # not reached: _missing raises


def require_path(path: Path, what: str) -> Path:
    """``path``, which must exist: a failure under CI, a skip elsewhere."""
    if not Path(path).exists():
        _missing(f"{path} is missing ({what})")
    return Path(path)


def require_shared(sub: str = "") -> Path:
    """The shared data folder (or a part of it). Missing data fails under CI and skips elsewhere."""
    return require_path(SHARED / sub, "the real data must sit beside the checkout as ../shared/data, or set "
                                      "MEDLENS_SHARED_DATA")


def link_subset(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """A small image folder made of symlinks into a Kermany-shaped folder (nothing is copied): the first
    ``per_class[split]`` files (sorted by name) of each class of each split."""
    for split, n in per_class.items():
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((src / split / cls).iterdir())[:n]
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                (out / f.name).symlink_to(f.resolve())
    return dst


@contextmanager
def env(**values: str):
    """Set environment variables for a block (session fixtures cannot use monkeypatch)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train(data: Path, run: Path, *extra: str, fast: bool = True) -> dict:
    """``medlens train DATA --out RUN --recipe cxr_cpu [FAST] EXTRA`` must succeed; returns the model card."""
    from medlens.cli import main

    args = ["train", str(data), "--out", str(run), "--recipe", "cxr_cpu", *(FAST if fast else []), *extra]
    assert main(args) == 0, f"medlens {' '.join(args)} failed"
    return read_card(run)


def read_card(run: Path) -> dict:
    return json.loads((Path(run) / "model.card.json").read_text())


def copy_run(run: Path, dst: Path) -> Path:
    """A private copy of a run directory, for a test that writes into it (evaluate, recalibrate)."""
    shutil.copytree(run, dst, symlinks=True)
    return dst


def shared_tmp(tmp_path_factory) -> Path:
    """The session's temporary folder that every xdist worker of this run shares."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` once per test session, whichever xdist worker gets there first; the others wait for it
    (a file lock) and reuse the folder. A build that failed is tried again by the next caller."""
    from filelock import FileLock  # comes with torch

    base = shared_tmp(tmp_path_factory)
    target, done = base / name, base / f"{name}.done"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)
            build(target)
            done.touch()
    return target


# ------------------------------------------------------------------ what a run chose, recomputed in the test


def validation_halves(run: Path, data: Path) -> dict[str, dict]:
    """The run's validation images split into the selection half (chose the epoch and the threshold) and the
    held-apart calibration half (fitted the temperature and the referral thresholds), each as
    ``{"paths", "labels", "probs"}`` from ``RUN/val_predictions.csv`` (calibrated probabilities). The halves are
    recomputed here from the patient ids of the data and the run's config, not read from the run."""
    import csv

    import numpy as np
    import yaml

    from medlens.data.sources import discover
    from medlens.uncertainty import calibration_split

    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text())
    with (Path(run) / "val_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    table = discover(data, patient_pattern=cfg["data"]["patient_pattern"])
    patient = dict(zip(map(str, table.items), table.patient_ids, strict=True))
    paths = [r["path"] for r in rows]
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    select, calib = calibration_split(np.arange(len(rows)), labels, [patient[p] for p in paths],
                                      fraction=cfg["eval"]["calibration_fraction"], seed=cfg["train"]["seed"])
    return {name: {"paths": [paths[i] for i in idx], "labels": labels[idx], "probs": probs[idx]}
            for name, idx in (("select", select), ("calib", calib))}


def decision_entropy(member_probs, threshold: float):
    """Entropy (nats) of the call ``p >= threshold``, written out here: each pass's positive-class probability is
    moved in logit space so the threshold sits at 0.5, the passes are averaged, and the binary entropy taken.
    ``member_probs``: (S, N) or (N,) positive-class probabilities."""
    import numpy as np

    p = np.clip(np.atleast_2d(np.asarray(member_probs, dtype=np.float64)), 1e-12, 1 - 1e-12)
    t = min(max(float(threshold), 1e-6), 1 - 1e-6)
    q = (1 / (1 + np.exp(-(np.log(p / (1 - p)) - np.log(t / (1 - t)))))).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(q > 0, q * np.log(q), 0) + np.where(q < 1, (1 - q) * np.log(1 - q), 0))
    return h


def assert_refers_share(u, threshold: float, coverage: float, tol: float = 1e-5) -> None:
    """``threshold`` is the ``coverage`` quantile of ``u`` as the referral rule defines it: at most
    ``1 - coverage`` of the values lie above it, and it is one of the values (the smallest with at least
    ``coverage`` of them at or below it). ``tol`` absorbs the rounding of recomputed values."""
    import numpy as np

    u = np.asarray(u, dtype=np.float64)
    n = len(u)
    assert n > 0
    above = int((u > threshold + tol).sum())
    at_or_above = int((u >= threshold - tol).sum())
    assert above <= (1 - coverage) * n + 1e-9, f"{above} of {n} above the threshold, coverage {coverage}"
    assert at_or_above > (1 - coverage) * n - 1e-9, f"only {at_or_above} of {n} at or above: threshold too high"
    assert np.isclose(u, threshold, atol=tol, rtol=0).any(), "the threshold is not one of the values"


# ------------------------------------------------------------------ a task whose explanation is known


def blobs(n: int, seed: int, size: int = 64, amplitude: float = 2.5):
    """The synthetic task of test_explain and test_trust: unit noise (already network-scale: no per-image
    z-score, whose global shift would be a shortcut) plus, for odd indices (class 1), a Gaussian blob (sigma
    3 px) inside a random quadrant. Returns images (n, 1, size, size), labels and the blobs' quadrants."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    labels = torch.arange(n) % 2
    quadrant = torch.randint(0, 4, (n,), generator=g)
    half, margin = size // 2, 6
    cy = (quadrant // 2) * half + torch.randint(margin, half - margin, (n,), generator=g)
    cx = (quadrant % 2) * half + torch.randint(margin, half - margin, (n,), generator=g)
    yy, xx = torch.arange(size).view(1, size, 1), torch.arange(size).view(1, 1, size)
    blob = torch.exp(-((yy - cy.view(-1, 1, 1)) ** 2 + (xx - cx.view(-1, 1, 1)) ** 2) / (2 * 3.0**2))
    x[:, 0] += amplitude * labels.view(-1, 1, 1) * blob
    return x, labels, quadrant


# ------------------------------------------------------------------ servers on loopback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when probed (another process may still take it before a server
    binds it: retry on a failed bind where that matters)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app_or_config, *, start_timeout_s: float = 120.0, stop_timeout_s: float = 30.0):
    """An ASGI app (or a ready ``uvicorn.Config``) on a real uvicorn server in a daemon thread of this process,
    for the block; yields the base URL (``http://127.0.0.1:PORT``). An app is served on 127.0.0.1 on a port the
    system picks when it binds (no probe-then-bind race). The block's end stops the server gracefully (lifespan
    shutdown runs); a server that does not start within ``start_timeout_s`` or stop within ``stop_timeout_s``
    fails the test."""
    import threading
    import time

    import uvicorn

    config = app_or_config if isinstance(app_or_config, uvicorn.Config) else uvicorn.Config(
        app_or_config, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            thread.join(timeout=stop_timeout_s)
            pytest.fail(f"the uvicorn server did not start within {start_timeout_s:.0f} s"
                        if thread.is_alive() else "the uvicorn server exited before it started (see its log)")
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]  # the port bound (config.port may be 0)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout_s)
        assert not thread.is_alive(), f"the uvicorn server did not stop within {stop_timeout_s:.0f} s"


# ------------------------------------------------------------------ the out-of-domain fixture (issue 8)


def ood_fixture(shared: Path, dst: Path, n_kermany: int = 5, n_breast: int = 5) -> dict[str, list[Path]]:
    """Inputs a chest X-ray model was not built for, written under ``dst`` from what ../shared/data holds, by
    kind: ``dicom`` (the real CT and MR files, used in place), ``breast`` (BreastMNIST ultrasound, 28 px as stored),
    ``breast_224`` (the same upscaled to 224 px), ``synthetic_content`` (blank, white, near-constant, uniform noise,
    Gaussian noise, 1x1 and 40x40 px), ``gradient`` (a smooth ramp: passes the content gate), ``inverted`` and
    ``rotated`` (Kermany test X-rays with grey levels inverted / turned 90 degrees)."""
    import numpy as np
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"dicom": [shared / "dicom" / "CT_small.dcm", shared / "dicom" / "MR_small.dcm"]}

    def save(kind: str, name: str, array) -> None:
        path = dst / f"{kind}-{name}.png"
        Image.fromarray(np.clip(np.rint(np.asarray(array) * 255), 0, 255).astype(np.uint8), mode="L").save(path)
        out.setdefault(kind, []).append(path)

    breast = np.load(shared / "medmnist" / "breastmnist.npz")["test_images"][:n_breast]
    for k, img in enumerate(breast):
        save("breast", str(k), img / 255.0)
        save("breast_224", str(k), np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR)) / 255.0)
    rng = np.random.default_rng(0)
    for name, array in (("blank", np.zeros((224, 224))), ("white", np.ones((224, 224))),
                        ("near_constant", 0.5 + rng.normal(0, 0.004, (224, 224))),
                        ("uniform_noise", rng.random((224, 224))),
                        ("gaussian_noise", rng.normal(0.5, 0.2, (224, 224))),
                        ("one_pixel", np.full((1, 1), 0.7)), ("tiny_40px", rng.random((40, 40)) * 0.1 + 0.4)):
        save("synthetic_content", name, array)
    save("gradient", "ramp", np.tile(np.linspace(0, 1, 224), (224, 1)))
    files = sorted((shared / "chest_xray" / "test" / "NORMAL").iterdir())[:n_kermany]
    files += sorted((shared / "chest_xray" / "test" / "PNEUMONIA").iterdir())[:n_kermany]
    for f in files:
        grey = np.asarray(Image.open(f).convert("L"), dtype=np.float64) / 255.0
        save("inverted", f.stem, 1.0 - grey)
        save("rotated", f.stem, np.rot90(grey))
    return out


def clinician_app(run: Path, tmp_path_factory, name: str, user: str, **app_options):
    """``(app, key)``: the service app on a private copy of ``run`` with its own SQLite audit database, no rate
    limit, and one clinician key for ``user`` (service imports are local: not every test file has the extra);
    ``app_options`` go to ``create_app`` (e.g. ``backend="onnx"``)."""
    import dataclasses

    from medlens.service.app import create_app
    from medlens.service.auth import KeyStore
    from medlens.service.settings import ServiceSettings

    own = copy_run(run, tmp_path_factory.mktemp(f"{name}-run") / "r")
    db = tmp_path_factory.mktemp(f"{name}-db") / "audit.db"
    settings = dataclasses.replace(ServiceSettings.load(own, database=db, env={}), rate_limit_per_minute=0)
    with KeyStore(settings.database_url) as store:
        key = store.create(user, "clinician")
    return create_app(own, settings, **app_options), key
