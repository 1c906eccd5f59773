"""The data-set registry: where a named data set comes from, its cache, its checksums.

Built on two layers, each usable on its own and re-exported here:

``fetch(url, dest, sha256=..., md5=..., size=...)`` (``medlens.data.fetch``)
    Checksummed, resumable, atomic downloads with a progress bar; :class:`NetworkError` when the server cannot
    be reached (the ``.part`` is kept for a resume).

``extract(archive, dest_dir)`` (``medlens.data.archive``)
    Zip / tar extraction that refuses members landing outside ``dest_dir``, with a completion marker.

``DATASETS`` / ``download_dataset(spec)`` / ``resolve_dataset(name, data_arg=...)``
    Where a named data set comes from, in this order: an explicit ``--data`` path; the environment
    (``MEDLENS_DATA_<NAME>`` = the data set itself, ``MEDLENS_DATA`` = a folder containing it); a local copy in
    a ``shared/data`` folder found by walking up from the working directory (the developers' and CI copy);
    the download cache (``$MEDLENS_CACHE`` or ``~/.cache/medlens``); and finally a download. Offline
    (``MEDLENS_OFFLINE=1``, or the download cannot connect) with none of these, one ``DataError`` says exactly
    how to provide the data.

Checksums. ``pneumoniamnist`` is verified against the MD5 that MedMNIST publishes for that file.
No checksum is published for the Mendeley ``ChestXRay2017.zip`` (as far as we could find), so ``chest_xray``
uses *trust on first use*: the sha256 of the first complete download is recorded in
``<cache>/checksums.json``, and every later download or re-extraction of that archive in the same cache is
verified against it. This detects a file that changes or is corrupted later; it cannot prove that the first
download was the genuine file. Local copies (``--data``, ``MEDLENS_DATA``, ``shared/data``) are the user's own
data and are used as they are (a single-file data set whose checksum differs from the registry's is used with
a warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medlens.data.archive import EXTRACT_MARKER, extract
from medlens.data.fetch import (
    NetworkError,
    fetch,
    fetch_with_digests,
    hash_file,
    verify_file,
    write_json_atomic,
)
from medlens.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "NetworkError",
    "cached_dataset",
    "default_cache_dir",
    "download_dataset",
    "extract",
    "fetch",
    "resolve_dataset",
]

log = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
DOWNLOADS_DIR = "_downloads"


# ----------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set is downloaded from and how it is checked and laid out.

    ``extract=True``: ``url`` is an archive that is extracted into ``<cache>/<name>/``; the data set is the
    folder inside it that holds all of ``root_markers`` (e.g. ``train`` and ``test``). ``extract=False``: the
    data set is the single downloaded file ``<cache>/<name>/<filename>``. ``shared_paths`` are extra places,
    relative to a data root (``MEDLENS_DATA`` or a ``shared/data`` folder), where a local copy may sit.
    With neither ``sha256`` nor ``md5`` the download is trusted on first use (see the module docstring).
    """

    name: str
    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    description: str = ""
    licence: str = ""
    layout_note: str = ""
    extract: bool = False
    root_markers: tuple[str, ...] = ()
    shared_paths: tuple[str, ...] = field(default=())


DATASETS: dict[str, DatasetSpec] = {
    # URL and MD5 exactly as published by MedMNIST in medmnist/info.py (INFO["pneumoniamnist"]["url"] and
    # ["MD5"], MedMNIST/MedMNIST v3.0.2; the same MD5 is listed for the earlier Zenodo record 6496656 in
    # v2.x, i.e. it is the MedMNIST v2 28x28 file). The size is not published there, so it is not checked.
    "pneumoniamnist": DatasetSpec(
        name="pneumoniamnist",
        url="https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        filename="pneumoniamnist.npz",
        md5="28209eda62fecd6e6a2d98b1501bb15f",
        description=(
            "PneumoniaMNIST (MedMNIST v2, Yang et al. 2023): the 5,856 paediatric chest X-rays of Kermany et "
            "al. 2018, centre-cropped and resized to 1x28x28; official splits train 4,708 / val 524 / test "
            "624 (test = the source test set); labels 0 normal, 1 pneumonia."
        ),
        licence="CC BY 4.0",
        layout_note="a MedMNIST .npz with train_/val_/test_images and _labels arrays",
        extract=False,
        shared_paths=("medmnist/pneumoniamnist.npz",),
    ),
    # Mendeley Data, doi:10.17632/rscbjbr9sj.2 (Kermany, Zhang, Goldbaum 2018), file ChestXRay2017.zip.
    # The /file_downloaded address redirects to signed storage. No checksum or authoritative size is
    # published for it (none found in the data set record or elsewhere), so it is trusted on first use.
    "chest_xray": DatasetSpec(
        name="chest_xray",
        url=(
            "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
            "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"
        ),
        filename="ChestXRay2017.zip",
        sha256=None,
        md5=None,
        size=None,
        description=(
            'Kermany et al. 2018, "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for '
            'Classification", Mendeley Data V2: ChestXRay2017.zip, paediatric chest X-rays (Guangzhou Women '
            "and Children's Medical Center), NORMAL vs PNEUMONIA (bacterial/viral in the file name); "
            "train 1,349 + 3,883, test 234 + 390. About 1.2 GB."
        ),
        licence="CC BY 4.0",
        layout_note="a folder with train/ val/ test/ NORMAL|PNEUMONIA/*.jpeg; val/ is optional",
        extract=True,
        root_markers=("train", "test"),
    ),
}


# ----------------------------------------------------------------------------------------------------------
# cache and download of registered data sets


def default_cache_dir() -> Path:
    """``$MEDLENS_CACHE`` if set, else ``~/.cache/medlens``."""
    env = os.environ.get("MEDLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medlens"


def _cache_root(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _download_target(spec: DatasetSpec, cache: Path) -> Path:
    if spec.extract:
        return cache / DOWNLOADS_DIR / spec.filename
    return cache / spec.name / spec.filename


def _load_checksums(cache: Path) -> dict:
    path = cache / CHECKSUMS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(
            f"{path} is unreadable ({err}). It records the checksums of earlier downloads; fix or delete it."
        ) from None
    return data if isinstance(data, dict) else {}


def _recorded(spec: DatasetSpec, cache: Path) -> dict | None:
    entry = _load_checksums(cache).get(spec.name)
    return entry if isinstance(entry, dict) and entry.get("sha256") else None


def _record_checksum(spec: DatasetSpec, cache: Path, sha256: str, size: int) -> None:
    data = _load_checksums(cache)
    data[spec.name] = {
        "filename": spec.filename,
        "url": spec.url,
        "sha256": sha256,
        "size": size,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "trust on first use: no official checksum is published; later downloads must match",
    }
    write_json_atomic(cache / CHECKSUMS_FILE, data)


def _locate_root(folder: Path, markers: tuple[str, ...], max_depth: int = 3) -> Path | None:
    """The first folder at or below ``folder`` (breadth first) that has every one of ``markers`` as a
    sub-folder (the chest_xray zip nests ``chest_xray/train``)."""
    if not markers:
        return folder if folder.exists() else None
    level = [folder]
    for _ in range(max_depth + 1):
        nxt = []
        for d in level:
            if all((d / m).is_dir() for m in markers):
                return d
            with contextlib.suppress(OSError):
                nxt.extend(
                    sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith((".", "__MACOSX")))
                )
        level = nxt
    return None


def cached_dataset(spec: DatasetSpec, cache_dir: Path | str | None = None) -> Path | None:
    """The data set from the cache if it is there, complete and verified; else None. Never downloads."""
    cache = _cache_root(cache_dir)
    if spec.extract:
        folder = cache / spec.name
        if not (folder / EXTRACT_MARKER).is_file():
            return None
        return _locate_root(folder, spec.root_markers) or folder
    path = _download_target(spec, cache)
    if not path.is_file():
        return None
    sha256, size = spec.sha256, spec.size
    if not (spec.sha256 or spec.md5) and (rec := _recorded(spec, cache)):
        sha256, size = rec["sha256"], rec.get("size")
    algos = [a for a, v in (("sha256", sha256), ("md5", spec.md5)) if v]
    if verify_file(path, hash_file(path, algos), sha256=sha256, md5=spec.md5, size=size) is not None:
        return None
    return path


def download_dataset(
    spec: DatasetSpec, cache_dir: Path | str | None = None, *, progress: bool = True, timeout: float = 60
) -> Path:
    """Download (if needed), verify and (for archives) extract ``spec`` into the cache; return the data set:
    the file for single-file data sets, the folder holding ``root_markers`` for archives.

    Raises ``NetworkError`` when the server cannot be reached and ``DataError`` for a bad download.
    """
    cache = _cache_root(cache_dir)
    if (hit := cached_dataset(spec, cache)) is not None:
        return hit
    sha256, size, want, source = spec.sha256, spec.size, (), ""
    trust_on_first_use = not (spec.sha256 or spec.md5)
    if trust_on_first_use:
        if rec := _recorded(spec, cache):
            sha256, size = rec["sha256"], rec.get("size") or size
            source = (
                f"recorded in {cache / CHECKSUMS_FILE} at the first download, as no official checksum "
                f"is published; if the file was really updated upstream, delete that entry"
            )
        else:
            want = ("sha256",)
    target = _download_target(spec, cache)
    path, digests = fetch_with_digests(
        spec.url,
        target,
        sha256=sha256,
        md5=spec.md5,
        size=size,
        progress=progress,
        timeout=timeout,
        want=want,
        expected_from=source,
    )
    if trust_on_first_use and sha256 is None:
        _record_checksum(spec, cache, digests["sha256"], path.stat().st_size)
        log.info(
            "recorded sha256 %s for %s in %s (trust on first use)",
            digests["sha256"],
            spec.filename,
            cache / CHECKSUMS_FILE,
        )
    if not spec.extract:
        return path
    folder = extract(path, cache / spec.name, progress=progress)
    root = _locate_root(folder, spec.root_markers)
    if root is None:
        raise DataError(
            f"{spec.filename} from {spec.url} was extracted to {folder}, but no folder in it holds "
            f"{' and '.join(m + '/' for m in spec.root_markers)}. The archive layout has changed; pass the data "
            "folder with --data."
        )
    return root


# ----------------------------------------------------------------------------------------------------------
# resolve


def _env_name(name: str) -> str:
    return "MEDLENS_DATA_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def _offline_from_env() -> bool:
    return os.environ.get("MEDLENS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _materialise(spec: DatasetSpec | None, path: Path) -> Path:
    """Turn an existing user-given location into the data set path (a file or the data folder)."""
    if spec is None:
        return path
    if spec.extract:
        if path.is_dir():
            return _locate_root(path, spec.root_markers) or path
        return path
    if path.is_dir() and (path / spec.filename).is_file():
        path = path / spec.filename
    if path.is_file():
        _warn_if_not_registered_file(spec, path)
    return path


def _warn_if_not_registered_file(spec: DatasetSpec, path: Path) -> None:
    algos = [a for a, v in (("sha256", spec.sha256), ("md5", spec.md5)) if v]
    if not algos or path.stat().st_size > (1 << 30):
        return
    digests = hash_file(path, algos)
    if verify_file(path, digests, sha256=spec.sha256, md5=spec.md5, size=None) is not None:
        log.warning(
            "%s is not the official %s (%s differs from the published checksum); using it as given, but "
            "results may not be comparable with published ones",
            path,
            spec.filename,
            algos[0],
        )


def _candidates_in_root(spec: DatasetSpec, root: Path) -> list[Path]:
    out = [root / spec.name]
    if not spec.extract:
        out.append(root / spec.filename)
    out.extend(root / p for p in spec.shared_paths)
    return out


def _shared_data_roots(search_from: Path | str | None) -> list[Path]:
    starts = [Path(search_from)] if search_from is not None else [Path.cwd(), Path(__file__).resolve().parent]
    roots: list[Path] = []
    for start in starts:
        start = start.resolve()
        for d in (start, *start.parents):
            cand = d / "shared" / "data"
            if cand.is_dir() and cand not in roots:
                roots.append(cand)
    return roots


def _usable(spec: DatasetSpec, path: Path) -> bool:
    if not path.exists():
        return False
    if spec.extract:
        return path.is_dir() and (not spec.root_markers or _locate_root(path, spec.root_markers) is not None)
    return path.is_file() or (path.is_dir() and (path / spec.filename).is_file())


def resolve_dataset(
    name: str,
    *,
    data_arg: str | os.PathLike | None = None,
    cache_dir: Path | str | None = None,
    offline: bool | None = None,
    registry: Mapping[str, DatasetSpec] | None = None,
    search_from: Path | str | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Find the data set ``name`` and return its path (a folder, or the file for single-file data sets).

    Order: ``data_arg`` (``--data``; must exist); ``$MEDLENS_DATA_<NAME>`` (the data set itself; must exist);
    ``$MEDLENS_DATA`` (a folder containing ``<name>``); ``shared/data/<name>`` in the working directory or any
    folder above it (``search_from`` replaces the working directory; by default the package's own location is
    searched too); the cache (``cache_dir``, else ``$MEDLENS_CACHE``, else ``~/.cache/medlens``); then a
    download into the cache. ``offline`` (default: ``$MEDLENS_OFFLINE=1``) forbids the download. When nothing
    is found and it cannot be downloaded, one ``DataError`` says how to provide the data. ``registry``
    replaces ``DATASETS`` (tests, mirrors).
    """
    registry = DATASETS if registry is None else registry
    spec = registry.get(name)

    if data_arg is not None and str(data_arg) != "":
        path = Path(data_arg).expanduser()
        if not path.exists():
            raise DataError(
                f"--data {path}: no such file or folder. Pass the path to the {name} data"
                + (f" ({spec.layout_note})." if spec and spec.layout_note else ".")
            )
        return _materialise(spec, path)

    if spec is None:
        raise ConfigError(
            f"unknown data set {name!r}: known data sets are {', '.join(sorted(registry)) or 'none'}; "
            "or pass your own folder with --data."
        )

    looked: list[str] = []
    env_name = _env_name(name)
    if value := os.environ.get(env_name):
        path = Path(value).expanduser()
        if not path.exists():
            raise DataError(f"{env_name}={value}: no such file or folder. Fix or unset {env_name}.")
        log.info("using %s from %s=%s", name, env_name, value)
        return _materialise(spec, path)

    roots: list[tuple[str, Path]] = []
    if value := os.environ.get("MEDLENS_DATA"):
        roots.append((f"MEDLENS_DATA={value}", Path(value).expanduser()))
    roots.extend(("shared data folder", r) for r in _shared_data_roots(search_from))
    for label, root in roots:
        for cand in _candidates_in_root(spec, root):
            if _usable(spec, cand):
                log.info("using %s from %s (%s)", name, cand, label)
                return _materialise(spec, cand)
        looked.append(str(root / spec.name))
        if label.startswith("MEDLENS_DATA="):
            log.warning("%s is set but holds no %s; looking elsewhere", label, name)

    cache = _cache_root(cache_dir)
    if (hit := cached_dataset(spec, cache)) is not None:
        return hit
    looked.append(str(cache / spec.name))

    if offline is None:
        offline = _offline_from_env()
    if offline:
        why = "offline mode: MEDLENS_OFFLINE is set" if _offline_from_env() else "offline mode"
        raise _not_found(spec, cache, why, looked)
    try:
        return download_dataset(spec, cache, progress=progress, timeout=timeout)
    except NetworkError as err:
        raise _not_found(spec, cache, f"no network: {err.reason}", looked) from None


def _not_found(spec: DatasetSpec, cache: Path, why: str, looked: list[str]) -> DataError:
    name = spec.name
    what = name if spec.extract else spec.filename
    layout = f" ({spec.layout_note})" if spec.layout_note else ""
    return DataError(
        f"{name} not found and it cannot be downloaded ({why}). Either pass --data /path/to/{what}{layout}, "
        f"set MEDLENS_DATA=/path/containing/{what}, or run `medlens data fetch {name}` on a machine with "
        f"internet and copy ~/.cache/medlens/{name} to {cache / name} on this machine.",
        hint="looked in " + ", ".join(looked) if looked else None,
    )
