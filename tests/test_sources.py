"""discover(): image folders, CSVs and MedMNIST npz, on the real Kermany and MedMNIST data."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared as shared

from medlens.data.sources import SampleTable, discover, kermany_patient
from medlens.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def kermany_table() -> SampleTable:
    return discover(shared("chest_xray"))


@pytest.fixture(scope="module")
def real_files() -> dict[str, list[Path]]:
    """A few real Kermany JPEGs per class (copied into tmp folders by the tests that need files)."""
    root = shared("chest_xray") / "train"
    return {c: sorted((root / c).iterdir())[:6] for c in ("NORMAL", "PNEUMONIA")}


def _copy(files: list[Path], folder: Path, rename=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, f in enumerate(files):
        dst = folder / (rename(k, f) if rename else f.name)
        shutil.copyfile(f, dst)
        out.append(dst)
    return out


# --------------------------------------------------------------------------------------------- Kermany


def test_kermany_full_tree_counts(kermany_table):
    t = kermany_table
    assert t.kind == "folder" and t.classes == ["NORMAL", "PNEUMONIA"]
    assert len(t) == 5856 and t.labels.dtype == np.int64
    counts = Counter((s, t.classes[lab]) for s, lab in zip(t.splits, t.labels, strict=True))
    assert counts == {
        ("train", "NORMAL"): 1341, ("train", "PNEUMONIA"): 3875,
        ("val", "NORMAL"): 8, ("val", "PNEUMONIA"): 8,
        ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390,
    }
    assert all(os.path.isabs(p) for p in t.items)
    assert t.skipped == []
    assert len(t.items) == len(set(t.items))


def test_kermany_patient_ids_and_subtypes(kermany_table):
    t = kermany_table
    assert t.patient_id_source == "filename" and not t.patients_per_file
    by_name = {Path(p).name: (pid, m) for p, pid, m in zip(t.items, t.patient_ids, t.meta, strict=True)}
    assert by_name["IM-0115-0001.jpeg"] == ("im-0115", {})
    assert by_name["IM-0011-0001-0002.jpeg"][0] == "im-0011"
    assert by_name["NORMAL2-IM-1427-0001.jpeg"][0] == "normal2-1427"
    assert by_name["person1_bacteria_1.jpeg"] == ("person1_bacteria", {"subtype": "bacteria"})
    assert by_name["person1_virus_6.jpeg"] == ("person1_virus", {"subtype": "virus"})
    assert by_name["person447_virus_921_1.jpeg"][0] == "person447_virus"
    # every pneumonia image has a subtype, no normal image has one
    subtypes = Counter((s, m.get("subtype")) for s, m in zip(t.splits, t.meta, strict=True))
    assert subtypes[("train", "bacteria")] == 2530 and subtypes[("train", "virus")] == 1345
    assert subtypes[("test", "bacteria")] == 242 and subtypes[("test", "virus")] == 148
    assert subtypes[("train", None)] == 1341
    # several images per patient: grouping matters
    assert len(set(t.patient_ids)) < 0.75 * len(t)
    assert Counter(t.patient_ids).most_common(1)[0][1] > 10


def test_kermany_person_numbers_are_per_subtype(kermany_table):
    """Why the subtype is part of a Kermany patient id: the official split reuses person numbers across
    train and test, but only ever with the other subtype (bacterial and viral cases are numbered apart)."""
    t = kermany_table
    numbers: dict[str, set[tuple[str, str]]] = {}
    for s, pid in zip(t.splits, t.patient_ids, strict=True):
        if pid.startswith("person") and s in ("train", "test"):
            number, subtype = pid.split("_")
            numbers.setdefault(number, set()).add((s, subtype))
    shared_numbers = [n for n, v in numbers.items() if {s for s, _ in v} == {"train", "test"}]
    assert len(shared_numbers) > 100
    for n in shared_numbers:
        train_sub = {sub for s, sub in numbers[n] if s == "train"}
        test_sub = {sub for s, sub in numbers[n] if s == "test"}
        assert not train_sub & test_sub, n


def test_kermany_patient_parser():
    assert kermany_patient("person12_virus_34.jpeg") == ("person12_virus", {"subtype": "virus"})
    assert kermany_patient("NORMAL2-IM-0007-0001.jpeg") == ("normal2-0007", {})
    assert kermany_patient("train/NORMAL/IM-0001-0001.jpeg") == ("im-0001", {})
    assert kermany_patient("scan_001.png") is None


def test_fingerprint_stable_and_relative(kermany_table, real_files, tmp_path):
    again = discover(kermany_table.source)
    assert again.fingerprint() == kermany_table.fingerprint()
    sub = kermany_table.subset(np.arange(10))
    assert sub.fingerprint() != kermany_table.fingerprint()
    # the same files under two different roots: same fingerprint (relative names)
    fps = []
    for where in ("a", "b/deeper"):
        for cls, files in real_files.items():
            _copy(files, tmp_path / where / "data" / cls)
        fps.append(discover(tmp_path / where / "data").fingerprint())
    assert fps[0] == fps[1]


def test_subset_mask_and_indices(kermany_table):
    t = kermany_table
    mask = np.array([s == "val" for s in t.splits])
    by_mask = t.subset(mask)
    by_idx = t.subset(np.flatnonzero(mask))
    assert len(by_mask) == 16 and by_mask.items == by_idx.items
    assert by_mask.classes == t.classes and by_mask.kind == "folder"
    assert set(by_mask.splits) == {"val"}
    assert list(by_mask.labels) == [0] * 8 + [1] * 8
    with pytest.raises(ValueError):
        t.subset(mask[:-1])


# --------------------------------------------------------------------------------------------- folders


def test_folder_without_split_and_per_file_patients(real_files, tmp_path):
    root = tmp_path / "data"
    for cls, files in real_files.items():
        _copy(files, root / cls, rename=lambda k, f: f"scan_{k:03d}.jpeg")
    t = discover(root)
    assert t.classes == ["NORMAL", "PNEUMONIA"] and set(t.splits) == {""}
    assert len(t) == 12 and not t.has_split
    assert t.patient_id_source == "per-file" and t.patients_per_file
    assert len(set(t.patient_ids)) == 12  # unique even though stems repeat across class folders
    assert any("own patient" in n for n in t.notes)


def test_user_patient_pattern(real_files, tmp_path):
    root = tmp_path / "data"
    for cls, files in real_files.items():
        _copy(files, root / cls, rename=lambda k, f, c=cls: f"{c[:1]}pat{k // 2:02d}_img{k}.jpeg")
    t = discover(root, patient_pattern=r"(?P<patient>[NP]pat\d+)_")
    assert t.patient_id_source == "pattern" and not t.patients_per_file
    assert len(set(t.patient_ids)) == 6
    t1 = discover(root, patient_pattern=r"([NP]pat\d+)")  # one unnamed group works too
    assert t1.patient_ids == t.patient_ids
    with pytest.raises(DataError, match="matched no patient id"):
        discover(root, patient_pattern=r"(person\d+)")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        discover(root, patient_pattern=r"(unclosed")
    with pytest.raises(ConfigError, match="no group"):
        discover(root, patient_pattern=r"pat\d+")


def test_non_images_ignored_and_empty_file_skipped(real_files, tmp_path):
    root = tmp_path / "data"
    for cls, files in real_files.items():
        _copy(files, root / cls)
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "NORMAL" / ".DS_Store").write_bytes(b"x")
    empty = root / "PNEUMONIA" / "person9999_virus_1.jpeg"
    empty.write_bytes(b"")
    t = discover(root)
    assert len(t) == 12
    assert t.skipped == [(str(empty), "empty file (0 bytes)")]
    with pytest.raises(DataError, match="person9999_virus_1.jpeg"):
        discover(root, strict=True)
    assert len(discover(root, check_readable=False)) == 13


# --------------------------------------------------------------------------------------------- bad input


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError) as e:
        discover(missing)
    assert str(missing) in e.value.message and "does not exist" in e.value.message


def test_empty_class_folder(real_files, tmp_path):
    root = tmp_path / "data"
    _copy(real_files["NORMAL"], root / "NORMAL")
    (root / "PNEUMONIA").mkdir()
    with pytest.raises(DataError) as e:
        discover(root)
    assert e.value.message == f"class folder {root / 'PNEUMONIA'} contains no images"


def test_only_one_class(real_files, tmp_path):
    root = tmp_path / "data"
    _copy(real_files["NORMAL"], root / "NORMAL")
    with pytest.raises(DataError) as e:
        discover(root)
    assert e.value.message == (
        f"found only one class 'NORMAL' in {root}: a classifier needs at least two class folders"
    )


def test_folder_with_no_images(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=f"no images found in {root}"):
        discover(root)


def test_unknown_file_type(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="data.txt"):
        discover(f)


# --------------------------------------------------------------------------------------------- CSV


def test_csv_good(real_files, tmp_path):
    files = _copy(real_files["NORMAL"][:3] + real_files["PNEUMONIA"][:3], tmp_path / "imgs")
    csv_path = tmp_path / "labels.csv"
    rows = ["path,label,patient_id,split,site"]
    for k, f in enumerate(files):
        p = f"imgs/{f.name}" if k % 2 else str(f)  # relative and absolute paths
        rows.append(f"{p},{'pneumonia' if k >= 3 else 'normal'},pt{k // 2},{'test' if k == 5 else 'train'},A")
    csv_path.write_text("\n".join(rows) + "\n")
    t = discover(csv_path)
    assert t.kind == "csv" and t.classes == ["normal", "pneumonia"]
    assert t.items == [str(f) for f in files]
    assert list(t.labels) == [0, 0, 0, 1, 1, 1]
    assert t.patient_ids == ["pt0", "pt0", "pt1", "pt1", "pt2", "pt2"]
    assert t.splits == ["train"] * 5 + ["test"]
    assert t.patient_id_source == "column"
    assert t.meta[0]["site"] == "A"
    assert t.meta[3].get("subtype") in ("bacteria", "virus")  # Kermany names still give the subtype


def test_csv_numeric_labels_sorted_numerically(real_files, tmp_path):
    files = _copy(real_files["NORMAL"][:3], tmp_path)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "".join(f"{f.name},{lab}\n" for f, lab in zip(files, (10, 2, 0), strict=True)))
    t = discover(csv_path)
    assert t.classes == ["0", "2", "10"]
    assert list(t.labels) == [2, 1, 0]


def test_csv_missing_column(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,diagnosis\na.png,normal\n")
    with pytest.raises(DataError) as e:
        discover(csv_path)
    msg = e.value.message
    assert str(csv_path) in msg and "'path'" in msg and "'label'" in msg and "file, diagnosis" in msg


def test_csv_missing_files(real_files, tmp_path):
    files = _copy(real_files["NORMAL"][:2], tmp_path)
    csv_path = tmp_path / "labels.csv"
    lines = ["path,label", f"{files[0].name},a", f"{files[1].name},b"]
    lines += [f"gone_{k}.png,a" for k in range(7)]
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        discover(csv_path)
    msg = e.value.message
    assert str(csv_path) in msg and "7 file(s) that do not exist" in msg
    assert str(tmp_path / "gone_0.png") in msg and "gone_6.png" not in msg  # the first few only


def test_csv_bad_split_value(real_files, tmp_path):
    files = _copy(real_files["NORMAL"][:2], tmp_path)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label,split\n{files[0].name},a,train\n{files[1].name},b,holdout\n")
    with pytest.raises(DataError, match="line 3: unknown split 'holdout'"):
        discover(csv_path)


# --------------------------------------------------------------------------------------------- npz


def test_pneumoniamnist():
    npz = shared("medmnist/pneumoniamnist.npz")
    t = discover(npz)
    assert t.kind == "npz" and t.classes == ["normal", "pneumonia"]
    assert Counter(t.splits) == {"train": 3882, "val": 524, "test": 624}
    test = t.indices("test")
    assert t.label_counts(test) == {"normal": 234, "pneumonia": 390}
    assert t.items[0] == f"{npz}::train::0" and t.items[-1] == f"{npz}::test::623"
    assert t.patient_ids == t.items and t.patients_per_file
    assert any("no patient ids" in n for n in t.notes)
    assert t.fingerprint() == discover(npz).fingerprint()


def test_breastmnist_flat_labels():
    t = discover(shared("medmnist/breastmnist.npz"))  # labels of shape (N,)
    assert Counter(t.splits) == {"train": 546, "val": 78, "test": 156}
    assert t.classes == ["malignant", "normal, benign"]


def test_unknown_npz_gets_numbered_classes(tmp_path):
    f = tmp_path / "organs.npz"
    arrays = {}
    for s, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{s}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    np.savez(f, **arrays)
    t = discover(f)
    assert t.classes == ["0", "1", "2"] and len(t) == 11


def test_npz_missing_keys(tmp_path):
    f = tmp_path / "broken.npz"
    np.savez(f, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DataError) as e:
        discover(f)
    msg = e.value.message
    assert str(f) in msg and "val_images" in msg and "keys found: train_images, train_labels" in msg


def test_dicom_patient_id_groups_images_and_is_pseudonymised(tmp_path):
    """Folders of DICOM files take the patient from PatientID, never written in clear."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for cls, patients in (("NORMAL", ["ALICE^A", "ALICE^A", "BOB^B"]), ("PNEUMONIA", ["CAROL^C", "DAVE^D"])):
        (tmp_path / cls).mkdir()
        for k, pid in enumerate(patients):
            src.PatientID = pid
            src.save_as(tmp_path / cls / f"img{k}.dcm")
    table = discover(tmp_path)
    assert table.patient_id_source == "dicom"
    ids = dict(zip([Path(i).relative_to(tmp_path).as_posix() for i in table.items], table.patient_ids, strict=True))
    assert ids["NORMAL/img0.dcm"] == ids["NORMAL/img1.dcm"] != ids["NORMAL/img2.dcm"]
    assert all(p.startswith("dicom-") and "ALICE" not in p for p in table.patient_ids)
