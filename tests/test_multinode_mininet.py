"""The torchrun recipe of docs/multinode.md, on Mininet hosts instead of machines.

A Mininet star with two worker hosts (the "machines", two ranks each) and its switch host,
which runs ``switchml-switch emulate`` on the switch's address; each worker host runs
``torchrun --nnodes 2 --node_rank i --nproc_per_node 2`` with the rendezvous on the first
host, ``--controller`` pointing at the switch host, ``GLOO_SOCKET_IFNAME`` naming the
host's interface and the cluster secret in ``SWITCHML_SECRET`` on every host (the controller
binds an address other hosts reach, so it runs authenticated), as the document types them. Every bucket must go through the
switch (no fallback), and the switch's own counters must show the four ranks' packets.

Needs root and Mininet; skipped, with the reason, otherwise.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulation.mininet import SWITCH_IP, StarNetwork, mininet_problem, worker_ip
from emulation.spawn import child_env, stop_process
from switchml import defaults

REPO = Path(__file__).resolve().parent.parent
NODES, RANKS_PER_NODE, STEPS = 2, 2, 6

pytestmark = [
    pytest.mark.mininet, pytest.mark.slow,
    pytest.mark.skipif(mininet_problem() is not None, reason=f"Mininet star unavailable: {mininet_problem()}"),
]


def torchrun_command(node_rank: int, controller: str, out: Path) -> list[str]:
    """docs/multinode.md's torchrun line for node ``node_rank`` (``python -m torch.distributed.run``
    is ``torchrun`` from this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--node_rank", str(node_rank),
            "--nproc_per_node", str(RANKS_PER_NODE), "--master_addr", worker_ip(0), "--master_port", "29400",
            "-m", "trainer.cli", "digits", "--launcher", "torchrun", "--controller", controller,
            "--steps", str(STEPS), "--out", str(out), "--no-progress", "--no-fallback"]


def test_two_nodes_of_two_ranks_train_through_a_switch_host(tmp_path):
    with StarNetwork(NODES, bw_mbit=None) as star:
        secret = {"SWITCHML_SECRET": secrets.token_hex(16)}
        switch = star.spawn_switch(tmp_path / "switch.log", env=secret, port=defaults.SWITCH_PORT,
                                   control_port=defaults.CONTROL_PORT)
        controller = f"tcp://{SWITCH_IP}:{defaults.CONTROL_PORT}"
        out = tmp_path / "run"
        nodes = [star.popen(host, torchrun_command(i, controller, out),
                            env=child_env({**secret, "GLOO_SOCKET_IFNAME": star.worker_ifname(i), "OMP_NUM_THREADS": "1"}),
                            log_path=str(tmp_path / f"node{i}.log"), cwd=str(REPO))
                 for i, host in enumerate(star.hosts)]
        deadline = time.monotonic() + 600
        for i, node in enumerate(nodes):
            try:
                code = node.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            assert code == 0, (tmp_path / f"node{i}.log").read_text(errors="replace")[-3000:]
        stats = star.hosts[0].popen([sys.executable, "-m", "emulation.cli", "stats", "--controller", controller],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(secret))
        report, err = stats.communicate(timeout=60)
        assert stats.returncode == 0, err.decode()
        stop_process(switch)

    final = json.loads((out / "final_metrics.json").read_text())["digits"]
    assert final["world_size"] == NODES * RANKS_PER_NODE
    assert final["steps"] == STEPS and final["buckets_through_switch"] >= STEPS
    assert final["buckets_on_fallback"] == 0
    counters = json.loads(report)["counters"]
    # every rank's packets reached the switch: a result needs all four contributions
    assert counters["results_multicast"] > 0 and counters["aggregated"] >= 4 * counters["results_multicast"]
