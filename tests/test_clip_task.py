"""The CLIP task: its losses against a direct computation, in one process and across a real
two-process Gloo group, and a few optimiser steps of each method (single process; training
through the switch is the trainer's test)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.utils.data import default_collate
from trainer_cli import metric_lines, train

from switchml.net import free_port
from trainer.data.scenes import SceneConfig, SceneDataset, SceneGenerator
from trainer.tasks.base import StageContext, warmup_cosine
from trainer.tasks.clip import (
    ClipSpec,
    ClipStage,
    ClipTask,
    build_model,
    build_tokenizer,
    contrastive_loss,
    evaluate_clip_checkpoint,
    load_checkpoint,
    method_loss,
    parse_clip_args,
)

torch.set_num_threads(1)

#: A model small enough for a test: 32x32 images, one layer per tower.
TINY = ["--embed-dim", "32", "--image-size", "32", "--patch-size", "8", "--width", "32", "--layers", "1",
        "--heads", "2", "--context-length", "20"]


def reference_loss(img: np.ndarray, txt: np.ndarray, scale: float, extra: np.ndarray | None = None,
                   valid: np.ndarray | None = None) -> float:
    """The loss written out row by row (float64): what ``contrastive_loss`` must equal."""
    n = len(img)
    i2t, t2i = [], []
    for i in range(n):
        cands = [txt[j] for j in range(n)]
        if extra is not None:
            cands += [extra[j] for j in range(n) if valid is None or valid[j] or j != i]
        logits = np.array([scale * img[i] @ c for c in cands])
        i2t.append(-(logits[i] - np.log(np.exp(logits).sum())))
        logits = np.array([scale * txt[i] @ img[j] for j in range(n)])
        t2i.append(-(logits[i] - np.log(np.exp(logits).sum())))
    return (np.mean(i2t) + np.mean(t2i)) / 2


def _features(n: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
            for _ in range(3)]


def test_loss_matches_direct_computation():
    img, txt, neg = _features(7, 5, seed=1)
    valid = torch.tensor([True, False, True, True, False, True, True])
    scale = torch.tensor(3.5, dtype=torch.float64)
    cases = [((), {}, (None, None)), ((neg,), {}, (neg, None)), ((neg,), {"extra_valid": valid}, (neg, valid))]
    for args, kwargs, (ref_extra, ref_valid) in cases:
        got = float(contrastive_loss(img, txt, scale, *args, **kwargs))
        want = reference_loss(img.numpy(), txt.numpy(), 3.5, None if ref_extra is None else ref_extra.numpy(),
                              None if ref_valid is None else ref_valid.numpy())
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    # The negatives make the task harder; masking a true "negative" removes exactly its term.
    assert float(contrastive_loss(img, txt, scale, neg)) > float(contrastive_loss(img, txt, scale))


# --------------------------------------------------------------------------- two processes



def _tiny_batch(indices: range, image_size: int = 32) -> dict[str, torch.Tensor]:
    spec = ClipStage(parse_clip_args(TINY)).spec
    ds = SceneDataset(SceneGenerator(SceneConfig(image_size=image_size), seed=3), "train", 64, build_tokenizer(spec))
    return default_collate([ds[i] for i in indices])


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank: feature-level losses (equal and unequal shares) and a DDP model step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        img, txt, neg = _features(8, 6, seed=2)
        valid = torch.arange(8) % 3 != 0
        scale = torch.tensor(4.0, dtype=torch.float64)
        for name, bounds in (("equal", (0, 4, 8)), ("unequal", (0, 3, 8))):
            lo, hi = bounds[rank], bounds[rank + 1]
            parts = [x[lo:hi].clone().requires_grad_(True) for x in (img, txt, neg)]
            loss = contrastive_loss(*parts[:2], scale, parts[2], extra_valid=valid[lo:hi])
            # Weight by this rank's share of the rows: then the gradients, summed over ranks
            # by the all_gather backward, are those of the loss on the whole batch.
            (loss * (hi - lo) / 8).backward()
            result[name] = (float(loss.detach()), hi - lo, [p.grad for p in parts])

        from torch.nn.parallel import DistributedDataParallel as DDP

        args = parse_clip_args([*TINY, "--method", "tripletclip"])
        torch.manual_seed(0)
        model = build_model(ClipStage(args).spec)
        ddp = DDP(model)
        loss, _ = method_loss("tripletclip", ddp, _tiny_batch(range(4 * rank, 4 * rank + 4)), torch.device("cpu"))
        loss.backward()  # DDP averages the gradients over the two ranks
        result["ddp"] = (float(loss.detach()), _grads(model))
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # Tear down in order: DDP's reducer before the group, and neither rank before the other is
        # done (a rank that left early once aborted its peer: "terminate called without an active
        # exception", SIGABRT in CI).
        del ddp, loss
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_equals_single_process_loss(tmp_path):
    tmp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    img, txt, neg = _features(8, 6, seed=2)
    valid = torch.arange(8) % 3 != 0
    full = [x.clone().requires_grad_(True) for x in (img, txt, neg)]
    want = contrastive_loss(*full[:2], torch.tensor(4.0, dtype=torch.float64), full[2], extra_valid=valid)
    want.backward()
    for name in ("equal", "unequal"):
        (l0, n0, g0), (l1, n1, g1) = ranks[0][name], ranks[1][name]
        assert (l0 * n0 + l1 * n1) / 8 == pytest.approx(float(want.detach()), rel=1e-12), name
        for k in range(3):
            assert torch.allclose(torch.cat([g0[k], g1[k]]), full[k].grad, atol=1e-12), (name, k)
        assert l0 != pytest.approx(l1)  # each rank's loss is its own rows', not a copy

    args = parse_clip_args([*TINY, "--method", "tripletclip"])
    torch.manual_seed(0)
    model = build_model(ClipStage(args).spec)
    loss, _ = method_loss("tripletclip", model, _tiny_batch(range(8)), torch.device("cpu"))
    loss.backward()
    (d0, dg), (d1, _) = ranks[0]["ddp"], ranks[1]["ddp"]
    assert (d0 + d1) / 2 == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(dg, _grads(model), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the stage


def _stage(tmp_path: Path, *extra: str) -> tuple[ClipStage, StageContext]:
    args = parse_clip_args([*TINY, "--train-scenes", "64", "--eval-scenes", "12", *extra])
    (stage,) = ClipTask().stages(args)
    return stage, StageContext(out_dir=tmp_path, rank=0, world_size=1, device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("method,mode", [("clip", "combined"), ("negclip", "combined"),
                                         ("tripletclip", "combined"), ("tripletclip", "alternate")])
def test_a_few_steps_lower_the_loss(tmp_path, method, mode):
    stage, ctx = _stage(tmp_path, "--method", method, "--triplet-mode", mode)
    torch.manual_seed(0)
    model = stage.build_model(ctx)
    ds = stage.train_dataset(ctx)
    batch = default_collate([ds[i] for i in range(24)])
    assert ("neg_text" in batch) == (method != "clip") and ("neg_image" in batch) == (method == "tripletclip")
    opt = stage.optimizer(model.parameters(), 2e-3)

    def probe() -> float:  # the same objective (step 0: the positive half when alternating)
        with torch.no_grad():
            return float(method_loss(method, model, batch, ctx.device, 0, mode)[0])

    before = probe()
    for _ in range(12):
        loss, metrics = stage.loss(model, batch, ctx)
        assert "loss" not in metrics  # the trainer logs the loss under that name itself
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe()
    assert after < before - 0.1, (before, after)


def test_evaluate_finish_and_reload(tmp_path):
    stage, ctx = _stage(tmp_path, "--method", "negclip")
    torch.manual_seed(1)
    model = stage.build_model(ctx)
    metrics = stage.evaluate(model, ctx)
    assert len(metrics) == 20 and all(0.0 <= v <= 1.0 for v in metrics.values())
    assert {"comp/test/avg", "comp/combo/avg", "retrieval/i2t_r1", "zeroshot/shape"} <= metrics.keys()
    stage.finish(model, ctx)
    assert (tmp_path / "clip_model.pt").is_file() and (tmp_path / "clip_spec.json").is_file()

    loaded, tok, spec = load_checkpoint(tmp_path / "clip_model.pt")
    assert spec.method == "negclip" and spec.tokenizer == "word"
    assert spec.distractors == stage.generator().config.distractors == 1  # the benchmark is the run's own
    assert ClipSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "distractors"}).distractors == 0
    # an evaluation on the first benchmark's scenes (no distractor) is another benchmark, and says so
    assert evaluate_clip_checkpoint(tmp_path / "clip_model.pt", eval_scenes=12, distractors=0)[0] != metrics
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    assert evaluate_clip_checkpoint(tmp_path / "clip_model.pt", eval_scenes=12)[0] == metrics

    # --pretrained: our checkpoint, and the trainer's own (<out>/clip.pt, {"model": ...}).
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "clip.pt")
    for path in (tmp_path / "clip_model.pt", tmp_path / "clip.pt"):
        again, _ = _stage(tmp_path, "--pretrained", str(path))
        torch.manual_seed(2)  # a different init, overwritten by the checkpoint
        m2 = again.build_model(ctx)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values(),
                                                     strict=True)), path


def test_methods_need_their_negatives(tmp_path):
    stage, ctx = _stage(tmp_path, "--method", "tripletclip")
    model = stage.build_model(ctx)
    batch = _tiny_batch(range(4))
    del batch["neg_image"]
    with pytest.raises(ValueError, match="negative images"):
        stage.loss(model, batch, ctx)


def test_switchml_eval_compares_runs(tmp_path):
    """``switchml-eval clip --ckpt RUN --compare RUN2 --report DIR``: metrics per run, table and chart."""
    for method in ("clip", "tripletclip"):
        run = tmp_path / method
        run.mkdir()
        stage, ctx = _stage(run, "--method", method)
        torch.manual_seed(0 if method == "clip" else 1)
        stage.finish(stage.build_model(ctx), ctx)
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    ClipTask.add_eval_arguments(parser)
    args = parser.parse_args(["--ckpt", str(tmp_path / "clip"), "--compare", str(tmp_path / "tripletclip"),
                              "--eval-scenes", "12", "--report", str(tmp_path / "report")])
    results = ClipTask().evaluate_checkpoint(args)
    assert list(results) == ["clip", "tripletclip"]
    assert results["clip"] != results["tripletclip"] and len(results["clip"]) == 20
    table = (tmp_path / "report" / "clip_methods.md").read_text()
    assert table.splitlines()[0] == "| metric | clip | tripletclip | chance |"
    assert (tmp_path / "report" / "clip_methods.png").stat().st_size > 1000
    single = ClipTask().evaluate_checkpoint(parser.parse_args(["--ckpt", str(tmp_path / "clip"),
                                                               "--eval-scenes", "12"]))
    assert single == results["clip"]
    with_train = ClipTask().evaluate_checkpoint(parser.parse_args(["--ckpt", str(tmp_path / "clip"),
                                                                   "--eval-scenes", "12", "--train-split"]))
    assert {k for k in with_train if k not in single} == {f"comp/train/{k}" for k in
                                                            ("swap-att", "swap-obj", "replace-obj", "replace-att",
                                                             "replace-rel", "add-att", "avg")}
    assert {k: with_train[k] for k in single} == single  # the held-out metrics do not move
    # runs named METHOD@SEED (--ckpt takes a name too): the report summarises each method over its seeds
    seeded = ClipTask().evaluate_checkpoint(parser.parse_args([
        "--ckpt", f"clip@0={tmp_path / 'clip'}", "--compare", f"clip@1={tmp_path / 'clip'}",
        "--compare", f"tripletclip@0={tmp_path / 'tripletclip'}", "--eval-scenes", "12",
        "--report", str(tmp_path / "seeded")]))
    assert list(seeded) == ["clip@0", "clip@1", "tripletclip@0"] and seeded["clip@1"] == results["clip"]
    assert (tmp_path / "seeded" / "clip_methods.md").read_text().startswith(
        "| metric | clip (n=2) | tripletclip (n=1) | tripletclip - clip |")
    with pytest.raises(FileNotFoundError):
        ClipTask().evaluate_checkpoint(parser.parse_args(["--ckpt", str(tmp_path / "nothing")]))


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])  # linear warm-up, then the peak
    assert lrs[5] == pytest.approx(0.2 * (1 + math.cos(math.pi / 6)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] < 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # zero after the last step
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="warmup_steps"):
            warmup_cosine(opt, total_steps=10, warmup_steps=bad)


def _train_clip(out: Path, steps: int, *extra: str) -> list[dict]:
    """``switchml-train clip`` (tiny, 2 workers through the switch); its metric lines, final line left out."""
    train("clip", *TINY, "--workers", "2", "--steps", str(steps), "--batch-size", "8", "--train-scenes", "64",
          "--eval-scenes", "8", "--log-every", "1", "--lr", "0.01", "--out", str(out), "--no-progress", *extra)
    return [m for m in metric_lines(out) if "final" not in m]


@pytest.mark.slow
def test_trainer_follows_and_resumes_the_lr_schedule(tmp_path):
    """The logged learning rate (the one each step used) is warm-up then cosine; --resume restores the schedule."""
    def want(step: int, total: int, warmup: int = 2) -> float:
        if step < warmup:
            return 0.01 * (step + 1) / warmup
        return 0.01 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    lines = _train_clip(tmp_path, 6, "--lr-schedule", "cosine", "--warmup-steps", "2")
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in lines] == pytest.approx([want(s, 6) for s in range(6)])
    # continued to 10 steps: the schedule resumes at step 6 of a 10-step run, not at its warm-up
    resumed = _train_clip(tmp_path, 10, "--lr-schedule", "cosine", "--warmup-steps", "2", "--resume")[len(lines):]
    assert [m["step"] for m in resumed] == [7, 8, 9, 10]
    assert [m["lr"] for m in resumed] == pytest.approx([want(s, 10) for s in range(6, 10)])
    constant = _train_clip(tmp_path / "constant", 3, "--lr-schedule", "constant")
    assert [m["lr"] for m in constant] == [0.01] * 3
