"""How the number of training scenes decides what hard negatives buy: a quick in-process probe.

One process, no switch and no process group (the objectives are those of the trainer's
:func:`trainer.tasks.clip.method_loss` at world size 1), global batch 256 as in the reference,
held-out compositional accuracy every 250 steps, one JSON line each; AdamW as the
trainer's, except that weight decay applies to every parameter (the trainer spares gains and biases). It is the cheap sweep that
chose the reference's ``TRAIN_SCENES`` (benchmarks/reference/clip.sh); the reference itself trains
through the switch with 4 workers.

    .venv/bin/python benchmarks/reference/clip_scenes_probe.py --method tripletclip --train-scenes 4000
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch.utils.data import DataLoader

from trainer.data.scenes import SceneConfig, SceneDataset, SceneGenerator, WordTokenizer
from trainer.eval.clip_metrics import build_benchmark, evaluate_scorer, model_scorer
from trainer.tasks.clip import ClipSpec, build_model, method_loss, small_model_cfg

log = logging.getLogger("clip_scenes_probe")


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Train as the options say; returns the evaluation rows it logs (one per ``--eval-every`` steps)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("clip", "negclip", "tripletclip"), default="clip",
                   help="tripletclip alternates its halves, as in the reference")
    p.add_argument("--train-scenes", type=int, default=20000, help="training scenes (the data set's size)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="the reference's global batch (4 workers x 64)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes per compositional category")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 to run two probes side by side)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.train_scenes < a.batch_size:
        raise ValueError(f"--train-scenes {a.train_scenes} is smaller than --batch-size {a.batch_size}: "
                         "no full batch to train on")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = WordTokenizer()
    model = build_model(ClipSpec(model_cfg=small_model_cfg(vocab_size=tok.vocab_size)))
    gen = SceneGenerator(SceneConfig(distractors=1), seed=0)
    data = SceneDataset(gen, "train", a.train_scenes, tok, negatives=a.method != "clip",
                        negative_images=a.method == "tripletclip")
    loader = DataLoader(data, batch_size=a.batch_size, shuffle=True, num_workers=1, drop_last=True,
                        persistent_workers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    bench = build_benchmark(gen, n_per_kind=a.eval_scenes, n_retrieval=min(a.eval_scenes, 200))
    rows: list[dict[str, float]] = []
    step, t0 = 0, time.time()
    while step < a.steps:
        for batch in loader:
            loss, _ = method_loss(a.method, model, batch, torch.device("cpu"), step, "alternate")
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % a.eval_every == 0 or step == a.steps:
                metrics = evaluate_scorer(model_scorer(model, tok), bench)
                row = {"step": step, "t": round(time.time() - t0), "loss": round(float(loss.detach()), 3),
                       **{k: round(v, 3) for k, v in metrics.items()
                          if k.startswith(("comp/test/", "comp/combo/avg", "zeroshot/"))}}
                log.info("%s", json.dumps(row))
                rows.append(row)
            if step >= a.steps:
                break
    return rows


if __name__ == "__main__":
    main()
