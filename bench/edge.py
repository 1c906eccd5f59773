"""Issue 10's edge benchmark: torch eager against ONNX Runtime fp32 and INT8, in one run on one machine.

    python bench/edge.py --run runs/cxr_cpu [--data ../shared/data/chest_xray] [--result bench/results/edge-cpu.json]

For the served model (``--run``, exported first with ``medlens export RUN --data DATA --int8`` unless
``RUN/export`` already holds both files) and for DenseNet121 (MONAI, 224 px, 1 channel; ``--densenet-run`` for a
trained one, else the untrained architecture: its speed does not depend on its weights, and then no AUC is
reported), each backend is measured in a fresh child process (so its peak memory, ``VmHWM``, is its own):
latency per image at batch 1 (p50, p99 over ``--iters`` calls after a warm-up), throughput at batch 32 (images/s
over at least ``--seconds``), model file size and peak resident memory. Every backend uses all the machine's
cores (torch intra-op threads = ONNX Runtime intra-op threads). Then ``medlens evaluate RUN --split test
--backend B --no-trust`` gives each backend's test AUC on the served model (the test split is evaluated once per
backend, with the threshold chosen on validation at training). Ratios are against torch eager, measured in the
same run. Writes the JSON (every figure, the machine, the command) and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULT = ROOT / "bench" / "results" / "edge-cpu.json"
BACKENDS = ("torch", "onnx", "onnx-int8")
#: measured too when OpenVINO is installed (``pip install openvino``; not a medlens dependency): the same ONNX files
#: compiled by OpenVINO's CPU plugin, to see whether it would beat ONNX Runtime on this CPU before choosing it
OPENVINO = ("openvino", "openvino-int8")


# -------------------------------------------------------------------------------------------- the child


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (model, backend) in this process; ``spec``: kind (run / densenet), path, backend, iters, seconds."""
    import numpy as np
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    if spec["kind"] == "run":
        from medlens.export import backend_file
        from medlens.models.card import load_checkpoint

        model, card = load_checkpoint(spec["path"])
        size, chans = card.input_size, card.in_chans
        onnx_path = None if spec["backend"] in ("torch", *OPENVINO) else backend_file(spec["path"], spec["backend"])
        weights = next(Path(spec["path"]).glob("*.safetensors"))
    else:  # DenseNet121, untrained unless a run was given
        from monai.networks.nets import DenseNet121

        model, size, chans = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval(), 224, 1
        weights = Path(spec["workdir"]) / "densenet121.pt"
        onnx_path = None
        if spec["backend"] != "torch":
            onnx_path = Path(spec["workdir"]) / ("densenet121.int8.onnx" if spec["backend"].endswith("int8") else
                                                 "densenet121.onnx")
    if spec["backend"] in OPENVINO:
        import openvino as ov

        if onnx_path is None:  # the served run: its export files
            onnx_path = backend_file(spec["path"], "onnx-int8" if spec["backend"] == "openvino-int8" else "onnx")
        compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads})
        output = compiled.output(0)
        run_batch = lambda x: compiled([x.numpy()])[output]  # noqa: E731
        file_bytes = onnx_path.stat().st_size
    elif spec["backend"] == "torch":
        model.eval()
        run_batch = lambda x: model(x)  # noqa: E731
        file_bytes = weights.stat().st_size if weights.exists() else sum(
            p.numel() * p.element_size() for p in model.parameters())
    else:
        from medlens.export import OrtClassifier

        ort_model = OrtClassifier(onnx_path, threads=threads)
        run_batch = ort_model
        file_bytes = onnx_path.stat().st_size
    rng = np.random.default_rng(0)

    def batch(n: int) -> torch.Tensor:
        return torch.from_numpy(rng.random((n, chans, size, size), dtype=np.float32))

    x1, x32 = batch(1), batch(32)
    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            run_batch(x1)
        times = []
        for _ in range(spec["iters"]):
            t0 = time.perf_counter()
            run_batch(x1)
            times.append(time.perf_counter() - t0)
        run_batch(x32)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < spec["seconds"]:
            run_batch(x32)
            n += 32
        elapsed = time.perf_counter() - t0
    ms = np.asarray(times) * 1000.0
    return {"latency_ms_batch1": {"p50": round(float(np.percentile(ms, 50)), 3),
                                  "p99": round(float(np.percentile(ms, 99)), 3),
                                  "mean": round(float(ms.mean()), 3), "calls": len(times)},
            "throughput_img_s_batch32": round(n / elapsed, 1), "file_bytes": int(file_bytes),
            "peak_rss_mb": _vm_hwm_mb(), "threads": threads}


# ------------------------------------------------------------------------------------------- the parent


def readme_rows(result: dict[str, Any]) -> list[str]:
    """The README table of a result: every figure from ``result["models"]``."""
    rows = ["| model | backend | batch 1 p50 / p99 (ms) | batch 32 (img/s) | size (MB) | peak RSS (MB) | test AUC |",
            "|---|---|---|---|---|---|---|"]
    for name, backends in result["models"].items():
        trained = any("test" in m for m in backends.values())
        for b, m in backends.items():
            t = m.get("test")
            auc = (f"{t['auc']['value']:.4f}" if t else
                   "speed only (same ONNX file)" if trained else "untrained")
            rows.append(f"| {name} | {b} | {m['latency_ms_batch1']['p50']:.2f} / {m['latency_ms_batch1']['p99']:.2f} "
                        f"({m['speedup_batch1_p50_vs_torch']:.1f}x) | {m['throughput_img_s_batch32']:.0f} "
                        f"({m['speedup_batch32_vs_torch']:.1f}x) | {m['file_bytes'] / 1e6:.2f} | "
                        f"{m['peak_rss_mb']:.0f} | {auc} |")
    return rows


def _export_densenet(workdir: Path, calibration: Any) -> dict[str, Any]:
    """DenseNet121 (untrained) to ONNX fp32 and INT8 the same way medlens export does (the same functions)."""
    import torch
    from monai.networks.nets import DenseNet121

    from medlens.export import _quantise

    class Logits(torch.nn.Module):  # the graph's two outputs, as medlens export writes them (features: pooled)
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            f = self.net.features(x)
            return self.net.class_layers(f), f.mean(dim=(2, 3))

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
    torch.save(net.state_dict(), workdir / "densenet121.pt")
    with torch.no_grad():
        torch.onnx.export(Logits(net).eval(), (torch.rand(1, 1, 224, 224),), str(workdir / "densenet121.onnx"),
                          input_names=["image"], output_names=["logits", "features"], opset_version=17,
                          dynamo=False, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"},
                                                      "features": {0: "batch"}})
        eager = net(calibration[:4].float() / 255.0)
    from medlens.export import OrtClassifier

    diff = float((OrtClassifier(workdir / "densenet121.onnx")(calibration[:4].float() / 255.0) - eager).abs().max())
    _quantise(workdir / "densenet121.onnx", workdir / "densenet121.int8.onnx", calibration, "unit_range", n=64, seed=0)
    return {"fp32_max_abs_logit_diff": diff, "weights": "untrained (random init): speed only, no AUC",
            "calibration": "64 Kermany training images at 224 px"}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"child {spec['kind']}/{spec['backend']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_auc(run: Path, data: Path, backend: str) -> dict[str, Any]:
    from medlens import rundir
    from medlens.cli import main as medlens

    assert medlens(["evaluate", str(run), "--data", str(data), "--split", "test", "--backend", backend,
                    "--no-trust", "--no-progress"]) == 0
    m = json.loads((rundir.eval_dir(run, rundir.eval_name("test", backend)) / "metrics.json").read_text())
    return {k: {kk: m[k][kk] for kk in ("value", "ci_low", "ci_high")} for k in ("auc", "accuracy", "sensitivity",
                                                                                 "specificity")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="the served model's run (exported, or exported here)")
    p.add_argument("--data", type=Path, default=SHARED / "chest_xray")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--densenet-iters", type=int, default=60)
    p.add_argument("--densenet-run", type=Path,
                   help="a trained DenseNet121 run (recipe densenet_monai): measured and tested like the served run")
    p.add_argument("--result", type=Path, default=RESULT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help="only rewrite the README rows of this result JSON from its figures")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        result["readme"] = readme_rows(result)
        args.render.write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(result["readme"]))
        return 0
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.run is None:
        p.error("--run is required")
    import tempfile

    import torch

    from medlens.cli import main as medlens
    from medlens.export import CARD_NAME, FP32_NAME, INT8_NAME, export_dir

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    run = args.run.resolve()
    if not ((export_dir(run) / FP32_NAME).exists() and (export_dir(run) / INT8_NAME).exists()):
        assert medlens(["export", str(run), "--data", str(args.data), "--int8", "--no-progress"]) == 0
    export_card = json.loads((export_dir(run) / CARD_NAME).read_text())
    started = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "edge", "written_by": "bench/edge.py", "command": " ".join(["python", "bench/edge.py",
                                                                            *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": threads, "torch": torch.__version__,
                   "platform": platform.platform()},
        "served_model": {"run": str(run), "model_id": export_card["source"]["model_id"],
                         "export_parity": export_card["parity"], "calibration": export_card["calibration"]},
        "models": {},
    }
    base = {"threads": threads, "warmup": args.warmup, "seconds": args.seconds}
    try:
        import openvino  # noqa: F401

        extra = OPENVINO
    except ImportError:
        extra = ()
        result["openvino"] = "not installed (pip install openvino): not measured"
    served = {b: measure({**base, "kind": "run", "path": str(run), "backend": b, "iters": args.iters})
              for b in (*BACKENDS, *extra)}
    for b in BACKENDS:
        served[b]["test"] = test_auc(run, args.data, b)
    result["models"]["served"] = served
    if args.densenet_run is not None:  # trained: its own export, speed and test AUC like the served run
        dense = args.densenet_run.resolve()
        if not ((export_dir(dense) / FP32_NAME).exists() and (export_dir(dense) / INT8_NAME).exists()):
            assert medlens(["export", str(dense), "--data", str(args.data), "--int8", "--no-progress"]) == 0
        result["densenet121_export"] = json.loads((export_dir(dense) / CARD_NAME).read_text())
        result["models"]["densenet121"] = {
            b: measure({**base, "kind": "run", "path": str(dense), "backend": b, "iters": args.densenet_iters})
            for b in (*BACKENDS, *extra)}
        for b in BACKENDS:
            result["models"]["densenet121"][b]["test"] = test_auc(dense, args.data, b)
    else:
        with tempfile.TemporaryDirectory(prefix="medlens-edge-") as tmp:
            from medlens.data.cache import TensorCache
            from medlens.data.sources import discover

            table = discover(args.data / "train")
            pick = list(range(0, len(table.items), max(1, len(table.items) // 64)))[:64]
            calibration = TensorCache().load(table, pick, 224, progress=False).images
            result["densenet121_export"] = _export_densenet(Path(tmp), calibration)
            result["models"]["densenet121"] = {
                b: measure({**base, "kind": "densenet", "path": "", "workdir": tmp, "backend": b,
                            "iters": args.densenet_iters}) for b in (*BACKENDS, *extra)}
    for backends in result["models"].values():
        eager = backends["torch"]
        for m in backends.values():
            m["speedup_batch1_p50_vs_torch"] = round(eager["latency_ms_batch1"]["p50"] / m["latency_ms_batch1"]["p50"], 2)
            m["speedup_batch32_vs_torch"] = round(m["throughput_img_s_batch32"] / eager["throughput_img_s_batch32"], 2)
            m["size_vs_torch"] = round(m["file_bytes"] / eager["file_bytes"], 3)
    s = result["models"]["served"]
    auc = {b: s[b]["test"]["auc"]["value"] for b in BACKENDS}
    result["bars"] = {
        "served int8 >= 4x torch per-image throughput at batch 1": s["onnx-int8"]["speedup_batch1_p50_vs_torch"] >= 4,
        "served int8 test AUC within 0.005 of fp32": abs(auc["onnx"] - auc["onnx-int8"]) <= 0.005,
        "served int8 size <= 1/3": s["onnx-int8"]["size_vs_torch"] <= 1 / 3,
        "densenet121 ORT fp32 >= 2x eager": result["models"]["densenet121"]["onnx"]["speedup_batch1_p50_vs_torch"] >= 2,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["readme"] = rows = readme_rows(result)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(rows))
    print(json.dumps(result["bars"], indent=1))
    print(f"wrote {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
