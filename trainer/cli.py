"""``switchml-train TASK``: train a task across workers through switchml (or DDP's allreduce)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from switchml import defaults
from switchml.extras import missing
from switchml.pipeline import parse_drop_probability
from switchml.protocol import K_TO_SIZE
from trainer.config import TrainConfig
from trainer.tasks import available_tasks, get_task

log = logging.getLogger("switchml.train")

#: What the [train] extra installs, as top-level modules (switchml.extras).
TRAIN_MODULES = ("torchvision", "PIL", "sklearn", "tqdm", "matplotlib")

EXAMPLES = """examples:
  switchml-train digits --workers 4                      # software switch on loopback, 4 ranks
  switchml-train digits --workers 4 --comm allreduce     # the same with DDP's Gloo allreduce
  switchml-train digits --controller tcp://10.0.0.1:48865 --launcher torchrun   # under torchrun
  switchml-train digits --launcher ray --workers 2       # Ray Train on a local cluster
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value



def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every task takes."""
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=_positive, default=2, help="ranks (local and ray launchers; under torchrun, torchrun's world size)")
    run.add_argument("--launcher", choices=["local", "torchrun", "ray"], default="local",
                     help="local: spawn the switch and the ranks here; torchrun: this process is one rank "
                          "started by torchrun; ray: a Ray Train TorchTrainer")
    run.add_argument("--steps", type=_positive, default=None, help="optimiser steps per stage (default: the task's)")
    run.add_argument("--epochs", type=_positive, default=None, help="epochs per stage, instead of --steps")
    run.add_argument("--batch-size", type=_positive, default=None, help="per-rank batch size (default: the task's)")
    run.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's)")
    run.add_argument("--accumulate", type=_positive, default=1,
                     help="micro-batches per step; all but the last run under DDP's no_sync()")
    run.add_argument("--seed", type=int, default=0, help="seed of model initialisation and data order")
    run.add_argument("--out", default=None, help="output folder (default: runs/TASK)")
    run.add_argument("--resume", action="store_true", help="continue each stage from its last checkpoint in --out")
    run.add_argument("--log-every", type=_positive, default=10, help="steps between metric lines")
    run.add_argument("--checkpoint-every", type=_positive, default=50, help="steps between checkpoints")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where ranks compute")
    run.add_argument("--threads", type=_positive, default=1, help="torch threads per rank")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--find-unused-parameters", action="store_true", help="DDP's find_unused_parameters")
    run.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's gradient bucket size")

    comm = p.add_argument_group("communication")
    comm.add_argument("--comm", choices=["switchml", "allreduce"], default="switchml",
                      help="average gradients through switchml, or with the process group's allreduce")
    comm.add_argument("--controller", default=None,
                      help="controller of a running switch (default: start the software switch)")
    comm.add_argument("--job", default="train", help="switchml job name prefix")
    comm.add_argument("-k", "--elements-per-packet", dest="k", type=int, choices=sorted(K_TO_SIZE), default=None,
                      help=f"elements per packet (default: the controller's, {defaults.K} for the software switch)")
    comm.add_argument("--switch-timeout", type=float, default=defaults.PROGRESS_TIMEOUT_S,
                      help="seconds without progress before an allreduce through the switch fails")
    comm.add_argument("--no-fallback", action="store_true",
                      help="fail instead of falling back to the process group's allreduce when the switch fails")
    comm.add_argument("--retry-after-steps", type=_positive, default=None,
                      help="after a fallback, try the switch again after this many steps")
    comm.add_argument("--drop-probability", type=parse_drop_probability, default=0.0,
                      help="emulated loss in the software switch this launcher starts (0.01 = 1%%)")
    comm.add_argument("--secret-file", metavar="FILE", default=None,
                      help="the cluster secret of the control channel (CurveZMQ), handed to every rank and to the "
                      f"switch this launcher starts (default: ${defaults.SECRET_ENV} or ${defaults.SECRET_FILE_ENV}; "
                      "local and ray launchers make a fresh one for the switch they start)")

    ray = p.add_argument_group("ray")
    ray.add_argument("--ray-address", default=None, help="address of a running Ray cluster (default: a local one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchml-train", description="Train a task across workers, averaging gradients through switchml.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name in available_tasks():
        try:
            task = get_task(name)
        except ImportError as exc:  # a task whose optional dependency is missing
            log.debug("task %s unavailable: %s", name, exc)
            continue
        p = sub.add_parser(name, help=task.help, description=task.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_common_arguments(p)
        task.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if error := missing("train", "switchml-train", *TRAIN_MODULES):
        print(error, file=sys.stderr)
        return 1
    config = TrainConfig.from_namespace(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from trainer.launch import LAUNCHERS

    ran, results = LAUNCHERS[config.launcher](config)
    if results:
        print(json.dumps({"task": ran.task, "comm": ran.comm, "workers": ran.workers, "results": results},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
