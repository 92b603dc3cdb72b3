"""The native data paths against the Python references (differential tests).

- Switch: random packet streams (valid, duplicated, reordered, lost, malformed, hostile,
  with table changes and emulated loss in between) through ``SoftwareSwitch.process`` on
  both data paths: identical replies after every packet, identical counters and slot
  state at the end.
- Quantizer: ``switchml._native`` against ``switchml.quantize`` (numpy), bit for bit.
- Worker engine: the same sums, bit for bit, from native and Python ranks (also mixed in
  one job); the same timeout, close and backoff behaviour.
- Selection: ``--dataplane``, ``dataplane=``, ``$SWITCHML_DATAPLANE`` and the fallback
  where the extension is missing; the build's fallback where there is no compiler.

Everything that needs the extensions skips, with the reason, where they did not build.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from emulation import native as switch_native
from emulation.runner import SoftwareSwitchRunner
from emulation.switch import SoftwareSwitch
from switchml import AllreduceTimeout, Worker, WorkerClosed, native, protocol, quantize
from switchml.pipeline import (
    DROPS_COUNTER,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    Replica,
    WorkerEntry,
)
from switchml.protocol import MsgType

REPO = Path(__file__).resolve().parent.parent
MISSING = switch_native.why_missing()
needs_native = pytest.mark.skipif(MISSING is not None, reason=f"native data path not built: {MISSING}")
COUNTERS = (RESULTS_COUNTER, RETRANSMISSIONS_COUNTER, DROPS_COUNTER, PACKETS_COUNTER)


# ------------------------------------------------------------------------ switch
CTRL = ("127.0.0.9", 9000)
STRANGER = ("127.0.0.99", 4242)
POOL = 64
SIZES = (0, 1, 2, 3, 4)  # size 5..7 (k=1024..4096) are refused: BAD_SIZE is part of the stream


class Job:
    def __init__(self, number: int, n: int, base: int, slots: int, k: int, mgid: int, host: int) -> None:
        self.number, self.n, self.base, self.slots, self.k, self.mgid = number, n, base, slots, k, mgid
        self.addrs = [(f"127.0.{host}.{1 + w % 200}", 7000 + w) for w in range(n)]

    def entry(self, w: int) -> WorkerEntry:
        return WorkerEntry(*self.addrs[w], self.number, w, self.n, self.mgid, self.base, self.slots)

    def replicas(self) -> list[Replica]:
        return [Replica(10 + w, w, "00:00:00:00:00:00", *a) for w, a in enumerate(self.addrs)]


JOBS = [Job(3, 3, 0, 8, 64, 1, 1), Job(200, 1, 8, 4, 32, 2, 2), Job(7, 32, 12, 4, 256, 3, 3),
        Job(9, 2, 16, 40, 128, 4, 4)]


def build_switch(dataplane: str, seed: int, drop: float) -> SoftwareSwitch:
    sw = SoftwareSwitch(pool_size=POOL, sizes=SIZES, drop_probability=drop, seed=seed, dataplane=dataplane)
    sw.add_admission(*CTRL, None)
    for job in JOBS:
        sw.set_multicast_group(job.mgid, job.replicas())
        for w in range(job.n):
            sw.add_admission(*job.addrs[w], job.entry(w))
    return sw


def packet(msg: int, job: int, tsi: int, slot: int, set_bit: int, e0: int, payload: np.ndarray, size: int) -> bytes:
    return protocol.encode_header(msg, size, job, tsi, slot, set_bit, e0) + payload.astype(">i4").tobytes()


def random_payload(rng: random.Random, k: int) -> np.ndarray:
    kind = rng.random()
    if kind < 0.2:  # extremes: the sum must wrap mod 2^32
        return np.array([rng.choice([2**31 - 1, -(2**31), -1, 1, 0]) for _ in range(k)], dtype=np.int64)
    return np.array([rng.randrange(-(2**31), 2**31) for _ in range(k)], dtype=np.int64)


def stream(seed: int, length: int):
    """Yield ("packet", data, src) and ("table", callable-name, args) steps."""
    rng = random.Random(seed)
    history: list[tuple[bytes, tuple[str, int]]] = []
    tsi = 0
    while length > 0:
        r = rng.random()
        job = rng.choice(JOBS)
        size = protocol.K_TO_SIZE[job.k]
        if r < 0.45:  # a round on one slot: every worker, shuffled, some lost, some twice
            slot, set_bit = job.base + rng.randrange(job.slots), rng.randrange(2)
            order = list(range(job.n))
            rng.shuffle(order)
            tsi += 1
            for w in order:
                if rng.random() < 0.1:
                    continue  # lost before the switch
                k = job.k if rng.random() > 0.03 else 32 << rng.choice([s for s in SIZES if 32 << s != job.k])
                data = packet(MsgType.UPDATE, job.number, tsi, slot, set_bit, rng.randrange(-128, 128),
                              random_payload(rng, k), protocol.K_TO_SIZE[k])
                copies = 2 if rng.random() < 0.1 else 1
                for _ in range(copies):
                    history.append((data, job.addrs[w]))
                    yield "packet", data, job.addrs[w]
                    length -= 1
        elif r < 0.60 and history:  # a duplicate or late retransmission
            yield "packet", *rng.choice(history[-200:])
            length -= 1
        elif r < 0.80:  # malformed
            data, src = rng.choice(history) if history else (b"\x00" * 12, CTRL)
            choice = rng.randrange(6)
            if choice == 0:
                data = data[: rng.randrange(len(data))]
            elif choice == 1:
                data = data + bytes(rng.randrange(1, 9))
            elif choice == 2:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            elif choice == 3:  # a size the switch refuses, correct length for it
                bad = rng.choice([5, 6, 7])
                data = bytes([data[0] & 0xF0 | bad]) + data[1:10] + bytes(4 * (32 << bad))
            elif choice == 4:  # RESULT or an unknown type sent to the switch
                data = bytes([rng.choice([1, 3, 15]) << 4 | (data[0] & 0xF)]) + data[1:]
            else:
                data = bytes([data[0] | 0x08]) + data[1:]  # the unused header bit set: still valid
            yield "packet", data, src
            length -= 1
        elif r < 0.93:  # hostile
            w = rng.randrange(job.n)
            slot = job.base + rng.randrange(job.slots)
            payload = random_payload(rng, job.k)
            choice = rng.randrange(5)
            if choice == 0:  # forged job number
                data = packet(MsgType.UPDATE, (job.number + 1) % 256, tsi, slot, 0, 0, payload, size)
                src = job.addrs[w]
            elif choice == 1:  # a slot outside the job's range (or the pool)
                data = packet(MsgType.UPDATE, job.number, tsi, rng.choice([job.base - 1, job.base + job.slots,
                                                                           POOL + 5, protocol.SLOT_MASK]) % 16384,
                              0, 0, payload, size)
                src = job.addrs[w]
            elif choice == 2:  # not admitted, or the controller sending an UPDATE
                data = packet(MsgType.UPDATE, job.number, tsi, slot, 0, 0, payload, size)
                src = rng.choice([STRANGER, CTRL])
            elif choice == 3:  # RESET from a worker
                data = packet(MsgType.RESET, 0, 0, slot, 0, 0, np.zeros(32, np.int64), 0)
                src = job.addrs[w]
            else:  # RESET from the controller (sometimes of a slot outside the pool)
                data = packet(MsgType.RESET, 0, 0, rng.choice([slot, slot, POOL + 1]), 0, 0, np.zeros(32, np.int64), 0)
                src = CTRL
            yield "packet", data, src
            length -= 1
        else:  # a table change, applied to both switches
            choice = rng.randrange(5)
            w = rng.randrange(job.n)
            if choice == 0:
                yield "table", "remove_admission", job.addrs[w]
            elif choice == 1:
                yield "table", "add_admission", (*job.addrs[w], job.entry(w))
            elif choice == 2:
                yield "table", "set_drop_probability", (rng.choice([10, 11, None, 0]), rng.choice([0.0, 0.05, 0.5]))
            elif choice == 3:
                yield "table", "clear_drop_probability", (rng.choice([10, 11, 0]),)
            else:
                yield "table", "delete_multicast_group", (job.mgid,)
                yield "table", "set_multicast_group", (job.mgid, job.replicas()[: rng.randrange(1, job.n + 1)])


def assert_same_state(ref: SoftwareSwitch, nat: SoftwareSwitch) -> None:
    for name in COUNTERS:
        assert nat.read_counter(name) == ref.read_counter(name), name
        assert all(type(c) is int for c in nat.read_counter(name))
    for v in (0, 1):
        for s in range(POOL):
            a, b = ref.slot_state(v, s), nat.slot_state(v, s)
            assert a[:3] == b[:3], (v, s)
            if a[1] or b[1] or a[0]:  # values of a slot that was touched since its reset
                k = a.k
                assert np.array_equal(a[3][:k], b[3][:k]), (v, s)


@needs_native
@pytest.mark.parametrize("drop", [0.0, 0.15])
@pytest.mark.parametrize("seed", range(10))
def test_switch_streams_give_identical_replies_and_counters(seed, drop):
    ref, nat = build_switch("python", seed, drop), build_switch("native", seed, drop)
    assert ref.dataplane == "python" and nat.dataplane == "native"
    sent = 0
    for kind, *step in stream(seed, 1500):
        if kind == "table":
            name, args = step
            getattr(ref, name)(*args)
            getattr(nat, name)(*args)
            continue
        data, src = step
        expected = ref.process(data, src)
        got = nat.process(data, src)
        assert got == expected, f"packet {sent}: {data[:10].hex()} from {src}"
        sent += 1
    assert_same_state(ref, nat)
    assert nat.drops() == ref.drops()
    assert sum(ref.read_counter(RESULTS_COUNTER)) > 20  # the stream did complete slots
    ref.clear()
    nat.clear()
    assert_same_state(ref, nat)


@needs_native
def test_every_drop_reason_and_reply_kind_occurs_in_the_streams():
    """The streams of the test above exercise every counter (else it would prove little)."""
    sw = build_switch("native", 0, 0.15)
    for kind, *step in stream(0, 3000):
        if kind == "table":
            getattr(sw, step[0])(*step[1])
        else:
            sw.process(*step)
    assert all(v > 0 for v in sw.drops().values()), sw.drops()
    assert sum(sw.read_counter(RETRANSMISSIONS_COUNTER)) > 0 and sw.read_counter(PACKETS_COUNTER)[2] > 0


@needs_native
@pytest.mark.parametrize("seed", [0, 1, 3, 12345, -7, 2**40 + 5, 2**100 + 3])
def test_loss_generator_draws_as_pythons_random(seed):
    sw = SoftwareSwitch(pool_size=8, seed=seed, dataplane="native")
    ref = random.Random(seed)
    assert sw.data_plane.rng_bits15(2000) == [ref.getrandbits(15) for _ in range(2000)]


@needs_native
def test_counter_writes_and_reads_are_python_ints_on_the_native_path():
    sw = build_switch("native", 0, 0.0)
    sw.set_counter(DROPS_COUNTER, 3, 41)
    sw.process(packet(MsgType.UPDATE, 0, 0, 0, 0, 0, np.zeros(32, np.int64), 0), STRANGER)
    assert sw.read_counter(DROPS_COUNTER)[3] == 42
    assert sw.drops()["not_admitted"] == 42
    with pytest.raises(ValueError, match="IPv4"):
        sw.process(b"\x00" * 138, ("::1", 5))


@needs_native
def test_native_switch_serves_udp_with_several_threads():
    from mpworkers import allreduce_job, expected_sum

    runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, 256, dataplane="native", threads=2, window=8, k=256)
    try:
        results = allreduce_job(runner.endpoint, "threads", 3, [50_000], seed=5, dtype="int32",
                                worker_kwargs={"dataplane": "native"})
        assert np.array_equal(results[0][0], expected_sum(3, 50_000, 5, "int32"))
        # per rank: 196 blocks and a first window of 8 (the descriptor's), and one registration
        # probe where the worker probes the switch when it registers
        assert runner.switch.read_counter(PACKETS_COUNTER)[1] in (3 * (196 + 8), 3 * (196 + 8 + 1))
    finally:
        runner.stop()


# ------------------------------------------------------------------------ quantizer
def _native():
    return native.worker_module()[0]


SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.0e38, -3.0e38, 2.0**126, 1.0, -1.0, 2.0**30, 0.5, 1.5, 2.5, -2.5,
           float("nan"), float("inf"), -float("inf")]
BIG = float(np.float32(3.0e38))
elements = st.floats(min_value=-BIG, max_value=BIG, allow_nan=False, width=32) | st.sampled_from(SPECIAL)


def native_exponents(x: np.ndarray, k: int) -> np.ndarray:
    out = np.empty(-(-x.size // k), np.int8)
    _native().block_exponents(x, k, out)
    return out


@needs_native
@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=elements), st.sampled_from([32, 64, 256]))
def test_block_exponents_match_numpy(x, k):
    padded = np.zeros(-(-x.size // k) * k, np.float32)
    padded[: x.size] = x
    assert np.array_equal(native_exponents(x, k), quantize.block_exponents(padded.reshape(-1, k)))


@needs_native
@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, 64, elements=elements.filter(lambda v: v == v and abs(v) != float("inf"))),
       st.integers(1, 32), st.integers(0, 40))
def test_quantize_matches_numpy_bit_for_bit(x, n, headroom):
    local = int(quantize.block_exponents(x[None, :])[0])
    e = min(local + headroom, protocol.EXP_NAN)  # the global exponent is the max over workers: >= local
    out = bytearray(x.nbytes)
    _native().quantize(x, e, n, out)
    assert np.array_equal(np.frombuffer(out, ">i4"), quantize.quantize(x, e, n))


@needs_native
@pytest.mark.parametrize("n", [1, 3, 32])
def test_quantize_matches_numpy_at_every_exponent(n):
    """Every global exponent: f = 2^(30-c-E) is a float32 down to E = -97-c and float64 below."""
    rng = np.random.default_rng(n)
    for e in range(protocol.EXP_MIN, protocol.EXP_NAN):
        x = (rng.uniform(-1, 1, 256) * 2.0**e).astype(np.float32)  # |x| < 2^e, some denormal for small e
        x[:4] = [0.0, -0.0, np.float32(2.0**e) * np.float32(0.99999994), np.float32(1e-45)]
        out = bytearray(x.nbytes)
        _native().quantize(x, e, n, out)
        assert np.array_equal(np.frombuffer(out, ">i4"), quantize.quantize(x, e, n)), e


@needs_native
def test_quantize_rounds_ties_to_even_and_handles_the_nan_sentinel():
    n, e = 1, 1  # f = 2^29: x * f lands on .5 for these x
    x = (np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.5], np.float64) / 2**29).astype(np.float32)
    out = bytearray(x.nbytes)
    _native().quantize(x, e, n, out)
    assert np.frombuffer(out, ">i4").tolist() == quantize.quantize(x, e, n).tolist() == [0, 2, 2, 0, -2, 4]
    _native().quantize(np.array([np.nan, 1.0], np.float32), protocol.EXP_NAN, 4, out := bytearray(8))
    assert out == bytes(8)


@needs_native
@settings(max_examples=300, deadline=None)
@given(arrays(np.int32, st.integers(1, 200)), st.integers(protocol.EXP_MIN, protocol.EXP_NAN), st.integers(1, 32))
def test_dequantize_matches_numpy_bit_for_bit(total, e, n):
    out = np.empty(total.size, np.float32)
    _native().dequantize(total.astype(">i4").tobytes(), e, n, out)
    with np.errstate(over="ignore"):  # large E: the float32 result is inf, on both paths
        want = quantize.dequantize(total, e, n)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@needs_native
@pytest.mark.parametrize("size", [1, 1000, 4096, 100_003])
def test_fused_block_quantizer_matches_numpy(size):
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size) * rng.choice([1e-30, 1.0, 1e30], size)).astype(np.float32)
    k, n = 1024, 4
    blocks = -(-size // k)
    q, exps = bytearray(blocks * k * 4), np.empty(blocks, np.int8)
    _native().quantize_blocks(x, k, n, q, exps)
    padded = np.zeros(blocks * k, np.float32)
    padded[:size] = x
    ref_exps = quantize.block_exponents(padded.reshape(-1, k))
    assert np.array_equal(exps, ref_exps)
    ref_q = np.concatenate([quantize.quantize(b, int(e), n) for b, e in zip(padded.reshape(-1, k), ref_exps, strict=True)])
    assert np.array_equal(np.frombuffer(q, ">i4"), ref_q)
    back = np.empty(size, np.float32)
    _native().dequantize_blocks(q, k, n, exps, back)
    ref_back = np.concatenate([quantize.dequantize(t, int(e), n) for t, e in zip(ref_q.reshape(-1, k), ref_exps,
                                                                               strict=True)])[:size]
    assert np.array_equal(back.view(np.uint32), ref_back.view(np.uint32))


# ------------------------------------------------------------------------ worker engine
def run_job(endpoint: str, name: str, planes: list[str], inputs: list[np.ndarray], **kwargs) -> list:
    """One job of len(planes) ranks as threads of this process; rank r uses data path planes[r]."""
    n = len(planes)
    workers: list[Worker | None] = [None] * n
    results: list = [None] * n

    def rank(r: int) -> None:
        try:
            workers[r] = Worker(endpoint, name, r, n, dataplane=planes[r], **kwargs)
            results[r] = [workers[r].allreduce(x[r]) for x in inputs]
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stats = [w.stats for w in workers if w is not None]
    for w in workers:
        if w is not None:
            w.close()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [results, stats, workers]


@needs_native
@pytest.mark.parametrize("planes", [["python", "python", "python"], ["native", "native", "native"],
                                    ["native", "python", "native"]])
def test_native_and_python_ranks_compute_identical_sums(planes):
    rng = np.random.default_rng(11)
    sizes = [1, 255, 257, 10_000, 33_333]
    floats = [[(rng.standard_normal(s) * 10.0 ** rng.integers(-20, 20)).astype(np.float32) for _ in planes]
              for s in sizes]
    floats.append([np.array([1.0, np.nan, 2.0], np.float32), np.ones(3, np.float32), np.ones(3, np.float32)])
    ints = [[rng.integers(-(2**29), 2**29, 5_000, dtype=np.int32) for _ in planes]]
    runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, 256, dataplane="native", window=8, k=128)
    try:
        results, stats, workers = run_job(runner.endpoint, "mixed", planes, floats + ints)
    finally:
        runner.stop()
    reference = _reference_sums(floats, ints, len(planes))
    for r in range(len(planes)):
        for got, want in zip(results[r], reference, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    for w in workers:  # the state that carries over to the next call is the same on both paths
        # every call: its blocks and a first window (for int32 too: it holds the call descriptor)
        assert w._next_tsi == sum(-(-x[0].size // 128) + min(8, -(-x[0].size // 128)) for x in floats) + 40 + 8
    assert len({(s.packets_sent, s.results) for s in stats}) == 1


def _reference_sums(floats, ints, n: int) -> list[np.ndarray]:
    """What the switch computes, from switchml.quantize (numpy) alone."""
    k, out = 128, []
    for xs in floats:
        size = xs[0].size
        blocks = -(-size // k)
        padded = [np.pad(x, (0, blocks * k - size)).reshape(-1, k) for x in xs]
        exps = np.max([quantize.block_exponents(p) for p in padded], axis=0)
        total = np.zeros((blocks, k), np.int32)
        for p in padded:
            for b in range(blocks):
                total[b] += quantize.quantize(p[b], int(exps[b]), n)
        out.append(np.concatenate([quantize.dequantize(total[b], int(exps[b]), n) for b in range(blocks)])[:size])
    for xs in ints:
        out.append(np.sum(xs, axis=0, dtype=np.int32))
    return out


@pytest.mark.parametrize("plane", ["python", "native"])
def test_progress_timeout_and_close_fail_the_call_clearly(plane, make_switch):
    if plane == "native" and MISSING:
        pytest.skip(f"native data path not built: {MISSING}")
    env = make_switch(window=4, k=64)

    def pair(job: str, timeout: float) -> tuple[Worker, Worker]:
        """Two ranks (registration waits for both); only rank 0 will sum, so no slot completes."""
        box: list[Worker] = []
        other = threading.Thread(target=lambda: box.append(Worker(env.endpoint, job, 1, 2, dataplane=plane)))
        other.start()
        w = Worker(env.endpoint, job, 0, 2, timeout=timeout, dataplane=plane)
        other.join()
        return w, box[0]

    w, idle = pair("half", 1.0)
    start = time.monotonic()
    with pytest.raises(AllreduceTimeout, match="no result from the switch"):
        w.allreduce(np.ones(1000, np.float32))
    assert 0.9 < time.monotonic() - start < 5
    w.close()
    idle.close()
    w, idle = pair("closing", 30.0)
    fut = w.allreduce_async(np.ones(1000, np.float32))
    time.sleep(0.2)
    start = time.monotonic()
    w.close()
    with pytest.raises(WorkerClosed):
        fut.result(timeout=5)
    assert time.monotonic() - start < 5
    idle.close()


@needs_native
def test_backoff_and_stale_filtering_match_the_python_engine():
    """A switch that loses everything: both engines resend on the same doubling schedule."""
    counts = {}
    for plane in ("python", "native"):
        env = SoftwareSwitchRunner("127.0.0.1", 0, 0, 64, window=4, k=64)
        with Worker(env.endpoint, f"lossy-{plane}", 0, 1, timeout=1.0, dataplane=plane) as w:
            env.switch.set_drop_probability(None, 1.0)  # after the job's RESETs went through
            junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stop = threading.Event()

            def spray(address=w.address, stop=stop, junk=junk):
                bogus = protocol.encode_packet(MsgType.RESULT, w.info.job_number, 999, w.info.pool_base, 0, 0,
                                               np.zeros(64, np.int32))
                while not stop.is_set():
                    for data in (bogus, b"\x10", bogus + b"\x00"):
                        junk.sendto(data, address)
                    time.sleep(0.01)

            sprayer = threading.Thread(target=spray)
            sprayer.start()
            with pytest.raises(AllreduceTimeout):
                w.allreduce(np.ones(4 * 64, np.float32))
            stop.set()
            sprayer.join()
            junk.close()
            counts[plane] = (w.stats.retransmissions, w.stats.stale_results)
        env.stop()
    # nothing comes back, so only the oldest due packet is resent, once per its doubling RTO:
    # at 10, 30, 50, 70 (RTO 20 ms), 90, 130, 170, 210 (40 ms), 250, 330, 410, 490 (80 ms),
    # 570, 730, 890 ms: 15 resends in the 1 s progress timeout, not 4 slots' worth each time
    for plane, (resent, stale) in counts.items():
        assert 12 <= resent <= 18, (plane, counts)
        assert stale > 30, (plane, counts)


# ------------------------------------------------------------------------ selection and build
def test_dataplane_option_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="dataplane='fast'"):
        SoftwareSwitch(dataplane="fast")
    monkeypatch.setenv(native.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"\$SWITCHML_DATAPLANE"):
        SoftwareSwitch()
    monkeypatch.setenv(native.ENV_VAR, "python")
    assert SoftwareSwitch().dataplane == "python"


def test_without_the_extension_the_default_is_python_and_native_is_refused():
    """As on a machine without a compiler: the modules cannot be imported."""
    code = """
import logging, sys
sys.modules["switchml._native"] = None
sys.modules["emulation._native_switch"] = None
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from emulation.switch import SoftwareSwitch
from switchml import native
assert SoftwareSwitch().dataplane == "python"
assert native.resolve_worker(None) == "python"
for make in (lambda: SoftwareSwitch(dataplane="native"), lambda: native.resolve_worker("native")):
    try:
        make()
    except native.NativeUnavailable as exc:
        print("refused:", exc)
    else:
        raise SystemExit("native was not refused")
"""
    env = {k: v for k, v in os.environ.items() if k != native.ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("data path: python (default; pure-Python reference, native unavailable") == 2, proc.stdout
    assert proc.stdout.count("refused:") == 2 and "pip install -e ." in proc.stdout


@needs_native
def test_emulate_takes_dataplane_and_logs_it():
    from trainer.launch import free_port

    for plane in ("python", "native"):
        switch = subprocess.Popen([sys.executable, "-m", "emulation.cli", "emulate", "--host", "127.0.0.1", "--port",
                                   str(free_port()), "--control-port", str(free_port()), "--dataplane", plane],
                                  stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            line = ""
            deadline = time.monotonic() + 60
            while "software switch: data" not in line and time.monotonic() < deadline:
                line = switch.stderr.readline()
            assert f"{plane} data path" in line, line
        finally:
            switch.terminate()
            switch.communicate(timeout=30)
    proc = subprocess.run([sys.executable, "-m", "emulation.cli", "emulate", "--dataplane", "fast"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "--dataplane" in proc.stderr


@pytest.mark.slow
def test_build_without_a_compiler_skips_the_extensions_and_succeeds(tmp_path):
    env = {**os.environ, "CC": "false", "LDSHARED": "false"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "could not build" in proc.stderr and "pure-Python data path" in proc.stderr
    assert not list((tmp_path / "lib").rglob("*.so"))


@needs_native
def test_bench_pps_runs_and_writes_json(tmp_path):
    out = tmp_path / "pps.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "pps", "--payload", "256", "--targets",
                           "native,python,echo-native,echo-offload", "--duration", "0.3", "--warmup", "0.1",
                           "--repeats", "1", "--quantize-size", "256KB", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import json

    doc = json.loads(out.read_text())
    assert {p["target"] for p in doc["points"]} == {"native", "python", "echo-native", "echo-offload"}
    assert all(p["pps"]["median"] > 0 for p in doc["points"])
    assert doc["quantizer"]["gb_per_s"]["native_quantize"] > 0 and "switchml-bench pps" in doc["command"]
