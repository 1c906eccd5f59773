"""Safe archive extraction: ``extract(archive, dest_dir)``.

Zip and tar(.gz/.bz2/.xz) extraction that refuses any member that would land outside ``dest_dir`` ("zip
slip": absolute paths, ``..``, links pointing out, device files). A marker file is written last, so an
extraction interrupted half way is redone on the next call instead of being trusted.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from medlens.data.fetch import CHUNK, write_json_atomic
from medlens.errors import DataError

__all__ = ["EXTRACT_MARKER", "extract"]

#: written into the destination folder when an extraction completes
EXTRACT_MARKER = ".medlens-extracted.json"


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
    write_json_atomic(marker, {**identity, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
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
                        shutil.copyfileobj(src, dst, CHUNK)
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
