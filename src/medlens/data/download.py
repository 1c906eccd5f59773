"""Checksummed, cached, resumable downloads; safe archive extraction; a small data-set registry.

Three layers, each usable on its own:

``fetch(url, dest, sha256=..., md5=..., size=...)``
    Downloads ``url`` to ``dest`` with the standard library only (``urllib``). Bytes go to ``dest.part``
    first; an existing ``.part`` is resumed with an HTTP ``Range`` request (a server that ignores ``Range``
    and answers ``200`` restarts the file cleanly). A progress bar (bytes, on stderr) is shown unless
    ``progress=False``. The file is verified (size, sha256, md5: whichever are given) and only then
    atomically renamed to ``dest``; a ``dest`` that already exists and verifies is returned at once without
    any request. A checksum mismatch deletes the bad file and raises :class:`~medlens.errors.DataError`;
    a network failure raises :class:`NetworkError` (a ``DataError``) and keeps the ``.part`` for a resume.

``extract(archive, dest_dir)``
    Zip and tar(.gz/.bz2/.xz) extraction that refuses any member that would land outside ``dest_dir``
    ("zip slip": absolute paths, ``..``, links pointing out, device files). A marker file is written last,
    so an extraction interrupted half way is redone on the next call instead of being trusted.

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
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from medlens import __version__
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

_CHUNK = 1 << 20
EXTRACT_MARKER = ".medlens-extracted.json"
CHECKSUMS_FILE = "checksums.json"
DOWNLOADS_DIR = "_downloads"
_USER_AGENT = f"medlens/{__version__} (python-urllib)"


class NetworkError(DataError):
    """A download that failed for lack of a working connection (refused, unreachable, timed out, cut off,
    or a temporary server error). ``reason`` is a short description, e.g. ``"connection refused"``."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None):
        self.reason = reason
        super().__init__(message, hint=hint)


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
# fetch


def fetch(
    url: str,
    dest: Path | str,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified, atomic) and return ``dest``.

    If ``dest`` exists and matches the given checksums (or no checksum is given) it is returned without
    any network access. A ``dest`` that fails verification is deleted and downloaded again.
    Raises ``DataError`` on a checksum/size mismatch (the bad file is deleted) or an HTTP error, and
    ``NetworkError`` (a ``DataError``) when the server cannot be reached or the transfer is cut off; the
    partial ``dest.part`` is then kept and the next call resumes it.
    """
    path, _ = _fetch(url, Path(dest), sha256=sha256, md5=md5, size=size, progress=progress, timeout=timeout)
    return path


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    md5: str | None,
    size: int | None,
    progress: bool,
    timeout: float,
    want: Iterable[str] = (),
    expected_from: str = "",
) -> tuple[Path, dict[str, str]]:
    """``fetch`` that also returns the digests named in ``want`` (computed while verifying)."""
    sha256 = sha256.lower() if sha256 else None
    md5 = md5.lower() if md5 else None
    algos = sorted(set(want) | {a for a, v in (("sha256", sha256), ("md5", md5)) if v})
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.is_file():
        digests = _hash_file(dest, algos)
        problem = _check(dest, digests, sha256=sha256, md5=md5, size=size)
        if problem is None:
            return dest, digests
        log.warning("%s does not match its checksum (%s); downloading it again", dest, problem[0])
        dest.unlink()

    part = _part_path(dest)
    for _attempt in range(3):
        offset = part.stat().st_size if part.is_file() else 0
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        if size is not None and offset == size and offset > 0:
            break  # a complete .part left by an earlier run: just verify it
        if _stream(url, part, offset, progress=progress, timeout=timeout, label=dest.name):
            break
    else:  # pragma: no cover - only a server that keeps sending inconsistent ranges gets here
        raise DataError(
            f"download of {url} failed: the server keeps answering with inconsistent byte ranges."
        )

    digests = _hash_file(part, algos)
    problem = _check(part, digests, sha256=sha256, md5=md5, size=size)
    if problem is not None:
        what, expected, got = problem
        part.unlink(missing_ok=True)
        source = f" ({expected_from})" if expected_from else ""
        kind = "size" if what == "size" else "checksum"
        raise DataError(
            f"{kind} mismatch for {dest.name} downloaded from {url}: expected {what} {expected}{source}, "
            f"got {got}. The bad file was deleted. Run the command again to download it afresh; if the "
            f"mismatch repeats, the file on the server has changed or something on the way alters it: "
            f"download it by hand, check it, and pass it (or its extracted folder) with --data."
        )
    os.replace(part, dest)
    return dest, digests


def _stream(url: str, part: Path, offset: int, *, progress: bool, timeout: float, label: str) -> bool:
    """One HTTP request appending to ``part`` from ``offset``. True when the file is complete, False when
    the ``.part`` had to be discarded and the caller should start again."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        with contextlib.closing(err):
            if err.code == 416 and offset:
                # Range not satisfiable: either the .part is already complete or it is longer than the file.
                total = _content_range_total(err.headers.get("Content-Range"))
                if total == offset:
                    return True
                part.unlink(missing_ok=True)
                return False
            raise _http_error(url, err, part) from None
    except (OSError, http.client.HTTPException) as err:  # URLError, refused, timeout, reset, bad status
        raise _network_error(url, part, err, timeout) from None
    except ValueError as err:  # "unknown url type" and other malformed addresses
        raise DataError(f"cannot download {url!r}: not a valid http(s) URL ({err}).") from None

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                return False
            mode = "ab"
        else:
            if offset:
                log.info(
                    "%s ignored the resume request (HTTP %s); downloading %s from the start",
                    url,
                    status,
                    label,
                )
            offset, mode = 0, "wb"
        total = offset + remaining if remaining is not None else None
        received = 0
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            ) as bar,
        ):
            try:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                out.flush()
                raise _network_error(url, part, err, timeout) from None
    if remaining is not None and received < remaining:
        have = offset + received
        raise NetworkError(
            f"download of {url} was cut off after {_fmt_bytes(have)} of {_fmt_bytes(total)}. "
            f"The partial file {part} is kept: run the same command again to resume it.",
            reason="connection closed early",
        )
    return True


_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _content_range_start(value: str | None) -> int | None:
    m = _RANGE_RE.match(value or "")
    return int(m.group(1)) if m else None


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\*|\d+-\d+)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _describe_network_failure(err: BaseException, timeout: float) -> str:
    reason: object = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "the host name could not be resolved (no network or DNS)"
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no response within {timeout:g} s"
    if isinstance(reason, ConnectionResetError | http.client.RemoteDisconnected):
        return "the connection was reset"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    text = str(reason) or type(reason).__name__
    return text


def _network_error(url: str, part: Path, err: BaseException, timeout: float) -> NetworkError:
    reason = _describe_network_failure(err, timeout)
    kept = ""
    if part.is_file() and part.stat().st_size > 0:
        kept = (
            f" The partial download {part} ({_fmt_bytes(part.stat().st_size)}) is kept and will be resumed."
        )
    return NetworkError(
        f"could not download {url}: {reason}. Check the network connection (and any proxy: "
        f"HTTPS_PROXY) and run the command again.{kept}",
        reason=reason,
    )


def _http_error(url: str, err: urllib.error.HTTPError, part: Path) -> DataError:
    code = f"HTTP {err.code} {err.reason}".strip()
    if err.code in (408, 429) or err.code >= 500:
        return NetworkError(
            f"could not download {url}: the server answered {code} (a temporary problem on its side). "
            "Try again later.",
            reason=code,
        )
    if err.code in (404, 410):
        what = "the file is no longer at this address"
    elif err.code in (401, 403):
        what = "the server refused access"
    else:
        what = "the server rejected the request"
    return DataError(
        f"could not download {url}: {code}: {what}. Download the file by hand from the data set's home "
        "page and pass it (or its extracted folder) with --data."
    )


def _hash_file(path: Path, algos: Iterable[str]) -> dict[str, str]:
    algos = list(algos)
    if not algos:
        return {}
    hashers = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def _check(
    path: Path, digests: Mapping[str, str], *, sha256: str | None, md5: str | None, size: int | None
) -> tuple[str, str, str] | None:
    """None when ``path`` matches; else (what, expected, got)."""
    if size is not None:
        got = path.stat().st_size
        if got != size:
            return "size", f"{size} bytes", f"{got} bytes"
    for algo, expected in (("sha256", sha256), ("md5", md5)):
        if expected and digests.get(algo) != expected:
            return algo, expected, str(digests.get(algo))
    return None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown size"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------
# extract


def extract(archive: Path | str, dest_dir: Path | str, *, progress: bool = False) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) ``archive`` into ``dest_dir`` and return ``dest_dir``.

    Every member is checked before anything is written: absolute names, ``..`` components, links that
    point outside ``dest_dir`` and device files make the whole archive be refused with a ``DataError``.
    ``__MACOSX/`` resource-fork folders are skipped. A marker file (``.medlens-extracted.json``) naming the
    archive is written when extraction completes; a later call with the same archive returns immediately,
    and an extraction that was interrupted (no marker) is redone, overwriting the partial files.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise DataError(f"cannot extract {archive}: the file does not exist.")
    identity = {"archive": archive.name, "size": archive.stat().st_size}
    marker = dest_dir / EXTRACT_MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(marker.read_text())
            if {k: recorded.get(k) for k in identity} == identity:
                return dest_dir
        marker.unlink(missing_ok=True)

    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest_dir, progress)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest_dir, progress)
        else:
            raise DataError(
                f"cannot extract {archive}: it is neither a zip nor a tar archive (an incomplete download or "
                "an error page?). Delete it and download it again."
            )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        raise DataError(
            f"cannot extract {archive}: the archive is damaged ({err}). Delete it and download it again."
        ) from None
    _write_json_atomic(marker, {**identity, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return dest_dir


def _skip_member(name: str) -> bool:
    first = PurePosixPath(name.replace("\\", "/")).parts[:1]
    return bool(first) and first[0] == "__MACOSX"


def _unsafe(archive: Path, dest_dir: Path, name: str, why: str = "would be written outside") -> DataError:
    return DataError(
        f"refusing to extract {archive}: member {name!r} {why} {dest_dir} (path traversal, 'zip slip'). "
        "The archive is corrupt or malicious; delete it and download it again from the official source."
    )


def _safe_target(archive: Path, root: Path, name: str) -> Path:
    """The resolved path ``name`` would be extracted to, or a DataError if it leaves ``root``."""
    norm = name.replace("\\", "/")
    if not norm or "\x00" in norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise _unsafe(archive, root, name)
    if ".." in PurePosixPath(norm).parts:
        raise _unsafe(archive, root, name)
    target = (root / norm).resolve()
    if target != root and not target.is_relative_to(root):
        raise _unsafe(archive, root, name)
    return target


def _extract_bar(archive: Path, n: int, progress: bool) -> tqdm:
    return tqdm(total=n, unit="file", desc=f"extracting {archive.name}", file=sys.stderr, disable=not progress,
                leave=False)


def _extract_zip(archive: Path, dest_dir: Path, progress: bool) -> None:
    root = dest_dir.resolve()
    with zipfile.ZipFile(archive) as zf:
        members = [(info, _safe_target(archive, root, info.filename)) for info in zf.infolist()]
        members = [(info, target) for info, target in members if not _skip_member(info.filename)]
        with _extract_bar(archive, len(members), progress) as bar:
            for info, target in members:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                bar.update(1)


_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def _extract_tar(archive: Path, dest_dir: Path, progress: bool) -> None:
    root = dest_dir.resolve()
    with tarfile.open(archive) as tf:
        members = []
        for member in tf.getmembers():
            target = _safe_target(archive, root, member.name)
            if member.isdev() or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise _unsafe(archive, root, member.name, why="is a device or special file, not allowed in")
            if member.issym():
                link = member.linkname.replace("\\", "/")
                resolved = (target.parent / link).resolve()
                if link.startswith("/") or not (resolved == root or resolved.is_relative_to(root)):
                    raise _unsafe(archive, root, member.name, why="is a link pointing outside")
            elif member.islnk():
                _safe_target(archive, root, member.linkname)
            if not _skip_member(member.name):
                members.append(member)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with _extract_bar(archive, len(members), progress) as bar:
            for member in members:
                try:
                    tf.extract(member, dest_dir, **extra)
                except _TAR_FILTER_ERROR as err:  # defence in depth: the stdlib filter disagrees
                    raise _unsafe(
                        archive, root, member.name, why=f"was refused by the tar filter ({err}) for"
                    ) from None
                bar.update(1)


def _write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
    _write_json_atomic(cache / CHECKSUMS_FILE, data)


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
    if _check(path, _hash_file(path, algos), sha256=sha256, md5=spec.md5, size=size) is not None:
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
    path, digests = _fetch(
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
    digests = _hash_file(path, algos)
    if _check(path, digests, sha256=spec.sha256, md5=spec.md5, size=None) is not None:
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
