"""Find the samples of a data set: ``discover(data) -> SampleTable``.

Three kinds of source are understood:

``folder``
    ``ROOT/{train,val,test}/CLASS/*`` (the source has its own split) or ``ROOT/CLASS/*`` (no split).
    Class folders are sorted by name; label ``i`` is ``classes[i]``. Files are found recursively below
    each class folder (so ``CLASS/patient/study/*.dcm`` works) and filtered by
    :func:`medlens.data.readers.is_image_file`. Hidden files and folders (and ``__MACOSX``) are ignored.
``csv``
    A CSV file with a header and the columns ``path,label`` plus optional ``patient_id`` and ``split``.
    Paths are relative to the CSV's folder or absolute. Other columns go into ``meta``.
``npz``
    A MedMNIST ``.npz`` (``train_images, train_labels, val_images, val_labels, test_images,
    test_labels``). Items are ``f"{npz_path}::{split}::{index}"``; MedMNIST has no patient ids, so every
    image is its own patient.

Patient ids come from ``medlens.data.patients``; the table itself is ``medlens.data.table.SampleTable``
(re-exported here).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from medlens.data.patients import PatientNamer, finish_patients, kermany_patient
from medlens.data.table import SPLIT_NAMES, SampleTable, npz_item, parse_npz_item, relative_name
from medlens.errors import DataError

__all__ = ["SPLIT_NAMES", "SampleTable", "discover", "kermany_patient", "npz_item", "parse_npz_item"]

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
_IGNORED_DIRS = {"__macosx", "__pycache__"}

# Class names of MedMNIST data sets (label i = classes[i]), from the MedMNIST v2 INFO table.
_MEDMNIST_CLASSES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
}
_NPZ_KEYS = [f"{s}_{k}" for s in SPLIT_NAMES for k in ("images", "labels")]


# ---------------------------------------------------------------------------------------------------
# discover


def discover(
    data: str | Path,
    *,
    patient_pattern: str | None = None,
    strict: bool = False,
    check_readable: bool = True,
) -> SampleTable:
    """Find the samples in an image folder, a CSV or a MedMNIST ``.npz``.

    ``check_readable`` does the cheap check only (the file exists and is not empty); decoding every file
    is left to :class:`medlens.data.cache.TensorCache`, which decodes each image once and reports the
    unreadable ones. Empty files are left out and listed in ``SampleTable.skipped``, or with
    ``strict=True`` raise :class:`DataError`.
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist",
            hint="give a folder of class folders (optionally inside train/val/test), "
            "a CSV with path,label columns, or a MedMNIST .npz",
        )
    path = path.absolute()
    if path.is_dir():
        return _discover_folder(path, patient_pattern, strict, check_readable)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _discover_csv(path, patient_pattern, strict, check_readable)
    if suffix == ".npz":
        return _discover_npz(path)
    raise DataError(
        f"{path} is not a folder, a .csv or a .npz file",
        hint="give a folder of class folders, a CSV with path,label columns, or a MedMNIST .npz",
    )


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror or e}") from None
    return [p for p in entries if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in _IGNORED_DIRS]


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` (recursive, sorted) and the number of other files ignored."""
    from medlens.data.readers import is_image_file

    found: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _IGNORED_DIRS)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if is_image_file(p):
                found.append(p)
            else:
                ignored += 1
    return found, ignored


def _cheap_check(p: Path) -> str | None:
    """Reason a file is unusable (missing or empty), or None."""
    try:
        size = p.stat().st_size
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if size == 0:
        return "empty file (0 bytes)"
    return None


def _discover_folder(root: Path, pattern: str | None, strict: bool, check: bool) -> SampleTable:
    subdirs = _visible_dirs(root)
    split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_ALIASES]
    if split_dirs:
        others = [d.name for d in subdirs if d not in split_dirs]
        if others:
            raise DataError(
                f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
                f"({', '.join(others)})",
                hint="use either ROOT/{train,val,test}/CLASS/images or ROOT/CLASS/images",
            )
        seen: dict[str, Path] = {}
        for d in split_dirs:
            s = _SPLIT_ALIASES[d.name.lower()]
            if s in seen:
                raise DataError(f"{root} has two folders for the {s} split: {seen[s].name} and {d.name}")
            seen[s] = d
        layout = [(s, seen[s]) for s in SPLIT_NAMES if s in seen]
    else:
        layout = [("", root)]

    # class folders per split
    per_split: list[tuple[str, Path, list[Path]]] = []
    for split, folder in layout:
        class_dirs = _visible_dirs(folder)
        if not class_dirs:
            loose, _ = _image_files(folder)
            where = f"{folder}" + (f" (the {split} split)" if split else "")
            if loose:
                raise DataError(
                    f"{where} holds images but no class folders",
                    hint=f"put the images into one folder per class, e.g. {folder}/NORMAL and {folder}/PNEUMONIA",
                )
            raise DataError(
                f"no images found in {where}",
                hint="expected one folder per class (e.g. NORMAL/, PNEUMONIA/) holding PNG, JPEG or DICOM files",
            )
        per_split.append((split, folder, class_dirs))

    classes = sorted({d.name for _, _, dirs in per_split for d in dirs})
    if len(classes) < 2:
        only = classes[0]
        folder = per_split[0][1]
        hint = "a classifier needs one folder per class, e.g. NORMAL/ and PNEUMONIA/"
        inner = _visible_dirs(folder / only)
        if inner:
            hint += f"; if {folder / only} is the data set itself, point at it instead"
        raise DataError(
            f"found only one class '{only}' in {folder}: a classifier needs at least two class folders",
            hint=hint,
        )
    class_index = {c: i for i, c in enumerate(classes)}

    namer = PatientNamer(pattern)
    kw: dict = dict(items=[], labels=[], patient_ids=[], splits=[], meta=[], notes=[])
    skipped: list[tuple[str, str]] = []
    ignored_total = 0
    for split, _folder, class_dirs in per_split:
        for cdir in class_dirs:
            files, ignored = _image_files(cdir)
            ignored_total += ignored
            if not files:
                inner = _visible_dirs(cdir)
                hint = "put the class's images (PNG, JPEG or DICOM) into it, or remove the empty folder"
                if ignored:
                    hint = f"it holds {ignored} file(s) that are not images; " + hint
                if inner and not ignored:
                    hint = f"its subfolders ({', '.join(d.name for d in inner[:3])}) hold no images either; " + hint
                raise DataError(f"class folder {cdir} contains no images", hint=hint)
            for f in files:
                if check:
                    reason = _cheap_check(f)
                    if reason is not None:
                        skipped.append((str(f), reason))
                        continue
                rel = f.relative_to(root).as_posix()
                pid, meta = namer(rel, f)
                kw["items"].append(str(f))
                kw["labels"].append(class_index[cdir.name])
                kw["patient_ids"].append(pid)
                kw["splits"].append(split)
                kw["meta"].append(meta)
    namer.check(str(root))
    _handle_skipped(skipped, strict, str(root))
    if not kw["items"]:
        raise DataError(f"no readable images found in {root}")
    finish_patients(kw, namer.used, len(kw["items"]))
    if ignored_total:
        kw["notes"].append(f"ignored {ignored_total} file(s) that are not images")
    if split_dirs:
        for split, folder, class_dirs in per_split:
            missing = sorted(set(classes) - {d.name for d in class_dirs})
            if missing:
                kw["notes"].append(f"the {split} split ({folder}) has no folder for class(es) {', '.join(missing)}")
    return SampleTable(
        classes=classes, skipped=skipped, source=str(root), kind="folder", **_as_arrays(kw)
    )


def _as_arrays(kw: dict) -> dict:
    kw = dict(kw)
    kw["labels"] = np.asarray(kw["labels"], dtype=np.int64)
    return kw


def _handle_skipped(skipped: list[tuple[str, str]], strict: bool, where: str) -> None:
    if skipped and strict:
        listed = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise DataError(
            f"{len(skipped)} unusable file(s) in {where}: {listed}{more}",
            hint="remove or replace them, or run without strict to skip them",
        )


# ---------------------------------------------------------------------------------------------------
# CSV


def _sort_classes(values: set[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer (so "10" comes after "2")."""
    try:
        return sorted(values, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(values)


def _discover_csv(csv_path: Path, pattern: str | None, strict: bool, check: bool) -> SampleTable:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {csv_path}: {e}") from None
    if not rows:
        raise DataError(f"CSV {csv_path} is empty", hint="it needs a header row with the columns path,label")
    header = [h.strip().lower() for h in rows[0]]
    col = {name: i for i, name in enumerate(header)}
    for alias, name in (("patient", "patient_id"), ("patientid", "patient_id")):
        if alias in col and name not in col:
            col[name] = col[alias]
    missing = [c for c in ("path", "label") if c not in col]
    if missing:
        raise DataError(
            f"CSV {csv_path} has no column {' or '.join(repr(m) for m in missing)} "
            f"(its columns are: {', '.join(rows[0]) or 'none'})",
            hint="the first row must name the columns: path,label (optionally patient_id and split)",
        )
    body = [(n, r) for n, r in enumerate(rows[1:], start=2) if any(c.strip() for c in r)]
    if not body:
        raise DataError(f"CSV {csv_path} has a header but no rows")
    base = csv_path.parent
    extra_cols = [h for h in header if h not in ("path", "label", "split", "patient_id", "patient", "patientid")]
    entries = []
    for line, r in body:
        if len(r) < len(header):
            r = r + [""] * (len(header) - len(r))
        p = r[col["path"]].strip()
        label = r[col["label"]].strip()
        if not p or not label:
            raise DataError(f"CSV {csv_path} line {line}: empty {'path' if not p else 'label'}")
        split = ""
        if "split" in col:
            raw = r[col["split"]].strip()
            if raw:
                split = _SPLIT_ALIASES.get(raw.lower(), "")
                if not split:
                    raise DataError(
                        f"CSV {csv_path} line {line}: unknown split {raw!r}",
                        hint="use train, val or test (or leave the cell empty)",
                    )
        pid = r[col["patient_id"]].strip() if "patient_id" in col else ""
        if "patient_id" in col and not pid:
            raise DataError(f"CSV {csv_path} line {line}: empty patient_id")
        fp = Path(p).expanduser()
        if not fp.is_absolute():
            fp = base / fp
        meta = {h: r[i] for h in extra_cols for i in [header.index(h)] if r[i] != ""}
        entries.append((line, fp, label, split, pid, meta))

    not_found = [str(e[1]) for e in entries if not e[1].is_file()]
    if not_found:
        raise DataError(
            f"CSV {csv_path} lists {len(not_found)} file(s) that do not exist, e.g. {', '.join(not_found[:5])}",
            hint=f"relative paths are taken from the CSV's folder {base}",
        )
    classes = _sort_classes({e[2] for e in entries})
    if len(classes) < 2:
        raise DataError(
            f"found only one class '{classes[0]}' in {csv_path}: a classifier needs at least two labels"
        )
    class_index = {c: i for i, c in enumerate(classes)}

    namer = PatientNamer(pattern)
    kw: dict = dict(items=[], labels=[], patient_ids=[], splits=[], meta=[], notes=[])
    skipped: list[tuple[str, str]] = []
    for _line, fp, label, split, pid, meta in entries:
        if check:
            reason = _cheap_check(fp)
            if reason is not None:
                skipped.append((str(fp), reason))
                continue
        rel = relative_name(str(fp), str(csv_path), "csv")
        if pid:
            namer.used["column"] += 1
            found = kermany_patient(rel)
            if found is not None:
                meta = {**found[1], **meta}
        else:
            pid, pmeta = namer(rel, fp)
            meta = {**pmeta, **meta}
        kw["items"].append(str(fp))
        kw["labels"].append(class_index[label])
        kw["patient_ids"].append(pid)
        kw["splits"].append(split)
        kw["meta"].append(meta)
    namer.check(str(csv_path))
    _handle_skipped(skipped, strict, str(csv_path))
    if not kw["items"]:
        raise DataError(f"no readable images listed in {csv_path}")
    finish_patients(kw, namer.used, len(kw["items"]))
    return SampleTable(classes=classes, skipped=skipped, source=str(csv_path), kind="csv", **_as_arrays(kw))


# ---------------------------------------------------------------------------------------------------
# MedMNIST npz




def _discover_npz(npz_path: Path) -> SampleTable:
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise DataError(f"cannot read {npz_path} as a .npz file: {e}") from None
    with npz:
        keys = list(npz.files)
        missing = [k for k in _NPZ_KEYS if k not in keys]
        if missing:
            raise DataError(
                f"{npz_path} is not a MedMNIST file: missing {', '.join(missing)} "
                f"(keys found: {', '.join(keys) or 'none'})",
                hint="a MedMNIST .npz has train_images, train_labels, val_images, val_labels, test_images, "
                "test_labels",
            )
        kw: dict = dict(items=[], labels=[], patient_ids=[], splits=[], meta=[], notes=[])
        all_labels = []
        for split in SPLIT_NAMES:
            labels = np.asarray(npz[f"{split}_labels"])
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1:
                raise DataError(
                    f"{npz_path}: {split}_labels has shape {labels.shape}; only single-label data sets "
                    "(labels of shape (N,) or (N, 1)) are supported"
                )
            # the images' shape without loading them (they can be large)
            n_images = _npz_array_len(npz, f"{split}_images")
            if n_images != len(labels):
                raise DataError(
                    f"{npz_path}: {split}_images has {n_images} images but {split}_labels has {len(labels)} labels"
                )
            all_labels.append(labels.astype(np.int64))
            for i in range(len(labels)):
                item = npz_item(npz_path, split, i)
                kw["items"].append(item)
                kw["patient_ids"].append(item)
                kw["splits"].append(split)
                kw["meta"].append({})
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)
    if labels.size == 0:
        raise DataError(f"{npz_path} holds no images")
    if labels.min() < 0:
        raise DataError(f"{npz_path}: negative labels found")
    known = _MEDMNIST_CLASSES.get(npz_path.stem.lower().split("_")[0])
    n_classes = int(labels.max()) + 1
    if known is not None and n_classes <= len(known):
        classes = list(known)
    else:
        classes = [str(i) for i in range(n_classes)]
    if len(classes) < 2:
        raise DataError(f"found only one class in {npz_path}: a classifier needs at least two labels")
    kw["labels"] = labels
    kw["notes"].append(
        "MedMNIST has no patient ids: each image counts as its own patient (the official MedMNIST "
        "train/val split was made per image, so it can share patients)"
    )
    return SampleTable(
        classes=classes, source=str(npz_path), kind="npz", patient_id_source="per-file",
        patients_per_file=True, **kw,
    )


def _npz_array_len(npz, key: str) -> int:
    """Length of an array in an npz, read from the .npy header (does not load the data)."""
    import zipfile

    from numpy.lib import format as npformat

    try:
        with npz.zip.open(f"{key}.npy") as fh:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, _, _ = npformat.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, _ = npformat.read_array_header_2_0(fh)
            else:
                raise ValueError(version)
        return int(shape[0]) if shape else 0
    except (KeyError, AttributeError, ValueError, OSError, zipfile.BadZipFile):
        return len(npz[key])
