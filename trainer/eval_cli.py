"""``switchml-eval TASK --ckpt RUN``: evaluate a trained run and print its metrics as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from switchml.extras import missing
from trainer.cli import TRAIN_MODULES
from trainer.tasks import available_tasks, get_task

log = logging.getLogger("switchml.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchml-eval",
                                     description="Evaluate a run of switchml-train and print its metrics as JSON.")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name in available_tasks():
        try:
            task = get_task(name)
        except ImportError as exc:
            log.debug("task %s unavailable: %s", name, exc)
            continue
        p = sub.add_parser(name, help=task.help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--ckpt", required=True, help="the run's --out folder, or a checkpoint file")
        p.add_argument("--json", default=None, help="also write the metrics to this file")
        task.add_eval_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if error := missing("train", "switchml-eval", *TRAIN_MODULES):
        print(error, file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        metrics = get_task(args.task)().evaluate_checkpoint(args)
    except FileNotFoundError as exc:
        print(f"switchml-eval: no checkpoint: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(metrics, indent=2, default=float)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
