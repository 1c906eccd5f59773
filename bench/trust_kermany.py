"""Issue 3's bars on Kermany: calibration, selective prediction, faithfulness, lung energy.

    python bench/trust_kermany.py --data ../shared/data/chest_xray --run runs/kermany_ens3 \
        --masks ../shared/data/segmentation

``--run`` is a deep-ensemble run of the default CPU recipe (``medlens train DATA --out RUN --recipe cxr_cpu
--ensemble 3``; trained here when the folder has no model yet). Its member 0 was trained with the recipe's
own seed and is exactly the default single model, so one training gives both: the single model is evaluated
(calibration, MC dropout, TTA, explanations) from ``RUN/members/0`` and the ensemble from ``RUN``. The test
split is only evaluated: nothing here is chosen on it.

Writes bench/results/trust-kermany.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from medlens import rundir
from medlens.cli import main as medlens
from medlens.models.card import jsonable


def _evaluate(run: Path, data: str, masks: str | None) -> dict:
    args = ["evaluate", str(run), "--data", data, "--split", "test", "--no-progress"]
    if masks:
        args += ["--masks", masks]
    t0 = time.perf_counter()
    assert medlens(args) == 0
    metrics = json.loads((rundir.eval_dir(run, "test") / "metrics.json").read_text())
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--masks", default=None)
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "trust-kermany.json"))
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "model.card.json").exists():
        assert medlens(["train", args.data, "--out", str(run), "--recipe", "cxr_cpu", "--ensemble",
                        str(args.members), "--no-progress"]) == 0
    single_dir = rundir.member_dir(run, 0)
    single = _evaluate(single_dir, args.data, args.masks)
    ensemble = _evaluate(run, args.data, None)
    card = json.loads((single_dir / "model.card.json").read_text())
    ens_card = json.loads((run / "model.card.json").read_text())
    unc = {m: {k: e[k] for k in ("accuracy", "accuracy_kept", "gain", "errors_auc", "passes")}
           | {"policy": e.get("policy")}
           for m, e in single["uncertainty"]["methods"].items()}
    unc["ensemble"] = {k: ensemble["uncertainty"]["methods"]["ensemble"][k]
                       for k in ("accuracy", "accuracy_kept", "gain", "errors_auc", "passes")}
    unc["ensemble"]["policy"] = ensemble["uncertainty"]["methods"]["ensemble"].get("policy")
    faith = {k: v for k, v in single["faithfulness"].items() if k != "curves"}
    calib = card["metrics"]["calibration"]
    result = {
        "benchmark": "trust_kermany", "written_by": "bench/trust_kermany.py", "data": args.data, "run": str(run), "recipe": "cxr_cpu",
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "single_model": {"model_id": card["model_id"], "policy_hash": card.get("policy_hash"), "test_auc": single["auc"]["value"],
                         "test_accuracy": single["accuracy"]["value"], "threshold": card["threshold"]},
        "ensemble": {"model_id": ens_card["model_id"], "policy_hash": ens_card.get("policy_hash"), "members": args.members,
                     "test_auc": ensemble["auc"]["value"], "test_accuracy": ensemble["accuracy"]["value"],
                     "threshold": ens_card["threshold"], "temperature": ens_card["temperature"],
                     "test_calibration": ensemble["calibration"]},
        "bar1_calibration": {"temperature": card["temperature"], "held_apart_val": calib,
                             "test": single["calibration"]},
        "bar2_selective": unc,
        "bar3_faithfulness": faith,
        "lung_energy": single.get("lung_energy"),
        "evaluate_seconds": {"single": single["seconds"], "ensemble": ensemble["seconds"]},
    }
    result = jsonable(result)
    print(json.dumps(result, indent=1))
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
