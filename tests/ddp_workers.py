"""DDP ranks for the hook tests: real processes, a real Gloo process group, real DDP."""

from __future__ import annotations

import os
import signal
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class OddNet(nn.Module):
    """Layers of odd sizes (so buckets are no multiple of k), and an optional unused head."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(37, 53)
        self.b = nn.Linear(53, 11)
        self.c = nn.Linear(11, 3)
        self.unused = nn.Linear(5, 7) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


#: The step in progress and when it began, for reports of a failed step (the fault tests bound it).
_STEP = {"step": -1, "started": 0.0}


def _batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank * 100_003 + step * 101 + micro)
    return torch.randn(16, 37, generator=g), torch.randn(16, 3, generator=g)


def train(rank: int, world_size: int, comm: str, options: dict) -> tuple[torch.Tensor, dict]:
    """Train OddNet a few SGD steps; returns the flat parameters and the hook's counters."""
    torch.manual_seed(0)
    model = OddNet(options.get("unused", False))
    # per-bucket caps apply from the first step (bucket_cap_mb alone starts with one big
    # bucket): 4 KB buckets give the small model several buckets of odd sizes
    ddp = DDP(model, bucket_cap_mb_list=[options.get("bucket_cap_mb", 0.004)],
              find_unused_parameters=options.get("unused", False))
    state = None
    if comm == "switchml":
        from switchml.hook import register

        extra = {key: options[key] for key in ("heartbeat_interval",) if key in options}
        state = register(ddp, controller=options["controller"], job=options.get("job", "hooktest"),
                         timeout=options.get("timeout", 30.0), k=options.get("k", 64),
                         retry_after_steps=options.get("retry_after_steps"), fallback=options.get("fallback", True),
                         control_timeout=options.get("control_timeout", 30.0), **extra)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    accumulate = options.get("accumulate", 1)
    max_step_s = 0.0
    for step in range(options.get("steps", 5)):
        _STEP.update(step=step, started=time.monotonic())
        optimizer.zero_grad()
        for micro in range(accumulate):
            x, y = _batch(rank, step, micro)
            if micro < accumulate - 1:
                with ddp.no_sync():
                    nn.functional.mse_loss(ddp(x), y).backward()
            else:
                nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
        max_step_s = max(max_step_s, time.monotonic() - _STEP["started"])
        if rank == 0 and options.get("kill_pid_at_step") == step:
            os.kill(options["kill_pid"], signal.SIGKILL)
        if rank == options.get("stop_rank") and options.get("stop_at_step") == step:
            os.kill(os.getpid(), signal.SIGSTOP)  # hang like a stuck rank: alive, silent
    stats = {}
    if state is not None:
        stats = {"through_switch": state.buckets_through_switch, "on_fallback": state.buckets_on_fallback,
                 "using_switch": state.using_switch, "max_step_s": max_step_s}
        state.close()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return flat, stats


def ddp_rank(queue, rank: int, world_size: int, port: int, runs: list[tuple[str, dict]]) -> None:
    """Run each (comm, options) of ``runs`` in turn on one process group; report all results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results = [train(rank, world_size, comm, options) for comm, options in runs]
        dist.destroy_process_group()
        queue.put((rank, [(p.numpy(), s) for p, s in results]))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        into = time.monotonic() - _STEP["started"]
        queue.put((rank, f"{type(exc).__name__}: {exc}\n[failed {into:.3f} s into step {_STEP['step']}]\n"
                         f"{traceback.format_exc()}"))
