"""Packet-level conformance of the leaf role (docs/hierarchy.md, "The leaf's algorithm").

Every test runs on each target that has the leaf role: the software switch serving the leaf
P4Info over P4Runtime (always), and BMv2 running ``p4/switchml_v1model.p4`` built with
``-DSWITCHML_LEAF_ROLE`` (where p4c-bm2-ss and simple_switch_grpc are on PATH and the harness
may run as root). The switch is a leaf of job ``JOB``: a rack of hosts are its workers, and one
more host plays the spine: it receives the rack's sums as UPDATEs and answers with RESULTs,
crafted here, so that loss and duplicates on the leaf-spine link are exact, chosen cases.
The tree's whole-job behaviour (real spines, loss, bit-identical results) is tests/test_tree.py's
and tests/test_bmv2_tree_mininet.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from switch_harness import Bmv2Harness, Env, Harness, SoftwareHarness, bmv2_unavailable
from test_conformance import BASE, JOB, RANGE, K, drops, expect_quiet, expect_result, reset_packet, start_job, update

from switchml.pipeline import (
    DROPS_COUNTER,
    LEAF_COUNTER,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    LeafCounter,
    PacketCounter,
    UpstreamEntry,
)
from switchml.protocol import MsgType

SPINE_HOST = 4  #: the host that plays the spine (the rack hosts are 0..3, the controller the last)


@pytest.fixture(scope="module", params=["software", "bmv2"])
def switch(request, tmp_path_factory) -> Iterator[Harness]:
    """The leaf targets, in place of conftest's ``switch`` (its ``env`` then hands them out)."""
    if request.param == "bmv2":
        reason = bmv2_unavailable()
        if reason:
            pytest.skip(f"BMv2 leaf: {reason}")
        harness: Harness = Bmv2Harness(tmp_path_factory.mktemp("bmv2-leaf"), leaf_role=True)
    else:
        harness = SoftwareHarness(leaf_role=True)
    yield harness
    harness.close()


def start_leaf_job(env: Env, rack: int, *, job: int = JOB):
    """A job whose ``rack`` hosts are this leaf's workers and whose spine is host ``SPINE_HOST``:
    what the controller programs on a leaf (``switchml.tree``). Returns (rack hosts, spine host)."""
    mgid = env.mgid(job)
    hosts = start_job(env, rack, job=job, mgid=mgid)
    spine = env.host(SPINE_HOST)
    # The leaf's upstream packets leave from the switch's own address, which the spine admits.
    src_ip, src_udp_port = env.switch.address
    env.p4rt.add_upstream(UpstreamEntry(job, spine.ip, spine.udp_port, spine.port, mgid, BASE, RANGE, spine.mac,
                                        src_ip, src_udp_port))
    return hosts, spine


def leaf_count(env: Env, which: LeafCounter) -> int:
    return env.counter(LEAF_COUNTER)[which]


def expect_upstream(env: Env, spine, **fields):
    """The next packet at the spine: an UPDATE from the leaf's address, with ``fields``."""
    received = spine.recv_from(env.switch.reply_timeout)
    assert received is not None, f"{env.name}: the spine received nothing within {env.switch.reply_timeout} s"
    pkt, source = received
    assert pkt.msg_type == MsgType.UPDATE, f"{env.name}: expected an UPDATE upstream, got {pkt.summary()}"
    assert source == tuple(env.switch.address), f"{env.name}: the rack sum came from {source}"
    for name, value in fields.items():
        assert getattr(pkt, name) == value, f"{env.name}: upstream field {name} is {getattr(pkt, name)}, not {value}"
    return pkt


def spine_result(slot: int, values, *, e0: int, tsi: int, set_bit: int = 0, job: int = JOB):
    return update(slot, values, set_bit=set_bit, e0=e0, tsi=tsi, job=job, msg_type=MsgType.RESULT)


# ------------------------------------------------------------------------ steps 1, 2 and 6
def test_a_completed_rack_goes_upstream_once_and_the_spines_result_is_multicast_to_the_rack(env):
    hosts, spine = start_leaf_job(env, 2)
    hosts[0].send(update(BASE, list(range(K)), e0=-3, tsi=11))
    env.wait_counter(PACKETS_COUNTER, PacketCounter.AGGREGATED, 1)
    hosts[1].send(update(BASE, 1000, e0=5, tsi=12))
    # one UPDATE to the spine: the completing packet's header, the rack's max exponent and sum
    rack_sum = expect_upstream(env, spine, job_number=JOB, slot=BASE, set=0, tsi=12, e0=5, e1=0)
    assert rack_sum.values == [i + 1000 for i in range(K)]
    expect_quiet(env, spine, *hosts)  # nothing to the rack before the spine answers
    assert leaf_count(env, LeafCounter.SENT_UPSTREAM) == 1
    assert env.counter(RESULTS_COUNTER)[BASE] == 0

    total = [3 * i + 7 for i in range(K)]  # the spine's sum over every rack, as it would send it
    spine.send(spine_result(BASE, total, e0=9, tsi=12))
    for host in hosts:  # the spine's RESULT, unchanged, to every worker of the rack
        result = expect_result(env, host, job_number=JOB, slot=BASE, set=0, tsi=12, e0=9)
        assert result.values == total
    expect_quiet(env, spine, *hosts)
    assert leaf_count(env, LeafCounter.RESULTS_FROM_UPSTREAM) == 1
    assert env.counter(RESULTS_COUNTER)[BASE] == 1
    assert env.counter(PACKETS_COUNTER)[PacketCounter.AGGREGATED] == 2


def test_a_rack_of_one_worker_goes_straight_upstream(env):
    (host,), spine = start_leaf_job(env, 1)
    host.send(update(BASE + 3, 42, e0=-20, tsi=5))
    assert expect_upstream(env, spine, slot=BASE + 3, tsi=5, e0=-20).values == [42] * K
    spine.send(spine_result(BASE + 3, 84, e0=-19, tsi=5))
    assert expect_result(env, host, slot=BASE + 3, e0=-19).values == [84] * K


# ------------------------------------------------------------------------ steps 3, 4 and 5
def test_a_retransmission_after_the_spines_result_is_answered_from_it_to_the_sender_only(env):
    hosts, spine = start_leaf_job(env, 2)
    hosts[0].send(update(BASE + 1, 1, e0=1))
    env.wait_counter(PACKETS_COUNTER, PacketCounter.AGGREGATED, 1)
    hosts[1].send(update(BASE + 1, 2, e0=2))
    expect_upstream(env, spine, slot=BASE + 1)
    spine.send(spine_result(BASE + 1, 30, e0=4, tsi=1))
    for host in hosts:
        expect_result(env, host, slot=BASE + 1)
    hosts[1].send(update(BASE + 1, 2, e0=2, tsi=77))  # its RESULT was lost: it sends again
    answer = expect_result(env, hosts[1], slot=BASE + 1, tsi=77, e0=4)
    assert answer.values == [30] * K  # the spine's sum, not the rack's
    expect_quiet(env, spine, hosts[0])
    assert env.counter(RETRANSMISSIONS_COUNTER)[BASE + 1] == 1
    assert leaf_count(env, LeafCounter.RESENT_UPSTREAM) == 0


def test_a_retransmission_before_the_spines_result_sends_the_rack_sum_again(env):
    """The leaf's UPDATE or the spine's RESULT was lost: the worker's resend is the leaf's timer."""
    hosts, spine = start_leaf_job(env, 2)
    hosts[0].send(update(BASE, 5, e0=-1))
    env.wait_counter(PACKETS_COUNTER, PacketCounter.AGGREGATED, 1)
    hosts[1].send(update(BASE, 6, e0=3))
    expect_upstream(env, spine, slot=BASE)  # ... and lost on the way: the spine never answers it
    hosts[0].send(update(BASE, 5, e0=-1, tsi=40))
    again = expect_upstream(env, spine, slot=BASE, tsi=40, e0=3)
    assert again.values == [11] * K  # the stored rack sum, not added to again
    expect_quiet(env, *hosts)
    assert leaf_count(env, LeafCounter.RESENT_UPSTREAM) == 1
    assert env.counter(PACKETS_COUNTER)[PacketCounter.AGGREGATED] == 2
    spine.send(spine_result(BASE, 20, e0=6, tsi=40))
    for host in hosts:
        assert expect_result(env, host, slot=BASE, e0=6).values == [20] * K


def test_a_retransmission_to_an_incomplete_rack_is_dropped(env):
    hosts, spine = start_leaf_job(env, 2)
    hosts[0].send(update(BASE, 10))
    env.wait_counter(PACKETS_COUNTER, PacketCounter.AGGREGATED, 1)
    hosts[0].send(update(BASE, 10))
    env.wait_counter(DROPS_COUNTER, DropReason.RETRANSMISSION_INCOMPLETE, 1)
    expect_quiet(env, spine, *hosts)
    hosts[1].send(update(BASE, 1))
    assert expect_upstream(env, spine, slot=BASE).values == [11] * K


# ------------------------------------------------------------------------ step 6: which RESULTs
def test_a_second_result_for_the_same_set_is_ignored(env):
    """The spine answers each resend: the answer to the second arrives after the first RESULT."""
    hosts, spine = start_leaf_job(env, 2)
    for i, host in enumerate(hosts):
        host.send(update(BASE, 1, e0=i))
        env.wait_counter(PACKETS_COUNTER, PacketCounter.AGGREGATED, i + 1)
    expect_upstream(env, spine)
    spine.send(spine_result(BASE, 8, e0=2, tsi=1))
    for host in hosts:
        expect_result(env, host, slot=BASE)
    spine.send(spine_result(BASE, 8, e0=2, tsi=1))
    env.wait_counter(LEAF_COUNTER, LeafCounter.IGNORED_FROM_UPSTREAM, 1)
    expect_quiet(env, *hosts)
    assert leaf_count(env, LeafCounter.RESULTS_FROM_UPSTREAM) == 1


def test_a_result_for_a_set_with_no_rack_sum_waiting_is_ignored(env):
    hosts, spine = start_leaf_job(env, 2)
    spine.send(spine_result(BASE + 2, 8, e0=0, tsi=1))  # nothing contributed yet
    env.wait_counter(LEAF_COUNTER, LeafCounter.IGNORED_FROM_UPSTREAM, 1)
    hosts[0].send(update(BASE + 2, 1))
    env.wait_counter(PACKETS_COUNTER, PacketCounter.AGGREGATED, 1)
    spine.send(spine_result(BASE + 2, 8, e0=0, tsi=1))  # the rack is not complete
    env.wait_counter(LEAF_COUNTER, LeafCounter.IGNORED_FROM_UPSTREAM, 2)
    expect_quiet(env, *hosts)
    hosts[1].send(update(BASE + 2, 2))  # the rack's sum is intact
    assert expect_upstream(env, spine, slot=BASE + 2).values == [3] * K


def test_results_from_anyone_but_the_jobs_spine_or_outside_its_range_are_dropped(env):
    hosts, spine = start_leaf_job(env, 2)
    for host in hosts:
        host.send(update(BASE, 1))
    expect_upstream(env, spine)
    hosts[0].send(spine_result(BASE, 99, e0=0, tsi=1))  # a worker forging the spine's answer
    env.wait_counter(DROPS_COUNTER, DropReason.BAD_MSG_TYPE, 1)
    env.stranger().send(spine_result(BASE, 99, e0=0, tsi=1))
    env.wait_counter(DROPS_COUNTER, DropReason.BAD_MSG_TYPE, 2)
    spine.send(spine_result(BASE, 99, e0=0, tsi=1, job=JOB + 1))  # a job this leaf has no upstream for
    env.wait_counter(DROPS_COUNTER, DropReason.BAD_MSG_TYPE, 3)
    spine.send(spine_result(BASE + RANGE, 99, e0=0, tsi=1))  # outside the job's slots
    env.wait_counter(DROPS_COUNTER, DropReason.SLOT_OUT_OF_RANGE, 1)
    expect_quiet(env, *hosts)
    spine.send(spine_result(BASE, 4, e0=1, tsi=1))  # the real one still gets through
    for host in hosts:
        assert expect_result(env, host, slot=BASE).values == [4] * K


# ------------------------------------------------------------------------ has_result's lifetime
def test_the_next_round_on_a_set_forgets_the_previous_rounds_result(env):
    """The first contribution of a new round clears has_result: a resend in round 3 (set 0 again,
    after round 2 on set 1), before the spine's RESULT, goes upstream again and is not answered
    with round 1's stale sum."""
    hosts, spine = start_leaf_job(env, 2)
    for set_bit, values, answer in ((0, (1, 2), 100), (1, (3, 4), 200), (0, (10, 20), None)):
        for host, v in zip(hosts, values, strict=True):
            host.send(update(BASE, v, set_bit=set_bit))
        assert expect_upstream(env, spine, set=set_bit).values == [sum(values)] * K
        if answer is not None:
            spine.send(spine_result(BASE, answer, e0=0, tsi=1, set_bit=set_bit))
            for host in hosts:
                assert expect_result(env, host, set=set_bit).values == [answer] * K
    hosts[0].send(update(BASE, 10, tsi=50))  # round 3's RESULT has not come
    assert expect_upstream(env, spine, set=0, tsi=50).values == [30] * K
    expect_quiet(env, *hosts)
    assert env.counter(RETRANSMISSIONS_COUNTER)[BASE] == 0


def test_reset_clears_the_sets_and_their_results(env):
    hosts, spine = start_leaf_job(env, 1)
    controller = env.controller()
    hosts[0].send(update(BASE, 5))
    expect_upstream(env, spine)
    spine.send(spine_result(BASE, 50, e0=0, tsi=1))
    expect_result(env, hosts[0])
    controller.send(reset_packet(BASE, tsi=3))
    assert controller.recv(env.switch.reply_timeout) is not None, f"{env.name}: no RESET echo"
    spine.send(spine_result(BASE, 50, e0=0, tsi=1))  # no rack sum waits any more
    env.wait_counter(LEAF_COUNTER, LeafCounter.IGNORED_FROM_UPSTREAM, 1)
    hosts[0].send(update(BASE, 7))  # a new first contribution, straight upstream
    assert expect_upstream(env, spine).values == [7] * K


def test_a_job_without_an_upstream_entry_on_a_leaf_switch_stays_flat(env):
    hosts = start_job(env, 2, job=JOB + 2, first_host=0)
    for host in hosts:
        host.send(update(BASE, 3, job=JOB + 2))
    for host in hosts:
        assert expect_result(env, host, job_number=JOB + 2).values == [6] * K
    assert leaf_count(env, LeafCounter.SENT_UPSTREAM) == 0
    assert drops(env, DropReason.BAD_MSG_TYPE) == 0

