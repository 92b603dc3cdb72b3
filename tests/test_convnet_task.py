"""The shapes_resnet task: its model is torchvision's ResNet-18 with the 32x32 stem, its data
the project's procedural shapes; a tiny width trains and evaluates in one process, and
through the switch with the local launcher (with the trainer's per-step comm wait)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from trainer.tasks import get_task
from trainer.tasks.base import StageContext
from trainer.tasks.convnet import ResNet18Small, ShapesResNetStage, ShapesResNetTask, render_shapes

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_full_width_is_torchvision_resnet18_with_the_32x32_stem():
    model = ResNet18Small()
    reference = torchvision.models.resnet18(num_classes=3)  # no weights: nothing is downloaded
    reference.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = torch.nn.Identity()
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 11_170_371
    assert isinstance(model.maxpool, torch.nn.Identity)
    # a 32x32 image keeps 4x4 positions into the last stage (a 7x7 stride-2 stem and max-pool would leave 1x1)
    assert model.layer4(model.layer3(model.layer2(model.layer1(model.conv1(torch.zeros(1, 3, 32, 32)))))).shape \
        == (1, 512, 4, 4)


def test_width_scales_every_stage():
    model = ResNet18Small(width=8)
    assert model.conv1.out_channels == 8 and model.layer4[0].conv1.out_channels == 64
    assert model.fc.in_features == 64 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="width=0"):
        ResNet18Small(width=0)


def test_shapes_are_generated_deterministically_per_seed_and_split():
    a, b = render_shapes(32, train=True, seed=0), render_shapes(32, train=True, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, render_shapes(32, train=False, seed=0).images)
    assert not torch.equal(a.images, render_shapes(32, train=True, seed=1).images)
    image, label = a[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert set(a.labels.tolist()) <= {0, 1, 2}


def test_a_tiny_width_trains_and_evaluates_in_one_process():
    stage = ShapesResNetStage(width=4, train_size=64, test_size=32)
    ctx = StageContext(Path("."), 0, 1, torch.device("cpu"), 0)
    torch.manual_seed(0)
    model = stage.build_model(ctx)
    optimizer = stage.optimizer(model.parameters(), 1e-2)
    batch = next(iter(DataLoader(stage.train_dataset(ctx), batch_size=16)))
    losses = []
    for _ in range(15):  # one batch, over and over: the loss must fall
        optimizer.zero_grad()
        loss, extra = stage.loss(model, batch, ctx)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert 0.0 <= extra["accuracy"] <= 1.0
    assert losses[-1] < losses[0]
    model.eval()
    metrics = stage.evaluate(model, ctx)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    # evaluation sees the held-out split, not the training images
    test = render_shapes(32, train=False, seed=0)
    with torch.no_grad():
        expected = F.cross_entropy(model(test.images.float() / 255.0), test.labels).item()
    assert metrics["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_registered_with_its_options():
    assert get_task("shapes_resnet") is ShapesResNetTask
    parser = argparse.ArgumentParser()
    ShapesResNetTask.add_arguments(parser)
    args = parser.parse_args(["--width", "8", "--train-size", "128"])
    (stage,) = ShapesResNetTask().stages(args)
    assert (stage.width, stage.train_size, stage.test_size, stage.data_seed) == (8, 128, 1024, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--width", "0"])


@pytest.mark.slow
def test_trains_through_the_switch_and_logs_the_comm_wait(tmp_path):
    out = tmp_path / "run"
    tiny = ["--width", "4", "--train-size", "64", "--test-size", "32"]
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "shapes_resnet", "--workers", "2", "--steps", "4",
                           "--log-every", "1", "--out", str(out), "--no-progress", "--no-fallback", *tiny],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())["shapes_resnet"]
    assert final["steps"] == 4 and final["batch_size"] == ShapesResNetStage.default_batch_size
    assert final["buckets_through_switch"] >= 4 and final["buckets_on_fallback"] == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if not m.get("final")]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # the wait is part of the step: never negative, never longer than the step it is in
    durations = [b["time"] - a["time"] for a, b in zip([{"time": 0.0}, *steps], steps, strict=False)]
    assert all(0.0 <= m["comm_wait"] <= d for m, d in zip(steps, durations, strict=True))
    assert final["comm_wait_seconds"] == pytest.approx(sum(m["comm_wait"] for m in steps))

    proc = subprocess.run([sys.executable, "-m", "trainer.eval_cli", "shapes_resnet", "--ckpt", str(out), *tiny],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["test_accuracy"] == pytest.approx(final["test_accuracy"])
