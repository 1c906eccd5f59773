"""`medlens train` never reads the test split: the official test folder is listed (split.json counts it) but
not one of its images is decoded while training."""

from __future__ import annotations

import json

from helpers import link_subset, train

import medlens.data.cache as cache_mod
import medlens.data.readers as readers


def test_training_never_reads_the_test_split(kermany, tmp_path, monkeypatch):
    data = link_subset(kermany, tmp_path / "data", {"train": 40, "test": 20})
    monkeypatch.setenv("MEDLENS_CACHE", str(tmp_path / "cache"))  # an empty cache: every image is decoded
    reads = tmp_path / "reads.txt"
    real_read = readers.read_image

    def spy(path, *args, **kwargs):
        with open(reads, "a") as f:  # a file, so decoding processes forked by the cache report too
            f.write(f"{path}\n")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(readers, "read_image", spy)
    # decode in this process (where the spy is installed whatever the multiprocessing start method)
    monkeypatch.setattr(cache_mod, "_PARALLEL_MIN", 10**9, raising=False)
    run = tmp_path / "run"
    train(data, run, "--set", "train.epochs=1")

    read = set(reads.read_text().splitlines()) if reads.exists() else set()
    assert not [p for p in read if p.startswith(str(data / "test"))], "training read test images"
    split = json.loads((run / "split.json").read_text())
    assert split["test"]["n"] == 40  # listed, never loaded
    # the spy saw the decoding: the training and validation images (one per distinct content) were read
    assert all(p.startswith(str(data / "train")) for p in read)
    assert len(read) >= 0.9 * (split["train"]["n"] + split["val"]["n"]), len(read)

