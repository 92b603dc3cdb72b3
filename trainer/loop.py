"""One rank's training: every launcher (local, torchrun, Ray) ends up in ``train_rank``.

Per stage of the task:
1. build the model (same seed on every rank; DDP broadcasts rank 0's weights anyway),
   wrap it in DDP, and with ``--comm switchml`` register the switchml hook;
2. shard the data with a DistributedSampler; on ``--resume`` load the stage's checkpoint;
3. train: loss, backward (gradients averaged by the hook or DDP's allreduce), step;
   with ``--accumulate A`` the first A-1 micro-batches run under ``no_sync()``;
4. rank 0 logs JSON lines to ``<out>/metrics.jsonl`` (with ``comm_wait``, see
   ``CommWaitClock``), shows a progress bar and writes ``<out>/<stage>.pt`` every
   ``--checkpoint-every`` steps and at the end;
5. close the hook (before the process group goes), evaluate on rank 0, call ``finish``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from switchml.extras import needs
from trainer.config import TrainConfig
from trainer.tasks import Stage, StageContext, get_task

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line to ``<out>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class CommWaitClock:
    """How long each step's backward stays blocked on gradient communication.

    DDP launches a bucket's allreduce (or the switchml hook) as soon as the bucket's last
    gradient is computed, overlapping communication with the rest of the backward pass,
    and ``backward()`` returns only once every bucket's reduction has completed and been
    copied back. So the time from the last gradient computed (a post-accumulate-grad hook
    on every parameter, whose last firing is when autograd produced the step's last
    gradient) to the return of ``backward()`` is the communication the step could not
    hide: the time it waits for the allreduce. It is the same measure for every backend
    (the switchml hook or DDP's own allreduce). Not in it: the communication that overlapped
    backward, and DDP's broadcast of buffers (BatchNorm statistics) at the start of forward.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self._last_grad: float | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._mark) for p in params if p.requires_grad]

    def _mark(self, param: torch.Tensor) -> None:
        self._last_grad = time.monotonic()

    def backward(self, loss: torch.Tensor) -> float:
        """``loss.backward()``; returns the seconds it waited after the last gradient (0 if none)."""
        self._last_grad = None
        loss.backward()
        end = time.monotonic()
        return max(0.0, end - self._last_grad) if self._last_grad is not None else 0.0

    def remove(self) -> None:
        """Remove the hooks from the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _device(args: TrainConfig, local_rank: int) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def _batches(loader: DataLoader, sampler: DistributedSampler, epoch: int):
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_stage(args: TrainConfig, stage: Stage, ctx: StageContext, metrics: MetricsLog) -> dict[str, float]:
    """Train one stage on this rank; returns rank 0's final metrics (empty elsewhere)."""
    torch.manual_seed(ctx.seed)
    model = stage.build_model(ctx).to(ctx.device)
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
              find_unused_parameters=args.find_unused_parameters, bucket_cap_mb=args.bucket_cap_mb)
    state = None
    if args.comm == "switchml":
        from switchml.hook import register

        state = register(ddp, controller=args.controller, job=f"{args.job}.{stage.name}",
                         fallback=not args.no_fallback, retry_after_steps=args.retry_after_steps,
                         timeout=args.switch_timeout, **({"k": args.k} if args.k else {}))
    lr = args.lr or stage.default_lr
    optimizer = stage.optimizer([p for p in ddp.parameters() if p.requires_grad], lr)
    dataset = stage.train_dataset(ctx)
    batch_size = args.batch_size or stage.default_batch_size
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=ctx.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = max(1, len(loader) // args.accumulate)
    total_steps = args.steps or (args.epochs * steps_per_epoch if args.epochs else stage.default_steps)
    scheduler = stage.lr_scheduler(optimizer, total_steps)

    ckpt_path = ctx.out_dir / f"{stage.name}.pt"
    step = 0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=ctx.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if scheduler is not None:
            # The schedule's position is the step; the optimiser's saved rate is the old run's,
            # so this run's schedule (its own total steps) sets the rate of the step it resumes at.
            scheduler.last_epoch = step - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()": expected here
                scheduler.step()
        log.info("rank %d: resumed stage %s at step %d", ctx.rank, stage.name, step)
    batches = _batches(loader, sampler, epoch=step * args.accumulate // max(1, len(loader)))

    progress = None
    if ctx.rank == 0 and step < total_steps and not args.no_progress:
        with needs("train", "switchml-train's progress bar"):
            from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True)
    clock = CommWaitClock(list(model.parameters()))
    comm_wait_total = 0.0
    ddp.train()
    start = time.monotonic()
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(args.accumulate):
            batch = next(batches)
            if micro < args.accumulate - 1:
                with ddp.no_sync():
                    loss, extra = stage.loss(ddp, batch, ctx)
                    (loss / args.accumulate).backward()
            else:
                loss, extra = stage.loss(ddp, batch, ctx)
                comm_wait = clock.backward(loss / args.accumulate)  # the micro-batch that communicates
        comm_wait_total += comm_wait
        step_lr = optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        if ctx.rank == 0:
            if step % args.log_every == 0 or step == total_steps:
                metrics.write(stage=stage.name, step=step, loss=loss.item(), time=time.monotonic() - start,
                              comm_wait=comm_wait,
                              comm=args.comm if state is None or state.using_switch else "fallback",
                              lr=step_lr, **extra)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.checkpoint_every == 0 or step == total_steps:
                _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                              "stage": stage.name}, ckpt_path)
    if progress is not None:
        progress.close()
    elapsed = time.monotonic() - start
    clock.remove()
    if state is not None:
        summary = {"buckets_through_switch": state.buckets_through_switch,
                   "buckets_on_fallback": state.buckets_on_fallback}
        state.close()  # before the process group is destroyed
    else:
        summary = {}
    result: dict[str, float] = {}
    if ctx.rank == 0:
        model.eval()
        result = {**stage.evaluate(model, ctx), **summary, "steps": step, "train_seconds": elapsed,
                  "comm_wait_seconds": comm_wait_total,
                  "batch_size": batch_size, "world_size": ctx.world_size}
        stage.finish(model, ctx)
        metrics.write(stage=stage.name, final=True, **result)
    dist.barrier()
    return result


def train_rank(args: TrainConfig, rank: int, world_size: int, local_rank: int = 0) -> dict[str, dict]:
    """Run every stage of ``args.task`` on this rank; the process group is set up if needed."""
    torch.set_num_threads(args.threads)
    own_group = not dist.is_initialized()
    device = _device(args, local_rank)
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out_dir / "metrics.jsonl", rank == 0)
    results = {}
    try:
        task = get_task(args.task)()
        for stage in task.stages(args):
            ctx = StageContext(out_dir, rank, world_size, device, args.seed)
            results[stage.name] = train_stage(args, stage, ctx, metrics)
    finally:
        if own_group:
            dist.destroy_process_group()
    if rank == 0:
        (out_dir / "final_metrics.json").write_text(json.dumps(results, indent=2))
    return results
