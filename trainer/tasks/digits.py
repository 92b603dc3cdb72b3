"""The built-in task: a small convnet on scikit-learn's handwritten digits (no download).

1,797 8x8 images ship inside scikit-learn; 80% train, 20% test, split by a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from switchml.extras import needs
from trainer.tasks.base import Stage, StageContext, Task, classification_loss


def digits_split(train: bool, seed: int = 0) -> TensorDataset:
    """The digits as (image [1, 8, 8] in 0..1, label) tensors; a fixed 80/20 split."""
    with needs("train", "the digits data set"):
        from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    cut = int(0.8 * len(order))
    idx = order[:cut] if train else order[cut:]
    images = torch.tensor(data.images[idx] / 16.0, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(images, torch.tensor(data.target[idx], dtype=torch.long))


class DigitsNet(nn.Module):
    """Two 3x3 convolutions and two linear layers: 30k parameters."""

    def __init__(self, width: int = 16, unused_head: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)
        # a head that forward() never uses: exercises DDP's find_unused_parameters
        self.unused = nn.Linear(3, 3) if unused_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class DigitsStage(Stage):
    name = "digits"
    default_steps = 150
    default_batch_size = 32
    default_lr = 2e-3

    def __init__(self, width: int = 16) -> None:
        self.width = width

    def build_model(self, ctx: StageContext) -> nn.Module:
        return DigitsNet(self.width)

    def train_dataset(self, ctx: StageContext) -> Dataset:
        return digits_split(train=True)

    def loss(self, model: nn.Module, batch, ctx: StageContext) -> tuple[torch.Tensor, dict[str, float]]:
        return classification_loss(model, batch, ctx)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        images, labels = digits_split(train=False).tensors
        logits = model(images.to(ctx.device)).cpu()
        return {"test_accuracy": (logits.argmax(1) == labels).float().mean().item(),
                "test_loss": F.cross_entropy(logits, labels).item()}


class DigitsTask(Task):
    name = "digits"
    help = "a small convnet on scikit-learn's handwritten digits (built in, no download)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--width", type=int, default=16, help="channels of the first convolution")

    def stages(self, args: argparse.Namespace) -> list[Stage]:
        return [DigitsStage(args.width)]

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        cls.add_arguments(parser)

    def evaluate_checkpoint(self, args: argparse.Namespace) -> dict:
        path = Path(args.ckpt)
        path = path / "digits.pt" if path.is_dir() else path
        stage = DigitsStage(args.width)
        ctx = StageContext(path.parent, 0, 1, torch.device("cpu"), 0)
        model = stage.build_model(ctx)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
        model.eval()
        return stage.evaluate(model, ctx)
