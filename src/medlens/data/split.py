"""Patient-grouped, label-stratified train / val / test splits.

A model is selected on ``val`` and judged on ``test``; both must hold patients the model never trained on,
otherwise the scores measure memory of a child's anatomy instead of pneumonia. Every split here is made of
whole patients (``SampleTable.patient_ids``), stratified by label, and deterministic for a given seed.

The rule (:func:`patient_grouped_split`):

* **The source has a test split** (``ROOT/test/``, a CSV ``split`` column, MedMNIST's ``test_*``): it is
  kept exactly as it is: it is the benchmark everyone else reports on.
* **A source's own val split is used only when it is big enough to select on** (at least
  ``MIN_OFFICIAL_VAL_PER_CLASS`` images per class, e.g. MedMNIST's 524). Kermany's has 16 images, far too few to
  choose a model or a threshold on. Its images (other patients than train's) join the pool of training
  images, and ``val`` is carved from that pool (train + official val), ``val_fraction`` of its images,
  grouped by patient and stratified by label.
* **The source has no test split**: train / val / test are made from all images, grouped by patient:
  ``1 - val_fraction - test_fraction`` / ``val_fraction`` / ``test_fraction`` (70 / 15 / 15 by default).

Stratification: each patient is put in the stratum of its most frequent label; within each stratum the
patients are shuffled (seeded) and taken greedily until the stratum's share of images is reached, so the
class balance of val follows the pool's. The result is checked with :func:`assert_patient_disjoint`.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medlens.data.table import SampleTable
from medlens.errors import DataError

SPLITS = ("train", "val", "test")


def patient_grouped_split(
    table: SampleTable,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    test_fraction: float = 0.15,
) -> dict[str, np.ndarray]:
    """``{"train": idx, "val": idx, "test": idx}``: sorted int64 indices into ``table`` (see module doc)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = len(table)
    all_idx = np.arange(n, dtype=np.int64)
    official_test = np.array([s == "test" for s in table.splits], dtype=bool)
    rng = np.random.default_rng(seed)

    if official_test.any():
        test = all_idx[official_test]
        pool = all_idx[~official_test]  # train + the official val (+ any rows without a split)
        leaked = sorted({table.patient_ids[i] for i in test} & {table.patient_ids[i] for i in pool})
        if leaked:
            more = f" and {len(leaked) - 10} more" if len(leaked) > 10 else ""
            raise DataError(
                f"the test split of {table.source or 'the data set'} shares {len(leaked)} patient(s) with its "
                f"training images: {', '.join(leaked[:10])}{more}",
                hint="a patient's images must all be in one split: fix the source's split, or remove the split "
                "folders (or the CSV split column) to let medlens split by patient",
            )
        official_val = all_idx[np.array([s == "val" for s in table.splits], dtype=bool)]
        if _big_enough(table, official_val):
            # A source's own validation split large enough to select on is the published protocol
            # (MedMNIST: 524 images); keep it so results compare with the literature.
            train, val = all_idx[np.array([s == "train" for s in table.splits], dtype=bool)], official_val
        else:
            _need_patients(table, pool, "the training images (train and val splits)")
            train, val = _carve(table, pool, val_fraction, rng)
    else:
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise DataError(
                f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
            )
        _need_patients(table, all_idx, "the data set", minimum=3)
        rest, test = _carve(table, all_idx, test_fraction, rng)
        train, val = _carve(table, rest, val_fraction / (1.0 - test_fraction), rng)

    split = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    if len(split["val"]) == 0:
        raise DataError(
            f"the validation split of {table.source or 'the data set'} came out empty "
            f"({len(pool if official_test.any() else all_idx)} images to split)",
            hint="add images, or raise val_fraction",
        )
    assert_patient_disjoint(table, split)
    return split


MIN_OFFICIAL_VAL_PER_CLASS = 50  # below this an official val split is too small to choose a model on


def _big_enough(table: SampleTable, idx: np.ndarray) -> bool:
    """True when every class has MIN_OFFICIAL_VAL_PER_CLASS images in ``idx`` (Kermany's 8 + 8 does not)."""
    if len(idx) == 0:
        return False
    counts = np.bincount(np.asarray(table.labels)[idx], minlength=len(table.classes))
    return bool(counts.min() >= MIN_OFFICIAL_VAL_PER_CLASS)


def _need_patients(table: SampleTable, idx: np.ndarray, what: str, minimum: int = 2) -> None:
    k = len({table.patient_ids[i] for i in idx})
    if k < minimum:
        raise DataError(
            f"{what} of {table.source or 'the data set'} hold(s) {k} patient(s): a patient-grouped split needs "
            f"at least {minimum}",
            hint="add images of more patients",
        )


def _carve(table: SampleTable, pool: np.ndarray, fraction: float, rng: np.random.Generator):
    """Split ``pool`` into (rest, carved): ``fraction`` of the images, whole patients, stratified by label."""
    pool = np.asarray(pool, dtype=np.int64)
    carved = grouped_stratified_carve(table.labels[pool], [table.patient_ids[i] for i in pool], fraction, rng)
    return np.sort(pool[~carved]), np.sort(pool[carved])


def grouped_stratified_carve(labels: np.ndarray, groups: Sequence[str], fraction: float,
                             rng: np.random.Generator) -> np.ndarray:
    """Which cases to carve off: a boolean mask over ``labels`` / ``groups`` (aligned, one entry per case)
    selecting ``fraction`` of the cases as whole groups (patients), stratified by label.

    The one implementation of the carve: train / val / test here, and the selection / calibration halves of
    validation (``medlens.calibration.calibration_split``). Each group goes to the stratum of its most
    frequent label (ties: the lowest label). Within a stratum the groups, in sorted order, are shuffled with
    ``rng`` and taken greedily while a group brings the stratum closer to ``fraction`` of its cases (a later,
    smaller group may still fit). A stratum of two or more groups always keeps at least one group on each side:
    when none was taken, its smallest group is; when all were (only possible for a fraction above one half),
    the last taken goes back. Deterministic for a given ``rng`` state.
    """
    y = np.asarray(labels, dtype=np.int64)
    by_group: dict[str, list[int]] = defaultdict(list)
    for pos, g in enumerate(groups):
        by_group[g].append(pos)
    n_classes = int(y.max()) + 1 if len(y) else 1
    strata: dict[int, list[str]] = defaultdict(list)
    for g in sorted(by_group):
        strata[int(np.argmax(np.bincount(y[by_group[g]], minlength=n_classes)))].append(g)

    carved = np.zeros(len(y), dtype=bool)
    for label in sorted(strata):
        members = strata[label]
        order = rng.permutation(len(members))
        sizes = [len(by_group[members[k]]) for k in order]
        target = fraction * sum(sizes)
        taken = 0
        chosen: list[int] = []
        for k, size in zip(order, sizes, strict=True):
            # take the group if that brings the stratum closer to its target (never overshoot by more than
            # half a group), and keep going: a later, smaller group may still fit
            if taken + size <= target or (taken + size - target) < (target - taken):
                chosen.append(int(k))
                taken += size
        if len(members) >= 2:
            if not chosen and target > 0:
                chosen = [min(order, key=lambda k: (len(by_group[members[k]]), members[k]))]
            elif len(chosen) == len(members):
                chosen = chosen[:-1]
        for k in chosen:
            carved[by_group[members[k]]] = True
    return carved


def assert_patient_disjoint(table: SampleTable, split: dict) -> None:
    """Raise DataError if an image or a patient is in two splits (names the offending patient ids)."""
    names = [s for s in split if len(split[s])]
    problems = []
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            both_items = np.intersect1d(split[a], split[b])
            if len(both_items):
                problems.append(
                    f"{len(both_items)} image(s) in both {a} and {b}, e.g. {table.items[int(both_items[0])]}"
                )
            pa = {table.patient_ids[i] for i in split[a]}
            pb = {table.patient_ids[i] for i in split[b]}
            shared = sorted(pa & pb)
            if shared:
                more = f" and {len(shared) - 10} more" if len(shared) > 10 else ""
                problems.append(
                    f"{len(shared)} patient(s) in both {a} and {b}: {', '.join(shared[:10])}{more}"
                )
    if problems:
        raise DataError(
            f"the split of {table.source or 'the data set'} is not patient-disjoint: " + "; ".join(problems),
            hint="a patient's images must all be in one split; if the source's own train/test folders share "
            "patients, remove the split folders (or the CSV split column) to let medlens split by patient",
        )


def split_manifest(table: SampleTable, split: dict) -> dict:
    """What went where, for the run directory: counts, patients and a hash of the patient assignment.

    ``hash`` is sha256 over the sorted patient ids of each split: two runs with the same hash trained,
    selected and tested on the same patients. ``fingerprint`` identifies the table (see
    ``SampleTable.fingerprint``).
    """
    out: dict = {}
    assignment = {}
    for name in [s for s in SPLITS if s in split] + [s for s in split if s not in SPLITS]:
        idx = np.asarray(split[name], dtype=np.int64)
        patients = sorted({table.patient_ids[i] for i in idx})
        assignment[name] = patients
        out[name] = {
            "n": int(len(idx)),
            "n_patients": len(patients),
            "label_counts": table.label_counts(idx),
            "patients": patients,
        }
    out["hash"] = hashlib.sha256(json.dumps(assignment, sort_keys=True).encode()).hexdigest()
    out["fingerprint"] = table.fingerprint()
    return out
