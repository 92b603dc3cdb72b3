"""Issue 15, item 6: the worker's retransmission timeout is TCP's (RFC 6298) and a slow peer
costs a few probes, not a window of spurious resends; spurious resends are counted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from switchml import Worker, defaults
from switchml.worker import retransmit_timeout, rtt_sample

FLOOR, CAP, TICK = 0.010, 0.2, 0.002


def test_first_sample_sets_the_mean_and_half_of_it_as_deviation():
    assert rtt_sample(0.0, 0.0, 0.004, 8) == (0.004, 0.002)


def test_rto_is_srtt_plus_four_deviations_between_floor_and_cap():
    assert retransmit_timeout(0.0, 0.0, 0.0, FLOOR, CAP, TICK) == FLOOR  # no sample yet: the floor
    assert retransmit_timeout(0.020, 0.005, 0.0, FLOOR, CAP, TICK) == pytest.approx(0.020 + 4 * 0.005)
    assert retransmit_timeout(0.001, 0.0001, 0.0, FLOOR, CAP, TICK) == FLOOR
    assert retransmit_timeout(0.001, 0.0, 0.0, 0.0, CAP, TICK) == pytest.approx(0.001 + TICK)  # clock granularity
    assert retransmit_timeout(0.100, 0.050, 0.0, FLOOR, CAP, TICK) == CAP
    assert retransmit_timeout(0.001, 0.0001, 0.080, FLOOR, CAP, TICK) == 0.080  # a backoff in force
    assert retransmit_timeout(0.001, 0.0001, 0.500, FLOOR, CAP, TICK) == CAP


def test_steady_round_trips_converge_and_the_deviation_decays():
    srtt, rttvar = 0.0, 0.0
    for _ in range(3000):
        srtt, rttvar = rtt_sample(srtt, rttvar, 0.001, 8)
    assert srtt == pytest.approx(0.001) and rttvar < 1e-7


def test_a_round_trip_of_w_samples_moves_the_estimate_as_one_rfc6298_sample():
    one = rtt_sample(0.001, 0.0005, 0.009, 1)
    srtt, rttvar = 0.001, 0.0005
    for _ in range(16):
        srtt, rttvar = rtt_sample(srtt, rttvar, 0.009, 16)
    # about as far (compounding 16 small steps is a little less than one step of the sum)
    assert srtt == pytest.approx(one[0], rel=0.1) and rttvar == pytest.approx(one[1], rel=0.2)
    assert one == pytest.approx((0.001 + (0.009 - 0.001) / 8, 0.0005 + (0.008 - 0.0005) / 4))


def test_after_a_window_of_slow_round_trips_the_rto_rises_and_then_decays_to_the_floor():
    """A peer descheduled for 15 ms: one round trip of 15 ms samples lifts the RTO to about
    15 ms (as one such sample does in RFC 6298); 1 ms round trips bring it back to the floor
    within a few round trips, not within a few packets."""
    w, srtt, rttvar = 16, 0.001, 0.0001
    for _ in range(w):
        srtt, rttvar = rtt_sample(srtt, rttvar, 0.015, w)
    assert retransmit_timeout(srtt, rttvar, 0.0, FLOOR, CAP, TICK) > 0.014
    for _ in range(w):
        srtt, rttvar = rtt_sample(srtt, rttvar, 0.001, w)
    assert retransmit_timeout(srtt, rttvar, 0.0, FLOOR, CAP, TICK) > 0.013
    for _ in range(10 * w):
        srtt, rttvar = rtt_sample(srtt, rttvar, 0.001, w)
    assert retransmit_timeout(srtt, rttvar, 0.0, FLOOR, CAP, TICK) == FLOOR


def test_defaults_are_rfc6298s():
    assert (defaults.RTT_ALPHA, defaults.RTT_BETA, defaults.RTT_K) == (1 / 8, 1 / 4, 4)
    assert 0 < defaults.RETRANSMIT_TIMEOUT_S < defaults.RETRANSMIT_TIMEOUT_MAX_S


def test_a_late_peer_costs_a_few_probes_not_a_window_of_resends(make_switch):
    """Rank 1 starts its call 0.4 s after rank 0 (as a descheduled peer would): rank 0 hears
    nothing back meanwhile, so it resends only its oldest packet, once per doubling RTO; the
    old per-slot timers resent all 16 slots at 10, 30, 70, 150, 310 ms (80 resends)."""
    env = make_switch(window=16, k=64)
    workers: list[Worker | None] = [None, None]

    def register(rank: int) -> None:
        workers[rank] = Worker(env.endpoint, "late", rank, 2, timeout=20.0)

    threads = [threading.Thread(target=register, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    w0, w1 = workers
    assert w0 is not None and w1 is not None
    try:
        x = np.arange(64 * 64, dtype=np.int32)
        fut = w0.allreduce_async(x)
        time.sleep(0.4)
        assert np.array_equal(w1.allreduce(x), 2 * x)
        assert np.array_equal(fut.result(timeout=20), 2 * x)
        # 10, 30, 50, ... ms: the probe clock doubles every 16 probes; a loaded machine that
        # stretches the 0.4 s adds a probe per doubled RTO
        assert w0.stats.retransmissions <= 30, w0.stats
        # a probe answered after its original was answered is a duplicate: counted, not used
        assert w0.stats.duplicate_results <= w0.stats.retransmissions
        futures = [w.allreduce_async(x[:100]) for w in (w0, w1)]  # the job goes on in step
        for f in futures:
            assert np.array_equal(f.result(timeout=20), 2 * x[:100])
    finally:
        w0.close()
        w1.close()
