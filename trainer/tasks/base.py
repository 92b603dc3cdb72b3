"""What a training task gives the trainer.

A task is a sequence of stages (most tasks have one). The trainer runs each stage on
every rank: it builds the stage's model, wraps it in DDP with the chosen communication
(switchml hook or the process group's allreduce), shards the stage's data set with a
DistributedSampler, and calls ``loss`` on each batch. Rank 0 evaluates and checkpoints.
A stage that needs an earlier stage's result (a frozen root model, say) loads it from
``ctx.out_dir`` in ``build_model``; ``finish`` is where a stage writes such artefacts.
"""

from __future__ import annotations

import argparse
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


@dataclass
class StageContext:
    """Where and how a stage runs."""

    out_dir: Path  #: the run's output folder (checkpoints, metrics, artefacts)
    rank: int
    world_size: int
    device: torch.device
    seed: int


def classification_loss(model: nn.Module, batch: Any, ctx: StageContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of a batch of (images, labels) and its accuracy: ``Stage.loss`` of a classifier."""
    images, labels = (t.to(ctx.device) for t in batch)
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    return loss, {"accuracy": (logits.argmax(1) == labels).float().mean().item()}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total_steps`` (open_clip's).

    The factor of step s (0-based) is ``(s + 1) / warmup_steps`` during the warm-up, then
    ``(1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``.
    """
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}); got {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Stage(ABC):
    """One training stage: a model, its data and its loss."""

    #: Name used for checkpoints (``<out>/<name>.pt``) and metric lines.
    name: str = "train"
    #: Steps this stage trains when the user gives neither --steps nor --epochs.
    default_steps: int = 200
    #: Per-rank batch size when the user gives no --batch-size.
    default_batch_size: int = 32
    #: Adam learning rate when the user gives no --lr.
    default_lr: float = 1e-3

    @abstractmethod
    def build_model(self, ctx: StageContext) -> nn.Module:
        """The module DDP wraps (trainable parameters only are synchronised)."""

    @abstractmethod
    def train_dataset(self, ctx: StageContext) -> Dataset:
        """The training set; the trainer shards it across ranks."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, ctx: StageContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (called through the DDP-wrapped ``model``) and metrics to log."""

    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        """Metrics of the trained (unwrapped) model, on rank 0; none by default."""
        return {}

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """The optimiser; Adam by default."""
        return torch.optim.Adam(params, lr=lr)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer,
                     total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The learning-rate schedule, stepped once per optimiser step; None (constant) by default."""
        return None

    def finish(self, model: nn.Module, ctx: StageContext) -> None:
        """Called on rank 0 after training: write what later stages or evaluation need."""


class Task(ABC):
    """A named training job: its command-line options and its stages."""

    name: str = "task"
    help: str = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Task-specific options (the trainer adds the common ones)."""

    @abstractmethod
    def stages(self, args: argparse.Namespace) -> list[Stage]:
        """The stages to run, in order."""

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Options of ``switchml-eval TASK`` (``--ckpt`` is added for every task)."""

    def evaluate_checkpoint(self, args: argparse.Namespace) -> dict[str, Any]:
        """``switchml-eval TASK``: the metrics of the run in ``args.ckpt`` (a run folder or a .pt file)."""
        raise NotImplementedError(f"task {self.name!r} has no switchml-eval yet")
