"""A communication-bound task: ResNet-18 on 32x32 procedural shapes (no download).

The model is torchvision's ResNet-18 (``BasicBlock``, [2, 2, 2, 2]) with the stem CIFAR
models use at 32x32: a 3x3 stride-1 first convolution and no max-pool, and 3 classes. At
the default ``--width 64`` that is 11.17M parameters, 44.7 MB of fp32 gradients per step,
which DDP cuts into its default buckets (``--bucket-cap-mb``, 25 MB): per image it
computes little, so on a slow network most of a step is the allreduce. ``--width``
scales every stage's channels (64, 128, 256, 512 at 64) so that tests train a tiny one.
No pretrained weights: training starts from torchvision's initialisation.

The data are the trainer's procedural shapes (``trainer.data.images``: circle, square or
triangle, the label being the first shape drawn), rendered once into memory when the
stage starts, so that steps time the model and the communication, not PIL. The images
depend only on ``--data-seed`` and the split, never on ``--seed``: runs with different
seeds see the same data in a different order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from switchml.extras import needs
from trainer.data.images import SHAPE_NAMES, TensorImages, shapes_dataset
from trainer.tasks.base import Stage, StageContext, Task, classification_loss

with needs("train", "the shapes_resnet task's model"):
    from torchvision.models.resnet import BasicBlock, ResNet

IMAGE_SIZE = 32
#: torchvision's ResNet-18 channel count of its first stage; --width is relative to it.
RESNET_WIDTH = 64
EVAL_BATCH = 256  #: images per forward pass in ``evaluate`` (bounds its memory)


class ResNet18Small(ResNet):
    """torchvision's ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool.

    ``width`` is the first stage's channels (torchvision's is 64); the later stages have
    2, 4 and 8 times as many, as in ResNet-18. At ``width=64`` the parameters have exactly
    the names and shapes of ``torchvision.models.resnet18(num_classes=...)`` with that stem.
    """

    def __init__(self, num_classes: int = len(SHAPE_NAMES), width: int = RESNET_WIDTH) -> None:
        if width < 1:
            raise ValueError(f"width={width}: expected a positive number of channels")
        self._scale = width / RESNET_WIDTH
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        # torchvision builds the 224x224 stem (7x7 stride 2, then a max-pool), which would leave
        # a 32x32 image 1x1 after layer3; rebuilt here at this width, with torchvision's init.
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity()
        self.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        # torchvision hard-codes 64/128/256/512 channels; scale them, and the stem's output
        # (self.inplanes is still torchvision's 64 when the first stage is built)
        if planes == RESNET_WIDTH and self.inplanes == RESNET_WIDTH:
            self.inplanes = self._width(RESNET_WIDTH)
        return super()._make_layer(block, self._width(planes), blocks, stride, dilate)

    def _width(self, channels: int) -> int:
        return max(1, round(channels * self._scale))


def render_shapes(n: int, train: bool, seed: int) -> TensorImages:
    """``n`` procedural shapes images (3x32x32) of one split, rendered once and kept as uint8."""
    source = shapes_dataset(IMAGE_SIZE, channels=3, train=train, seed=seed, n=n)
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        image, labels[i] = source[i]
        # the generator's floats are uint8 / 255: back to uint8 exactly, a quarter of the memory
        images[i] = (image * 255.0).round_().to(torch.uint8)
    return TensorImages(images, labels, IMAGE_SIZE, 3)


class ShapesResNetStage(Stage):
    name = "shapes_resnet"
    default_steps = 200
    # a small per-rank batch keeps the step communication-bound: 44.7 MB of gradients per
    # step against the compute of 8 images at 32x32 (about 0.3 s on one core here)
    default_batch_size = 8
    default_lr = 1e-3

    def __init__(self, width: int = RESNET_WIDTH, train_size: int = 4096, test_size: int = 1024,
                 data_seed: int = 0) -> None:
        self.width, self.train_size, self.test_size, self.data_seed = width, train_size, test_size, data_seed

    def build_model(self, ctx: StageContext) -> nn.Module:
        return ResNet18Small(len(SHAPE_NAMES), self.width)

    def train_dataset(self, ctx: StageContext) -> Dataset:
        return render_shapes(self.train_size, train=True, seed=self.data_seed)

    def loss(self, model: nn.Module, batch, ctx: StageContext) -> tuple[torch.Tensor, dict[str, float]]:
        return classification_loss(model, batch, ctx)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        test = render_shapes(self.test_size, train=False, seed=self.data_seed)
        logits = torch.cat([model(test.images[i:i + EVAL_BATCH].to(ctx.device).float() / 255.0).cpu()
                            for i in range(0, len(test), EVAL_BATCH)])
        return {"test_accuracy": (logits.argmax(1) == test.labels).float().mean().item(),
                "test_loss": F.cross_entropy(logits, test.labels).item(),
                "parameters": sum(p.numel() for p in model.parameters())}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


class ShapesResNetTask(Task):
    name = "shapes_resnet"
    help = ("ResNet-18 (11M parameters) on 32x32 procedural shapes: a communication-bound task "
            "for the network benchmarks (built in, no download)")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("shapes_resnet")
        group.add_argument("--width", type=_positive, default=RESNET_WIDTH,
                           help="channels of the first stage (ResNet-18: 64, 11.2M parameters; 8: 0.18M, for tests)")
        group.add_argument("--train-size", type=_positive, default=4096, help="training images (rendered at start)")
        group.add_argument("--test-size", type=_positive, default=1024, help="held-out images rank 0 evaluates on")
        group.add_argument("--data-seed", type=int, default=0,
                           help="seed of the generated images (--seed orders them and initialises the model)")

    def stages(self, args: argparse.Namespace) -> list[Stage]:
        return [ShapesResNetStage(args.width, args.train_size, args.test_size, args.data_seed)]

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        cls.add_arguments(parser)

    def evaluate_checkpoint(self, args: argparse.Namespace) -> dict:
        path = Path(args.ckpt)
        path = path / f"{ShapesResNetStage.name}.pt" if path.is_dir() else path
        stage = ShapesResNetStage(args.width, args.train_size, args.test_size, args.data_seed)
        ctx = StageContext(path.parent, 0, 1, torch.device("cpu"), 0)
        model = stage.build_model(ctx)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
        model.eval()
        return stage.evaluate(model, ctx)
