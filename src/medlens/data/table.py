"""``SampleTable``: one row per sample of a data set (what ``medlens.data.sources.discover`` returns).

Items are absolute file paths, or for a MedMNIST ``.npz`` ``f"{npz_path}::{split}::{index}"`` (see
:func:`npz_item` / :func:`parse_npz_item`). The split, the tensor cache, training and evaluation read the table;
only discovery builds it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SPLIT_NAMES", "SampleTable", "npz_item", "parse_npz_item", "relative_name"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass(eq=False)
class SampleTable:
    """One row per sample. All per-item lists have the same length and order."""

    items: list[str]  # absolute file paths, or for npz: f"{npz_path}::{split}::{index}"
    labels: np.ndarray  # int64 (N,)
    patient_ids: list[str]
    splits: list[str]  # "train" | "val" | "test" | "" (source has no split)
    classes: list[str]  # label i = classes[i]
    meta: list[dict]  # per item, e.g. {"subtype": "bacteria"} for Kermany pneumonia
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files left out
    source: str = ""  # the folder, CSV or npz given to discover (absolute)
    kind: str = ""  # "folder" | "csv" | "npz"
    patient_id_source: str = ""  # "filename" | "pattern" | "column" | "per-file" | "mixed"
    patients_per_file: bool = False  # True when (some) patient ids are just the file: splits may leak
    notes: list[str] = field(default_factory=list)  # things the user should know about this source

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.items)
        for name in ("labels", "patient_ids", "splits", "meta"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SampleTable.{name} has {len(getattr(self, name))} entries, items has {n}")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_split(self) -> bool:
        """True when the source brings its own split (some item has a non-empty split)."""
        return any(self.splits)

    def indices(self, split: str) -> np.ndarray:
        """Indices of the items of one of the source's own splits."""
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def label_counts(self, indices=None) -> dict[str, int]:
        labels = self.labels if indices is None else self.labels[np.asarray(indices, dtype=np.int64)]
        counts = np.bincount(labels, minlength=len(self.classes))
        return {c: int(counts[i]) for i, c in enumerate(self.classes)}

    def subset(self, mask_or_indices) -> SampleTable:
        """A new table with the rows selected by a boolean mask (length N) or by integer indices."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"mask has shape {sel.shape}, table has {len(self)} rows")
            idx = np.flatnonzero(sel)
        else:
            idx = sel.astype(np.int64).ravel()
        return SampleTable(
            items=[self.items[i] for i in idx],
            labels=self.labels[idx].copy(),
            patient_ids=[self.patient_ids[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            classes=list(self.classes),
            meta=[dict(self.meta[i]) for i in idx],
            skipped=list(self.skipped),
            source=self.source,
            kind=self.kind,
            patient_id_source=self.patient_id_source,
            patients_per_file=self.patients_per_file,
            notes=list(self.notes),
        )

    def relative_name(self, i: int) -> str:
        """The item's name relative to the source (forward slashes): the same on every machine."""
        return relative_name(self.items[i], self.source, self.kind)

    def fingerprint(self) -> str:
        """sha256 over the items' relative names, labels and class names (stable across machines)."""
        h = hashlib.sha256()
        h.update(("\x1f".join(self.classes) + "\x1e").encode())
        for i in range(len(self)):
            h.update(f"{self.relative_name(i)}\x1f{int(self.labels[i])}\x1e".encode())
        return h.hexdigest()

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [f"{self.kind} {self.source}: {len(self)} images, {len(set(self.patient_ids))} patients"]
        for split in ([s for s in SPLIT_NAMES if s in self.splits] if self.has_split else [""]):
            idx = self.indices(split) if split else np.arange(len(self))
            counts = ", ".join(f"{c} {n}" for c, n in self.label_counts(idx).items())
            lines.append(f"  {split or 'all'}: {len(idx)} ({counts})")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable files, e.g. {self.skipped[0][0]}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def relative_name(item: str, source: str, kind: str) -> str:
    """``item``'s name relative to the ``source`` of a table of ``kind`` (forward slashes; see
    ``SampleTable.relative_name``)."""
    if kind == "npz":
        path, split, index = item.rsplit("::", 2)
        return f"{Path(path).name}::{split}::{index}"
    base = Path(source) if kind == "folder" else Path(source).parent
    p = Path(item)
    try:
        return p.relative_to(base).as_posix()
    except ValueError:  # an absolute path outside the CSV's folder: keep what is stable, the tail
        return "/".join(p.parts[-3:])


def npz_item(npz_path: str | Path, split: str, index: int) -> str:
    return f"{npz_path}::{split}::{index}"


def parse_npz_item(item: str) -> tuple[str, str, int] | None:
    """``(npz_path, split, index)`` for an npz item, or None for a file path."""
    parts = item.rsplit("::", 2)
    if len(parts) != 3 or parts[1] not in SPLIT_NAMES or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])
