"""Issue 10's pruning and distillation bars, measured as a user would run them, on 2 CPU cores.

    python bench/compress.py --run runs/cxr_cpu [--data ../shared/data/chest_xray] [--work runs/compress]

Structured pruning of ``--run`` at each ``--sparsity`` (``medlens prune --structured``, 3 fine-tuning epochs), and
distillation of ``--run`` (the teacher) into a student of the same family with ``--student-widths`` (``medlens
distill``, the teacher's epochs). Each new run and the teacher are evaluated once on the test split (``medlens
evaluate --no-trust``: the threshold chosen on validation at training), and timed per image at batch 1 (torch
eager, all cores; p50 over 300 calls) and at batch 32. Writes ``bench/results/compress-cpu.json`` with the
sparsity vs AUC table, multiply-adds, sizes, speed-ups and the bars (structured 50%: >= 1.5x faster and within
0.01 test AUC; student: >= 5x fewer multiply-adds and within 0.01 test AUC of the teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def speed(run: Path, iters: int = 300) -> dict[str, Any]:
    import numpy as np
    import torch

    from medlens.compress import macs
    from medlens.models.card import load_checkpoint

    model, card = load_checkpoint(run)
    x1 = torch.rand(1, card.in_chans, card.input_size, card.input_size)
    x32 = torch.rand(32, card.in_chans, card.input_size, card.input_size)
    times = []
    with torch.inference_mode():
        for _ in range(30):
            model(x1)
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x1)
            times.append(time.perf_counter() - t0)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            model(x32)
            n += 32
        rate = n / (time.perf_counter() - t0)
    return {"macs": macs(model, card.input_size, card.in_chans),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "weights_bytes": (run / "model.safetensors").stat().st_size,
            "latency_ms_batch1_p50": round(float(np.percentile(np.asarray(times) * 1000, 50)), 3),
            "throughput_img_s_batch32": round(rate, 1), "widths": card.model_args.get("widths")}


def test_metrics(run: Path, data: Path) -> dict[str, Any]:
    from medlens import rundir
    from medlens.cli import main as medlens

    assert medlens(["evaluate", str(run), "--data", str(data), "--split", "test", "--no-trust", "--no-progress"]) == 0
    m = json.loads((rundir.eval_dir(run, "test") / "metrics.json").read_text())
    return {k: {kk: round(m[k][kk], 4) for kk in ("value", "ci_low", "ci_high")}
            for k in ("auc", "sensitivity", "specificity")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, default=SHARED / "chest_xray")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "compress")
    p.add_argument("--sparsity", default="0.25,0.5,0.75", help="structured (channel) sparsities")
    p.add_argument("--unstructured", default="0.5,0.75,0.9", help="unstructured (weight) sparsities; '' for none")
    p.add_argument("--skip-structured", action="store_true", help="only the unstructured rows and the teacher")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs already made under --work (their cards exist): evaluate and time them again")
    p.add_argument("--speed-rounds", type=int, default=3,
                   help="timing rounds over all models, interleaved; the median of each figure is reported (on a "
                        "shared 2-core machine one model's batch-1 latency varies by up to ~2x between calls)")
    p.add_argument("--student-widths", default="8,16,32,64")
    p.add_argument("--result", type=Path, default=ROOT / "bench" / "results" / "compress-cpu.json")
    args = p.parse_args(argv)
    import torch

    from medlens.cli import main as medlens

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = args.run.resolve()
    rows: dict[str, Any] = {"teacher": {"run": str(teacher), "test": test_metrics(teacher, args.data)}}
    for s in [] if args.skip_structured else [float(x) for x in args.sparsity.split(",")]:
        out = args.work / f"pruned-{s:g}"
        t0 = time.perf_counter()
        assert (args.reuse and (out / "model.card.json").exists()) or medlens(
            ["prune", str(teacher), "--data", str(args.data), "--out", str(out), "--sparsity", str(s),
             "--structured", "--epochs", "3", "--no-progress"]) == 0
        rows[f"pruned {s:.0%}"] = {"run": str(out), "seconds": round(time.perf_counter() - t0, 1),
                                   "test": test_metrics(out, args.data)}
    for s in [float(x) for x in args.unstructured.split(",") if x.strip()]:
        out = args.work / f"sparse-{s:g}"
        t0 = time.perf_counter()
        assert (args.reuse and (out / "model.card.json").exists()) or medlens(
            ["prune", str(teacher), "--data", str(args.data), "--out", str(out), "--sparsity", str(s),
             "--epochs", "3", "--no-progress"]) == 0
        pruned = json.loads((out / "model.card.json").read_text())["metrics"]["pruned_from"]
        rows[f"unstructured {s:.0%} zeros"] = {"run": str(out), "seconds": round(time.perf_counter() - t0, 1),
                                               "zero_share": pruned["zero_share_of_pruned_weights"],
                                               "test": test_metrics(out, args.data)}
    widths = [int(w) for w in args.student_widths.split(",")]
    card = json.loads((teacher / "model.card.json").read_text())
    student_args = {k: v for k, v in card["model_args"].items() if k not in ("num_classes", "in_chans")}
    student_args["widths"] = widths
    if not args.skip_structured:
        out = args.work / "student"
        t0 = time.perf_counter()
        assert (args.reuse and (out / "model.card.json").exists()) or medlens(
            ["distill", str(teacher), "--student", card["model_name"], "--student-args", json.dumps(student_args),
             "--data", str(args.data), "--out", str(out), "--no-progress"]) == 0
        rows["distilled student"] = {"run": str(out), "seconds": round(time.perf_counter() - t0, 1),
                                     "test": test_metrics(out, args.data)}
    import statistics

    timings: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    for _ in range(max(1, args.speed_rounds)):  # interleaved rounds: drift lands in every model's spread alike
        for name, r in rows.items():
            timings[name].append(speed(Path(r["run"])))
    for name, r in rows.items():
        t = timings[name]
        r.update({k: t[0][k] for k in ("macs", "parameters", "weights_bytes", "widths")})
        for k in ("latency_ms_batch1_p50", "throughput_img_s_batch32"):
            r[k] = round(statistics.median(x[k] for x in t), 3)
            r[k + "_rounds"] = [x[k] for x in t]
    base = rows["teacher"]
    for r in rows.values():
        r["speedup_batch1"] = round(base["latency_ms_batch1_p50"] / r["latency_ms_batch1_p50"], 2)
        r["speedup_batch32"] = round(r["throughput_img_s_batch32"] / base["throughput_img_s_batch32"], 2)
        r["macs_ratio"] = round(base["macs"] / r["macs"], 2)
        r["auc_change"] = round(r["test"]["auc"]["value"] - base["test"]["auc"]["value"], 4)
    half = rows.get("pruned 50%")
    student = rows.get("distilled student")
    result = {
        "bench": "compress", "written_by": "bench/compress.py",
        "command": " ".join(["python", "bench/compress.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "data": str(args.data), "rows": rows,
        "bars": {
            "structured 50%: >= 1.5x faster at batch 1": bool(half and half["speedup_batch1"] >= 1.5),
            "structured 50%: test AUC within 0.01": bool(half and abs(half["auc_change"]) <= 0.01),
            "student: >= 5x fewer multiply-adds": bool(student and student["macs_ratio"] >= 5),
            "student: test AUC within 0.01 of the teacher": bool(student and abs(student["auc_change"]) <= 0.01),
        } if not args.skip_structured else {"note": "unstructured rows only (--skip-structured): no bars"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = ["| model | widths | MACs (M) | batch 1 p50 ms | batch 32 img/s | test AUC (95% CI) | sens / spec |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t = r["test"]
        table.append(f"| {name} | {r['widths']} | {r['macs'] / 1e6:.1f} ({r['macs_ratio']:.1f}x fewer) | "
                     f"{r['latency_ms_batch1_p50']:.2f} ({r['speedup_batch1']:.1f}x) | {r['throughput_img_s_batch32']:.0f}"
                     f" ({r['speedup_batch32']:.1f}x) | {t['auc']['value']:.4f} ({t['auc']['ci_low']:.4f}-"
                     f"{t['auc']['ci_high']:.4f}) | {t['sensitivity']['value']:.3f} / {t['specificity']['value']:.3f} |")
    result["readme"] = table
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table))
    print(json.dumps(result["bars"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
