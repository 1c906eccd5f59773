"""Decode once, reuse forever: the decoded-tensor cache, and ``preprocess``, the one resize for every stage.

``preprocess(image, size, options=...)`` turns a decoded image (``read_image``'s float32 HxW in [0, 1]) into the
uint8 ``size x size`` array the network sees. Training, evaluation, prediction and serving all go through it, so a
model never sees pixels prepared differently from the ones it was trained on. ``options`` are the preprocessing
switches (``preprocess_options``): the recipe's ``data.*`` settings at training, the model card's ``preprocess``
afterwards; ``{}`` is the plain resize.

``TensorCache`` stores preprocessed images on disk, keyed by the **content** of the file (sha256 of its
bytes) and the preprocessing key (size, options, ``PREPROCESS_VERSION``, the reader's version). Renaming, moving or
touching a file costs nothing; changing a pixel, the size or the preprocessing decodes again.

Layout::

    <root>/<prepkey>/pack-<id>.npy    uint8 (n, size, size)
    <root>/<prepkey>/pack-<id>.json   {"format": 1, "prep": prepkey, "n": n, "hashes": [sha256, ...]}

A pack is written atomically (temporary file + ``os.replace``; the ``.json`` last), so a pack whose ``.json``
exists is complete and an interrupted run leaves nothing half-written behind (only stray ``.tmp`` files).
Each load that decodes something adds packs; packs are never modified, so several processes can share one
cache. MedMNIST ``.npz`` items are keyed by the sha256 of the ``.npz`` file, the split and the index.

The default root is ``$MEDLENS_CACHE/tensors``, else ``~/.cache/medlens/tensors``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medlens.data import readers as _readers
from medlens.data.table import SampleTable, parse_npz_item
from medlens.errors import ConfigError, DataError

# Bump when preprocess() changes what it outputs: old cache entries are then ignored, not reused.
PREPROCESS_VERSION = "pp1"
PACK_FORMAT = 1
_PACK_ROWS = 2048  # decoded images per pack: an interrupted run keeps what it finished
_PARALLEL_MIN = 64  # fewer images than this are decoded in this process


#: ``options["equalize"]``: none, global histogram equalisation, or CLAHE (contrast-limited adaptive)
EQUALIZE = ("none", "hist", "clahe")
CLAHE_CLIP, CLAHE_TILES = 0.01, 8  # scikit-image's defaults: clip limit 0.01, contextual regions 1/8 of each side
#: every key ``options`` may hold (a step added to ``preprocess`` adds its keys here and in ``preprocess_options``)
OPTION_KEYS = ("equalize", "clip", "tiles", "lung_crop")
#: ``options["lung_crop"]``: crop to the lungs found by a segmentation model (``medlens.seg.crop``), identified by
#: its weights; ``margin`` is added on each side as a share of the box
LUNG_CROP_KEYS = ("model_id", "weights_sha256", "margin")


def preprocess_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check ``preprocess`` options and return them in canonical form: ``{}`` is the plain resize (so cards
    without the field and runs without the settings keep their cache entries), else e.g. ``{"equalize": "hist"}``
    or ``{"equalize": "clahe", "clip": 0.01, "tiles": 8}`` (defaults filled, keys a choice does not use dropped).
    Unknown keys or values raise ``ConfigError``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"unknown preprocessing option(s) {', '.join(map(repr, unknown))}",
                          hint=f"known options: {', '.join(OPTION_KEYS)} (a model card written by a newer medlens?)")
    equalize = options.get("equalize", "none")
    if equalize not in EQUALIZE:
        raise ConfigError(f"unknown preprocessing option equalize={equalize!r}", hint=f"choose one of {', '.join(EQUALIZE)}")
    out: dict[str, Any] = {}
    if equalize == "hist":
        out["equalize"] = "hist"
    elif equalize == "clahe":
        clip, tiles = options.get("clip", CLAHE_CLIP), options.get("tiles", CLAHE_TILES)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
            raise ConfigError(f"CLAHE clip limit {clip!r} must be a number in (0, 1]",
                              hint=f"the default is {CLAHE_CLIP}; higher values give more contrast")
        if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
            raise ConfigError(f"CLAHE tiles {tiles!r} must be a whole number >= 1",
                              hint=f"the default is {CLAHE_TILES} (tiles per side)")
        out.update(equalize="clahe", clip=float(clip), tiles=int(tiles))
    crop = options.get("lung_crop")
    if crop:
        if not isinstance(crop, dict) or not isinstance(crop.get("weights_sha256"), str):
            raise ConfigError(f"preprocessing option lung_crop={crop!r} must name the segmentation model's weights",
                              hint="{'model_id': ..., 'weights_sha256': ..., 'margin': 0.05}")
        margin = crop.get("margin", 0.05)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 0.5:
            raise ConfigError(f"lung crop margin {margin!r} must be a number in [0, 0.5]")
        out["lung_crop"] = {"model_id": str(crop.get("model_id", "")), "weights_sha256": crop["weights_sha256"],
                            "margin": float(margin)}
    return out


def equalize(image: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    """The equalisation ``options`` ask for, on a float HxW image in [0, 1] (scikit-image); float32 in [0, 1].

    CLAHE stretches the image's own grey range to [0, 1] first (scikit-image does), so its output depends only on
    the image. A constant image (blank) is returned unchanged: both methods would invent structure (CLAHE) or move
    every pixel to 0.5 (hist) in it."""
    kind = options.get("equalize", "none")
    if kind == "none" or image.size == 0 or float(image.max()) == float(image.min()):
        return image
    from skimage import exposure  # imported here: only runs that equalise pay for it

    if kind == "hist":
        out = exposure.equalize_hist(image, nbins=256)
    else:  # contextual regions of 1/tiles of the height and width, as scikit-image's default of 1/8
        kernel = tuple(max(1, d // int(options["tiles"])) for d in image.shape)
        out = exposure.equalize_adapthist(image, kernel_size=kernel, clip_limit=float(options["clip"]), nbins=256)
    return np.asarray(out, dtype=np.float32)


def preprocess(image: np.ndarray, size: int, *, options: dict[str, Any] | None = None,
               crop: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """A decoded image (float HxW in [0, 1], or uint8) -> uint8 ``(size, size)``. THE network preprocessing.

    ``options`` (``preprocess_options``; a model card's ``preprocess``): ``{"equalize": "hist" | "clahe", ...}``
    equalises the decoded image before the resize. Before, not after: CLAHE's tiles and the histogram are then
    those of the image as acquired, whatever the network's input size. Measured (scikit-image 0.26, one CPU
    core): at 224 px CLAHE takes ~8-11 ms per image either way; on a 1955x1841 radiograph (the RG1_J2KI DICOM
    of the shared data) ~470 ms before the resize against ~22 ms after, but on images not already at the input
    size the two results differ by ~6-13 grey levels on average (up to 37-62): not equivalent, so the slower,
    size-independent order is kept. The tensor cache pays the cost once per image; Kermany's files are 224 px.

    ``options["lung_crop"]`` crops the decoded image to the lungs first (before equalising, so the histogram is
    the lungs'); ``crop`` is the callable that does it (``medlens.seg.crop.LungCropper``, which holds the
    segmentation model the options name). It is passed, not looked up, so this module needs no model code.

    The image is squashed to a square (the aspect ratio is not kept, nothing is cropped or padded: a
    radiograph's edges hold anatomy, and the Kermany train/test images were already squashed to 224x224 by
    their uploader, so a pad would treat them differently from the originals). Resizing is Pillow's
    bilinear filter on the float image; Pillow widens the filter when shrinking, so downscaling is
    antialiased (no aliasing of rib edges and text). The result is rounded to uint8 (0..255 for 0..1).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3].mean(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"preprocess expects a 2-D grey image, got shape {arr.shape}")
    opts = preprocess_options(options)
    if "lung_crop" in opts and crop is None:
        raise ConfigError("this model was trained on images cropped to the lungs, but no lung segmentation model "
                          "was given to crop with", hint="load the run with medlens (it keeps its lung model in "
                                                          "RUN/lung_seg/)")
    if arr.dtype == np.uint8:
        if arr.shape == (size, size) and not opts:
            return np.ascontiguousarray(arr)
        arr = arr.astype(np.float32) / 255.0
    if "lung_crop" in opts:
        arr = crop(np.asarray(arr, dtype=np.float32))
    arr = equalize(np.asarray(arr, dtype=np.float32), opts)
    if arr.shape != (size, size):
        resized = Image.fromarray(arr, mode="F").resize((size, size), Image.BILINEAR)
        arr = np.asarray(resized, dtype=np.float32)
    out = np.clip(np.rint(arr * 255.0), 0, 255)
    return out.astype(np.uint8)


def preprocess_key(size: int, options: dict[str, Any] | None = None) -> str:
    """Directory name of the cache entries made with this preprocessing (size, options) and this reader.

    Plain preprocessing (``options`` empty) keeps the name it always had; any option adds its ``equalize`` choice
    and a hash of all the options (``s224-pp1-r1-clahe-<10 hex>``), so entries made with other settings are
    never reused."""
    reader = getattr(_readers, "READER_VERSION", "r1")
    key = f"s{int(size)}-{PREPROCESS_VERSION}-{reader}"
    opts = preprocess_options(options)
    if opts:
        digest = hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:10]
        key += f"-{opts.get('equalize', 'none')}{'-lung' if 'lung_crop' in opts else ''}-{digest}"
    return key


def default_cache_root() -> Path:
    env = os.environ.get("MEDLENS_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "medlens"
    return base / "tensors"


@dataclass
class CachedImages:
    """The preprocessed images of the readable requested items.

    ``images[k]`` is item ``keep[k]`` of the table; ``skipped`` lists the items that could not be read.
    """

    images: Any  # torch.uint8 (n, 1, size, size)
    keep: np.ndarray  # int64 indices into the table, in the requested order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    hashes: list[str] = field(default_factory=list)  # content key of each kept image (equal = same pixels)
    n_decoded: int = 0  # images decoded by this load (0 when everything was cached)
    n_cached: int = 0  # images found in the cache

    def __len__(self) -> int:
        return len(self.keep)


def _decode_file(path: str, size: int, options: dict[str, Any] | None = None, crop=None
                 ) -> tuple[np.ndarray | None, str | None]:
    """Worker: read + preprocess one file. Errors come back as text (they must cross a process boundary)."""
    try:
        image, _ = _readers.read_image(path)
        return preprocess(image, size, options=options, crop=crop), None
    except DataError as e:
        reason = e.message
    except Exception as e:  # noqa: BLE001 - a reader bug must not kill a 100k-image decode
        reason = f"{type(e).__name__}: {e}"
    prefix = f"{path}: "
    return None, reason[len(prefix):] if reason.startswith(prefix) else reason


def _decode_chunk(args: tuple[list[str], int, dict[str, Any], Any]) -> list[tuple[np.ndarray | None, str | None]]:
    paths, size, options, crop = args  # crop: a picklable callable (it loads its model once per process)
    return [_decode_file(p, size, options, crop) for p in paths]


def _hash_file(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
                hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


class TensorCache:
    """On-disk cache of preprocessed images, keyed by file content + preprocessing (see module doc)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        # per prepkey: content hash -> (pack name, row); pack names already read
        self._index: dict[str, dict[str, tuple[str, int]]] = {}
        self._seen_packs: dict[str, set[str]] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._npz_hashes: dict[tuple[str, int, int], str] = {}

    # -- index ------------------------------------------------------------------------------------
    def _refresh(self, prep: str) -> dict[str, tuple[str, int]]:
        """Read the .json of packs not seen yet (written by this or another process)."""
        index = self._index.setdefault(prep, {})
        seen = self._seen_packs.setdefault(prep, set())
        folder = self.root / prep
        if not folder.is_dir():
            return index
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = entry.name
            if not name.endswith(".json") or name in seen:
                continue
            try:
                with open(entry.path, encoding="utf-8") as fh:
                    info = json.load(fh)
                hashes = info["hashes"]
                if info.get("format") != PACK_FORMAT or not (folder / (name[:-5] + ".npy")).is_file():
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged pack is ignored: its images are simply decoded again
            seen.add(name)
            pack = name[:-5]
            for row, h in enumerate(hashes):
                index.setdefault(h, (pack, row))
        return index

    def _array(self, prep: str, pack: str) -> np.ndarray:
        key = (prep, pack)
        if key not in self._arrays:
            path = self.root / prep / f"{pack}.npy"
            try:
                self._arrays[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"tensor cache file {path} cannot be read: {e}",
                                hint=f"delete the folder {self.root / prep} and run again") from None
        return self._arrays[key]

    def _write_pack(self, prep: str, hashes: list[str], images: list[np.ndarray], size: int,
                    name: str | None = None) -> None:
        folder = self.root / prep
        folder.mkdir(parents=True, exist_ok=True)
        if name is None:
            name = "pack-" + hashlib.sha256("".join(hashes).encode()).hexdigest()[:24]
        arr = np.stack(images).astype(np.uint8) if images else np.zeros((0, size, size), np.uint8)
        tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        npy, js = folder / f"{name}.npy", folder / f"{name}.json"
        try:
            with open(str(npy) + tag, "wb") as fh:
                np.save(fh, arr)
            os.replace(str(npy) + tag, npy)
            with open(str(js) + tag, "w", encoding="utf-8") as fh:
                json.dump({"format": PACK_FORMAT, "prep": prep, "n": len(hashes), "hashes": hashes}, fh)
            os.replace(str(js) + tag, js)
        except OSError as e:
            for leftover in (str(npy) + tag, str(js) + tag):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            raise DataError(f"cannot write to the tensor cache {folder}: {e.strerror or e}",
                            hint="free disk space, or set MEDLENS_CACHE to a writable folder") from None

    # -- npz ----------------------------------------------------------------------------------------
    def _npz_hash(self, path: str) -> str:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._npz_hashes:
            h = _hash_file(path)
            if h is None:
                raise DataError(f"cannot read {path}")
            self._npz_hashes[key] = h
        return self._npz_hashes[key]

    def _ensure_npz(self, prep: str, size: int, npz_path: str, split: str, index: dict,
                    options: dict[str, Any] | None = None, crop=None) -> str:
        """Make sure the whole split of an npz is cached (one pack); return the key prefix of its rows."""
        prefix = f"npz:{self._npz_hash(npz_path)}:{split}:"
        if prefix + "0" in index:
            return prefix
        with np.load(npz_path, allow_pickle=False) as npz:
            images = np.asarray(npz[f"{split}_images"])
        if len(images) == 0:
            return prefix
        rows = [preprocess(im, size, options=options, crop=crop) for im in images]
        hashes = [f"{prefix}{i}" for i in range(len(rows))]
        name = "npz-" + hashlib.sha256(prefix.encode()).hexdigest()[:24]
        self._write_pack(prep, hashes, rows, size, name=name)
        self._refresh(prep)
        return prefix

    # -- load ---------------------------------------------------------------------------------------
    def load(
        self,
        table: SampleTable,
        indices=None,
        size: int = 224,
        *,
        strict: bool = False,
        progress: bool = True,
        workers: int | None = None,
        options: dict[str, Any] | None = None,
        crop: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> CachedImages:
        """The preprocessed images of ``table`` rows ``indices`` (all rows if None), decoding only new ones.

        ``options``: the ``preprocess`` options (``preprocess_options``; a model card's ``preprocess``); images
        prepared with other options are other cache entries. ``crop``: the lung cropper ``options`` may ask for.

        Files that cannot be read are left out and listed in ``skipped`` (the caller reports them), or
        with ``strict=True`` raise DataError listing them. ``workers``: decoding processes (default: the
        CPU count; 0 or 1 decodes in this process).
        """
        import torch

        idx = np.arange(len(table), dtype=np.int64) if indices is None else \
            np.asarray(indices, dtype=np.int64).ravel()
        options = preprocess_options(options)
        prep = preprocess_key(size, options)
        index = self._refresh(prep)

        keys: list[str | None] = [None] * len(idx)
        skipped: list[tuple[int, str, str]] = []  # (position, item, reason)
        npz_done: dict[tuple[str, str], str] = {}
        file_pos: list[int] = []
        for pos, i in enumerate(idx):
            item = table.items[int(i)]
            parsed = parse_npz_item(item) if table.kind == "npz" or "::" in item else None
            if parsed is not None:
                npz_path, split, k = parsed
                if (npz_path, split) not in npz_done:
                    npz_done[(npz_path, split)] = self._ensure_npz(prep, size, npz_path, split, index, options, crop)
                keys[pos] = f"{npz_done[(npz_path, split)]}{k}"
                if keys[pos] not in index:
                    skipped.append((pos, item, f"no image {k} in the {split} split"))
                    keys[pos] = None
            else:
                file_pos.append(pos)
        n_cached = sum(1 for k in keys if k is not None)  # npz rows (their packs are made above)

        # content hashes of the files (reading bytes is cheap next to decoding them)
        paths = [table.items[int(idx[pos])] for pos in file_pos]
        hashes = _hash_many(paths)
        missing: dict[str, str] = {}  # hash -> a path with that content, to decode
        for pos, path, h in zip(file_pos, paths, hashes, strict=True):
            if h is None:
                skipped.append((pos, path, "file cannot be opened (missing or no permission)"))
                continue
            keys[pos] = h
            if h in index:
                n_cached += 1
            elif h not in missing:
                missing[h] = path

        failed = self._decode_missing(prep, size, missing, progress, workers, options, crop)
        index = self._refresh(prep)
        for pos, path, h in zip(file_pos, paths, hashes, strict=True):
            if h is not None and h in failed:
                skipped.append((pos, path, failed[h]))
                keys[pos] = None

        skipped.sort()
        if skipped and strict:
            listed = "; ".join(f"{item} ({reason})" for _, item, reason in skipped[:5])
            more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
            raise DataError(
                f"{len(skipped)} of {len(idx)} images cannot be read: {listed}{more}",
                hint="remove or replace the files, or run without strict to skip them",
            )

        kept_pos = [pos for pos in range(len(idx)) if keys[pos] is not None]
        out = np.empty((len(kept_pos), 1, size, size), dtype=np.uint8)
        by_pack: dict[str, list[tuple[int, int]]] = {}
        for j, pos in enumerate(kept_pos):
            pack, row = index[keys[pos]]
            by_pack.setdefault(pack, []).append((row, j))
        for pack, pairs in by_pack.items():
            pairs.sort()
            rows = np.fromiter((r for r, _ in pairs), dtype=np.int64, count=len(pairs))
            dest = np.fromiter((j for _, j in pairs), dtype=np.int64, count=len(pairs))
            out[dest, 0] = self._array(prep, pack)[rows]  # sorted rows: a forward read of the memmap
        return CachedImages(
            images=torch.from_numpy(out),
            keep=idx[kept_pos] if kept_pos else np.zeros(0, np.int64),
            skipped=[(item, reason) for _, item, reason in skipped],
            hashes=[keys[pos] for pos in kept_pos],
            n_decoded=len(missing) - len(failed),
            n_cached=n_cached,
        )

    def _decode_missing(self, prep: str, size: int, missing: dict[str, str], progress: bool,
                        workers: int | None, options: dict[str, Any] | None = None, crop=None) -> dict[str, str]:
        """Decode the files not in the cache, write them as packs; return {hash: reason} of failures."""
        if not missing:
            return {}
        from tqdm.auto import tqdm

        items = list(missing.items())
        n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
        n_workers = max(1, min(n_workers, len(items) // 16 or 1))
        failed: dict[str, str] = {}
        done_h: list[str] = []
        done_im: list[np.ndarray] = []

        def flush(force: bool) -> None:
            while len(done_h) >= _PACK_ROWS or (force and done_h):
                k = min(len(done_h), _PACK_ROWS)
                self._write_pack(prep, done_h[:k], done_im[:k], size)
                del done_h[:k], done_im[:k]

        bar = tqdm(total=len(items), desc=f"decoding {len(items)} images", unit="img",
                   disable=not progress, leave=False)
        try:
            if n_workers <= 1 or len(items) < _PARALLEL_MIN:
                for h, path in items:
                    image, error = _decode_file(path, size, options, crop)
                    self._collect(h, image, error, done_h, done_im, failed)
                    bar.update(1)
                    flush(False)
            else:
                chunk = max(8, min(128, len(items) // (n_workers * 8) or 8))
                batches = [items[k:k + chunk] for k in range(0, len(items), chunk)]
                # A crop runs a torch model in the workers: forking a process whose torch (OpenMP) thread pool is
                # already running can deadlock the child, so those workers start fresh ("spawn").
                context = multiprocessing.get_context("spawn") if crop is not None else None
                with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
                    results = pool.map(_decode_chunk, [([p for _, p in b], size, options, crop) for b in batches])
                    for batch, res in zip(batches, results, strict=True):
                        for (h, _), (image, error) in zip(batch, res, strict=True):
                            self._collect(h, image, error, done_h, done_im, failed)
                        bar.update(len(batch))
                        flush(False)
        finally:
            bar.close()
            flush(True)  # keep what was decoded, even when interrupted
        return failed

    @staticmethod
    def _collect(h, image, error, done_h, done_im, failed) -> None:
        if image is None:
            failed[h] = error or "cannot be read"
        else:
            done_h.append(h)
            done_im.append(image)


def _hash_many(paths: list[str]) -> list[str | None]:
    """sha256 of each file; threads overlap the reads (hashlib releases the GIL on large buffers)."""
    if len(paths) < 256:
        return [_hash_file(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as ex:
        return list(ex.map(_hash_file, paths, chunksize=64))
