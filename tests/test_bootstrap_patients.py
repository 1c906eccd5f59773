"""Cluster (patient) bootstrap: intervals resample patients, each with all of their images."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.metrics import _cluster_index, bootstrap_ci, metrics_with_ci


def _scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    p = np.clip(0.25 * y + 0.75 * rng.random(n), 0, 1)
    return y, p


def test_copies_of_one_patient_do_not_narrow_the_patient_interval():
    """k identical images per patient carry the information of one: the patient interval stays as wide as
    for one image per patient, while resampling images would shrink it by about sqrt(k)."""
    y, p = _scores(150)
    k = 4
    yk, pk, groups = np.repeat(y, k), np.repeat(p, k), np.repeat(np.arange(150), k)
    width = {}
    for name, ci in (("one image each", bootstrap_ci(y, p, 0.5, n_boot=600, seed=1)),
                     ("patients", bootstrap_ci(yk, pk, 0.5, n_boot=600, seed=1, groups=groups)),
                     ("images", bootstrap_ci(yk, pk, 0.5, n_boot=600, seed=1))):
        width[name] = ci["auc"][1] - ci["auc"][0]
    assert width["patients"] == pytest.approx(width["one image each"], rel=0.2)
    assert width["images"] < 0.7 * width["patients"]


def test_cluster_resamples_draw_whole_patients_and_keep_strata():
    y = np.array([1, 1, 0, 0, 0, 1, 0])
    groups = ["a", "a", "b", "c", "c", "d", "e"]
    index, n_units = _cluster_index(y, groups, 200, np.random.default_rng(0), stratified=True)
    assert n_units == 5
    for ix in index:
        drawn = [groups[i] for i in ix]
        for g in set(drawn):  # a drawn patient comes with all of its images, as often as it was drawn
            size = groups.count(g)
            assert drawn.count(g) % size == 0
            assert sorted(i for i in ix if groups[i] == g) == sorted(
                [i for i in range(len(groups)) if groups[i] == g] * (drawn.count(g) // size))
        # 2 patients with a positive (a, d) and 3 without (b, c, e) in every resample
        pos_draws = sum(drawn.count(g) // groups.count(g) for g in ("a", "d"))
        neg_draws = sum(drawn.count(g) // groups.count(g) for g in ("b", "c", "e"))
        assert (pos_draws, neg_draws) == (2, 3)


def test_metrics_with_ci_records_the_unit():
    y, p = _scores(60)
    groups = np.arange(60) // 3
    out = metrics_with_ci(y, p, 0.5, n_boot=100, seed=7, groups=groups)
    assert out["bootstrap"]["unit"] == "patient" and out["bootstrap"]["n_units"] == 20
    assert out["bootstrap"]["resamples"] == 100 and out["bootstrap"]["seed"] == 7
    again = metrics_with_ci(y, p, 0.5, n_boot=100, seed=7, groups=groups)
    assert again["auc"] == out["auc"]  # deterministic for a seed
    assert out["auc"]["ci_low"] <= out["auc"]["value"] <= out["auc"]["ci_high"]
    with pytest.raises(ValueError, match="groups has 3 entries"):
        bootstrap_ci(y, p, 0.5, groups=[1, 2, 3])
