"""Cost of each explanation method relative to one forward + backward pass (a training step without the
optimiser), same model, same image, same process.

    python bench/explain_speed.py                         # seed_cnn, one 224 x 224 image, CPU
    python bench/explain_speed.py --model resnet18 --device cuda

Prints the median time of each method and its ratio to forward+backward, and writes
bench/results/explain_speed-<device>.json. Run it on a quiet machine: on 2 cores a second torch process
slows everything several-fold (the ratios hold up better than the absolute times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from medlens.explain import make_explainer
from medlens.forward import resolve_device
from medlens.models import create_model
from medlens.models.card import jsonable

# (label, method, options, repeats): the perturbation methods (hundreds of forward passes) get fewer
# repeats and no warm-up call of their own; the batch-size rows show what batching buys on this device
CASES = [
    ("gradcam", "gradcam", {}, 15),
    ("gradcam++", "gradcam++", {}, 15),
    ("scorecam (all channels)", "scorecam", {}, 2),
    ("scorecam (max_channels=32)", "scorecam", {"max_channels": 32}, 3),
    ("scorecam (max_channels=32, batch 4)", "scorecam", {"max_channels": 32, "batch_size": 4}, 3),
    ("occlusion (defaults)", "occlusion", {}, 2),
    ("occlusion (batch 4)", "occlusion", {"batch_size": 4}, 2),
]


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    if repeats > 3:
        fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--result", default=None, help="JSON path (default bench/results/explain_speed-<device>.json)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model).to(device).eval()
    x = torch.randn(1, 1, args.size, args.size, device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x)[:, 1].sum().backward()

    def forward():
        with torch.no_grad():
            model(x)

    # Each row is divided by a forward+backward timed just before it, so a neighbour process that starts or
    # stops halfway through the run (on a shared 2-core machine) shifts both sides of a ratio alike.
    rows: dict[str, float] = {}
    ratios: dict[str, float] = {}
    cases = [("forward (no grad)", forward, 15), ("forward+backward", forward_backward, 15)]
    for label, fn, repeats in cases:
        reference = _median_seconds(forward_backward, 7, device)
        rows[label] = _median_seconds(fn, repeats, device)
        ratios[label] = rows[label] / reference
    for label, method, options, repeats in CASES:
        reference = _median_seconds(forward_backward, 7, device)
        model.zero_grad(set_to_none=True)
        with make_explainer(method, model, **options) as explainer:
            rows[label] = _median_seconds(lambda e=explainer: e(x), repeats, device)
        ratios[label] = rows[label] / reference
    step = rows["forward+backward"]

    print(f"{args.model}, 1 x 1 x {args.size} x {args.size}, {device}, {torch.get_num_threads()} threads")
    print(f"{'method':<36} {'ms':>10} {'x fwd+bwd':>10}")
    for label, seconds in rows.items():
        print(f"{label:<36} {seconds * 1e3:>10.1f} {ratios[label]:>10.2f}")

    if device.type == "cuda":
        where = f"GPU: {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    result = jsonable({
        "benchmark": "explain_speed", "written_by": "bench/explain_speed.py",
        "model": args.model,
        "input": [1, 1, args.size, args.size],
        "device": where,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: round(v, 5) for k, v in rows.items()},
        "forward_backward_seconds": round(step, 5),
        "ratio_to_forward_backward": {k: round(v, 3) for k, v in ratios.items()},
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    })
    out = Path(args.result) if args.result else Path(__file__).parent / "results" / f"explain_speed-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
