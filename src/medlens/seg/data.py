"""Segmentation data: image + mask pairs, split by patient, decoded once into a cache.

Layout of a segmentation data set (``DATA``)::

    DATA/images/<name>.<png|jpg|dcm|...>
    DATA/masks/<name>.png             same size as its image; 0 = background, 255 (any value > 0) = foreground,
                                      127 = "ignore" (left out of the loss and every metric)
    DATA/manifest.csv                 optional: image,mask[,patientid|patient_id|patient][,split][,...]

With a manifest, its rows decide the pairs and the patients (other columns, e.g. ``finding`` or ``view``, travel
as per-image metadata for subgroup tables). Without one, images and masks pair by file stem and every image is its
own patient (a warning says that a split by file can leak patients). The pairs are a ``SampleTable`` (items = image
paths, ``meta["mask"]`` = mask path, one dummy class), so the patient-grouped split, its manifest and its hash are
classification's own (``medlens.data.split``).

Decoded pairs are cached under ``<cache root>/seg/``: one ``.npz`` per requested set of pairs, keyed by the sha256
of every image and mask file, the size and ``SEG_CACHE_VERSION``; a changed pixel decodes again.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medlens.data.cache import default_cache_root, preprocess
from medlens.data.patients import _per_file_id
from medlens.data.readers import is_image_file, read_image
from medlens.data.table import SampleTable
from medlens.errors import DataError

log = logging.getLogger("medlens.seg")

#: label values of a decoded mask
BACKGROUND, FOREGROUND, IGNORE = 0, 1, 2
#: the value of the "ignore" region in mask files
IGNORE_VALUE = 127
SEG_CACHE_VERSION = "seg1"
_PATIENT_COLUMNS = ("patientid", "patient_id", "patient")


def is_segmentation_data(path: str | Path) -> bool:
    """True for a folder holding ``images/`` and ``masks/``."""
    p = Path(path)
    return p.is_dir() and (p / "images").is_dir() and (p / "masks").is_dir()


def discover_segmentation(root: str | Path) -> SampleTable:
    """The image / mask pairs of ``root`` as a ``SampleTable`` (see the module doc); problems name the file."""
    root = Path(root).resolve()
    if not is_segmentation_data(root):
        raise DataError(f"{root}: not a segmentation data set",
                        hint="expected images/ and masks/ folders (and optionally manifest.csv with image,mask,"
                             "patientid columns)")
    manifest = root / "manifest.csv"
    rows = _manifest_rows(manifest, root) if manifest.is_file() else _pair_by_stem(root)
    if not rows:
        raise DataError(f"{root}: no image / mask pairs found", hint="masks/<name>.png for each images/<name>.*")
    per_file = not manifest.is_file() or not any(r["patient"] for r in rows)
    patients = [r["patient"] or _per_file_id(r["rel"]) for r in rows]
    table = SampleTable(
        items=[r["image"] for r in rows], labels=np.zeros(len(rows), dtype=np.int64), patient_ids=patients,
        splits=[r["split"] for r in rows], classes=["image"], meta=[r["meta"] for r in rows], source=str(root),
        kind="segmentation", patient_id_source="per-file" if per_file else "column", patients_per_file=per_file)
    if per_file:
        table.notes.append("no patient ids (no manifest.csv with a patientid column): every image is its own "
                           "patient, so images of one patient may land in both train and test")
        log.warning("%s: %s", root, table.notes[-1])
    return table


def _manifest_rows(manifest: Path, root: Path) -> list[dict]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {manifest}: {e}") from None
    missing = [c for c in ("image", "mask") if c not in columns]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}",
                        hint=f"found {', '.join(columns)}; a segmentation manifest needs image and mask")
    patient_col = next((c for c in _PATIENT_COLUMNS if c in columns), None)
    rows, problems = [], []
    for n, rec in enumerate(records, start=2):
        image, mask = root / rec["image"].strip(), root / rec["mask"].strip()
        for what, p in (("image", image), ("mask", mask)):
            if not p.is_file():
                problems.append(f"line {n}: {what} {p} does not exist")
        split = (rec.get("split") or "").strip().lower()
        if split and split not in ("train", "val", "test"):
            problems.append(f"line {n}: split {split!r} is not train, val or test")
        meta = {k: v for k, v in rec.items() if k not in ("image", "mask", "split") and k and v not in (None, "")}
        meta["mask"] = str(mask)
        rows.append({"image": str(image), "rel": rec["image"].strip(), "split": split, "meta": meta,
                     "patient": (rec.get(patient_col) or "").strip() if patient_col else ""})
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{manifest}: {'; '.join(problems[:5])}{more}", hint="fix the manifest or the files")
    return rows


def _pair_by_stem(root: Path) -> list[dict]:
    masks = {p.stem: p for p in sorted((root / "masks").iterdir()) if p.is_file() and not p.name.startswith(".")}
    rows, unpaired = [], []
    for p in sorted((root / "images").iterdir()):
        if not p.is_file() or p.name.startswith(".") or not is_image_file(p):
            continue
        if p.stem not in masks:
            unpaired.append(p.name)
            continue
        rows.append({"image": str(p), "rel": f"images/{p.name}", "split": "", "patient": "",
                     "meta": {"mask": str(masks[p.stem])}})
    if unpaired:
        log.warning("%s: %d image(s) without a mask left out: %s", root, len(unpaired), ", ".join(unpaired[:5]))
    return rows


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file -> uint8 labels (BACKGROUND / FOREGROUND / IGNORE), HxW. ``shape`` (the image's) is checked."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {shape[1]}x{shape[0]}",
                        hint="a mask must have its image's size, pixel for pixel")
    labels = np.where(arr == IGNORE_VALUE, IGNORE, np.where(arr > 0, FOREGROUND, BACKGROUND))
    return labels.astype(np.uint8)


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``size x size`` (the image's squash, labels stay labels)."""
    if labels.shape == (size, size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))


@dataclass
class Pairs:
    images: torch.Tensor  # uint8 (n, 1, S, S): the network's input, as ``preprocess`` makes it
    masks: torch.Tensor  # uint8 (n, 1, S, S): BACKGROUND / FOREGROUND / IGNORE
    keep: np.ndarray  # indices into the table
    original_shapes: list[tuple[int, int]] = field(default_factory=list)
    n_decoded: int = 0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pairs(table: SampleTable, indices, size: int, *, cache_dir: str | Path | None = None) -> Pairs:
    """Decode the pairs ``indices`` of ``table`` at ``size`` (through the cache). An unreadable image or mask
    is an error naming the file: a segmentation set is small and every pair was drawn by hand."""
    idx = np.asarray(indices, dtype=np.int64)
    files = [(table.items[i], table.meta[i]["mask"]) for i in idx]
    key = hashlib.sha256(f"{SEG_CACHE_VERSION}\x1f{int(size)}".encode())
    for image, mask in files:
        key.update(f"{_sha256(image)}\x1f{_sha256(mask)}\x1e".encode())
    root = Path(cache_dir) if cache_dir else default_cache_root()
    path = root / "seg" / f"{key.hexdigest()[:32]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Pairs(torch.from_numpy(z["images"]), torch.from_numpy(z["masks"]), idx,
                         [tuple(s) for s in z["shapes"].tolist()], 0)
    images, masks, shapes = [], [], []
    for image_path, mask_path in files:
        try:
            image, _ = read_image(image_path)
        except DataError as e:
            raise DataError(f"{image_path}: {e.message}", hint=e.hint) from None
        labels = read_mask(mask_path, image.shape[:2])
        images.append(preprocess(image, size))
        masks.append(resize_labels(labels, size))
        shapes.append(image.shape[:2])
    x = np.stack(images)[:, None] if images else np.zeros((0, 1, size, size), np.uint8)
    m = np.stack(masks)[:, None] if masks else np.zeros((0, 1, size, size), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, images=x, masks=m, shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 2))
    os.replace(tmp, path)
    return Pairs(torch.from_numpy(x), torch.from_numpy(m), idx, [tuple(s) for s in shapes], len(files))
