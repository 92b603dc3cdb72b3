"""A two-level tree with BMv2 leaves, end to end (issue 19, item 5; docs/hierarchy.md).

A Mininet tree of 2 racks x 2 workers whose leaf hosts run ``simple_switch_grpc`` with
``p4/switchml_v1model.p4`` built with ``-DSWITCHML_LEAF_ROLE``, each set up by ``switchml-switch
deploy --target bmv2 --leaf-role`` (the leaf build, forwarding from its port map), under a spine
host running the software switch and the tree's controller (``emulate --leaf
...,kind=bmv2,ports=...``), which programs each BMv2 leaf over P4Runtime. Workers on the hosts
sum arrays through it: the same bits as a flat sum (exact for int32, within the quantization
bound for float32), and the same bits again with the leaves' P4 loss tables dropping 1% of the
packets on every port and the spine 1% of what it receives.

Needs root, Mininet, ethtool, and p4c-bm2-ss and simple_switch_grpc on PATH (``.ci/run`` adds
/opt/p4/bin where it exists); skipped, with the reason, otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_allreduce import run_on_hosts
from mpworkers import assert_within_quantization_bound, expected_sum

from emulation.mininet import SWITCH_IP, TreeNetwork, bmv2_problem
from emulation.spawn import stop_process
from switchml import defaults
from switchml.deploy import P4_K, compile_bmv2
from switchml.pipeline import LEAF_COUNTER, LeafCounter

RACKS, PER_RACK = 2, 2
N = RACKS * PER_RACK
SIZES, DTYPES = (3000, 5000), ("int32", "float32")

pytestmark = [
    pytest.mark.mininet, pytest.mark.bmv2, pytest.mark.slow,
    pytest.mark.skipif(bmv2_problem() is not None, reason=f"BMv2 tree unavailable: {bmv2_problem()}"),
]


@pytest.fixture(scope="module")
def tree():
    with TreeNetwork(RACKS, PER_RACK, bw_mbit=None, leaf_switch="bmv2") as net:
        yield net


def _leaf_counter(tree: TreeNetwork, log_dir, rack: int) -> list[int]:
    """Leaf ``rack``'s leaf counter, read over P4Runtime from its Unix socket."""
    from switchml.p4info import with_leaf_role
    from switchml.p4runtime_target import P4RuntimeTarget

    target = P4RuntimeTarget(f"unix:{(log_dir / f'leaf{rack}.sock').resolve()}", p4info=with_leaf_role(),
                             election_id=5, timeout=10)
    try:
        return target.read_counter(LEAF_COUNTER)
    finally:
        target.close()


def test_ranks_under_bmv2_leaves_get_the_flat_sums_and_the_same_bits_under_loss(tree, tmp_path):
    config = tuple(map(str, compile_bmv2(tmp_path / "p4", leaf_role=True)))
    endpoint = f"tcp://{SWITCH_IP}:{defaults.CONTROL_PORT}"

    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    procs = tree.spawn_tree(clean_dir, leaf_config=config, window=8, extra=["--insecure"])
    clean = run_on_hosts(tree, endpoint, "exact", tmp_path, 11, SIZES, DTYPES)
    exact = expected_sum(N, SIZES[0], 11, "int32")
    for r in clean:
        assert int(r["k"]) == P4_K
        assert np.array_equal(r["r0"].astype(np.int64), exact)  # int32: exact, as a flat switch sums
        assert_within_quantization_bound(r["r1"], N, SIZES[1], 12, P4_K)
        assert r["r1"].tobytes() == clean[0]["r1"].tobytes()  # every rank the same bits
    for rack in range(RACKS):  # each BMv2 leaf sent its rack's sums up and multicast the spine's RESULTs
        counts = _leaf_counter(tree, clean_dir, rack)
        assert counts[LeafCounter.SENT_UPSTREAM] > 0 and counts[LeafCounter.RESULTS_FROM_UPSTREAM] > 0, counts
    for proc in procs:
        stop_process(proc, grace=5.0)

    lossy_dir = tmp_path / "lossy"
    lossy_dir.mkdir()
    tree.spawn_tree(lossy_dir, leaf_config=config, leaf_drop_probability=0.01, window=8,
                    drop_probability=0.01, extra=["--insecure"])
    lossy = run_on_hosts(tree, endpoint, "lossy", tmp_path, 11, SIZES, DTYPES)
    for r in lossy:  # the leaf-spine and worker-leaf losses change which packets are resent, never the sums
        assert r["r0"].tobytes() == clean[0]["r0"].tobytes()
        assert r["r1"].tobytes() == clean[0]["r1"].tobytes()
    assert sum(int(r["retransmissions"]) for r in lossy) > 0  # the loss tables did drop packets
