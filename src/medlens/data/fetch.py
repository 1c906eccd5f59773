"""Checksummed, resumable downloads with a progress bar: ``fetch(url, dest, sha256=..., md5=..., size=...)``.

Downloads ``url`` to ``dest`` with the standard library only (``urllib``). Bytes go to ``dest.part`` first; an
existing ``.part`` is resumed with an HTTP ``Range`` request (a server that ignores ``Range`` and answers
``200`` restarts the file cleanly). A progress bar (bytes, on stderr) is shown unless ``progress=False``. The
file is verified (size, sha256, md5: whichever are given) and only then atomically renamed to ``dest``; a
``dest`` that already exists and verifies is returned at once without any request. A checksum mismatch
deletes the bad file and raises :class:`~medlens.errors.DataError`; a network failure raises
:class:`NetworkError` (a ``DataError``) and keeps the ``.part`` for a resume.

The data-set registry and cache that use it are ``medlens.data.download``; archive extraction is
``medlens.data.archive``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from tqdm import tqdm

from medlens import __version__
from medlens.errors import DataError

__all__ = ["NetworkError", "fetch", "fetch_with_digests", "hash_file", "verify_file", "write_json_atomic"]

log = logging.getLogger(__name__)

#: bytes per read when downloading, hashing or extracting
CHUNK = 1 << 20
USER_AGENT = f"medlens/{__version__} (python-urllib)"


class NetworkError(DataError):
    """A download that failed for lack of a working connection (refused, unreachable, timed out, cut off,
    or a temporary server error). ``reason`` is a short description, e.g. ``"connection refused"``."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None):
        self.reason = reason
        super().__init__(message, hint=hint)


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
    path, _ = fetch_with_digests(url, Path(dest), sha256=sha256, md5=md5, size=size, progress=progress, timeout=timeout)
    return path


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def fetch_with_digests(
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
    """:func:`fetch` that also returns the digests named in ``want`` (computed while verifying), for a caller
    that records them (trust on first use); ``expected_from`` says where the expected checksum came from."""
    sha256 = sha256.lower() if sha256 else None
    md5 = md5.lower() if md5 else None
    algos = sorted(set(want) | {a for a, v in (("sha256", sha256), ("md5", md5)) if v})
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.is_file():
        digests = hash_file(dest, algos)
        problem = verify_file(dest, digests, sha256=sha256, md5=md5, size=size)
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

    digests = hash_file(part, algos)
    problem = verify_file(part, digests, sha256=sha256, md5=md5, size=size)
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
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
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
                    chunk = response.read(CHUNK)
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


def hash_file(path: Path, algos: Iterable[str]) -> dict[str, str]:
    algos = list(algos)
    if not algos:
        return {}
    hashers = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def verify_file(
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


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
