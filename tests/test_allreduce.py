"""End to end: worker processes sum through the software switch over real UDP on loopback."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from mpworkers import CTX, allreduce_job, assert_within_quantization_bound, expected_sum, slow_worker

from switchml import ControllerError, ControllerTimeout, Worker
from switchml.pipeline import DropReason
from switchml.protocol import MsgType, WireFormatError, encode_packet


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sum_within_bound_and_identical_on_every_rank(make_switch, n):
    env = make_switch(window=16, k=256)
    sizes = [0, 1, 255, 257, 20_000]
    results = allreduce_job(env.endpoint, f"job{n}", n, sizes, seed=n)
    for i, size in enumerate(sizes):
        for rank in range(1, n):
            assert np.array_equal(results[rank][i], results[0][i])
        assert results[0][i].shape == (size,) and results[0][i].dtype == np.float32
        assert_within_quantization_bound(results[0][i], n, size, n + i, 256)


def test_int32_is_exact(make_switch):
    env = make_switch(window=8, k=64)
    results = allreduce_job(env.endpoint, "ints", 3, [1000], seed=1, dtype="int32")
    assert np.array_equal(results[0][0], expected_sum(3, 1000, 1, "int32"))
    assert results[0][0].dtype == np.int32


@pytest.mark.parametrize("loss", [0.01, 0.10])
def test_lossy_run_is_bit_identical_to_lossless(make_switch, loss):
    sizes, n = [30_000, 5_000], 4
    clean = allreduce_job(make_switch(window=16, k=256).endpoint, "clean", n, sizes, seed=3)
    lossy_env = make_switch(drop_probability=loss, window=16, k=256, seed=11)
    lossy = allreduce_job(lossy_env.endpoint, "lossy", n, sizes, seed=3, worker_kwargs={"timeout": 60})
    for rank in range(n):
        for a, b in zip(clean[rank], lossy[rank], strict=True):
            assert np.array_equal(a, b)
    assert lossy_env.switch.drops()["emulated_loss"] > 0


def test_two_concurrent_jobs_stay_isolated(make_switch):
    env = make_switch(window=8, k=128)
    out: dict[str, list] = {}
    jobs = {"small": (2, [3_000], 5), "large": (3, [40_000, 7], 6)}
    threads = [threading.Thread(target=lambda name=name, spec=spec: out.__setitem__(
        name, allreduce_job(env.endpoint, name, spec[0], spec[1], seed=spec[2]))) for name, spec in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (n, sizes, seed) in jobs.items():
        for i, size in enumerate(sizes):
            assert_within_quantization_bound(out[name][0][i], n, size, seed + i, 128)


def test_hostile_traffic_is_dropped_and_the_honest_job_stays_exact(make_switch):
    env = make_switch(window=8, k=64)
    switch_addr = env.server.address
    stop = threading.Event()
    # an admitted sender of another job (one rank, so it registers at once) that forges packets
    attacker = Worker(env.endpoint, "attacker", 0, 1)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def attack():
        junk = [b"", b"\x00", b"\xff" * 9, b"\x07" + b"\x00" * 300, encode_packet(MsgType.RESET, 0, 0, 0, 0, 0, np.zeros(32, np.int32))]
        while not stop.is_set():
            for slot in range(0, 24):
                forged_job = encode_packet(MsgType.UPDATE, (attacker.info.job_number + 1) % 256, 0, slot, 0, 0,
                                           np.full(64, 10**6, np.int32))
                own_job_foreign_slot = encode_packet(MsgType.UPDATE, attacker.info.job_number, 0, slot, slot % 2, 0,
                                                     np.full(64, 10**6, np.int32))
                attacker._sock.sendto(forged_job, switch_addr)
                if not attacker.info.pool_base <= slot < attacker.info.pool_base + 8:
                    attacker._sock.sendto(own_job_foreign_slot, switch_addr)
                stranger.sendto(own_job_foreign_slot, switch_addr)
            for data in junk:
                stranger.sendto(data, switch_addr)
            time.sleep(0.002)

    thread = threading.Thread(target=attack)
    thread.start()
    try:
        results = allreduce_job(env.endpoint, "honest", 2, [20_000, 300], seed=9, dtype="int32")
    finally:
        stop.set()
        thread.join()
        attacker.close()
        stranger.close()
    assert np.array_equal(results[0][0], expected_sum(2, 20_000, 9, "int32"))
    assert np.array_equal(results[1][1], expected_sum(2, 300, 10, "int32"))
    d = env.switch.drops()
    for reason in (DropReason.MALFORMED, DropReason.NOT_ADMITTED, DropReason.JOB_MISMATCH,
                   DropReason.SLOT_OUT_OF_RANGE, DropReason.RESET_NOT_FROM_CONTROLLER):
        assert d[reason.name.lower()] > 0, reason


def test_backed_off_timeout_holds_until_a_clean_round_trip(make_switch):
    """TCP-like: after resends, the next packets keep the backed-off timeout (no burst of
    spurious resends at the base timeout); the first answered first transmission ends it."""
    env = make_switch(window=4, k=64)
    with Worker(env.endpoint, "backoff", 0, 1, timeout=20.0, retransmit_timeout=0.01) as w:
        assert w._rto() == pytest.approx(0.01)
        env.switch.set_drop_probability(None, 1.0)  # after the job's RESETs went through
        x = np.arange(40 * 64, dtype=np.int32)
        fut = w.allreduce_async(x)
        deadline = time.monotonic() + 10
        while w.stats.retransmissions < 8 and time.monotonic() < deadline:  # two resends per slot
            time.sleep(0.01)
        backed_off = float(w._rtt_state[1])
        assert backed_off >= 0.02 and w._rto() >= backed_off
        env.switch.set_drop_probability(None, 0.0)
        assert np.array_equal(fut.result(timeout=20), x)
        assert w._rtt_state[1] == 0.0 and w._rto() < backed_off
        assert np.array_equal(w.allreduce(x), x)


def test_killed_worker_fails_the_others_in_bounded_time_and_switch_serves_next_job(make_switch):
    env = make_switch(window=8, k=256, heartbeat_timeout=2.0)
    kwargs = {"timeout": 30.0, "heartbeat_interval": 0.2}
    queue = CTX.Queue()
    # rank 2 dies as soon as its call runs: the native engine sums 1M floats in under 50 ms
    # here, so a later death could come after the call has completed
    procs = [CTX.Process(target=slow_worker, args=(queue, env.endpoint, "doomed", r, 3, 1_000_000,
                                                   0.0 if r == 2 else None, kwargs), daemon=True) for r in range(3)]
    for p in procs:
        p.start()
    reports = sorted(queue.get(timeout=60) for _ in range(2))  # rank 2 dies without a word
    for p in procs:
        p.join(timeout=10)
    assert procs[2].exitcode == -9
    for rank, message, _ in reports:
        assert rank in (0, 1)
        assert message.startswith("JobFailed") and "heartbeat" in message and "[2]" in message, message
    # the switch freed the dead job's slots and serves the next one
    results = allreduce_job(env.endpoint, "next", 2, [5_000], seed=4, dtype="int32")
    assert np.array_equal(results[0][0], expected_sum(2, 5_000, 4, "int32"))


def _unused_tcp_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_controller_raises_clear_error_in_bounded_time():
    start = time.monotonic()
    with pytest.raises(ControllerTimeout, match="no answer from the controller"):
        Worker(f"tcp://127.0.0.1:{_unused_tcp_port()}", "x", 0, 1, control_timeout=1.0)
    assert time.monotonic() - start < 5


def test_bad_registration_is_refused_with_the_field_named(make_switch):
    env = make_switch()
    with pytest.raises(ControllerError, match="rank=5"):
        Worker(env.endpoint, "bad", 5, 2, control_timeout=5)
    with pytest.raises(ControllerError, match="world_size=33"):
        Worker(env.endpoint, "bad", 0, 33, control_timeout=5)
    with pytest.raises(ControllerError, match="world_size=0"):
        Worker(env.endpoint, "bad", 0, 0, control_timeout=5)
    with pytest.raises(WireFormatError, match="k=100"):
        Worker(env.endpoint, "bad", 0, 1, k=100)


def test_pool_exhaustion_is_reported(make_switch):
    env = make_switch(pool_size=8, window=8)
    with Worker(env.endpoint, "first", 0, 1):
        with pytest.raises(ControllerError, match="pool exhausted"):
            Worker(env.endpoint, "second", 0, 1, control_timeout=5)
    with Worker(env.endpoint, "third", 0, 1) as w:  # slots came back when "first" left
        assert w.allreduce(np.ones(3, np.int32)).tolist() == [1, 1, 1]


def test_unreachable_switch_fails_job_setup_with_clear_error():
    from emulation.switch import SoftwareSwitch
    from emulation.target import InProcessTarget
    from switchml.controller import Controller, ControllerOptions

    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # bound but never answers
    options = ControllerOptions(bind="tcp://127.0.0.1:0", switch_address=dead.getsockname(), reset_timeout=0.5)
    with Controller(InProcessTarget(SoftwareSwitch(pool_size=64)), options) as ctl:
        with pytest.raises(ControllerError, match="RESET packets were not acknowledged"):
            Worker(ctl.endpoint, "j", 0, 1, control_timeout=10)
    dead.close()


def test_torch_tensors_keep_type_shape_and_dtype(make_switch):
    torch = pytest.importorskip("torch")
    env = make_switch(k=64, window=4)
    with Worker(env.endpoint, "torch", 0, 1) as w:
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8
        y = w.allreduce(x)
        assert isinstance(y, torch.Tensor) and y.shape == (3, 4) and y.dtype == torch.float32
        assert torch.equal(y, x)
        h = w.allreduce(x.half())
        assert h.dtype == torch.float16 and torch.equal(h, x.half())
        i = w.allreduce(torch.arange(5, dtype=torch.int32))
        assert torch.equal(i, torch.arange(5, dtype=torch.int32))
        fut = w.allreduce_async(np.ones(3, np.float32))
        assert np.array_equal(fut.result(timeout=10), np.ones(3, np.float32))
        with pytest.raises(TypeError, match="float64"):
            w.allreduce(np.ones(3))


def test_worker_options_configure_a_worker_and_keyword_arguments_override_them(make_switch):
    from switchml import WorkerOptions

    env = make_switch(window=8)
    options = WorkerOptions(k=64, timeout=7.0, control_timeout=20.0)
    with Worker(env.endpoint, "opts", 0, 1, options=options, timeout=9.0) as w:
        assert w.info.k == 64  # asked for through the options
        assert w.options.timeout == 9.0 and w.options.control_timeout == 20.0 and options.timeout == 7.0
        assert w.allreduce(np.arange(300, dtype=np.int32)).tolist() == list(range(300))


def test_out_receives_the_sum_in_place(make_switch):
    """On each data path (the fixture's): the Python engine fills ``out`` from its blocks, the
    native one writes the sum into it directly."""
    torch = pytest.importorskip("torch")
    env = make_switch(k=64, window=4)
    with Worker(env.endpoint, "out", 0, 1) as w:
        x = np.arange(1000, dtype=np.float32) / 8
        out = np.full_like(x, np.nan)
        assert w.allreduce(x, out=out) is out and np.array_equal(out, x)
        ints = np.arange(300, dtype=np.int32).reshape(3, 100)
        assert w.allreduce(ints, out=ints) is ints and np.array_equal(ints, np.arange(300).reshape(3, 100))
        t = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4
        before = t.clone()
        assert w.allreduce(t, out=t) is t and torch.equal(t, before)  # in place, as dist.all_reduce
        for bad, message in ((np.empty(999, np.float32), "out: 999 elements of float32; expected 1000"),
                             (np.empty(1000, np.int32), "out: 1000 elements of int32; expected 1000 of float32"),
                             (np.empty(2000, np.float32)[::2], "C-contiguous"),
                             ([0.0] * 1000, "out: expected a numpy array or torch tensor, got list")):
            with pytest.raises((TypeError, ValueError), match=message):
                w.allreduce(x, out=bad)
        # a refused out loses nothing: the next call works
        assert np.array_equal(w.allreduce(x), x)
