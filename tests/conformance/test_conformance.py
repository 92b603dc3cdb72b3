"""Packet-level conformance: DESIGN.md's switch semantics, checked on every target present.

Each test runs against the software switch (always) and BMv2 (when p4c-bm2-ss and
simple_switch_grpc are on PATH and the harness may run as root). The switch is programmed
over P4Runtime by ``P4RuntimeTarget``, as the controller programs it; packets are crafted
with the scapy layer (``tests/scapy_layer.py``); counters are read over P4Runtime.
A test that expects silence first waits until the counter that the packet must move has
moved (the switch has decided), then listens for ``quiet_time``.
"""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy_layer import SwitchML
from switch_harness import Env

from switchml import pipeline, protocol
from switchml.pipeline import (
    DROPS_COUNTER,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    PacketCounter,
    Replica,
    WorkerEntry,
)
from switchml.protocol import MsgType

K = pipeline.P4_K  # the P4 targets' compiled-in k
SIZE = protocol.K_TO_SIZE[K]
JOB, BASE, RANGE = 7, 100, 16
AGGREGATED = PacketCounter.AGGREGATED


# ------------------------------------------------------------------------ helpers
def update(slot: int, values, *, set_bit: int = 0, e0: int = 0, tsi: int = 1, job: int = JOB,
           msg_type: int = MsgType.UPDATE, size: int = SIZE) -> SwitchML:
    k = protocol.SIZE_TO_K[size]
    values = [values] * k if isinstance(values, int) else list(values)
    return SwitchML(msg_type=int(msg_type), size=size, job_number=job, tsi=tsi, set=set_bit, slot=slot, e0=e0,
                    values=values)


def reset_packet(slot: int, *, size: int = 0, tsi: int = 0, job: int = JOB) -> SwitchML:
    """A RESET as the controller sends it (k = 32: the switch never reads its payload)."""
    return SwitchML(msg_type=int(MsgType.RESET), size=size, job_number=job, tsi=tsi, slot=slot,
                    values=[0] * protocol.SIZE_TO_K[size])


def start_job(env: Env, n: int, *, job: int = JOB, mgid: int | None = None, base: int = BASE, size: int = RANGE,
              first_host: int = 0):
    """Program a job as the controller does: multicast group with egress rewrites, admission."""
    mgid = env.mgid() if mgid is None else mgid
    hosts = [env.host(first_host + w) for w in range(n)]
    env.p4rt.set_multicast_group(mgid, [Replica(h.port, w, h.mac, h.ip, h.udp_port) for w, h in enumerate(hosts)])
    for w, h in enumerate(hosts):
        env.p4rt.add_worker(WorkerEntry(h.ip, h.udp_port, job, w, n, mgid, base, size))
    return hosts


def expect_result(env: Env, host, **fields) -> SwitchML:
    pkt = host.recv(env.switch.reply_timeout)
    assert pkt is not None, f"{env.name}: {host} received no reply within {env.switch.reply_timeout} s"
    assert pkt.msg_type == MsgType.RESULT, f"{env.name}: expected a RESULT, got {pkt.summary()}"
    for name, value in fields.items():
        assert getattr(pkt, name) == value, f"{env.name}: RESULT field {name} is {getattr(pkt, name)}, not {value}"
    return pkt


def expect_quiet(env: Env, *hosts) -> None:
    time.sleep(env.switch.quiet_time)
    for host in hosts:
        pkt = host.recv(0.001)
        assert pkt is None, f"{env.name}: {host} received an unexpected {pkt.summary()} ({pkt.fields})"


def drops(env: Env, reason: DropReason) -> int:
    return env.counter(DROPS_COUNTER)[reason]


# ------------------------------------------------------------------------ aggregation
def test_contributions_are_absorbed_until_the_last_completes_and_is_multicast(env):
    hosts = start_job(env, 3)
    hosts[0].send(update(BASE, list(range(K)), e0=-3, tsi=11))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 1)
    hosts[1].send(update(BASE, 1000, e0=5, tsi=12))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 2)
    expect_quiet(env, *hosts)  # absorbed: nothing comes back before the slot completes
    hosts[2].send(update(BASE, -7, e0=1, tsi=13))
    for host in hosts:  # every worker gets its own copy, addressed to it by the egress rewrite
        result = expect_result(env, host, job_number=JOB, tsi=13, slot=BASE, set=0, e0=5, e1=0, size=SIZE)
        assert result.values == [i + 1000 - 7 for i in range(K)]
    expect_quiet(env, *hosts)  # exactly one copy each
    assert env.counter(RESULTS_COUNTER)[BASE] == 1


def test_a_one_worker_job_completes_on_its_first_packet(env):
    (host,) = start_job(env, 1)
    host.send(update(BASE + 3, 42, e0=-20, tsi=5))
    result = expect_result(env, host, slot=BASE + 3, tsi=5, e0=-20)
    assert result.values == [42] * K


def test_int32_sums_wrap_modulo_2_to_the_32(env):
    hosts = start_job(env, 2)
    hosts[0].send(update(BASE, [2**31 - 1, -(2**31)] * (K // 2)))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 1)
    hosts[1].send(update(BASE, [1, -1] * (K // 2)))
    assert expect_result(env, hosts[0]).values == [-(2**31), 2**31 - 1] * (K // 2)


def test_exponent_is_the_signed_maximum(env):
    hosts = start_job(env, 3)
    for host, e0 in zip(hosts, (-7, -3, -100), strict=True):
        host.send(update(BASE, 1, e0=e0))
    assert expect_result(env, hosts[0]).e0 == -3
    # -128 is 0x80: an unsigned comparison would take it for the largest
    for host, e0 in zip(hosts, (3, -128, 120), strict=True):
        host.send(update(BASE + 1, 1, e0=e0))
    assert expect_result(env, hosts[0], slot=BASE + 1).e0 == 120


@pytest.mark.parametrize("order", [(10, 127, -5), (127, 10, -5), (-5, 10, 127)])
def test_nan_sentinel_127_wins_the_maximum(env, order):
    hosts = start_job(env, 3)
    for i, (host, e0) in enumerate(zip(hosts, order, strict=True)):
        host.send(update(BASE, 1, e0=e0))
        env.wait_counter(PACKETS_COUNTER, AGGREGATED, i + 1)
    assert expect_result(env, hosts[1]).e0 == protocol.EXP_NAN


# ------------------------------------------------------------------------ retransmission
def test_retransmission_to_a_complete_slot_is_answered_to_the_sender_only(env):
    hosts = start_job(env, 3)
    for i, host in enumerate(hosts):
        host.send(update(BASE + 2, i + 1, e0=i))
    for host in hosts:
        expect_result(env, host)
    hosts[1].send(update(BASE + 2, 2, e0=1, tsi=77))  # its RESULT was lost: it sends again
    answer = expect_result(env, hosts[1], tsi=77, slot=BASE + 2, e0=2)
    assert answer.values == [6] * K  # the stored sum, not added to again
    expect_quiet(env, *hosts)  # a unicast: the others get nothing
    assert env.counter(RETRANSMISSIONS_COUNTER)[BASE + 2] == 1
    assert env.counter(RESULTS_COUNTER)[BASE + 2] == 1


def test_retransmission_to_an_incomplete_slot_is_dropped_and_not_added_twice(env):
    hosts = start_job(env, 2)
    hosts[0].send(update(BASE, 10))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 1)
    hosts[0].send(update(BASE, 10))
    env.wait_counter(DROPS_COUNTER, DropReason.RETRANSMISSION_INCOMPLETE, 1)
    expect_quiet(env, *hosts)
    hosts[1].send(update(BASE, 1))
    assert expect_result(env, hosts[0]).values == [11] * K
    assert env.counter(PACKETS_COUNTER)[AGGREGATED] == 2


def test_set_reuse_keeps_the_shadow_copy_and_overwrites_on_the_next_round(env):
    hosts = start_job(env, 2)
    hosts[0].send(update(BASE, 1))
    hosts[1].send(update(BASE, 2))
    for host in hosts:
        assert expect_result(env, host, set=0).values == [3] * K
    # worker 0 moves on to set 1 of the slot; worker 1 lost its result and retransmits on set 0
    hosts[0].send(update(BASE, 10, set_bit=1))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 3)
    hosts[1].send(update(BASE, 2, tsi=9))
    assert expect_result(env, hosts[1], set=0, tsi=9).values == [3] * K  # the shadow copy survived
    hosts[1].send(update(BASE, 20, set_bit=1))
    for host in hosts:
        assert expect_result(env, host, set=1).values == [30] * K
    # the third round uses set 0 again: the first contribution overwrites the old sum
    hosts[0].send(update(BASE, 100))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 5)
    hosts[1].send(update(BASE, 200))
    for host in hosts:
        assert expect_result(env, host, set=0).values == [300] * K


# ------------------------------------------------------------------------ RESET
@pytest.mark.parametrize("size", [0, 1, 3])
def test_reset_is_echoed_to_the_controller_and_clears_both_sets(env, size):
    hosts = start_job(env, 2)
    controller = env.controller()
    hosts[0].send(update(BASE, 5))
    hosts[0].send(update(BASE, 50, set_bit=1))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 2)
    controller.send(reset_packet(BASE, size=size, tsi=99))
    echo = controller.recv(env.switch.reply_timeout)
    assert echo is not None, f"{env.name}: no RESET echo"
    assert (echo.msg_type, echo.slot, echo.tsi, echo.job_number, echo.size) == (MsgType.RESET, BASE, 99, JOB, size)
    assert env.counter(PACKETS_COUNTER)[PacketCounter.RESETS] == 1
    # worker 0's bit is gone from both sets: its next packets are new first contributions
    hosts[0].send(update(BASE, 7))
    hosts[0].send(update(BASE, 70, set_bit=1))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 4)
    assert drops(env, DropReason.RETRANSMISSION_INCOMPLETE) == 0
    hosts[1].send(update(BASE, 1))
    assert expect_result(env, hosts[0], set=0).values == [8] * K
    hosts[1].send(update(BASE, 1, set_bit=1))
    assert expect_result(env, hosts[0], set=1).values == [71] * K
    expect_quiet(env, controller)


def test_reset_from_anyone_but_the_controller_is_dropped(env):
    hosts = start_job(env, 2)
    controller = env.controller()
    stranger = env.stranger()
    hosts[0].send(update(BASE, 5))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 1)
    hosts[1].send(reset_packet(BASE))
    stranger.send(reset_packet(BASE))
    env.wait_counter(DROPS_COUNTER, DropReason.RESET_NOT_FROM_CONTROLLER, 2)
    expect_quiet(env, *hosts, controller)
    assert env.counter(PACKETS_COUNTER)[PacketCounter.RESETS] == 0
    hosts[1].send(update(BASE, 1))  # the slot was not cleared
    assert expect_result(env, hosts[0]).values == [6] * K


def test_reset_of_a_slot_outside_the_pool_is_dropped(env):
    controller = env.controller()
    controller.send(reset_packet(1024))
    controller.send(reset_packet(protocol.SLOT_MASK))
    env.wait_counter(DROPS_COUNTER, DropReason.SLOT_OUT_OF_RANGE, 2)
    expect_quiet(env, controller)


# ------------------------------------------------------------------------ admission
def test_a_sender_without_admission_entry_is_dropped(env):
    hosts = start_job(env, 2)
    stranger = env.stranger()
    stranger.send(update(BASE, 1000))
    env.wait_counter(DROPS_COUNTER, DropReason.NOT_ADMITTED, 1)
    hosts[0].send(update(BASE, 1))
    hosts[1].send(update(BASE, 2))
    assert expect_result(env, hosts[0]).values == [3] * K  # nothing of the stranger's
    expect_quiet(env, stranger)


def test_a_removed_worker_is_no_longer_admitted(env):
    hosts = start_job(env, 2)
    env.p4rt.remove_worker(hosts[1].ip, hosts[1].udp_port)
    hosts[1].send(update(BASE, 1))
    env.wait_counter(DROPS_COUNTER, DropReason.NOT_ADMITTED, 1)
    assert env.counter(PACKETS_COUNTER)[AGGREGATED] == 0


def test_slots_outside_the_jobs_range_are_dropped(env):
    hosts = start_job(env, 2)
    hosts[0].send(update(BASE - 1, 1))
    hosts[0].send(update(BASE + RANGE, 1))
    hosts[0].send(update(1023, 1))
    env.wait_counter(DROPS_COUNTER, DropReason.SLOT_OUT_OF_RANGE, 3)
    assert env.counter(PACKETS_COUNTER)[AGGREGATED] == 0
    expect_quiet(env, *hosts)


def test_a_forged_job_number_is_dropped_and_jobs_stay_isolated(env):
    a = start_job(env, 2, job=JOB, mgid=env.mgid(0), base=BASE)
    b = start_job(env, 2, job=JOB + 2, mgid=env.mgid(1), base=BASE + RANGE, first_host=2)
    a[0].send(update(BASE + RANGE, 1000, job=JOB + 2))  # job B's number, job B's slot
    a[0].send(update(BASE, 1000, job=JOB + 2))  # job B's number, its own slot
    env.wait_counter(DROPS_COUNTER, DropReason.JOB_MISMATCH, 2)
    b[0].send(update(BASE + RANGE, 1, job=JOB + 2))
    b[1].send(update(BASE + RANGE, 2, job=JOB + 2))
    for host in b:
        assert expect_result(env, host, job_number=JOB + 2).values == [3] * K
    a[0].send(update(BASE, 10))
    a[1].send(update(BASE, 20))
    for host in a:
        assert expect_result(env, host, job_number=JOB).values == [30] * K
    expect_quiet(env, *a, *b)


# ------------------------------------------------------------------------ malformed packets
def test_other_message_types_are_dropped(env):
    hosts = start_job(env, 2)
    hosts[0].send(update(BASE, 1, msg_type=MsgType.RESULT))
    hosts[0].send(update(BASE, 1, msg_type=3))
    env.wait_counter(DROPS_COUNTER, DropReason.BAD_MSG_TYPE, 2)
    assert env.counter(PACKETS_COUNTER)[AGGREGATED] == 0
    expect_quiet(env, *hosts)


def test_malformed_packets_are_dropped(env):
    hosts = start_job(env, 2)
    good = bytes(update(BASE, 1))
    hosts[0].send(good[:5])  # shorter than the header
    hosts[0].send(good[:-4])  # one element short of k
    hosts[0].send(good + bytes(4))  # one element too many
    env.wait_counter(DROPS_COUNTER, DropReason.MALFORMED, 3)
    assert env.counter(PACKETS_COUNTER)[AGGREGATED] == 0
    expect_quiet(env, *hosts)


def test_update_sizes_the_target_does_not_take_are_dropped(env):
    refused = [size for size in sorted(set(protocol.SIZE_TO_K) - env.switch.update_sizes)
               if protocol.packet_bytes(protocol.SIZE_TO_K[size]) <= env.switch.max_payload]
    if not refused:
        pytest.skip(f"the {env.name} switch takes every size of wire format v1 that fits its links")
    hosts = start_job(env, 2)
    for size in refused:
        hosts[0].send(update(BASE, 1, size=size))
    env.wait_counter(DROPS_COUNTER, DropReason.BAD_SIZE, len(refused))
    expect_quiet(env, *hosts)


# ------------------------------------------------------------------------ loss and counters
def test_the_loss_table_drops_packets_arriving_on_a_lossy_port(env):
    hosts = start_job(env, 2)
    env.p4rt.set_drop_probability(hosts[0].port, 1.0)
    hosts[0].send(update(BASE, 1))
    env.wait_counter(DROPS_COUNTER, DropReason.EMULATED_LOSS, 1)
    assert env.counter(PACKETS_COUNTER)[AGGREGATED] == 0
    env.p4rt.set_drop_probability(hosts[0].port, 0.0)
    hosts[0].send(update(BASE, 1))
    env.wait_counter(PACKETS_COUNTER, AGGREGATED, 1)
    hosts[1].send(update(BASE, 2))
    assert expect_result(env, hosts[0]).values == [3] * K


def test_counters_count_every_outcome_exactly(env):
    hosts = start_job(env, 2)
    controller, stranger = env.controller(), env.stranger()
    sent = [
        (hosts[0], update(BASE, 1)),  # aggregated
        (hosts[1], update(BASE, 2)),  # aggregated, completes: results_multicast[BASE]
        (hosts[1], update(BASE, 2)),  # answered: retransmissions_answered[BASE]
        (hosts[0], update(BASE + 1, 1)),  # aggregated
        (hosts[0], update(BASE + 1, 1)),  # RETRANSMISSION_INCOMPLETE
        (stranger, update(BASE, 1)),  # NOT_ADMITTED
        (controller, reset_packet(BASE + 1)),  # resets
        (hosts[0], update(BASE, 1, job=JOB + 1)),  # JOB_MISMATCH
        (hosts[0], update(BASE + RANGE, 1)),  # SLOT_OUT_OF_RANGE
        (hosts[0], update(BASE, 1, msg_type=3)),  # BAD_MSG_TYPE
        (hosts[1], reset_packet(BASE)),  # RESET_NOT_FROM_CONTROLLER
        (hosts[1], bytes(4)),  # MALFORMED
    ]
    for host, packet in sent:
        host.send(packet)
        time.sleep(0.005)  # keep the order across hosts (ports) on every target
    env.wait_counter(PACKETS_COUNTER, PacketCounter.RECEIVED, len(sent))
    expected_drops = dict.fromkeys(DropReason, 0)
    for reason in (DropReason.RETRANSMISSION_INCOMPLETE, DropReason.NOT_ADMITTED, DropReason.JOB_MISMATCH,
                   DropReason.SLOT_OUT_OF_RANGE, DropReason.BAD_MSG_TYPE, DropReason.RESET_NOT_FROM_CONTROLLER,
                   DropReason.MALFORMED):
        expected_drops[reason] = 1
    env.wait_counter(DROPS_COUNTER, DropReason.MALFORMED, 1)
    assert dict(zip(DropReason, env.counter(DROPS_COUNTER), strict=True)) == expected_drops
    assert env.counter(PACKETS_COUNTER) == [len(sent), 3, 1]
    results, answered = env.counter(RESULTS_COUNTER), env.counter(RETRANSMISSIONS_COUNTER)
    assert (results[BASE], sum(results)) == (1, 1)
    assert (answered[BASE], sum(answered)) == (1, 1)


# ------------------------------------------------------------------------ plain forwarding
def test_plain_ipv4_traffic_is_forwarded(env):
    if not env.switch.forwards_plain_ipv4:
        pytest.skip(f"the {env.name} switch is a UDP endpoint: it forwards no other traffic")
    sender, receiver = env.host(0), env.host(1)
    env.p4rt.add_forward(receiver.ip, receiver.port, receiver.mac)
    frame = bytes(Ether(src=sender.mac, dst="02:00:00:00:00:fe") / IP(src=sender.ip, dst=receiver.ip)
                  / UDP(sport=5000, dport=5001) / b"hello")
    sender.send_frame(frame)
    got = receiver.recv_frame(env.switch.reply_timeout,
                              lambda f: UDP in f and f[UDP].dport == 5001 and bytes(f[UDP].payload) == b"hello")
    assert got is not None and got.dst == receiver.mac
