"""The worker's engine: one allreduce call's packets, behind one interface with two loops.

``Engine.allreduce(flat, state)`` runs one call on this rank's ``CallState`` (the job's
assignment, the socket, and what carries from call to call: slot uses, the next packet id,
the round-trip estimator, the stop flags) and returns an ``Outcome``: the sum, or why the
call stopped, with the numbers the ``Worker`` needs to turn it into its errors. Two engines:
``PythonEngine`` (the reference) and ``NativeEngine`` (the same loop in C). ``make_engine``
picks one for a ``dataplane``.


One ``Worker`` per rank. It registers with the controller, then a single engine thread
runs allreduce calls one after another, in the order they were made, so every rank's
k-th call meets the other ranks' k-th call in the same slots.

One call on an array of B blocks of k elements (float32 or int32), window
w = min(W, max(B, 1)), B + w packets:

1. Cut the array into blocks; for float32, compute each block's local exponent (one numpy pass).
2. Send packets 0..w-1, the first window: zero payload and, for float32, the local exponents
   of blocks 0..w-1. Packet 0's payload holds the call descriptor: this rank's element count
   and dtype (``descriptor_word``) in lane ``worker_id``, zeros elsewhere, so the switch's sum
   holds every rank's word exactly. Packet i uses slot ``pool_base + i mod w``; each reuse of
   a slot flips its set bit (the shadow copy).
3. Packet 0's RESULT comes before this rank sends any payload (results of packets 1..w-1
   that come first are kept; their next packets wait for it). If a rank's descriptor differs
   from this one, the call's outcome carries every rank's word (the ``Worker`` raises ``ShapeMismatch`` naming this rank's and the differing
   ranks' counts and dtypes), never a result. Before it does, each rank sends the first-window
   packets of the largest window any rank used (W is the job's, so every rank can tell the
   others' w from their counts) and waits for their results: every slot of that window was
   then used once on every rank, and the job's next call meets in step. Every call, even an
   empty one, sends its descriptor, so every call meets the other ranks' on slot 0.
4. On the RESULT of packet i: for float32 its exponent is block i's global max E_i; its
   payload, for i >= w, is the sum of block i-w (float32: dequantized with E_(i-w)). Then
   send packet i+w: block i (float32: quantized with E_i, with block i+w's local exponent).
5. Retransmission, as TCP's: the timeout (RTO) is the smoothed round trip plus 4 mean
   deviations (RFC 6298, ``retransmit_timeout``), sampled on first transmissions only (Karn's
   rule) with each sample's gain divided by the w samples a round trip brings (RFC 7323,
   appendix G), between ``retransmit_timeout`` (the floor) and a cap. A packet without its
   RESULT after its RTO is resent unchanged, and its RTO doubles; a backed-off RTO also holds
   for the slots' next packets until a first transmission is answered. A packet that a packet
   sent after it overtook (it, or its result, was lost: RACK's rule) is resent after one
   smoothed round trip plus a tick, within the same floor and cap, without the deviation
   term: under loss the samples include peers' recoveries, and waiting those out would only
   slow this rank's. When nothing sent after a packet came back (a peer is descheduled, the switch stalls, or
   all was lost) only the oldest due packet is resent, once per its RTO, as TCP resends only
   the first unacknowledged segment on a timeout: a slow peer costs one spurious resend, not
   a window of them. Timers are checked only once the socket is drained (a result still
   queued behind others is not lost). No progress at all for ``timeout`` stops the call (``Outcome.stopped``).
6. After B + w results the sum is complete.

RESULTs whose job number, slot or tsi (the packet id) do not match an outstanding packet
are ignored: stale, or duplicates (a result for a packet of this call already answered,
``WorkerStats.duplicate_results``: a resend of it was spurious).

``PythonEngine`` below is the reference. With ``dataplane="native"`` the same loop runs
in C (``native/worker.c``: recvmmsg/sendmmsg batches, the quantizer fused into packet
building, the GIL released) with the same window, set bits, tsi, RTO, backoff, stale
filtering, progress timeout and abort; ``NativeEngine`` hands it the call.
"""

from __future__ import annotations

import abc
import math
import socket
import struct
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from switchml import defaults, native, quantize
from switchml.messages import JobInfo
from switchml.native import WORKER_NUM_STATS as _NATIVE_STATS
from switchml.native import WORKER_RC_MISMATCH as _RC_MISMATCH
from switchml.protocol import (
    DESCRIPTOR_DTYPE_BITS,
    DESCRIPTOR_MAX_ELEMENTS,
    DTYPE_CODES,
    EXP_MIN,
    MSG_TYPE_SHIFT,
    PREAMBLE,
    PREAMBLE_BYTES,
    SET_BIT,
    SLOT_MASK,
    MsgType,
    k_to_size,
    packet_bytes,
)

TSI_MOD = 1 << 32
_TSI_MOD = TSI_MOD
SCAN_INTERVAL_S = 0.002  # how often outstanding slots are checked for a due retransmission
_SCAN_INTERVAL_S = SCAN_INTERVAL_S
#: Receives in a row that may postpone a due timer check while results keep arriving: they
#: may answer the very slots whose timers are due (a resend then would be spurious).
_SCAN_DEFER_MAX = 64
FLAG_ABORT, FLAG_CLOSED = 1, 2  # bits of CallState.flags, which the loops poll (the native one without the GIL)


def first_window(window: int, n_el: int, k: int) -> int:
    """Packets in a call's first window (one per slot): min(W, blocks), and 1 for an empty call
    (which still sends its descriptor, so that it meets the other ranks' call)."""
    return min(window, max(1, -(-n_el // k)))


def descriptor_word(n_el: int, dtype: Any) -> int:
    """This rank's word in the call descriptor (``protocol.DESCRIPTOR_*``): element count
    (saturated) and dtype code."""
    return (min(n_el, DESCRIPTOR_MAX_ELEMENTS) << DESCRIPTOR_DTYPE_BITS) | DTYPE_CODES[np.dtype(dtype).name]


def describe_word(word: int) -> tuple[int, str]:
    """(element count, dtype name) of a descriptor word."""
    code = word & ((1 << DESCRIPTOR_DTYPE_BITS) - 1)
    name = next((name for name, c in DTYPE_CODES.items() if c == code), None)
    return word >> DESCRIPTOR_DTYPE_BITS, name or f"no descriptor (dtype code {code}: another switchml version?)"


def _count_text(count: int) -> str:
    return f">= {count}" if count >= DESCRIPTOR_MAX_ELEMENTS else str(count)


def rtt_sample(srtt: float, rttvar: float, sample: float, per_rtt: int) -> tuple[float, float]:
    """RFC 6298's estimator after one round-trip sample: (smoothed RTT, mean deviation).

    ``srtt <= 0`` means no sample yet: the first sets srtt = R, rttvar = R / 2. After that,
    rttvar += beta * (|srtt - R| - rttvar), then srtt += alpha * (R - srtt), with alpha and
    beta of ``defaults`` divided by ``per_rtt``, the samples one round trip brings (the
    window's slots), as RFC 7323 (appendix G) does for per-segment samples: the estimator
    then forgets a burst of slow round trips over a few round trips, not a few packets.
    """
    sample = max(sample, 1e-9)  # a zero would read as "no sample"
    if srtt <= 0:
        return sample, sample / 2
    gain = 1.0 / max(1, per_rtt)
    rttvar += (abs(srtt - sample) - rttvar) * defaults.RTT_BETA * gain
    srtt += (sample - srtt) * defaults.RTT_ALPHA * gain
    return srtt, rttvar


def retransmit_timeout(srtt: float, rttvar: float, backed_off: float, floor: float, cap: float,
                       granularity: float) -> float:
    """RFC 6298's RTO: srtt + max(granularity, K * rttvar), at least ``floor`` (also the RTO
    before the first sample) and a backed-off timeout still in force, at most ``cap``."""
    rto = floor if srtt <= 0 else max(floor, srtt + max(granularity, defaults.RTT_K * rttvar))
    return min(max(rto, backed_off), cap)


@dataclass
class WorkerStats:
    """Counts since the worker started."""

    calls: int = 0
    packets_sent: int = 0
    retransmissions: int = 0
    results: int = 0
    stale_results: int = 0
    #: results for a packet already answered: a resend of it was spurious (the switch also
    #: counts, as the drop reason retransmission_incomplete, resends of packets it already has)
    duplicate_results: int = 0



@dataclass
class CallState:
    """What an engine works on: this rank's assignment and socket, and the state calls carry over."""

    #: The controller's assignment (job number, worker id, k, window, slots, switch address).
    info: JobInfo
    #: The rank's UDP socket to the switch (blocking for the native engine).
    sock: socket.socket
    #: Counters the engines add to.
    stats: WorkerStats
    #: Seconds a call may go without any progress before it stops (``Outcome.stopped``).
    timeout: float
    #: The retransmission timeout's floor (and the RTO before the first sample).
    retransmit_timeout: float
    #: Per slot: how often it was used (its next set bit).
    slot_uses: list[int] = field(default_factory=list)
    #: tsi of the next call's packet 0.
    next_tsi: int = 0
    #: [smoothed round trip of a packet (0: no sample yet), backed-off timeout still in force
    #: (0: none), round trip's mean deviation], in seconds (rtt_sample, retransmit_timeout);
    #: kept across calls, and an array so the native loop updates it in place.
    rtt_state: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.float64))
    #: FLAG_ABORT | FLAG_CLOSED, raised by the Worker; the loops stop when one is set.
    flags: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int32))

    def __post_init__(self) -> None:
        if not self.slot_uses:
            self.slot_uses = [0] * self.info.window

    def rto(self) -> float:
        """Retransmission timeout of a fresh packet (``retransmit_timeout`` of the estimator's state)."""
        srtt, backed_off, rttvar = self.rtt_state
        return retransmit_timeout(float(srtt), float(rttvar), float(backed_off), self.retransmit_timeout,
                                  defaults.RETRANSMIT_TIMEOUT_MAX_S, _SCAN_INTERVAL_S)

    def sample_rtt(self, sample: float, per_rtt: int) -> None:
        """A clean round trip (a first transmission's): update the estimator; the backoff ends."""
        self.rtt_state[0], self.rtt_state[2] = rtt_sample(float(self.rtt_state[0]), float(self.rtt_state[2]),
                                                            sample, per_rtt)
        self.rtt_state[1] = 0.0

    def lost_timeout(self) -> float:
        """Timeout of a packet that a later one overtook (RACK's rule): one smoothed round trip
        and a tick, between the floor and the cap, at least a backoff in force. No deviation
        term: the deviation measures peers' delays, which do not hold a packet that is lost."""
        srtt, backed_off, _ = self.rtt_state
        return retransmit_timeout(float(srtt), 0.0, float(backed_off), self.retransmit_timeout,
                                  defaults.RETRANSMIT_TIMEOUT_MAX_S, _SCAN_INTERVAL_S)


@dataclass
class Outcome:
    """How an engine's call ended: ``result`` when it completed, else why not."""

    #: The sum (a fresh 1-D array of the call's length and dtype), when the call completed.
    result: np.ndarray | None = None
    #: Every rank's descriptor word (packet 0's result lanes) when they differ from this rank's:
    #: a shape mismatch. With ``stopped`` False the job's slots were brought back in step.
    lanes: np.ndarray | None = None
    #: The call stopped early: a flag was raised (abort, close) or no progress for ``timeout``.
    stopped: bool = False
    #: The native loop's return code (0 for the Python loop and a completed call).
    code: int = 0
    #: Seconds without progress when the call stopped.
    silent_for: float = 0.0
    #: Packets answered and packets of the call when it stopped.
    done: int = 0
    n_packets: int = 0
    #: Switch slots still waiting for a result when it stopped.
    waiting: tuple[int, ...] = ()


def _stopped(state: CallState, code: int, silent_for: float, done: int, n_packets: int, outstanding: Any,
             lanes: np.ndarray | None) -> Outcome:
    waiting = tuple(state.info.pool_base + r for r, i in enumerate(outstanding) if i >= 0)
    return Outcome(lanes=lanes, stopped=True, code=code, silent_for=silent_for, done=done, n_packets=n_packets,
                   waiting=waiting)


class Engine(abc.ABC):
    """One allreduce call: sum a 1-D float32 or int32 array over the job."""

    #: "python" or "native" (``switchml.native``).
    name: str

    def prepare(self, sock: socket.socket) -> None:  # noqa: B027 - optional hook
        """Set the socket up for this engine, once, before the first call."""

    @abc.abstractmethod
    def allreduce(self, flat: np.ndarray, state: CallState, out: np.ndarray | None = None) -> Outcome:
        """Run one call on ``state`` (updated in place when the call completes or was drained).

        ``out``: a 1-D array of ``flat``'s size and dtype to write the sum into (the result is
        then ``out``); None: a fresh array."""


class PythonEngine(Engine):
    """The reference loop (see the module docstring)."""

    name = native.PYTHON

    def allreduce(self, flat: np.ndarray, state: CallState, out: np.ndarray | None = None) -> Outcome:
        info, stats = state.info, state.stats
        n_el, k, n = flat.size, info.k, info.num_workers
        n_blocks = -(-n_el // k)
        blocks = np.zeros((n_blocks, k), dtype=flat.dtype)
        blocks.reshape(-1)[:n_el] = flat
        sums = np.empty((n_blocks, k), dtype=flat.dtype)  # gathered per block, then flattened into out
        is_float = flat.dtype == np.float32
        w = first_window(info.window, n_el, k)
        n_packets = n_blocks + w
        local_exp = quantize.block_exponents(blocks) if is_float else None
        global_exp = np.zeros(n_blocks, dtype=np.int16)
        byte0 = MsgType.UPDATE << MSG_TYPE_SHIFT | k_to_size(k)
        tsi0 = state.next_tsi
        uses0 = list(state.slot_uses)
        desc = descriptor_word(n_el, flat.dtype)
        zero_payload = bytes(4 * k)
        desc_payload = bytearray(zero_payload)  # packet 0: the descriptor in this rank's lane
        struct.pack_into(">I", desc_payload, 4 * info.worker_id, desc)

        def make_packet(i: int, wnd: int) -> bytes:
            """Packet i of the call with a window of wnd slots (wnd > w only for a mismatch's drain)."""
            rel = i % wnd
            set_bit = (uses0[rel] + i // wnd) & 1
            if i >= wnd:
                b = i - wnd
                payload = (quantize.quantize(blocks[b], int(global_exp[b]), n) if is_float else blocks[b]).astype(
                    ">i4").tobytes()
            else:
                payload = desc_payload if i == 0 else zero_payload
            e0 = (int(local_exp[i]) if i < n_blocks else EXP_MIN) if is_float else 0
            return PREAMBLE.pack(byte0, info.job_number, (tsi0 + i) % _TSI_MOD,
                                 (SET_BIT if set_bit else 0) | (info.pool_base + rel), e0, 0) + payload

        sock, switch = state.sock, info.switch
        slots = info.window  # sized for the whole pool range: a mismatch's drain may use more than w
        outstanding = [-1] * slots  # per slot: index of the packet awaiting its result (-1: none)
        packets = [b""] * slots
        sent_at = [0.0] * slots
        resent = [False] * slots  # Karn's rule: only first transmissions measure the round trip
        rto = [0.0] * slots  # the RTO: for a packet nothing sent after it has answered (the probe)
        lost_rto = [0.0] * slots  # the timeout of a packet a later one overtook (lost, not delayed)
        issued = 0  # packets 0..issued-1 were sent at least once (a result for one not outstanding is a duplicate)

        def send(rel: int, i: int, wnd: int, at: float) -> None:
            nonlocal issued
            outstanding[rel], packets[rel] = i, make_packet(i, wnd)
            sock.sendto(packets[rel], switch)
            sent_at[rel], rto[rel], lost_rto[rel], resent[rel] = at, state.rto(), state.lost_timeout(), False
            issued = max(issued, i + 1)
            stats.packets_sent += 1

        now = time.monotonic()
        for rel in range(w):
            send(rel, rel, w, now)
        held: list[int] = []  # slots whose next packet waits for packet 0's result (the descriptor check)
        checked = False
        mismatch: np.ndarray | None = None  # every rank's descriptor word, when they differ
        live = w  # slots with a packet outstanding or held
        done = 0
        expected_len = packet_bytes(k)
        buf = bytearray(expected_len + 64)
        last_progress = last_scan = now
        newest_answered = -math.inf  # send time of the newest packet answered: older ones outstanding are lost
        next_probe = 0.0
        deferred = 0
        sock.settimeout(_SCAN_INTERVAL_S)
        while live:
            try:
                nbytes = sock.recv_into(buf)
            except TimeoutError:
                nbytes = 0
            now = time.monotonic()
            if nbytes:
                rel = _match(state, buf, nbytes, expected_len, tsi0, issued, outstanding)
                if rel is not None:
                    i = outstanding[rel]
                    done += 1
                    stats.results += 1
                    last_progress = now
                    newest_answered = max(newest_answered, sent_at[rel])
                    if not resent[rel]:  # Karn's rule: a clean sample; the backoff ends
                        state.sample_rtt(now - sent_at[rel], w)
                    if i == 0:  # every rank's descriptor, before any rank sent a payload
                        lanes = np.frombuffer(buf, dtype=">u4", count=n, offset=PREAMBLE_BYTES)
                        if np.any(lanes != desc):
                            mismatch = lanes.astype(np.uint32)
                            # bring every slot any rank used in this call's first window to the
                            # same count of uses on all ranks: send the first-window packets this
                            # rank did not (zero payload), then wait for their results
                            w_all = max(first_window(info.window, int(c) >> DESCRIPTOR_DTYPE_BITS, k)
                                        for c in lanes)
                            held.clear()
                            outstanding[0] = -1
                            for r in range(w, w_all):
                                send(r, r, w_all, now)
                            live = sum(1 for r in range(w_all) if outstanding[r] >= 0)
                            n_packets = w_all  # the call's packets, for the bookkeeping below
                            continue
                        checked = True
                        for r in held:
                            send(r, r + w, w, now)  # held slots answered packet r (first window)
                        held.clear()
                    if mismatch is not None:  # the drain: this slot's first-window packet is back
                        outstanding[rel] = -1
                        live -= 1
                        continue
                    e0 = PREAMBLE.unpack_from(buf)[4]
                    if i >= w:
                        total = np.frombuffer(buf, dtype=">i4", count=k, offset=PREAMBLE_BYTES)
                        sums[i - w] = quantize.dequantize(total, int(global_exp[i - w]), n) if is_float else total
                    if is_float and i < n_blocks:
                        global_exp[i] = e0
                    nxt = i + w
                    if nxt >= n_packets:
                        outstanding[rel] = -1
                        live -= 1
                    elif checked:
                        send(rel, nxt, w, now)
                    else:
                        outstanding[rel] = -1
                        held.append(rel)
            if now - last_scan < _SCAN_INTERVAL_S:
                continue
            if nbytes and deferred < _SCAN_DEFER_MAX:  # timers wait for the socket to drain, a bounded while
                deferred += 1
                continue
            last_scan, deferred = now, 0
            if state.flags[0] or now - last_progress > state.timeout:
                return _stopped(state, 0, now - last_progress, done, n_packets, outstanding, mismatch)
            oldest = -1
            for rel in range(slots):
                if outstanding[rel] < 0:
                    continue
                if sent_at[rel] < newest_answered:  # a later packet came back: this one was lost
                    if now - sent_at[rel] >= lost_rto[rel]:
                        _resend(state, rel, packets, sent_at, resent, rto, lost_rto, now)
                elif now - sent_at[rel] >= rto[rel] and (oldest < 0 or sent_at[rel] < sent_at[oldest]):
                    oldest = rel
            if oldest >= 0 and now >= next_probe:  # nothing came back since: probe with the oldest only
                _resend(state, oldest, packets, sent_at, resent, rto, lost_rto, now)
                next_probe = now + rto[oldest]
        if mismatch is not None:
            for rel in range(n_packets):
                state.slot_uses[rel] += 1
            state.next_tsi = (tsi0 + n_packets) % _TSI_MOD
            return Outcome(lanes=mismatch)
        for rel in range(w):
            state.slot_uses[rel] += len(range(rel, n_packets, w))
        state.next_tsi = (tsi0 + n_packets) % _TSI_MOD
        if out is None:
            return Outcome(result=sums.reshape(-1)[:n_el])
        np.copyto(out, sums.reshape(-1)[:n_el])
        return Outcome(result=out)


def _resend(state: CallState, rel: int, packets: list[bytes], sent_at: list[float], resent: list[bool], rto: list[float],
            lost_rto: list[float], now: float) -> None:
    """Resend slot rel's packet unchanged; its timeouts double (capped), and the loss timeout
    holds for the next packets until a clean round trip."""
    state.sock.sendto(packets[rel], state.info.switch)
    sent_at[rel], resent[rel] = now, True
    rto[rel] = min(rto[rel] * 2, defaults.RETRANSMIT_TIMEOUT_MAX_S)
    lost_rto[rel] = min(lost_rto[rel] * 2, defaults.RETRANSMIT_TIMEOUT_MAX_S)
    state.rtt_state[1] = max(state.rtt_state[1], lost_rto[rel])
    state.stats.retransmissions += 1


def _match(state: CallState, buf: bytearray, nbytes: int, expected_len: int, tsi0: int, issued: int,
           outstanding: list[int]) -> int | None:
    """The window slot a RESULT answers, or None for a stale, duplicate or foreign packet.

    A duplicate is a result of this call's job and slots for a packet already answered
    (``issued``: packets 0..issued-1 were sent): a resend of it was spurious.
    """
    if nbytes != expected_len:
        state.stats.stale_results += 1
        return None
    byte0, job, tsi, pidx, _, _ = PREAMBLE.unpack_from(buf)
    rel = (pidx & SLOT_MASK) - state.info.pool_base
    if byte0 >> MSG_TYPE_SHIFT != MsgType.RESULT or job != state.info.job_number or not 0 <= rel < len(outstanding):
        state.stats.stale_results += 1
        return None
    i = (tsi - tsi0) % _TSI_MOD
    if i == outstanding[rel]:
        return rel
    if i < issued:
        state.stats.duplicate_results += 1
    else:
        state.stats.stale_results += 1
    return None


class NativeEngine(Engine):
    """The same loop in C (``switchml._native.allreduce``): same packets, same state after."""

    name = native.NATIVE

    def __init__(self, module: ModuleType, offload: bool) -> None:
        self._module, self._offload = module, offload

    def prepare(self, sock: socket.socket) -> None:
        sock.setblocking(True)  # the native loop polls before it receives; sends wait for buffer space

    def allreduce(self, flat: np.ndarray, state: CallState, out: np.ndarray | None = None) -> Outcome:
        info, stats = state.info, state.stats
        n_el, k, n = flat.size, info.k, info.num_workers
        is_float = flat.dtype == np.float32
        w = first_window(info.window, n_el, k)
        flat = np.ascontiguousarray(flat)
        if out is None:
            out = np.empty(n_el, dtype=flat.dtype)
        parity = bytes(u & 1 for u in state.slot_uses)
        counts = np.zeros(_NATIVE_STATS, dtype=np.int64)  # sent, retransmissions, results, stale, duplicates
        outstanding = np.full(info.window, -1, dtype=np.int64)
        lanes = np.zeros(n, dtype=np.uint32)  # packet 0's result: every rank's descriptor word (0: not back)
        desc = descriptor_word(n_el, flat.dtype)
        host, port = info.switch
        ip = int.from_bytes(socket.inet_aton(socket.gethostbyname(host)), "big")
        tsi0 = state.next_tsi
        try:
            code, done, n_packets, silent_for = self._module.allreduce(
                state.sock.fileno(), ip, port, flat, out, is_float, k, info.window, info.job_number, info.pool_base,
                n, tsi0, parity, desc, info.worker_id, lanes, state.retransmit_timeout,
                defaults.RETRANSMIT_TIMEOUT_MAX_S, (defaults.RTT_ALPHA, defaults.RTT_BETA, defaults.RTT_K),
                state.timeout, _SCAN_INTERVAL_S, state.rtt_state, counts, state.flags, outstanding, self._offload)
        finally:
            stats.packets_sent += int(counts[0])
            stats.retransmissions += int(counts[1])
            stats.results += int(counts[2])
            stats.stale_results += int(counts[3])
            stats.duplicate_results += int(counts[4])
        mismatch = lanes if lanes[info.worker_id] and np.any(lanes != desc) else None
        if code == _RC_MISMATCH and mismatch is not None:  # drained: n_packets first-window slots used once
            for rel in range(n_packets):
                state.slot_uses[rel] += 1
            state.next_tsi = (tsi0 + n_packets) % _TSI_MOD
            return Outcome(lanes=mismatch)
        if code != 0:
            return _stopped(state, code, silent_for, done, n_packets, outstanding.tolist(), mismatch)
        for rel in range(w):
            state.slot_uses[rel] += len(range(rel, n_packets, w))
        state.next_tsi = (tsi0 + n_packets) % _TSI_MOD
        return Outcome(result=out)


def make_engine(dataplane: str | None) -> Engine:
    """The engine for ``Worker(dataplane=...)`` (``switchml.native.resolve_worker``'s rules)."""
    if native.resolve_worker(dataplane) == native.NATIVE:
        return NativeEngine(native.worker_module()[0], native.udp_offload())
    return PythonEngine()
