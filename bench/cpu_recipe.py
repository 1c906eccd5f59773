"""Wall-clock bar for a CPU recipe: train + evaluate from a cold tensor cache, as a user would run it.

    python bench/cpu_recipe.py --data ../shared/data/chest_xray --recipe cxr_cpu
    python bench/cpu_recipe.py --data ../shared/data/medmnist/pneumoniamnist.npz --recipe medmnist

Writes bench/results/cpu_recipe-<recipe>.json with the wall time, the test metrics (with 95% CIs), the
validation-chosen threshold and the machine. The test split is evaluated once, after training is finished.
The intervals in ``test`` resample patients (as ``medlens evaluate`` does where patients are known);
``test_image_level_ci`` recomputes them from the same predictions resampling images, to show how much too
narrow image-level intervals are.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from medlens import rundir
from medlens.cli import main as medlens
from medlens.metrics import metrics_with_ci
from medlens.models.card import jsonable


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default=None, help="run directory (default: a temporary folder)")
    p.add_argument("--result", default=None)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="medlens-bench-"))
    os.environ["MEDLENS_CACHE"] = str(work / "cache")  # cold cache: decoding counts against the bar
    run = Path(args.out) if args.out else work / "run"
    sets = [x for s in args.set for x in ("--set", s)]
    t0 = time.perf_counter()
    assert medlens(["train", args.data, "--out", str(run), "--recipe", args.recipe, *sets]) == 0
    t_train = time.perf_counter() - t0
    assert medlens(["evaluate", str(run), "--data", args.data, "--split", "test"]) == 0
    wall = time.perf_counter() - t0
    metrics = json.loads((rundir.eval_dir(run, "test") / "metrics.json").read_text())
    card = json.loads((run / "model.card.json").read_text())
    keys = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "pr_auc", "ece")
    with (rundir.eval_dir(run, "test") / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    boot = metrics["bootstrap"]
    image_level = metrics_with_ci([int(r["label"]) for r in rows], [float(r["probability"]) for r in rows],
                                  metrics["threshold"], n_boot=boot["resamples"], seed=boot["seed"])
    result = {
        "benchmark": "cpu_recipe", "written_by": "bench/cpu_recipe.py", "recipe": args.recipe, "overrides": args.set, "data": args.data,
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(), "wall_seconds": round(wall, 1),
        # other load on the machine while this ran (a 2-core machine shared with anything else is slower)
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "train_seconds": round(t_train, 1), "best_epoch": card["epoch"],
        "val_auc": card["metrics"]["val"]["auc"], "threshold": card["threshold"],
        "threshold_policy": card["threshold_policy"],
        "test": {k: metrics[k] for k in keys}, "test_n": metrics["n"], "bootstrap": boot,
        "test_image_level_ci": {k: image_level[k] for k in keys}, "image_level_bootstrap": image_level["bootstrap"],
        "ci_width_patient_over_image": {
            k: (metrics[k]["ci_high"] - metrics[k]["ci_low"]) / (image_level[k]["ci_high"] - image_level[k]["ci_low"])
            for k in keys if image_level[k]["ci_high"] is not None and image_level[k]["ci_high"] > image_level[k]["ci_low"]},
        "model_id": card["model_id"], "policy_hash": card["policy_hash"],
        "subgroups": metrics.get("subgroups"), "date": time.strftime("%Y-%m-%d"),
    }
    result = jsonable(result)  # NaN (e.g. specificity of an all-positive subgroup) -> null
    print(json.dumps(result, indent=1))
    out = Path(args.result) if args.result else Path(__file__).parent / "results" / f"cpu_recipe-{args.recipe}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
