"""The DDP communication hook: parity with DDP's allreduce, loss, odd buckets, fallback."""

from __future__ import annotations

import numpy as np
import pytest
from ddp_workers import ddp_rank
from mpworkers import run_processes

from emulation.spawn import spawn_switch, stop_process
from switchml.net import free_port

# Quantization error of a mean gradient is < 2^-28 of its block's largest element here;
# over a few SGD steps of lr 0.05 the parameters stay far inside this tolerance, while a
# missing division by the world size or a lost bucket moves them by far more.
ATOL = 1e-5


def run_ddp(n: int, runs: list[tuple[str, dict]], timeout: float = 180) -> list[list[tuple[np.ndarray, dict]]]:
    port = free_port()
    reports = run_processes(ddp_rank, lambda r: (r, n, port, runs), n, timeout)
    errors = [r[1] for r in reports if isinstance(r[1], str)]
    assert not errors, errors[0]
    return [r[1] for r in reports]


def assert_same_on_every_rank(per_rank, run: int) -> None:
    for rank in range(1, len(per_rank)):
        assert np.array_equal(per_rank[rank][run][0], per_rank[0][run][0]), f"rank {rank} differs"


@pytest.mark.parametrize("n", [2, 4])
def test_parity_with_ddp_allreduce_and_identical_ranks(make_switch, n):
    env = make_switch(window=16, k=64)
    options = {"controller": env.endpoint, "steps": 6}
    per_rank = run_ddp(n, [("allreduce", options), ("switchml", options)])
    reference, through_switch = per_rank[0][0][0], per_rank[0][1][0]
    assert_same_on_every_rank(per_rank, 1)
    np.testing.assert_allclose(through_switch, reference, rtol=0, atol=ATOL)
    assert not np.array_equal(reference, run_ddp_initial_params()), "training did not move the parameters"
    stats = per_rank[0][1][1]
    assert stats["through_switch"] >= 6 and stats["on_fallback"] == 0
    assert reference.size % 64 != 0  # buckets end mid-packet


def run_ddp_initial_params() -> np.ndarray:
    import torch
    from ddp_workers import OddNet

    torch.manual_seed(0)
    return torch.cat([p.detach().flatten() for p in OddNet().parameters()]).numpy()


def test_one_percent_loss_gives_the_same_parameters(make_switch):
    clean = make_switch(window=8, k=64)
    lossy = make_switch(window=8, k=64, drop_probability=0.01, seed=5)
    per_rank = run_ddp(2, [("switchml", {"controller": clean.endpoint, "steps": 6, "job": "clean"}),
                           ("switchml", {"controller": lossy.endpoint, "steps": 6, "job": "lossy"})])
    assert np.array_equal(per_rank[0][0][0], per_rank[0][1][0])
    assert_same_on_every_rank(per_rank, 1)
    assert lossy.switch.drops()["emulated_loss"] > 0


def test_unused_parameters_and_no_sync_accumulation(make_switch):
    env = make_switch(window=8, k=64)
    options = {"controller": env.endpoint, "steps": 4, "unused": True, "accumulate": 3, "bucket_cap_mb": 25}
    per_rank = run_ddp(2, [("allreduce", options), ("switchml", options)])
    assert_same_on_every_rank(per_rank, 1)
    np.testing.assert_allclose(per_rank[0][1][0], per_rank[0][0][0], rtol=0, atol=ATOL)
    # one bucket per step: the no_sync micro-batches never reach the hook
    assert per_rank[0][1][1]["through_switch"] == 4


def test_switch_killed_during_training_falls_back_on_every_rank():
    port, control = free_port(), free_port()
    switch = spawn_switch("127.0.0.1", port, control, k=64)
    try:
        options = {"controller": f"tcp://127.0.0.1:{control}", "steps": 8, "timeout": 2.0,
                   "kill_pid": switch.pid, "kill_pid_at_step": 2}
        per_rank = run_ddp(2, [("allreduce", {"steps": 8}), ("switchml", options)])
    finally:
        stop_process(switch)
    assert_same_on_every_rank(per_rank, 1)
    np.testing.assert_allclose(per_rank[0][1][0], per_rank[0][0][0], rtol=0, atol=ATOL)
    for rank in range(2):
        stats = per_rank[rank][1][1]
        assert stats["on_fallback"] > 0 and stats["through_switch"] > 0 and not stats["using_switch"]


def test_unreachable_controller_falls_back_from_the_start():
    options = {"controller": f"tcp://127.0.0.1:{free_port()}", "steps": 3, "control_timeout": 2.0}
    import ddp_workers

    ddp_workers_options = dict(options)
    per_rank = run_ddp(2, [("allreduce", {"steps": 3}), ("switchml", ddp_workers_options)])
    del ddp_workers
    np.testing.assert_allclose(per_rank[0][1][0], per_rank[0][0][0], rtol=0, atol=ATOL)
    assert per_rank[0][1][1]["through_switch"] == 0 and not per_rank[0][1][1]["using_switch"]


def test_trainer_hook_is_the_librarys():
    """The hook lives in ``switchml.hook``; ``from trainer.hook import register`` keeps working."""
    import switchml.hook
    import trainer.hook

    assert trainer.hook.register is switchml.hook.register
    assert trainer.hook.SwitchMLState is switchml.hook.SwitchMLState
