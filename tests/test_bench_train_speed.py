"""bench/train_speed.py runs on the CPU with a tiny setting, and compares pipelines at equal settings: the
ceiling, medlens and the MONAI-tutorial peer all run in the precision and memory format their triple names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_speed_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _multichannel_conv(model: torch.nn.Module) -> torch.nn.Module:
    """The first convolution with more than one input channel (a 1-channel tensor is both contiguous and
    channels-last, so only such a layer's input shows the memory format)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)


def test_train_speed_runs_on_cpu_with_equal_settings(kermany, tmp_path, monkeypatch):
    bench = _load()
    seen: list[tuple[bool, bool]] = []  # (autocast on, channels-last input) at every forward, in order
    make = bench.create_model

    def recording_model(*args, **kw):
        model = make(*args, **kw)

        def hook(_module, inputs):
            x = inputs[0]  # the input of a conv with several input channels: its memory format is telling
            seen.append((torch.is_autocast_enabled(x.device.type),
                         x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        _multichannel_conv(model).register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(bench, "create_model", recording_model)
    out = tmp_path / "ts.json"
    assert bench.main(["--data", str(kermany), "--device", "cpu", "--model", "seed_cnn", "--size", "32",
                       "--batch", "4", "--steps", "2", "--warmup", "1", "--workers", "0", "--limit", "16",
                       "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["written_by"] == "bench/train_speed.py" and result["device_type"] == "cpu"
    assert set(result["triples"]) == {"fp32"} and "bf16_channels_last" in result["not_measured"]
    fp32 = result["triples"]["fp32"]
    assert (fp32["precision"], fp32["memory_format"]) == ("fp32", "contiguous")
    ips = fp32["images_per_s"]
    assert set(ips) == {"ceiling", "medlens", "monai_tutorial"} and min(ips.values()) > 0
    assert fp32["medlens_over_peer"] == pytest.approx(ips["medlens"] / ips["monai_tutorial"], rel=0.1)
    # 3 pipelines x (1 warm-up + 2 timed) steps, every one of them in fp32 without autocast
    assert len(seen) == 9 and set(seen) == {(False, False)}


def test_bf16_triple_puts_the_peer_in_bf16_and_channels_last(kermany, tmp_path):
    """The peer's step honours the triple's setting (on the CPU too, where autocast to bf16 exists)."""
    bench = _load()
    seen = []
    make = bench.create_model

    def recording_model(*args, **kw):
        model = make(*args, **kw)
        _multichannel_conv(model).register_forward_pre_hook(lambda _m, inputs: seen.append(
            (torch.is_autocast_enabled("cpu"),
             inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous())))
        return model

    bench.create_model = recording_model

    class Args:
        size, batch, steps, warmup, workers, model = 32, 4, 1, 0, 0, "seed_cnn"

    paths = sorted(str(p) for p in (kermany / "train" / "NORMAL").iterdir())[:8]
    bench.bench_monai_tutorial(paths, [0] * 8, Args, torch.device("cpu"), bench.SETTINGS["bf16_channels_last"])
    assert seen and all(autocast and cl for autocast, cl in seen)
