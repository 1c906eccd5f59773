"""Structured pruning and distillation (issue 10): smaller networks that are ordinary runs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import read_card, require_module

from medlens.cli import main
from medlens.errors import ConfigError, DataError
from medlens.losses import DistillationLoss


def test_structured_pruning_gives_a_narrower_run_that_loads_and_predicts(tiny_run, cxr_tiny, tmp_path):
    require_module("torch_pruning", extra="export")
    from medlens.compress import PRUNED_INIT
    from medlens.inference import Predictor

    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_run), "--data", str(cxr_tiny), "--out", str(out), "--sparsity", "0.5",
                 "--structured", "--epochs", "1", "--no-progress"]) == 0
    before, after = read_card(tiny_run), read_card(out)
    assert before["model_args"].get("widths") == [8, 16, 32, 64]
    assert after["model_args"]["widths"] == [4, 8, 16, 32]
    assert after["split_hash"] == before["split_hash"]  # the same patients in train / val / test
    pruned = after["metrics"]["pruned_from"]
    assert pruned["model_id"] == before["model_id"] and pruned["macs"][1] < 0.4 * pruned["macs"][0]
    assert (out / "model.safetensors").stat().st_size < 0.5 * (tiny_run / "model.safetensors").stat().st_size
    assert json.loads((out / "model.card.json").read_text())["config"]["train"]["init_weights"].endswith(PRUNED_INIT)
    result = Predictor.from_run(out).predict(sorted((cxr_tiny / "test").rglob("*.jpeg"))[:2])
    assert all("probability" in r for r in result)


def test_pruning_refuses_a_sparsity_outside_0_1(tiny_run, cxr_tiny, tmp_path):
    require_module("torch_pruning", extra="export")
    from medlens.compress import prune_run

    with pytest.raises(ConfigError, match="between 0 and 1"):
        prune_run(tiny_run, cxr_tiny, tmp_path / "x", sparsity=1.5)


def test_initial_weights_that_do_not_fit_are_named(tmp_path):
    from safetensors.torch import save_file

    from medlens.models import create_model
    from medlens.warmstart import load_init_weights

    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(DataError, match="w.safetensors"):
        load_init_weights(create_model("seed_cnn", num_classes=2, in_chans=1), path)


def test_distillation_loss_pulls_the_student_towards_the_teacher_on_the_same_batch():
    seen = []

    class Teacher(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1) * 5

    base = torch.nn.CrossEntropyLoss()
    x, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    target = Teacher()(x)
    seen.clear()
    loss = DistillationLoss(base, Teacher(), temperature=2.0, alpha=1.0)
    assert loss(target.clone(), labels, x).item() == pytest.approx(0.0, abs=1e-6)  # agreeing: nothing to learn
    assert seen and seen[0] is x  # the teacher saw the student's own batch
    student = torch.zeros(4, 2, requires_grad=True)
    value = loss(student, labels, x)
    assert value.item() > 0.01
    value.backward()
    stepped = (student - 0.5 * student.grad).detach()
    assert loss(stepped, labels, x).item() < value.item()  # a gradient step moves towards the teacher
    mixed = DistillationLoss(base, Teacher(), temperature=2.0, alpha=0.0)
    assert mixed(student.detach(), labels, x).item() == pytest.approx(base(student.detach(), labels).item())


def test_distill_trains_a_smaller_student_on_the_teachers_split(tiny_run, cxr_tiny, tmp_path):
    out = tmp_path / "student"
    assert main(["distill", str(tiny_run), "--student", "seed_cnn", "--student-args",
                 '{"widths": [4, 8, 8, 16], "stem": 2}', "--data", str(cxr_tiny), "--out", str(out),
                 "--epochs", "1", "--no-progress"]) == 0
    teacher, student = read_card(tiny_run), read_card(out)
    assert student["split_hash"] == teacher["split_hash"] and student["input_size"] == teacher["input_size"]
    assert student["config"]["train"]["teacher"].endswith(tiny_run.name)
    d = student["metrics"]["distilled_from"]
    assert d["model_id"] == teacher["model_id"] and d["macs"]["student"] < d["macs"]["teacher"] / 3
    assert "distilling from" in (out / "train.log").read_text()  # the teacher was loaded into the loss


def test_training_starts_from_the_initial_weights(tiny_run, cxr_tiny, tmp_path):
    """With a learning rate of 0 the trained parameters are exactly the initial weights (fine-tuning after
    pruning starts from the pruned network, not from a random one)."""
    from helpers import train
    from safetensors.torch import load_file

    init = tiny_run / "model.safetensors"
    run = tmp_path / "from-init"
    train(cxr_tiny, run, "--set", f"train.init_weights={init}", "--set", "train.lr=0", "--set", "train.epochs=1",
          "--set", "train.weight_decay=0")
    start, end = load_file(str(init)), load_file(str(run / "model.safetensors"))
    params = [k for k in start if k.endswith("weight") and "bn" not in k and start[k].ndim > 1]
    assert params and all(torch.equal(start[k], end[k]) for k in params)


def test_unstructured_pruning_keeps_the_pruned_weights_at_zero_through_the_fine_tune(tiny_run, cxr_tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "sparse"
    assert main(["prune", str(tiny_run), "--data", str(cxr_tiny), "--out", str(out), "--sparsity", "0.6",
                 "--epochs", "2", "--no-progress"]) == 0
    card = read_card(out)
    assert card["model_args"] == read_card(tiny_run)["model_args"]  # same architecture, same size
    assert card["metrics"]["pruned_from"]["structured"] is False
    weights = load_file(str(out / "model.safetensors"))
    pruned = [v for k, v in weights.items() if k.endswith("weight") and v.ndim in (2, 4)]
    zeros = sum(int((v == 0).sum()) for v in pruned) / sum(v.numel() for v in pruned)
    assert zeros >= 0.59  # still 60% zeros after two epochs of AdamW with momentum and weight decay
