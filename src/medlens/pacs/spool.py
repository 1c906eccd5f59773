"""The DICOM node's spool: received instances and results to send, as files that survive ``kill -9``.

Folders under the spool root:
- ``incoming/KEY.dcm`` (+ ``KEY.json``, who sent it and when): received and acknowledged, not yet processed;
- ``results/ID.sr.dcm``, ``results/ID.sc.dcm``: the result objects of prediction ``ID``, kept for the API;
- ``outbox/UID.dcm``: results still to send to the destination (links to the files in ``results/``);
- ``failed/KEY.dcm``: instances whose processing failed again and again (set aside so they do not block the
  queue; the audit trail has a ``dicom-failed`` row with the error). Move one back to ``incoming/`` to retry.

Every file is written to a temporary name, fsynced, renamed into place, and then the folder is fsynced. So a
file under its final name is always complete and on disk. The C-STORE handler answers success only after
``incoming/KEY.dcm`` is in place. After a crash, whatever is still in ``incoming/`` is processed and whatever is
still in ``outbox/`` is sent. Processing is idempotent (the result UIDs are derived from the input, see
:mod:`medlens.pacs.results`), so work cut off half way is redone, not duplicated.

A message queue would work too. Plain files are used because they need no other server beside the node, and
the sender can read a result straight from ``outbox/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

INCOMING, RESULTS, OUTBOX, FAILED = "incoming", "results", "outbox", "failed"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temporary file, fsync, rename, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def instance_key(sop_instance_uid: str) -> str:
    """The spool name of a received instance: one file per instance (a resend replaces, never doubles it)."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:32]


class Spool:
    """The spool folders under ``root`` (created 0700: they hold patient data)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for name in (INCOMING, RESULTS, OUTBOX, FAILED):
            (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    # -- received instances

    def accept(self, sop_instance_uid: str, data: bytes, info: dict[str, Any]) -> Path:
        """Store one received instance (the encoded DICOM file) and who sent it, durably; its path."""
        key = instance_key(sop_instance_uid)
        write_atomic(self.root / INCOMING / f"{key}.json", json.dumps(info).encode())
        path = self.root / INCOMING / f"{key}.dcm"
        write_atomic(path, data)
        return path

    def pending(self) -> list[Path]:
        """Received instances not yet processed, oldest first."""
        return _oldest_first(self.root / INCOMING, "*.dcm")

    def info(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return {}

    def done(self, path: Path) -> None:
        """A received instance is processed: its results are in ``outbox/`` and the audit trail."""
        for p in (path, path.with_suffix(".json")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        _fsync_dir(path.parent)

    def quarantine(self, path: Path) -> Path:
        """Set a received instance (and its info) aside in ``failed/``; its new path."""
        target = self.root / FAILED / path.name
        for p, q in ((path.with_suffix(".json"), target.with_suffix(".json")), (path, target)):
            with contextlib.suppress(FileNotFoundError):
                os.replace(p, q)
        _fsync_dir(target.parent)
        _fsync_dir(path.parent)
        return target

    # -- results

    def result_path(self, prediction_id: str, kind: str) -> Path:
        """``results/ID.KIND.dcm`` (kind: sr or sc)."""
        return self.root / RESULTS / f"{prediction_id}.{kind}.dcm"

    def add_result(self, prediction_id: str, kind: str, sop_instance_uid: str, data: bytes) -> None:
        """Keep a result object and queue it for sending (a link in ``outbox/``, named by its UID)."""
        path = self.result_path(prediction_id, kind)
        write_atomic(path, data)
        queued = self.root / OUTBOX / f"{sop_instance_uid}.dcm"
        tmp = queued.with_name(f".tmp-{queued.name}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links: a copy
            write_atomic(queued, data)
            return
        os.replace(tmp, queued)
        _fsync_dir(queued.parent)

    def outbox(self) -> list[Path]:
        """Results still to send, oldest first."""
        return _oldest_first(self.root / OUTBOX, "*.dcm")

    def sent(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _fsync_dir(path.parent)

    def clean_temporaries(self) -> int:
        """Remove half-written files of a process that died (never acknowledged or queued); how many."""
        count = 0
        for folder in (INCOMING, RESULTS, OUTBOX):
            for tmp in (self.root / folder).glob(".tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    count += 1
        for orphan in (self.root / INCOMING).glob("*.json"):  # info written, instance not: not acknowledged
            if not orphan.with_suffix(".dcm").exists():
                orphan.unlink()
        return count


def _oldest_first(folder: Path, pattern: str) -> list[Path]:
    entries = []
    for p in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            entries.append((p.stat().st_mtime_ns, p.name, p))
    return [p for _, _, p in sorted(entries)]
