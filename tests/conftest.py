"""Shared fixtures: the real data in ../shared/data, a tensor cache, and tiny trained runs (built once per session).

Session fixtures for tests that need a trained model (see helpers.py for the functions behind them):

* ``cxr_tiny``: an image folder of symlinks into the Kermany data, ``helpers.TINY_COUNTS`` images per class
  (train 200, test 20): large enough for the held-apart calibration half of validation to be used.
* ``tiny_run``: ``medlens train cxr_tiny --recipe cxr_cpu FAST`` (seed 0). Read-only: a test that writes into a run
  (evaluate, recalibrate, serve with an audit database in the run) takes ``helpers.copy_run(tiny_run, tmp_path / "run")``.
* ``tiny_ensemble_run``: the same with ``--ensemble 2`` (member 0 is ``tiny_run``'s model). Read-only too.
* ``tiny_seg_run``: ``medlens train ../shared/data/segmentation --recipe lung_unet SEG_FAST`` (64 px, a few
  epochs): a real, small lung segmentation run. Read-only.
* ``medlens_cache``: points MEDLENS_CACHE at the session's tensor cache for one test
  (``pytestmark = pytest.mark.usefixtures("medlens_cache")``).

Each is built once per test session and shared by every xdist worker (a file lock).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    SEG_FAST,
    TINY_COUNTS,
    built_once,
    env,
    in_ci,  # noqa: F401 - re-exported for the test files
    link_subset,
    require_module,  # noqa: F401 - re-exported for the test files
    require_shared,
    shared_tmp,
    train,
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def kermany() -> Path:
    return require_shared("chest_xray")


@pytest.fixture(scope="session")
def tensor_cache_dir(tmp_path_factory) -> Path:
    """One decoded-tensor cache for the whole session, shared by the xdist workers (the cache is safe for
    concurrent processes: packs are written atomically and never modified)."""
    path = shared_tmp(tmp_path_factory) / "tensor-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def medlens_cache(tensor_cache_dir, monkeypatch) -> Path:
    monkeypatch.setenv("MEDLENS_CACHE", str(tensor_cache_dir))
    return tensor_cache_dir


@pytest.fixture(scope="session")
def cxr_tiny(kermany, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "cxr-tiny", lambda root: link_subset(kermany, root, TINY_COUNTS))


def _check_calibrated(card: dict) -> None:
    """A tiny run's card must have used the held-apart calibration half (else temperature and referral are
    untested): a fitted temperature and referral thresholds chosen on those images."""
    cal = card["metrics"]["calibration"]
    assert cal["n"] >= 20, f"calibration half too small ({cal}): enlarge helpers.TINY_COUNTS"
    assert card["refer"]["n"] == cal["n"] and "held-apart" in card["refer"]["data"]


@pytest.fixture(scope="session")
def tiny_run(cxr_tiny, tmp_path_factory, tensor_cache_dir) -> Path:
    def build(run: Path) -> None:
        with env(MEDLENS_CACHE=str(tensor_cache_dir)):
            _check_calibrated(train(cxr_tiny, run))

    return built_once(tmp_path_factory, "tiny-run", build)


@pytest.fixture(scope="session")
def tiny_ensemble_run(cxr_tiny, tmp_path_factory, tensor_cache_dir) -> Path:
    def build(run: Path) -> None:
        with env(MEDLENS_CACHE=str(tensor_cache_dir)):
            _check_calibrated(train(cxr_tiny, run, "--ensemble", "2"))

    return built_once(tmp_path_factory, "tiny-ensemble-run", build)


@pytest.fixture(scope="session")
def lung_masks() -> Path:
    return require_shared("segmentation")


@pytest.fixture(scope="session")
def tiny_seg_run(lung_masks, tmp_path_factory, tensor_cache_dir) -> Path:
    from medlens.cli import main

    def build(run: Path) -> None:
        with env(MEDLENS_CACHE=str(tensor_cache_dir)):
            args = ["train", str(lung_masks), "--out", str(run), "--recipe", "lung_unet", *SEG_FAST, "--no-progress"]
            assert main(args) == 0, f"medlens {' '.join(args)} failed"

    return built_once(tmp_path_factory, "tiny-seg-run", build)
