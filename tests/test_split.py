"""Patient-grouped, stratified splits on the real Kermany and PneumoniaMNIST data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_shared as shared

from medlens.data.sources import SampleTable, discover
from medlens.data.split import assert_patient_disjoint, patient_grouped_split, split_manifest
from medlens.errors import DataError


@pytest.fixture(scope="module")
def table() -> SampleTable:
    return discover(shared("chest_xray"))


@pytest.fixture(scope="module")
def split(table) -> dict[str, np.ndarray]:
    return patient_grouped_split(table, val_fraction=0.15, seed=0)


def _pneumonia_ratio(table, idx) -> float:
    return float(np.mean(table.labels[idx] == table.classes.index("PNEUMONIA")))


def test_official_test_kept_as_is(table, split):
    assert np.array_equal(split["test"], table.indices("test"))


def test_val_carved_from_train_plus_official_val(table, split):
    pool = np.concatenate([table.indices("train"), table.indices("val")])
    assert np.array_equal(np.sort(np.concatenate([split["train"], split["val"]])), np.sort(pool))
    # the 16 official val images are training candidates, not the validation split
    assert len(split["val"]) > 700
    assert abs(len(split["val"]) / len(pool) - 0.15) < 0.01
    for name, idx in split.items():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0), name


def test_patient_disjoint(table, split):
    assert_patient_disjoint(table, split)
    patients = {k: {table.patient_ids[i] for i in v} for k, v in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_official_kermany_split_is_patient_disjoint(table):
    assert_patient_disjoint(table, {s: table.indices(s) for s in ("train", "val", "test")})


def test_stratified(table, split):
    train, val = _pneumonia_ratio(table, split["train"]), _pneumonia_ratio(table, split["val"])
    assert abs(train - val) < 0.03
    for seed in (1, 2, 3):
        s = patient_grouped_split(table, seed=seed)
        assert abs(_pneumonia_ratio(table, s["train"]) - _pneumonia_ratio(table, s["val"])) < 0.03


def test_deterministic_with_seed(table, split):
    again = patient_grouped_split(table, val_fraction=0.15, seed=0)
    for k in split:
        assert np.array_equal(split[k], again[k])
    other = patient_grouped_split(table, val_fraction=0.15, seed=1)
    assert not np.array_equal(split["val"], other["val"])
    assert np.array_equal(split["test"], other["test"])


def test_manifest(table, split):
    m = split_manifest(table, split)
    assert m["train"]["n"] + m["val"]["n"] == 5232 and m["test"]["n"] == 624
    assert m["test"]["label_counts"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert m["val"]["n_patients"] == len(m["val"]["patients"]) == len(set(m["val"]["patients"]))
    assert m["val"]["patients"] == sorted(m["val"]["patients"])
    assert len(m["hash"]) == 64 and m["fingerprint"] == table.fingerprint()
    assert split_manifest(table, patient_grouped_split(table, seed=0))["hash"] == m["hash"]
    assert split_manifest(table, patient_grouped_split(table, seed=5))["hash"] != m["hash"]


def test_no_source_split_makes_70_15_15(table):
    no_split = table.subset(table.indices("train"))
    no_split.splits = [""] * len(no_split)
    s = patient_grouped_split(no_split, seed=0)
    n = len(no_split)
    assert sum(len(v) for v in s.values()) == n
    assert abs(len(s["test"]) / n - 0.15) < 0.01 and abs(len(s["val"]) / n - 0.15) < 0.01
    assert_patient_disjoint(no_split, s)
    ratios = [_pneumonia_ratio(no_split, s[k]) for k in ("train", "val", "test")]
    assert max(ratios) - min(ratios) < 0.03


def test_pneumoniamnist_split():
    t = discover(shared("medmnist/pneumoniamnist.npz"))
    s = patient_grouped_split(t, seed=0)
    assert np.array_equal(s["test"], t.indices("test"))
    assert len(s["train"]) + len(s["val"]) == 3882 + 524
    assert_patient_disjoint(t, s)


def _toy_table(patients, labels, splits) -> SampleTable:
    n = len(patients)
    return SampleTable(
        items=[f"/x/img{k}.png" for k in range(n)], labels=np.array(labels), patient_ids=list(patients),
        splits=list(splits), classes=["a", "b"], meta=[{} for _ in range(n)], source="/x", kind="folder",
    )


def test_assert_patient_disjoint_names_patients():
    t = _toy_table(["p1", "p1", "p2", "p3"], [0, 0, 1, 1], [""] * 4)
    with pytest.raises(DataError) as e:
        assert_patient_disjoint(t, {"train": np.array([0, 2]), "val": np.array([1]), "test": np.array([3])})
    assert "p1" in e.value.message and "train and val" in e.value.message
    with pytest.raises(DataError, match="image"):
        assert_patient_disjoint(t, {"train": np.array([0, 1, 2]), "val": np.array([2, 3])})


def test_leaky_source_split_is_refused():
    patients = ["p1", "p2", "p3", "p4", "p5", "p6", "p1"]
    t = _toy_table(patients, [0, 1, 0, 1, 0, 1, 0], ["train"] * 6 + ["test"])
    with pytest.raises(DataError) as e:
        patient_grouped_split(t)
    assert "test split of /x shares 1 patient(s) with its training images: p1" in e.value.message


def test_too_few_patients():
    t = _toy_table(["p1", "p1"], [0, 1], ["train", "train"])
    with pytest.raises(DataError, match="at least"):
        patient_grouped_split(t)


def test_a_large_official_val_split_is_kept_as_published(shared_data):
    """MedMNIST's own val split (524 images) is the published protocol: it is used as is, not re-carved."""
    table = discover(shared_data / "medmnist" / "pneumoniamnist.npz")
    split = patient_grouped_split(table, seed=0)
    assert [table.splits[i] for i in split["val"]] == ["val"] * 524
    assert {table.splits[i] for i in split["train"]} == {"train"}
