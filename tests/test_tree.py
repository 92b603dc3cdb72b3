"""Two-level aggregation (docs/hierarchy.md): leaf switches under a spine.

Packet by packet, the leaf role (``emulation.dataplane``, steps 1-6) on both data planes,
against a spine and a flat switch driven by hand, and the native leaf against the Python one on
random packet streams (identical replies and counters); then whole jobs of real ``Worker``
processes over UDP on loopback through ``emulation.tree.SoftwareTreeRunner`` (two leaves and a
spine, the controller programming all three in-process or over P4Runtime), lossless and with loss
on the leaves' and the spine's ports, and a leaf in its own process; and the refusals: a
P4Runtime target with the P4 programs' P4Info has no leaf role.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mpworkers import allreduce_job, expected_sum

from emulation import native as switch_native
from emulation.runner import SoftwareSwitchRunner
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from emulation.tree import SoftwareTreeRunner, racks_of_sizes
from switchml import ControllerError, protocol
from switchml.controller import Controller, ControllerOptions
from switchml.errors import LeafRoleUnsupported
from switchml.pipeline import (
    DROPS_COUNTER,
    LEAF_COUNTER,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    LeafCounter,
    Replica,
    UpstreamEntry,
    WorkerEntry,
)
from switchml.protocol import MsgType
from switchml.tree import JobSlots, Leaf, Tree, tree_plan

K = 64
JOB, BASE, POOL, MGID = 5, 10, 4, 6
SPINE = ("127.0.0.1", 6000)
LEAF = [("127.0.0.1", 6001), ("127.0.0.1", 6002)]
SPINE_PORT = 99  # the leaf's port towards the spine
MAC = "00:00:00:00:00:00"


def worker_addr(rank: int) -> tuple[str, int]:
    return ("127.0.0.1", 7000 + rank)


def update(slot: int, set_bit: int, values, e0: int = 0, tsi: int = 1) -> bytes:
    return protocol.encode_packet(MsgType.UPDATE, JOB, tsi, slot, set_bit, e0, np.asarray(values, np.int32))


def vec(x: int) -> np.ndarray:
    return np.full(K, x, np.int32)


def program(sw: SoftwareSwitch, members: list[tuple[str, int]], upstream: bool) -> SoftwareSwitch:
    """``members`` as workers 0..n-1 of JOB, and (a leaf) the upstream entry towards SPINE."""
    sw.set_multicast_group(MGID, [Replica(10 + i, i, MAC, *a) for i, a in enumerate(members)])
    for i, a in enumerate(members):
        sw.add_admission(*a, WorkerEntry(*a, JOB, i, len(members), MGID, BASE, POOL))
    if upstream:
        sw.add_upstream(UpstreamEntry(JOB, *SPINE, SPINE_PORT, MGID, BASE, POOL))
    return sw


def leaf(ranks: list[int], dataplane: str = "python") -> SoftwareSwitch:
    return program(SoftwareSwitch(pool_size=32, dataplane=dataplane), [worker_addr(r) for r in ranks], upstream=True)


def counter(sw: SoftwareSwitch, which: LeafCounter) -> int:
    return sw.read_counter(LEAF_COUNTER)[which]


def drops(sw: SoftwareSwitch, reason: DropReason) -> int:
    return sw.drops()[reason.name.lower()]


# ------------------------------------------------------------------ packet by packet


def test_a_completed_rack_goes_upstream_once_and_the_spines_result_is_multicast_to_the_rack(dataplane):
    lf = leaf([0, 1], dataplane)
    assert lf.process(update(BASE, 0, vec(1), e0=-3, tsi=8), worker_addr(0)) == []
    out = lf.process(update(BASE, 0, vec(2), e0=4, tsi=8), worker_addr(1))
    assert [dst for _, dst in out] == [SPINE]  # steps 1-2: nothing to the rack yet
    up = protocol.decode_packet(out[0][0])
    assert (up.msg_type, up.job_number, up.tsi, up.slot, up.set_bit, up.e0) == (MsgType.UPDATE, JOB, 8, BASE, 0, 4)
    assert np.all(up.payload == 3)  # the rack's sum, its max exponent
    assert counter(lf, LeafCounter.SENT_UPSTREAM) == 1 and sum(lf.read_counter(RESULTS_COUNTER)) == 0

    result = protocol.encode_packet(MsgType.RESULT, JOB, 8, BASE, 0, 6, vec(10))
    out = lf.process(result, SPINE)  # step 6
    assert sorted(dst for _, dst in out) == [worker_addr(0), worker_addr(1)]
    assert all(data == result for data, _ in out)  # the spine's packet, unchanged
    assert counter(lf, LeafCounter.RESULTS_FROM_UPSTREAM) == 1 and lf.read_counter(RESULTS_COUNTER)[BASE] == 1
    assert lf.slot_state(0, BASE).exp == 6 and np.all(lf.slot_state(0, BASE).values[:K] == 10)


def test_a_retransmission_before_the_spines_result_resends_upstream_and_after_it_is_answered_from_it(dataplane):
    lf = leaf([0, 1], dataplane)
    lf.process(update(BASE, 1, vec(1), e0=2, tsi=3), worker_addr(0))
    first = lf.process(update(BASE, 1, vec(2), e0=1, tsi=3), worker_addr(1))
    # step 5: the leaf's UPDATE (or the spine's RESULT) was lost; a worker's resend is the leaf's timer
    again = lf.process(update(BASE, 1, vec(2), e0=1, tsi=3), worker_addr(1))
    assert again == first and counter(lf, LeafCounter.RESENT_UPSTREAM) == 1
    lf.process(protocol.encode_packet(MsgType.RESULT, JOB, 3, BASE, 1, 5, vec(40)), SPINE)
    # step 4: answered from the spine's RESULT, to the one worker, with its own tsi
    out = lf.process(update(BASE, 1, vec(1), e0=2, tsi=3), worker_addr(0))
    assert [dst for _, dst in out] == [worker_addr(0)]
    pkt = protocol.decode_packet(out[0][0])
    assert pkt.msg_type == MsgType.RESULT and pkt.e0 == 5 and np.all(pkt.payload == 40)
    assert lf.read_counter(RETRANSMISSIONS_COUNTER)[BASE] == 1
    # a duplicate RESULT (the spine answering a second resend) changes nothing and reaches nobody
    assert lf.process(protocol.encode_packet(MsgType.RESULT, JOB, 3, BASE, 1, 0, vec(-1)), SPINE) == []
    assert counter(lf, LeafCounter.IGNORED_FROM_UPSTREAM) == 1 and np.all(lf.slot_state(1, BASE).values[:K] == 40)


def test_the_leaf_takes_only_its_spines_results_for_a_waiting_set_of_its_range(dataplane):
    lf = leaf([0, 1], dataplane)
    result = protocol.encode_packet(MsgType.RESULT, JOB, 0, BASE, 0, 0, vec(9))
    assert lf.process(result, ("127.0.0.1", 6999)) == []  # not the upstream address
    assert drops(lf, DropReason.BAD_MSG_TYPE) == 1
    other_job = protocol.encode_packet(MsgType.RESULT, JOB + 1, 0, BASE, 0, 0, vec(9))
    assert lf.process(other_job, SPINE) == [] and drops(lf, DropReason.BAD_MSG_TYPE) == 2
    outside = protocol.encode_packet(MsgType.RESULT, JOB, 0, BASE + POOL, 0, 0, vec(9))
    assert lf.process(outside, SPINE) == [] and drops(lf, DropReason.SLOT_OUT_OF_RANGE) == 1
    assert lf.process(result, SPINE) == []  # nothing waits in the set: the rack is incomplete
    assert counter(lf, LeafCounter.IGNORED_FROM_UPSTREAM) == 1
    lf.process(update(BASE, 0, vec(1)), worker_addr(0))
    assert lf.process(result, SPINE) == [] and counter(lf, LeafCounter.IGNORED_FROM_UPSTREAM) == 2
    lf.process(update(BASE, 0, vec(1)), worker_addr(1))
    wrong_k = protocol.encode_packet(MsgType.RESULT, JOB, 0, BASE, 0, 0, np.zeros(2 * K, np.int32))
    assert lf.process(wrong_k, SPINE) == [] and drops(lf, DropReason.SIZE_MISMATCH) == 1
    for junk in (b"", b"\x10", b"\x10" * 9, result[:-1], b"\x1f" + result[1:]):  # hostile RESULTs: dropped, no crash
        assert lf.process(junk, SPINE) == []
    assert len(lf.process(result, SPINE)) == 2  # and the real one still works


def test_a_rack_of_one_goes_straight_upstream(dataplane):
    lf = leaf([0], dataplane)
    out = lf.process(update(BASE, 0, vec(7), e0=1), worker_addr(0))
    assert [dst for _, dst in out] == [SPINE] and np.all(protocol.decode_packet(out[0][0]).payload == 7)
    assert lf.process(update(BASE, 0, vec(7), e0=1), worker_addr(0)) == out  # its resend goes up again


def test_a_reset_clears_the_leafs_waiting_and_held_results(dataplane):
    lf = leaf([0], dataplane)
    lf.add_admission("127.0.0.9", 9000, None)
    lf.process(update(BASE, 0, vec(7)), worker_addr(0))
    lf.process(protocol.encode_packet(MsgType.RESULT, JOB, 1, BASE, 0, 0, vec(7)), SPINE)
    reset = protocol.encode_packet(MsgType.RESET, 0, 0, BASE, 0, 0, np.zeros(32, np.int32))
    assert len(lf.process(reset, ("127.0.0.9", 9000))) == 1
    assert lf.process(protocol.encode_packet(MsgType.RESULT, JOB, 1, BASE, 0, 0, vec(7)), SPINE) == []
    assert counter(lf, LeafCounter.IGNORED_FROM_UPSTREAM) == 1


class HandWiredTree:
    """Two leaves and a spine joined by hand: each packet a switch emits is handed to its
    destination switch, except those ``lose`` says are lost; what reaches a worker is kept."""

    def __init__(self, racks: list[list[int]], dataplane: str) -> None:
        self.leaves = [leaf(ranks, dataplane) for ranks in racks]
        self.spine = program(SoftwareSwitch(pool_size=32, dataplane=dataplane), LEAF[:len(racks)], upstream=False)
        self.switch_at = {SPINE: self.spine, **dict(zip(LEAF, self.leaves, strict=False))}
        self.rack_of = {r: i for i, ranks in enumerate(racks) for r in ranks}
        self.delivered: dict[tuple[str, int], list[bytes]] = {}

    def send(self, rank: int, packet: bytes, lose=lambda src, dst: False) -> None:
        queue = [(packet, worker_addr(rank), LEAF[self.rack_of[rank]])]
        while queue:
            data, src, dst = queue.pop(0)
            if lose(src, dst):
                continue
            if dst not in self.switch_at:
                self.delivered.setdefault(dst, []).append(data)
                continue
            queue += [(out, dst, to) for out, to in self.switch_at[dst].process(data, src)]


def test_every_loss_on_the_leaf_spine_link_is_recovered_by_worker_resends_with_the_flat_switchs_result(dataplane):
    flat = program(SoftwareSwitch(pool_size=32, dataplane="python"), [worker_addr(r) for r in range(3)], upstream=False)
    contributions = {0: (vec(5), -2), 1: (vec(-9), 7), 2: (np.arange(K, dtype=np.int32), 3)}
    flat_out = []
    for r, (values, e0) in contributions.items():
        flat_out += flat.process(update(BASE + 1, 0, values, e0, tsi=4), worker_addr(r))
    expected = {dst: data for data, dst in flat_out}

    tree = HandWiredTree([[0, 1], [2]], dataplane)
    lost_once = {(LEAF[0], SPINE), (SPINE, LEAF[1])}  # leaf 0's UPDATE and the spine's RESULT to leaf 1

    def lose(src, dst):
        if (src, dst) in lost_once:
            lost_once.discard((src, dst))
            return True
        return False

    for r, (values, e0) in contributions.items():
        tree.send(r, update(BASE + 1, 0, values, e0, tsi=4), lose)
    assert tree.delivered == {}  # the spine never completed: leaf 0's sum was lost
    tree.send(1, update(BASE + 1, 0, *contributions[1], tsi=4), lose)  # rank 1 times out: leaf 0 resends
    assert set(tree.delivered) == {worker_addr(0), worker_addr(1)}  # rack 1's RESULT was lost on the way down
    tree.send(2, update(BASE + 1, 0, *contributions[2], tsi=4), lose)  # rank 2 resends: the spine answers leaf 1
    for dst, packets in tree.delivered.items():
        assert packets == [expected[dst]], dst  # byte for byte the flat switch's RESULT, once each
    assert counter(tree.leaves[0], LeafCounter.RESENT_UPSTREAM) == 1
    assert counter(tree.leaves[1], LeafCounter.RESENT_UPSTREAM) == 1
    assert tree.spine.read_counter(RETRANSMISSIONS_COUNTER)[BASE + 1] == 1


# ------------------------------------------------------------------ native against the reference

STREAM_POOL = 32
FLAT = 9  # a job on the same switch that is no leaf job: its slots complete as on a flat switch
CTRL = ("127.0.0.9", 9000)


def stream_leaf(dataplane: str, seed: int, drop: float) -> SoftwareSwitch:
    """A leaf of JOB (racks of 3: ranks 0-2, slots BASE..BASE+POOL-1) that also runs flat job FLAT."""
    sw = SoftwareSwitch(pool_size=STREAM_POOL, sizes=(0, 1), drop_probability=drop, seed=seed, dataplane=dataplane)
    sw.add_admission(*CTRL, None)
    program(sw, [worker_addr(r) for r in range(3)], upstream=True)
    sw.set_multicast_group(FLAT + 1, [Replica(20 + i, i, MAC, "127.0.0.2", 8000 + i) for i in range(2)])
    for i in range(2):
        sw.add_admission("127.0.0.2", 8000 + i, WorkerEntry("127.0.0.2", 8000 + i, FLAT, i, 2, FLAT + 1, 0, 4))
    return sw


def leaf_stream(seed: int, length: int):
    """Yield ("packet", data, src) and ("table", method, args): rounds of the rack's workers (shuffled,
    some lost, some twice), worker resends, the spine's RESULTs (right, duplicated, late, from another
    address, of another k or job, outside the range), flat-job rounds, RESETs and upstream table changes."""
    rng = random.Random(seed)
    history: list[tuple[bytes, tuple[str, int]]] = []
    tsi = 0
    while length > 0:
        r = rng.random()
        slot, set_bit = BASE + rng.randrange(POOL), rng.randrange(2)
        k = K if rng.random() > 0.03 else 32
        if r < 0.40:  # a round of the rack
            tsi += 1
            order = [0, 1, 2]
            rng.shuffle(order)
            for w in order:
                if rng.random() < 0.1:
                    continue
                data = protocol.encode_packet(MsgType.UPDATE, JOB, tsi, slot, set_bit, rng.randrange(-128, 128),
                                              np.array([rng.randrange(-2**31, 2**31) for _ in range(k)], np.int64))
                for _ in range(2 if rng.random() < 0.1 else 1):
                    history.append((data, worker_addr(w)))
                    yield "packet", data, worker_addr(w)
                    length -= 1
        elif r < 0.55 and history:  # a worker's resend or a late duplicate
            yield "packet", *rng.choice(history[-100:])
            length -= 1
        elif r < 0.80:  # the spine's RESULT, and its impostors
            values = np.array([rng.randrange(-2**31, 2**31) for _ in range(k)], np.int64)
            choice = rng.randrange(6)
            job = JOB if choice != 1 else JOB + 1
            if choice == 2:
                slot = rng.choice([BASE - 1, BASE + POOL, STREAM_POOL + 3])
            data = protocol.encode_packet(MsgType.RESULT, job, tsi, slot, set_bit, rng.randrange(-128, 128), values)
            src = ("127.0.0.1", 6999) if choice == 3 else SPINE
            for _ in range(2 if choice == 4 else 1):
                yield "packet", data, src
                length -= 1
        elif r < 0.88:  # a round of the flat job
            fslot = rng.randrange(4)
            for w in (0, 1):
                data = protocol.encode_packet(MsgType.UPDATE, FLAT, tsi, fslot, set_bit, 0, np.full(K, w + 1, np.int64))
                yield "packet", data, ("127.0.0.2", 8000 + w)
                length -= 1
        elif r < 0.94:  # a RESET from the controller
            yield "packet", protocol.encode_packet(MsgType.RESET, 0, 0, slot, 0, 0, np.zeros(32, np.int64)), CTRL
            length -= 1
        else:  # the controller takes the upstream entry away and gives it back
            if rng.random() < 0.5:
                yield "table", "remove_upstream", (JOB,)
            yield "table", "add_upstream", (UpstreamEntry(JOB, *SPINE, SPINE_PORT, MGID, BASE, POOL),)
            yield "table", "set_drop_probability", (rng.choice([SPINE_PORT, None, 10]), rng.choice([0.0, 0.1]))


@pytest.mark.skipif(switch_native.why_missing() is not None, reason=f"native: {switch_native.why_missing()}")
@pytest.mark.parametrize("drop", [0.0, 0.1])
@pytest.mark.parametrize("seed", range(6))
def test_the_native_leaf_gives_the_references_replies_and_counters(seed, drop):
    ref, nat = stream_leaf("python", seed, drop), stream_leaf("native", seed, drop)
    for i, (kind, *step) in enumerate(leaf_stream(seed, 1200)):
        if kind == "table":
            getattr(ref, step[0])(*step[1])
            getattr(nat, step[0])(*step[1])
            continue
        assert nat.process(*step) == ref.process(*step), f"step {i}: {step[0][:10].hex()} from {step[1]}"
    for name in (LEAF_COUNTER, RESULTS_COUNTER, RETRANSMISSIONS_COUNTER, DROPS_COUNTER, PACKETS_COUNTER):
        assert nat.read_counter(name) == ref.read_counter(name), name
    for v in (0, 1):
        for slot in range(STREAM_POOL):
            a, b = ref.slot_state(v, slot), nat.slot_state(v, slot)
            assert a[:3] == b[:3] and np.array_equal(a.values[:a.k], b.values[:a.k]), (v, slot)
            assert a.has_result == b.has_result, (v, slot)
    leaf_counts = ref.read_counter(LEAF_COUNTER)
    assert all(c > 0 for c in leaf_counts), leaf_counts  # the stream reached every leaf step


# ------------------------------------------------------------------ the controller's plan


def test_the_plan_numbers_workers_per_level_and_sends_each_rank_to_its_leaf():
    spine_target = InProcessTarget(SoftwareSwitch(pool_size=32, dataplane="python"))
    leaves = [InProcessTarget(SoftwareSwitch(pool_size=32, dataplane="python")) for _ in LEAF]
    tree = Tree([Leaf(t, a) for t, a in zip(leaves, LEAF, strict=True)], racks_of_sizes([1, 2]))
    ports = {}
    plan = tree_plan(tree, spine_target, SPINE, JobSlots(JOB, MGID, BASE, POOL),
                     {r: worker_addr(r) for r in range(3)}, lambda a: ports.setdefault(a, len(ports) + 1),
                     lambda a: MAC)
    spine_program, leaf0, leaf1 = plan.programs
    assert spine_program.role == "spine" and spine_program.upstream is None
    assert [(e.ip, e.udp_port, e.worker_id, e.num_workers) for e in spine_program.workers] == [
        (*LEAF[0], 0, 2), (*LEAF[1], 1, 2)]
    assert [(e.udp_port, e.worker_id, e.num_workers) for e in leaf0.workers] == [(7000, 0, 1)]
    assert [(e.udp_port, e.worker_id, e.num_workers) for e in leaf1.workers] == [(7001, 0, 2), (7002, 1, 2)]
    for p, leaf in zip((leaf0, leaf1), LEAF, strict=True):  # a P4 leaf sends from the address the spine admits
        assert p.upstream == UpstreamEntry(JOB, *SPINE, ports[SPINE], MGID, BASE, POOL, MAC, *leaf)
    assert plan.switch_of == {0: LEAF[0], 1: LEAF[1], 2: LEAF[1]}


def test_the_plan_places_ranks_by_host_and_admits_each_leaf_at_the_spine_by_its_uplink():
    """Addresses here are only table keys: no packet is sent."""
    targets = [InProcessTarget(SoftwareSwitch(pool_size=32, dataplane="python")) for _ in range(3)]
    tree = Tree([Leaf(targets[1], ("10.0.1.1", 48864), hosts={"10.0.1.2", "10.0.1.3"}, uplink=("10.9.0.1", 48864)),
                 Leaf(targets[2], ("10.0.2.1", 48864), hosts={"10.0.2.2"})])
    addresses = {0: ("10.0.2.2", 5000), 1: ("10.0.1.3", 5000), 2: ("10.0.1.2", 5001)}
    plan = tree_plan(tree, targets[0], ("10.9.0.100", 48864), JobSlots(JOB, MGID, BASE, POOL), addresses,
                     lambda a: 1, lambda a: MAC)
    assert [(e.ip, e.worker_id) for e in plan.programs[0].workers] == [("10.9.0.1", 0), ("10.0.2.1", 1)]
    assert [r.ip for r in plan.programs[0].replicas] == ["10.9.0.1", "10.0.2.1"]
    assert [(e.ip, e.udp_port, e.worker_id) for e in plan.programs[1].workers] == [("10.0.1.3", 5000, 0),
                                                                                  ("10.0.1.2", 5001, 1)]
    assert plan.switch_of == {0: ("10.0.2.1", 48864), 1: ("10.0.1.1", 48864), 2: ("10.0.1.1", 48864)}
    # each leaf's upstream packets leave from the address the spine admits it by (a P4 leaf writes it in)
    assert [(p.upstream.src_ip, p.upstream.src_udp_port) for p in plan.programs[1:]] == [("10.9.0.1", 48864),
                                                                                         ("10.0.2.1", 48864)]
    with pytest.raises(ValueError, match=r"rank 3 at 10\.0\.3\.2:5000 is in no leaf's hosts"):
        tree_plan(tree, targets[0], ("10.9.0.100", 48864), JobSlots(JOB, MGID, BASE, POOL),
                  {**addresses, 3: ("10.0.3.2", 5000)}, lambda a: 1, lambda a: MAC)
    with pytest.raises(ValueError, match="leaf uplink addresses"):
        Tree([Leaf(targets[1], ("10.0.1.1", 1), uplink=("10.9.0.1", 1)), Leaf(targets[2], ("10.9.0.1", 1))])


# ------------------------------------------------------------------ whole jobs over UDP


def tree_runner(racks: list[int], **kw) -> SoftwareTreeRunner:
    return SoftwareTreeRunner(len(racks), racks_of_sizes(racks), "127.0.0.1", pool_size=64, window=8, k=K, **kw)


def assert_released(runner: SoftwareTreeRunner) -> None:
    """Every job's entries are gone from every switch of the tree; the controller's stay."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        switches = [runner.spine, *runner.leaves]
        if all(list(s.admission_entries().values()) == [None] and not s.multicast_groups() and not
               s.upstream_entries() for s in switches):
            return
        time.sleep(0.05)
    raise AssertionError("the tree's entries were not deleted when the job ended")


@pytest.mark.parametrize("racks", [[2, 2], [2, 1], [1, 1]])
def test_int32_sums_are_exact_across_racks(racks):
    n, size = sum(racks), 3_000
    with tree_runner(racks) as runner:
        results = allreduce_job(runner.endpoint, f"ints{racks}", n, [size, 1], seed=4, dtype="int32")
        for rank in range(n):
            assert np.array_equal(results[rank][0], expected_sum(n, size, 4, "int32"))
            assert np.array_equal(results[rank][1], expected_sum(n, 1, 5, "int32"))  # the i-th size: seed + i
        for i, lf in enumerate(runner.leaves):
            assert counter(lf, LeafCounter.SENT_UPSTREAM) > 0, f"leaf {i} sent nothing upstream"
        assert_released(runner)


def test_float32_is_bit_identical_to_a_flat_switch_run_of_the_same_data():
    """Exact here, not only within the quantization bound: a tree's RESULT is the flat switch's
    (wrapping int32 sums and max exponents do not depend on the order they are taken in), and every
    rank quantizes with the job's world size, as in a flat job."""
    sizes, n = [10_000, 64 * 3 + 5], 4
    flat = SoftwareSwitchRunner("127.0.0.1", 0, 0, 64, window=8, k=K)
    try:
        expected = allreduce_job(flat.endpoint, "flat", n, sizes, seed=6)
    finally:
        flat.stop()
    with tree_runner([2, 2]) as runner:
        got = allreduce_job(runner.endpoint, "tree", n, sizes, seed=6)
    for rank in range(n):
        for a, b in zip(expected[rank], got[rank], strict=True):
            assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)


def test_loss_on_the_leaves_and_the_spine_is_recovered_bit_identical_to_lossless(dataplane):
    sizes, n, racks = [6_000, 64], 3, [2, 1]
    with tree_runner(racks, dataplane=dataplane) as clean:
        expected = allreduce_job(clean.endpoint, "clean", n, sizes, seed=9)
    with tree_runner(racks, dataplane=dataplane, leaf_drop_probability=0.05,
                     spine_drop_probability=0.05, seed=3) as lossy:
        got = allreduce_job(lossy.endpoint, "lossy", n, sizes, seed=9, worker_kwargs={"timeout": 60})
        for rank in range(n):
            for a, b in zip(expected[rank], got[rank], strict=True):
                assert np.array_equal(a, b)
        assert lossy.spine.drops()["emulated_loss"] > 0
        assert all(lf.drops()["emulated_loss"] > 0 for lf in lossy.leaves)
        # lost packets above a leaf were noticed through its workers' retransmissions
        assert sum(counter(lf, LeafCounter.RESENT_UPSTREAM) for lf in lossy.leaves) > 0


# ------------------------------------------------------------------ refusals


def test_a_p4runtime_target_refuses_a_tree_naming_the_missing_upstream_table():
    pytest.importorskip("grpc")
    from switchml.p4runtime_target import P4RuntimeTarget

    leaf_switch = SoftwareSwitchRunner("127.0.0.1", 0, 0, 32, p4runtime_port=0, with_controller=False,
                                       dataplane="python")
    target = None
    try:
        target = P4RuntimeTarget(leaf_switch.p4runtime.grpc_address, supported_k=(K,))
        spine = InProcessTarget(SoftwareSwitch(pool_size=32, dataplane="python"))
        tree = Tree([Leaf(target, leaf_switch.server.address)], racks_of_sizes([1]))
        with pytest.raises(LeafRoleUnsupported, match=r"tree leaf 0 .*has no table SwitchIngress\.upstream"):
            Controller(spine, ControllerOptions(bind="tcp://127.0.0.1:0", switch_address=SPINE, pool_size=32,
                                                window=4, k=K, tree=tree))
    finally:
        if target is not None:
            target.close()
        leaf_switch.stop()


def test_a_rank_in_no_rack_fails_the_job_with_the_rank_named():
    from switchml import Worker

    with SoftwareTreeRunner(1, lambda rank, address: 3, "127.0.0.1", pool_size=64, window=8, k=K) as runner:
        errors: list[str] = []

        def register(rank: int) -> None:
            try:
                Worker(runner.endpoint, "lost", rank, 2, timeout=10).close()
            except ControllerError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=register, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 2
        assert all("rack_of(rank 0, 127.0.0.1:" in e and "expected a leaf index 0..0" in e for e in errors), errors


# ------------------------------------------------------------------ over P4Runtime


def test_a_tree_programmed_over_p4runtime_sums_exactly_and_deletes_its_entries():
    pytest.importorskip("grpc")
    from switchml.p4runtime_target import P4RuntimeTarget

    n, racks = 3, [1, 2]
    with tree_runner(racks, p4runtime=True) as runner:
        assert all(isinstance(t, P4RuntimeTarget) for t in runner.targets)
        results = allreduce_job(runner.endpoint, "p4rt-tree", n, [2_000], seed=8, dtype="int32")
        for rank in range(n):
            assert np.array_equal(results[rank][0], expected_sum(n, 2_000, 8, "int32"))
        assert all(counter(lf, LeafCounter.SENT_UPSTREAM) > 0 for lf in runner.leaves)
        assert_released(runner)


def test_the_leaf_p4info_adds_the_upstream_table_and_keeps_every_id_of_the_contract():
    pytest.importorskip("google.protobuf")
    from switchml import pipeline
    from switchml.p4info import P4Info, has_leaf_role, with_leaf_role

    base, leafy = P4Info.default(), with_leaf_role()
    assert not has_leaf_role(base) and has_leaf_role(leafy)
    assert base.differences(leafy) == [f"table {pipeline.UPSTREAM_TABLE} is not in the served pipeline",
                                       f"action {pipeline.SET_UPSTREAM_ACTION} is not in the served pipeline"]
    for group in ("tables", "actions", "counters", "registers"):
        assert {i: x.name for i, x in getattr(base, group).items()}.items() <= \
            {i: x.name for i, x in getattr(leafy, group).items()}.items()
    table = leafy.table(pipeline.UPSTREAM_TABLE)
    assert [f.name for f in table.match_fields] == list(pipeline.UPSTREAM_KEYS)
    assert [p.name for p in leafy.action(pipeline.SET_UPSTREAM_ACTION).params] == list(pipeline.SET_UPSTREAM_PARAMS)


def test_the_leaf_role_over_p4runtime_needs_a_p4runtime_port():
    with pytest.raises(ValueError, match="--leaf-role needs --p4runtime-port"):
        SoftwareSwitchRunner("127.0.0.1", 0, 0, 32, leaf_role=True)


def _p4runtime_target_when_up(address: str, proc: subprocess.Popen, timeout: float = 60.0):
    """A leaf ``P4RuntimeTarget`` of the switch process ``proc`` once its server answers (or fail)."""
    from switchml.p4info import with_leaf_role
    from switchml.p4runtime_target import P4RuntimeError, P4RuntimeTarget

    deadline = time.monotonic() + timeout
    while True:
        try:
            return P4RuntimeTarget(address, p4info=with_leaf_role(), supported_k=(K,), timeout=2)
        except P4RuntimeError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_leaf_in_its_own_process_started_with_leaf_role_joins_a_tree():
    """``switchml-switch emulate --no-controller --p4runtime-port P --leaf-role``: a leaf the
    controller of a tree programs over P4Runtime from another process, as on another host."""
    pytest.importorskip("grpc")
    from switchml.net import free_port

    data_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "emulation.cli", "emulate", "--host", "127.0.0.1", "--port",
                             str(data_port), "--no-controller", "--p4runtime-port", str(grpc_port), "--leaf-role",
                             "--pool-size", "64"], cwd=Path(__file__).resolve().parents[1],
                            stderr=subprocess.PIPE, text=True)
    spine = SoftwareSwitchRunner("127.0.0.1", 0, 0, 64, with_controller=False)
    near = SoftwareSwitchRunner("127.0.0.1", 0, 0, 64, with_controller=False, dataplane="python")
    remote, controller = None, None
    try:
        remote = _p4runtime_target_when_up(f"127.0.0.1:{grpc_port}", proc)
        tree = Tree([Leaf(remote, ("127.0.0.1", data_port)), Leaf(InProcessTarget(near.switch), near.server.address)],
                    racks_of_sizes([2, 1]))
        controller = Controller(InProcessTarget(spine.switch), ControllerOptions(
            bind="tcp://127.0.0.1:0", switch_address=spine.server.address, pool_size=64, window=8, k=K,
            tree=tree)).start()
        results = allreduce_job(controller.endpoint, "remote-leaf", 3, [1_500], seed=2, dtype="int32")
        for rank in range(3):
            assert np.array_equal(results[rank][0], expected_sum(3, 1_500, 2, "int32"))
    finally:
        if controller is not None:
            controller.stop()
        if remote is not None:
            remote.close()
        near.stop()
        spine.stop()
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def _emulate(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emulation.cli", "emulate", "--host", "127.0.0.1", *args],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)[1]


def test_switchml_switch_emulate_with_leaf_runs_a_tree_of_three_processes():
    """The command lines of docs/hierarchy.md: two leaves (--leaf-role) and a spine whose
    controller programs them (--leaf ... --rack-sizes), each its own process."""
    pytest.importorskip("grpc")
    from switchml.net import free_port

    ports = [free_port() for _ in range(6)]  # UDP/TCP ports on loopback, for 3 processes
    leaves = [_emulate("--port", str(ports[2 * i]), "--no-controller", "--p4runtime-port", str(ports[2 * i + 1]),
                       "--leaf-role", "--pool-size", "64") for i in range(2)]
    specs = [f"p4runtime=127.0.0.1:{ports[2 * i + 1]},data=127.0.0.1:{ports[2 * i]}" for i in range(2)]
    spine = _emulate("--port", str(ports[4]), "--control-port", str(ports[5]), "--pool-size", "64", "--window", "8",
                     "-k", "64", "--leaf", specs[0], "--leaf", specs[1], "--rack-sizes", "2,1")
    try:
        endpoint = f"tcp://127.0.0.1:{ports[5]}"
        ready = subprocess.run([sys.executable, "-m", "emulation.cli", "wait", "--controller", endpoint, "--timeout",
                                "60"], capture_output=True, text=True, timeout=90)
        assert ready.returncode == 0, ready.stderr
        results = allreduce_job(endpoint, "cli-tree", 3, [1_000], seed=3, dtype="int32")
        for rank in range(3):
            assert np.array_equal(results[rank][0], expected_sum(3, 1_000, 3, "int32"))
    finally:
        logs = _stop(spine)
        for proc in leaves:
            _stop(proc)
    assert "spine of a tree of 2 leaves" in logs, logs[-2000:]


def test_a_leaf_with_its_own_port_map_gets_its_ports_and_macs_from_it():
    """A P4 leaf's replicas and upstream entry use its port map; the spine keeps the controller's."""
    targets = [InProcessTarget(SoftwareSwitch(pool_size=32, dataplane="python")) for _ in range(2)]
    spine = ("10.255.255.254", 48864)
    own = {"10.0.0.1": (1, "02:00:00:00:00:01"), "10.0.1.1": (2, "02:00:00:00:00:02"), spine[0]: (3, "02:aa:00:00:00:fe")}
    tree = Tree([Leaf(targets[1], ("10.1.0.1", 48870), hosts={"10.0.0.1", "10.0.1.1"},
                      port_of=lambda a: own[a[0]][0], mac_of=lambda a: own[a[0]][1])])
    plan = tree_plan(tree, targets[0], spine, JobSlots(JOB, MGID, BASE, POOL),
                     {0: ("10.0.0.1", 5000), 1: ("10.0.1.1", 5000)}, lambda a: 9, lambda a: MAC)
    spine_program, leaf = plan.programs
    assert [(r.port, r.mac) for r in leaf.replicas] == [own["10.0.0.1"], own["10.0.1.1"]]
    assert (leaf.upstream.port, leaf.upstream.mac) == own[spine[0]]
    assert [(r.port, r.mac) for r in spine_program.replicas] == [(9, MAC)]


def test_emulate_refuses_a_bad_leaf_spec_naming_the_field():
    from emulation.tree import LeafSpec, parse_leaf_spec

    assert parse_leaf_spec("p4runtime=h:1,data=10.0.0.1:5,uplink=10.9.0.1:6,hosts=10.0.0.2+10.0.0.3") == LeafSpec(
        "h:1", ("10.0.0.1", 5), ("10.9.0.1", 6), ("10.0.0.2", "10.0.0.3"))
    assert parse_leaf_spec("p4runtime=unix:/run/l0.sock,data=10.1.0.1:48870,kind=bmv2,ports=l0.json") == LeafSpec(
        "unix:/run/l0.sock", ("10.1.0.1", 48870), None, (), "bmv2", "l0.json")
    for bad, why in (("data=10.0.0.1:5", "no p4runtime="), ("p4runtime=h:1,data=10.0.0.1:0", "data='10.0.0.1:0'"),
                     ("p4runtime=h:1,data=a:2,color=red", "field 'color=red'"),
                     ("p4runtime=h:1,data=a:2,kind=tofino", "kind='tofino': expected one of software, bmv2"),
                     ("p4runtime=h:1,data=a:2,kind=bmv2", "kind=bmv2 needs ports=FILE")):
        with pytest.raises(ValueError, match=why):
            parse_leaf_spec(bad)
    proc = subprocess.run([sys.executable, "-m", "emulation.cli", "emulate", "--leaf", "p4runtime=x,data=127.0.0.1:5"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "--leaf p4runtime='x': expected HOST:PORT" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "emulation.cli", "emulate", "--rack-sizes", "2,1"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "--rack-sizes needs --leaf" in proc.stderr, proc.stderr
