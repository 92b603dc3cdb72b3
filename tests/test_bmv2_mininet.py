"""switchml on BMv2, end to end, deployed as a user would (docs/deploy.md).

A Mininet star whose switch host runs ``simple_switch_grpc`` (BMv2) on its links, four
worker hosts and a controller host; ``switchml-switch deploy --target bmv2 --compile``
compiles ``p4/switchml_v1model.p4``, pushes it over P4Runtime and runs the controller.
Then workers on the hosts sum arrays through BMv2 (exact for int32, within the
quantization bound for float32, and bit-identical with the P4 loss table dropping 1% of
the packets on every port), and ``switchml-train digits`` trains through it with one
torchrun node per host.

Needs root, Mininet, ethtool, and p4c-bm2-ss and simple_switch_grpc on PATH (``.ci/run``
adds /opt/p4/bin where it exists); skipped, with the reason, otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from host_allreduce import run_on_hosts
from mpworkers import assert_within_quantization_bound, expected_sum

from emulation.mininet import CONTROLLER_HOST_IP, StarNetwork, bmv2_problem, worker_ip
from emulation.spawn import child_env
from switchml.deploy import P4_K, compile_bmv2

REPO = Path(__file__).resolve().parent.parent
N = 4
SIZES, DTYPES = (3000, 5000), ("int32", "float32")

pytestmark = [
    pytest.mark.mininet, pytest.mark.bmv2, pytest.mark.slow,
    pytest.mark.skipif(bmv2_problem() is not None, reason=f"BMv2 star unavailable: {bmv2_problem()}"),
]


@pytest.fixture(scope="module")
def star():
    with StarNetwork(N, bw_mbit=None, switch="bmv2") as net:
        yield net


def _env() -> dict[str, str]:
    return child_env({"OMP_NUM_THREADS": "1"})


def _allreduce_on_hosts(star: StarNetwork, endpoint: str, job: str, workdir: Path, seed: int) -> list[dict]:
    return run_on_hosts(star, endpoint, job, workdir, seed, SIZES, DTYPES)


def test_workers_on_hosts_get_exact_sums_through_bmv2_and_the_same_bits_under_loss(star, tmp_path):
    endpoint = star.deploy_bmv2(tmp_path / "lossless", window=8)  # --compile: p4c-bm2-ss inside deploy
    assert endpoint == f"tcp://{CONTROLLER_HOST_IP}:48865"
    clean = _allreduce_on_hosts(star, endpoint, "exact", tmp_path, seed=11)
    assert all(int(r["k"]) == P4_K for r in clean)
    exact = expected_sum(N, SIZES[0], 11, "int32")
    for r in clean:
        assert np.array_equal(r["r0"].astype(np.int64), exact)  # int32: exact
        assert_within_quantization_bound(r["r1"], N, SIZES[1], 12, P4_K)
        assert r["r1"].tobytes() == clean[0]["r1"].tobytes()  # every rank the same bits

    # the P4 loss table drops 1% of the packets arriving on every port: retransmission and the
    # shadow copies recover every loss, and quantization makes no difference between the runs
    config = compile_bmv2(tmp_path / "p4")
    endpoint = star.deploy_bmv2(tmp_path / "lossy", window=8, drop_probability=0.01,
                                config=(str(config[0]), str(config[1])))
    lossy = _allreduce_on_hosts(star, endpoint, "lossy", tmp_path, seed=11)
    for r in lossy:
        assert r["r0"].tobytes() == clean[0]["r0"].tobytes()
        assert r["r1"].tobytes() == clean[0]["r1"].tobytes()
    assert sum(int(r["retransmissions"]) for r in lossy) > 0  # the loss table did drop packets


def test_switchml_train_digits_trains_through_bmv2_with_torchrun_on_every_host(star, tmp_path):
    endpoint = star.deploy_bmv2(tmp_path / "train", window=8)
    out = tmp_path / "run"
    procs = []
    for rank, host in enumerate(star.hosts):
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(N), "--node_rank", str(rank),
                "--nproc_per_node", "1", "--master_addr", worker_ip(0), "--master_port", "29400",
                "-m", "trainer.cli", "digits", "--launcher", "torchrun", "--controller", endpoint,
                "--steps", "8", "--out", str(out), "--no-progress", "--no-fallback"]
        env = {**_env(), "GLOO_SOCKET_IFNAME": star.worker_ifname(rank)}
        procs.append(star.popen(host, args, env=env, log_path=str(tmp_path / f"train-r{rank}.log"), cwd=str(REPO)))
    deadline = time.monotonic() + 600
    for rank, proc in enumerate(procs):
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, (tmp_path / f"train-r{rank}.log").read_text()[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())["digits"]
    assert final["steps"] == 8 and final["buckets_through_switch"] >= 8 and final["buckets_on_fallback"] == 0
    assert final["world_size"] == N
