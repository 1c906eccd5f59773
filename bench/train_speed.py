"""Training throughput: medlens's pipeline vs the MONAI-tutorial pipeline, in the same process, same data,
model, batch and device; plus the model's compute ceiling (the same step on device-resident random tensors).

    python bench/train_speed.py --data ../shared/data/chest_xray --device cuda --workers 14
    python bench/train_speed.py --device cpu --model seed_cnn --size 64 --steps 5 --workers 2   # CPU / CI size

It compares *pipelines*, not precisions: each "triple" (ceiling, medlens, peer) runs all three with the same
numeric precision and memory format, so a ratio never credits medlens for bf16 or channels-last that the peer
could use too. Two triples are measured: ``fp32`` (fp32, contiguous NCHW) and ``bf16_channels_last`` (bf16
autocast, channels-last model and input: what medlens trains with on a GPU). On the CPU medlens trains in fp32
(bf16 autocast is slower there for convolutions), so only the fp32 triple is run and the JSON says why.

Prints images/s of each, the ratios per triple, and writes
bench/results/train_speed-<device type>-<device name>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medlens.config import AugmentConfig
from medlens.data.augment import BatchAugment
from medlens.data.cache import TensorCache
from medlens.data.sources import discover
from medlens.forward import resolve_device
from medlens.losses import make_loss
from medlens.models import create_model
from medlens.train import train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, n_steps: int, warmup: int, device: torch.device, batch: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync(device)
    return n_steps * batch / (time.perf_counter() - t0)


#: the precision / memory-format settings of a triple: every pipeline in a triple uses the same one
SETTINGS = {
    "fp32": {"precision": "fp32", "memory_format": "contiguous", "amp": False, "channels_last": False},
    "bf16_channels_last": {"precision": "bf16 autocast", "memory_format": "channels_last", "amp": True,
                           "channels_last": True},
}


def _autocast(device: torch.device, setting: dict):
    return torch.autocast(device.type, dtype=torch.bfloat16) if setting["amp"] else contextlib.nullcontext()


def _new_model(name: str, size: int, device: torch.device, setting: dict):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=1).to(device)
    if setting["channels_last"]:
        model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def bench_medlens(files_table, idx, args, device, setting: dict) -> float:
    cache = TensorCache(Path(args.cache) if args.cache else None)
    loaded = cache.load(files_table, idx, args.size, progress=False)
    x_all = loaded.images.to(device)
    y_all = torch.from_numpy(files_table.labels[loaded.keep]).to(device)
    model, opt = _new_model(args.model, args.size, device, setting)
    loss_fn = make_loss("class_weights", torch.bincount(y_all.cpu(), minlength=2)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    augment = BatchAugment(AugmentConfig(), gen)
    state = {"order": torch.randperm(len(x_all), device=device), "pos": 0}

    def step():
        if state["pos"] + args.batch > len(x_all):
            state["order"], state["pos"] = torch.randperm(len(x_all), device=device), 0
        i = state["order"][state["pos"] : state["pos"] + args.batch]
        state["pos"] += args.batch
        train_step(model, x_all[i], y_all[i], augment=augment, loss_fn=loss_fn, optimizer=opt,
                   intensity="per_image_zscore", amp=setting["amp"], channels_last=setting["channels_last"])

    return _timed(step, args.steps, args.warmup, device, args.batch)


def bench_ceiling(args, device, setting: dict) -> float:
    model, opt = _new_model(args.model, args.size, device, setting)
    x = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss().to(device)

    def step():
        train_step(model, x, y, augment=None, loss_fn=loss_fn, optimizer=opt, intensity="per_image_zscore",
                   amp=setting["amp"], channels_last=setting["channels_last"])

    return _timed(step, args.steps, args.warmup, device, args.batch)


def bench_monai_tutorial(paths, labels, args, device, setting: dict) -> float:
    """The MONAI classification tutorial's pipeline: LoadImage + per-sample random rotate / flip / zoom in a
    DataLoader with workers, the same network, a plain training step, in the triple's precision and memory
    format (the tutorial itself trains in fp32: the fp32 triple is the tutorial as written)."""
    import monai.transforms as T
    from monai.data import DataLoader, Dataset, PILReader

    transforms = T.Compose([
        T.LoadImage(reader=PILReader(converter=lambda im: im.convert("L")), image_only=True,
                    ensure_channel_first=True),
        T.ScaleIntensity(),
        T.Resize((args.size, args.size)),
        T.RandRotate(range_x=np.pi / 12, prob=0.5, keep_size=True),
        T.RandFlip(spatial_axis=0, prob=0.5),
        T.RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5),
    ])
    data = [{"img": p, "label": int(y)} for p, y in zip(paths, labels, strict=True)]

    class _DS(Dataset):
        def __getitem__(self, i):
            d = self.data[i]
            return transforms(d["img"]), d["label"]

    loader = DataLoader(_DS(data), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)
    model, opt = _new_model(args.model, args.size, device, setting)
    loss_fn = torch.nn.CrossEntropyLoss()
    it = {"it": iter(loader)}

    def step():
        try:
            x, y = next(it["it"])
        except StopIteration:
            it["it"] = iter(loader)
            x, y = next(it["it"])
        x, y = x.as_tensor().to(device, non_blocking=True) if hasattr(x, "as_tensor") else x.to(device), y.to(device)
        if setting["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        with _autocast(device, setting):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()

    return _timed(step, args.steps, args.warmup, device, args.batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"))
    p.add_argument("--model", default="densenet121")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images (0 = all)")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    table = discover(args.data)
    idx = np.flatnonzero(np.asarray(table.splits) == "train")
    if args.limit:
        idx = idx[: args.limit]
    paths = [table.items[i] for i in idx]
    triples = ["fp32", "bf16_channels_last"] if device.type == "cuda" else ["fp32"]
    measured = {}
    for name in triples:
        setting = SETTINGS[name]
        r = {"ceiling": bench_ceiling(args, device, setting),
             "medlens": bench_medlens(table, idx, args, device, setting),
             "monai_tutorial": bench_monai_tutorial(paths, table.labels[idx], args, device, setting)}
        measured[name] = {
            "precision": setting["precision"], "memory_format": setting["memory_format"],
            "applies_to": "ceiling, medlens and monai_tutorial alike",
            "images_per_s": {k: round(v, 1) for k, v in r.items()},
            "medlens_over_peer": round(r["medlens"] / r["monai_tutorial"], 2),
            "medlens_fraction_of_ceiling": round(r["medlens"] / r["ceiling"], 3),
        }
        print(f"{name}: {measured[name]['images_per_s']}", file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "benchmark": "train_speed", "written_by": "bench/train_speed.py", "argv": sys.argv[1:] if argv is None
        else list(argv), "device": name, "device_type": device.type, "model": args.model,
        "image_size": args.size, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "loader_workers_peer": args.workers, "images": len(idx), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "triples": measured,
        "not_measured": {} if device.type == "cuda" else {
            "bf16_channels_last": "medlens trains in fp32 on the CPU (bf16 autocast is slower there for convs)"},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=1))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"train_speed-{device.type}-{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
