"""The software switch's algorithm, packet by packet (DESIGN.md "Switch semantics")."""

from __future__ import annotations

import numpy as np
import pytest

from emulation.switch import SoftwareSwitch
from switchml import protocol
from switchml.pipeline import DROPS_COUNTER, RESULTS_COUNTER, RETRANSMISSIONS_COUNTER, DropReason, Replica, WorkerEntry
from switchml.protocol import MsgType

pytestmark = pytest.mark.usefixtures("dataplane")  # both data paths (conftest.py)

K = 64
CTRL = ("127.0.0.9", 9000)
JOB, BASE, POOL = 5, 10, 4


def addr(w: int) -> tuple[str, int]:
    return ("127.0.0.1", 7000 + w)


def make(n: int, **kw) -> SoftwareSwitch:
    sw = SoftwareSwitch(pool_size=32, **kw)
    sw.add_admission(*CTRL, None)
    sw.set_multicast_group(JOB + 1, [Replica(w + 1, w, "00:00:00:00:00:00", *addr(w)) for w in range(n)])
    for w in range(n):
        sw.add_admission(*addr(w), WorkerEntry(*addr(w), JOB, w, n, JOB + 1, BASE, POOL))
    return sw


def update(slot: int, set_bit: int, values, e0: int = 0, tsi: int = 1, job: int = JOB) -> bytes:
    return protocol.encode_packet(MsgType.UPDATE, job, tsi, slot, set_bit, e0, np.asarray(values, np.int32))


def vec(x: int) -> np.ndarray:
    return np.full(K, x, np.int32)


def drops(sw: SoftwareSwitch, reason: DropReason) -> int:
    return sw.read_counter(DROPS_COUNTER)[reason]


def test_first_contribution_is_absorbed_and_last_completes_with_multicast():
    sw = make(3)
    assert sw.process(update(BASE, 0, vec(1), e0=-3), addr(0)) == []
    assert sw.process(update(BASE, 0, vec(2), e0=5), addr(1)) == []
    out = sw.process(update(BASE, 0, vec(3), e0=1, tsi=77), addr(2))
    assert sorted(dst for _, dst in out) == [addr(0), addr(1), addr(2)]
    for data, _ in out:
        pkt = protocol.decode_packet(data)
        assert pkt.msg_type == MsgType.RESULT and pkt.job_number == JOB and pkt.tsi == 77
        assert pkt.slot == BASE and pkt.set_bit == 0 and pkt.e0 == 5  # max exponent
        assert np.all(pkt.payload == 6)
    assert sw.read_counter(RESULTS_COUNTER)[BASE] == 1


def test_duplicate_of_incomplete_slot_is_dropped_and_not_added_twice():
    sw = make(2)
    sw.process(update(BASE, 0, vec(10)), addr(0))
    assert sw.process(update(BASE, 0, vec(10)), addr(0)) == []
    assert drops(sw, DropReason.RETRANSMISSION_INCOMPLETE) == 1
    out = sw.process(update(BASE, 0, vec(1)), addr(1))
    assert np.all(protocol.decode_packet(out[0][0]).payload == 11)


def test_retransmission_to_complete_slot_is_answered_by_unicast():
    sw = make(2)
    sw.process(update(BASE, 1, vec(4)), addr(0))
    sw.process(update(BASE, 1, vec(5)), addr(1))
    out = sw.process(update(BASE, 1, vec(4)), addr(1))
    assert [dst for _, dst in out] == [addr(1)]
    assert np.all(protocol.decode_packet(out[0][0]).payload == 9)
    assert sw.read_counter(RETRANSMISSIONS_COUNTER)[BASE] == 1


def test_set_reuse_overwrites_and_keeps_shadow_copy():
    sw = make(2)
    sw.process(update(BASE, 0, vec(1)), addr(0))
    sw.process(update(BASE, 0, vec(2)), addr(1))  # set 0 complete: 3
    # worker 0 moves on to set 1; worker 1 lost the result and retransmits set 0
    assert sw.process(update(BASE, 1, vec(100)), addr(0)) == []
    again = sw.process(update(BASE, 0, vec(2)), addr(1))
    assert np.all(protocol.decode_packet(again[0][0]).payload == 3)  # the shadow copy is intact
    out = sw.process(update(BASE, 1, vec(200)), addr(1))
    assert np.all(protocol.decode_packet(out[0][0]).payload == 300)
    # third use of set 0: the first contribution overwrites the old sum
    sw.process(update(BASE, 0, vec(7)), addr(1))
    out = sw.process(update(BASE, 0, vec(8)), addr(0))
    assert np.all(protocol.decode_packet(out[0][0]).payload == 15)


def test_reordered_contributions_and_independent_slots():
    sw = make(2)
    sw.process(update(BASE + 1, 0, vec(1)), addr(1))
    sw.process(update(BASE, 0, vec(2)), addr(0))
    out1 = sw.process(update(BASE + 1, 0, vec(3)), addr(0))
    out0 = sw.process(update(BASE, 0, vec(4)), addr(1))
    assert np.all(protocol.decode_packet(out1[0][0]).payload == 4)
    assert np.all(protocol.decode_packet(out0[0][0]).payload == 6)


def test_single_worker_completes_immediately():
    sw = make(1)
    out = sw.process(update(BASE, 0, vec(42)), addr(0))
    assert len(out) == 1 and np.all(protocol.decode_packet(out[0][0]).payload == 42)
    out = sw.process(update(BASE, 0, vec(42)), addr(0))  # a retransmission: answered again
    assert len(out) == 1


def test_int32_sum_wraps_never_saturates():
    sw = make(2)
    sw.process(update(BASE, 0, vec(2**31 - 1)), addr(0))
    out = sw.process(update(BASE, 0, vec(1)), addr(1))
    assert np.all(protocol.decode_packet(out[0][0]).payload == -(2**31))


def test_reset_clears_both_sets_and_is_echoed():
    sw = make(2)
    sw.process(update(BASE, 0, vec(1)), addr(0))
    sw.process(update(BASE, 1, vec(1)), addr(1))
    reset = protocol.encode_header(MsgType.RESET, 0, JOB, 0, BASE, 0, 0) + bytes(4 * 32)
    assert sw.process(reset, CTRL) == [(reset, CTRL)]
    # after the reset, worker 0's earlier contribution is forgotten
    assert sw.process(update(BASE, 0, vec(5)), addr(1)) == []
    out = sw.process(update(BASE, 0, vec(6)), addr(0))
    assert np.all(protocol.decode_packet(out[0][0]).payload == 11)


def test_reset_from_a_worker_is_dropped():
    sw = make(2)
    reset = protocol.encode_header(MsgType.RESET, 0, JOB, 0, BASE, 0, 0) + bytes(4 * 32)
    assert sw.process(reset, addr(0)) == []
    assert drops(sw, DropReason.RESET_NOT_FROM_CONTROLLER) == 1


@pytest.mark.parametrize("data,src,reason", [
    (b"\x00\x01", addr(0), DropReason.MALFORMED),
    (update(BASE, 0, vec(1))[:-1], addr(0), DropReason.MALFORMED),
    (update(BASE, 0, vec(1)) + b"\x00\x00\x00\x00", addr(0), DropReason.MALFORMED),
    (bytes([MsgType.RESULT << 4 | 1]) + update(BASE, 0, vec(1))[1:], addr(0), DropReason.BAD_MSG_TYPE),
    (bytes([0xF << 4 | 1]) + update(BASE, 0, vec(1))[1:], addr(0), DropReason.BAD_MSG_TYPE),
    (update(BASE, 0, vec(1)), ("127.0.0.1", 6666), DropReason.NOT_ADMITTED),
    (update(BASE, 0, vec(1)), CTRL, DropReason.NOT_ADMITTED),
    (update(BASE + POOL, 0, vec(1)), addr(0), DropReason.SLOT_OUT_OF_RANGE),
    (update(BASE - 1, 0, vec(1)), addr(0), DropReason.SLOT_OUT_OF_RANGE),
    (update(BASE, 0, vec(1), job=JOB + 1), addr(0), DropReason.JOB_MISMATCH),
])
def test_hostile_and_broken_packets_are_dropped_and_counted(data, src, reason):
    sw = make(2)
    assert sw.process(data, src) == []
    assert drops(sw, reason) == 1
    assert sum(sw.read_counter(DROPS_COUNTER)) == 1
    # the honest job is untouched
    sw.process(update(BASE, 0, vec(1)), addr(0))
    out = sw.process(update(BASE, 0, vec(2)), addr(1))
    assert np.all(protocol.decode_packet(out[0][0]).payload == 3)


def test_size_not_taken_by_the_target_is_dropped():
    sw = make(2, sizes=(1,))
    data = protocol.encode_packet(MsgType.UPDATE, JOB, 0, BASE, 0, 0, np.zeros(32, np.int32))
    assert sw.process(data, addr(0)) == [] and drops(sw, DropReason.BAD_SIZE) == 1


def test_mixed_sizes_in_one_slot_are_refused():
    sw = make(2)
    sw.process(update(BASE, 0, vec(1)), addr(0))
    other = protocol.encode_packet(MsgType.UPDATE, JOB, 0, BASE, 0, 0, np.zeros(128, np.int32))
    assert sw.process(other, addr(1)) == [] and drops(sw, DropReason.SIZE_MISMATCH) == 1


def test_drop_probability_drops_about_that_fraction():
    sw = make(1, drop_probability=0.25, seed=3)
    answered = sum(len(sw.process(update(BASE, 0, vec(1)), addr(0))) for _ in range(4000))
    # each packet crosses the lossy port twice (in and out): 0.75^2 survive
    assert 0.5 < answered / 4000 < 0.62
    assert drops(sw, DropReason.EMULATED_LOSS) == 4000 - answered


def test_per_port_drop_probability_only_hits_that_port():
    sw = make(2)
    sw.set_drop_probability(1, 1.0)  # worker 0's port
    assert sw.process(update(BASE, 0, vec(1)), addr(0)) == []
    assert drops(sw, DropReason.EMULATED_LOSS) == 1
    sw.process(update(BASE + 1, 0, vec(1)), addr(1))
    assert drops(sw, DropReason.EMULATED_LOSS) == 1


def test_bad_table_entries_are_refused():
    sw = SoftwareSwitch(pool_size=16)
    with pytest.raises(ValueError, match="outside"):
        sw.add_admission("127.0.0.1", 1, WorkerEntry("127.0.0.1", 1, 0, 0, 2, 1, 10, 8))
    with pytest.raises(ValueError, match="worker_id"):
        sw.add_admission("127.0.0.1", 1, WorkerEntry("127.0.0.1", 1, 0, 2, 2, 1, 0, 8))
    with pytest.raises(ValueError, match="fraction"):
        sw.set_drop_probability(None, 1.5)


@pytest.mark.parametrize(("field", "args"), [
    ("num_workers=0", (0, 0, 0)), ("num_workers=33", (0, 0, 33)), ("num_workers=64", (0, 0, 64)),
    ("worker_id=32", (0, 32, 32)), ("job=256", (256, 0, 2)),
])
def test_entries_no_switch_could_complete_are_refused_before_any_target_sees_them(field, args):
    """The P4 programs complete a slot when its count wraps to 0 mod num_workers (6 bits): an
    n of 0 or above the 32-bit bitmap would hang every slot, so WorkerEntry itself refuses it."""
    job, worker_id, n = args
    with pytest.raises(ValueError, match=field):
        WorkerEntry("10.0.0.1", 4000, job, worker_id, n, 1, 0, 8)
