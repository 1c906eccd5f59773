"""Shared fixtures: the real data in ../shared/data and a per-session tensor cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def require_shared(sub: str = "") -> Path:
    """The shared data folder (or a part of it). Missing data fails loudly in CI and skips elsewhere."""
    path = SHARED / sub
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared/data beside the checkout")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def kermany() -> Path:
    return require_shared("chest_xray")


@pytest.fixture(scope="session")
def tensor_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tensor-cache")
