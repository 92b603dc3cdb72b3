"""The worker engine: streams tensors through the switch and reassembles the sums.

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
   from this one, the call raises ``ShapeMismatch`` naming this rank's and the differing
   ranks' counts and dtypes, never a result. Before it does, each rank sends the first-window
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
   queued behind others is not lost). No progress at all for ``timeout`` fails the call.
6. After B + w results the sum is complete.

RESULTs whose job number, slot or tsi (the packet id) do not match an outstanding packet
are ignored: stale, or duplicates (a result for a packet of this call already answered,
``WorkerStats.duplicate_results``: a resend of it was spurious).

``_allreduce_flat`` below is the reference. With ``dataplane="native"`` the same loop runs
in C (``native/worker.c``: recvmmsg/sendmmsg batches, the quantizer fused into packet
building, the GIL released) with the same window, set bits, tsi, RTO, backoff, stale
filtering, progress timeout and abort; ``_allreduce_flat_native`` hands it the call.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from switchml import defaults, native, protocol, quantize
from switchml.control import ControlClient
from switchml.errors import (
    AllreduceTimeout,
    ControllerGone,
    ControllerTimeout,
    JobFailed,
    ShapeMismatch,
    SwitchMLError,
    SwitchUnreachable,
    WorkerClosed,
)
from switchml.messages import Barrier, Heartbeat, Hello, HelloAnswer, JobInfo, Leave, Refusal, Register
from switchml.native import WORKER_NUM_STATS as _NATIVE_STATS
from switchml.native import WORKER_RC_MISMATCH as _RC_MISMATCH
from switchml.net import local_ip_towards, open_udp_socket
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

log = logging.getLogger(__name__)

_TSI_MOD = 1 << 32
_SCAN_INTERVAL_S = 0.002  # how often outstanding slots are checked for a due retransmission
#: Receives in a row that may postpone a due timer check while results keep arriving: they
#: may answer the very slots whose timers are due (a resend then would be spurious).
_SCAN_DEFER_MAX = 64
_FLAG_ABORT, _FLAG_CLOSED = 1, 2  # bits of Worker._flags, which the native loop polls
#: How long the heartbeat thread waits on its connection at a time, between heartbeats, so that
#: close() is not held up by a long heartbeat interval.
_HEARTBEAT_SLICE_S = 0.05
#: tsi of the registration probe (``Worker._probe_switch``): the last a call would reach, after 2^32 packets
_PROBE_TSI = _TSI_MOD - 1
#: The probe's first resend and its cap: ranks released by the controller at once probe within
#: a few ms of each other, and a resend before the last rank's probe arrived is a needless one
#: (counted by the switch as a retransmission to an incomplete slot)
_PROBE_RTO_S, _PROBE_RTO_MAX_S = 0.1, 1.0


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


class Worker:
    """A rank's connection to the switch: ``allreduce`` sums arrays over the job's ranks.

    Args:
        controller: ZeroMQ endpoint of the controller.
        job: job name; all ranks of one job use the same name.
        rank: this worker's rank, 0..world_size-1.
        world_size: number of ranks in the job (at most 32).
        k: elements per packet to ask for (None: the controller's default).
        timeout: seconds an allreduce may go without any progress before it fails.
        control_timeout: seconds to wait for the controller (registration waits for all ranks).
        retransmit_timeout: first retransmission timeout of a slot; it doubles up to
            ``defaults.RETRANSMIT_TIMEOUT_MAX_S``.
        heartbeat_interval: seconds between heartbeats to the controller. When the controller's
            process ends (with the software switch, the switch's), its connection closes and
            calls fail with ``JobFailed`` at once; a controller's verdict on silent peers
            reaches them within one interval.
        probe_timeout: seconds to wait, right after registration, for the switch to answer
            the probe every rank sends (one aggregation round); without an answer the
            Worker raises ``SwitchUnreachable`` naming the switch's address.
        dataplane: the engine's data path: "native" (C), "python" (the reference) or None:
            native where its extension is built, unless ``$SWITCHML_DATAPLANE`` says otherwise
            (``switchml.native``).

    Attributes set by the heartbeat thread when the job fails:
        failed_ranks: the ranks the controller declared silent (its verdict), else ().
        controller_lost: True when the connection to the controller closed (its process ended).
        failure: the reason, in words (None while the job runs).
    """

    def __init__(
        self,
        controller: str = defaults.CONTROLLER,
        job: str = "default",
        rank: int = 0,
        world_size: int = 1,
        *,
        k: int | None = None,
        timeout: float = defaults.PROGRESS_TIMEOUT_S,
        control_timeout: float = defaults.CONTROL_TIMEOUT_S,
        retransmit_timeout: float = defaults.RETRANSMIT_TIMEOUT_S,
        heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL_S,
        probe_timeout: float = defaults.PROBE_TIMEOUT_S,
        dataplane: str | None = None,
    ) -> None:
        if k is not None:
            k_to_size(k)  # raises a clear error for a k the wire format lacks
        self.dataplane = native.resolve_worker(dataplane)
        self._native = native.worker_module()[0] if self.dataplane == native.NATIVE else None
        self._offload = native.udp_offload()
        self.job, self.rank, self.world_size = job, rank, world_size
        self.timeout, self.retransmit_timeout = timeout, retransmit_timeout
        self.stats = WorkerStats()
        self._control = ControlClient(controller, control_timeout)
        hello: HelloAnswer = self._control.request(Hello())
        self._sock = open_udp_socket(local_ip_towards(hello.switch), 0)
        self.address: tuple[str, int] = self._sock.getsockname()
        try:
            self.info: JobInfo = self._control.request(Register(job, rank, world_size, self.address, k))
        except SwitchMLError:
            self._sock.close()
            self._control.close()
            raise
        log.info("rank %d of job %r: job number %d, k=%d, window %d, slots from %d", rank, job,
                 self.info.job_number, self.info.k, self.info.window, self.info.pool_base)
        self.failed_ranks: tuple[int, ...] = ()
        self.controller_lost = False
        try:
            self._probe_switch(probe_timeout)
        except SwitchMLError:
            try:  # free the job's slots now rather than after the heartbeat timeout
                self._control.request(Leave(job, rank), timeout=2.0)
            except SwitchMLError as exc:
                log.debug("leave: %s", exc)
            self._sock.close()
            self._control.close()
            raise
        self._slot_uses = [0] * self.info.window  # per slot: how often it was used (its next set bit)
        self._next_tsi = 0
        # [smoothed round trip of a packet (0: no sample yet), backed-off timeout still in force
        # (0: none), round trip's mean deviation], in seconds (rtt_sample, retransmit_timeout);
        # kept across calls, and an array so the native loop updates it in place
        self._rtt_state = np.zeros(3, dtype=np.float64)
        self._calls: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._closing = threading.Event()
        self._abort: str | None = None  # set by the heartbeat thread when the job failed
        # _abort and _closing as bits the native loop can poll without the GIL
        self._flags = np.zeros(1, dtype=np.int32)
        self._flags_lock = threading.Lock()
        self._spares = _SpareBuffers()
        if self._native is not None:
            self._sock.setblocking(True)  # the native loop polls before it receives; sends wait for buffer space
        self._broken: BaseException | None = None
        self._engine = threading.Thread(target=self._run_engine, name=f"switchml-engine-{rank}", daemon=True)
        self._heartbeat = threading.Thread(target=self._run_heartbeat, args=(controller, heartbeat_interval),
                                           name=f"switchml-heartbeat-{rank}", daemon=True)
        self._engine.start()
        self._heartbeat.start()

    # ------------------------------------------------------------------ API
    def allreduce_async(self, x: Any) -> Future:
        """Queue the sum of ``x`` over all ranks; returns a Future of the same type, shape and dtype."""
        future: Future = Future()
        if self._closing.is_set():
            future.set_exception(WorkerClosed("the worker is closed"))
            return future
        try:
            staged = _stage(x, self._spares.take)
        except (TypeError, ValueError) as exc:
            future.set_exception(exc)
            return future
        self._calls.put((staged, future))
        return future

    def allreduce(self, x: Any, timeout: float | None = None) -> Any:
        """The sum of ``x`` over all ranks (blocking). ``x``: numpy array or torch tensor, float32 or int32."""
        return self.allreduce_async(x).result(timeout=timeout)

    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every rank of the job has called ``barrier``."""
        self._control.request(Barrier(self.job, self.rank), timeout)

    @property
    def failure(self) -> str | None:
        """Why the job failed, as the heartbeat thread learned it (None while it runs)."""
        return self._abort

    def close(self) -> None:
        """Finish queued calls' failure, leave the job and release sockets; idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._raise_flag(_FLAG_CLOSED)
        self._calls.put(None)
        self._engine.join(timeout=max(self.timeout, 1.0) + 5)
        self._heartbeat.join(timeout=5)
        if not self.controller_lost:  # else nobody answers: a fallback step must not wait for it
            try:
                self._control.request(Leave(self.job, self.rank), timeout=2.0)
            except SwitchMLError as exc:
                log.debug("leave: %s", exc)
        self._control.close()
        self._sock.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- engine
    def _run_engine(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                break
            staged, future = item
            if not future.set_running_or_notify_cancel():
                continue
            if self._broken is not None:
                future.set_exception(SwitchMLError(f"worker unusable after an earlier failure: {self._broken}"))
                continue
            try:
                flat = staged.flat
                total = self._allreduce_flat(flat)
                future.set_result(staged.restore(total))
                self.stats.calls += 1
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the Future
                # Slots of this job are now out of step with the other ranks: no later call can be trusted
                # (except after a shape mismatch that brought them back in step).
                if not (isinstance(exc, ShapeMismatch) and exc.in_step):
                    self._broken = exc
                future.set_exception(exc)
            finally:
                self._spares.give(staged.flat)  # the result is a separate array: the staged copy is free
        while True:  # calls queued behind close() fail rather than hang
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(WorkerClosed("the worker was closed before this call ran"))

    def _probe_switch(self, timeout: float) -> None:
        """Check, right after registration, that packets to the switch's advertised address come back.

        Every rank sends one UPDATE (zero payload) on set 1 of the job's first slot, which no call
        has used yet, and waits for its RESULT: the switch multicasts it once all ranks' probes
        are in, so each rank learns that the whole job reaches the switch and back, at the cost
        of one round trip. Calls start on set 0 of that slot and flip to set 1 only at its
        second use, when the probe's bitmap bits are cleared as usual (shadow copy), so the
        probe leaves no state a call can meet. A late duplicate of the probe's RESULT carries
        ``_PROBE_TSI``, which no call waits for, so calls drop it as stale.

        Raises:
            SwitchUnreachable: nothing came back within ``timeout``; names the address.
        """
        info = self.info
        packet = (protocol.encode_header(MsgType.UPDATE, k_to_size(info.k), info.job_number, _PROBE_TSI,
                                         info.pool_base, 1, EXP_MIN)
                  + bytes(protocol.ELEMENT_BYTES * info.k))
        buf = bytearray(packet_bytes(info.k) + 64)
        start = time.monotonic()
        deadline, rto = start + timeout, _PROBE_RTO_S
        try:
            while (now := time.monotonic()) < deadline:
                self._sock.sendto(packet, info.switch)
                resend_at = min(now + rto, deadline)
                rto = min(rto * 2, _PROBE_RTO_MAX_S)
                while (wait := resend_at - time.monotonic()) > 0:
                    self._sock.settimeout(wait)
                    try:
                        n = self._sock.recv_into(buf)
                    except TimeoutError:
                        break
                    if n < PREAMBLE_BYTES:
                        continue
                    h = protocol.decode_header(buf[:n])
                    if (h.msg_type == MsgType.RESULT and h.job_number == info.job_number and h.tsi == _PROBE_TSI
                            and h.slot == info.pool_base):
                        log.debug("rank %d: the switch at %s:%d answered the probe in %.1f ms", self.rank,
                                  *info.switch, 1e3 * (time.monotonic() - start))
                        return
        except OSError as exc:  # e.g. ECONNREFUSED from an ICMP port unreachable: nothing listens there
            raise SwitchUnreachable(self._unreachable_message(f"sending to it failed ({exc})")) from exc
        finally:
            self._sock.settimeout(None)
        raise SwitchUnreachable(self._unreachable_message(f"no packet came back within {timeout:g} s"))

    def _unreachable_message(self, what: str) -> str:
        host, port = self.info.switch
        return (f"rank {self.rank} of job {self.job!r}: probing the switch at {host}:{port} (the address the "
                f"controller at {self._control.endpoint} advertises) from {self.address[0]}:{self.address[1]}: "
                f"{what}. This host cannot reach that address, or another rank of the job cannot: check the "
                "switch's --advertise-address (deploy: --switch-address), routes and firewalls")

    def _run_heartbeat(self, controller: str, interval: float) -> None:
        """Tell the controller every ``interval`` s that this rank is alive, and learn whether the job is.

        Between heartbeats the thread watches the TCP connection to the controller: when the
        controller's process dies (with the software switch, the switch's), its kernel closes
        the connection, and the job's calls fail within milliseconds rather than at the
        progress timeout. A heartbeat that is merely late is only logged: a loaded controller
        must not fail a job whose data plane works. A refusal carries the controller's verdict
        (``failed_ranks``). Either way: ``failed_ranks``/``controller_lost`` first, then the
        abort the engine checks.
        """
        client = ControlClient(controller, max(interval * 5, 2.0), watch_connection=True)
        try:
            client.connect()  # watched from now on, before the first heartbeat
            due = time.monotonic() + interval
            while not self._closing.is_set():
                if (wait := due - time.monotonic()) > 0:
                    client.wait_for_disconnect(min(wait, _HEARTBEAT_SLICE_S))  # short slices: close() is prompt
                    continue
                due = time.monotonic() + interval
                try:
                    answer = client.call(Heartbeat(self.job, self.rank))
                except ControllerGone:
                    raise
                except ControllerTimeout as exc:
                    log.warning("rank %d: %s", self.rank, exc)
                    continue
                if isinstance(answer, Refusal):
                    self.failed_ranks = answer.failed_ranks
                    self._fail_job(f"controller refused 'heartbeat': {answer.error}")
                    return
        except ControllerGone as exc:
            self.controller_lost = True
            self._fail_job(str(exc))
        finally:
            client.close()

    def _fail_job(self, reason: str) -> None:
        """Make the job's calls fail with ``reason`` (the engine checks the abort flag)."""
        self._abort = reason
        self._raise_flag(_FLAG_ABORT)
        log.error("rank %d: %s", self.rank, reason)

    def _raise_flag(self, bit: int) -> None:
        with self._flags_lock:
            self._flags[0] |= bit

    def _allreduce_flat(self, flat: np.ndarray) -> np.ndarray:
        """Sum a 1-D float32 or int32 array over the job; the engine's one call."""
        if self._native is not None:
            return self._allreduce_flat_native(flat)
        info = self.info
        n_el, k, n = flat.size, info.k, info.num_workers
        n_blocks = -(-n_el // k)
        blocks = np.zeros((n_blocks, k), dtype=flat.dtype)
        blocks.reshape(-1)[:n_el] = flat
        out = np.empty((n_blocks, k), dtype=flat.dtype)
        is_float = flat.dtype == np.float32
        w = first_window(info.window, n_el, k)
        n_packets = n_blocks + w
        local_exp = quantize.block_exponents(blocks) if is_float else None
        global_exp = np.zeros(n_blocks, dtype=np.int16)
        byte0 = MsgType.UPDATE << MSG_TYPE_SHIFT | k_to_size(k)
        tsi0 = self._next_tsi
        uses0 = list(self._slot_uses)
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

        sock, switch = self._sock, info.switch
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
            sent_at[rel], rto[rel], lost_rto[rel], resent[rel] = at, self._rto(), self._lost_timeout(), False
            issued = max(issued, i + 1)
            self.stats.packets_sent += 1

        now = time.monotonic()
        for rel in range(w):
            send(rel, rel, w, now)
        held: list[int] = []  # slots whose next packet waits for packet 0's result (the descriptor check)
        checked = False
        mismatch: ShapeMismatch | None = None
        live = w  # slots with a packet outstanding or held
        done = 0
        expected_len = packet_bytes(k)
        buf = bytearray(expected_len + 64)
        last_progress = last_scan = now
        newest_answered = -math.inf  # send time of the newest packet answered: older ones outstanding are lost
        next_probe = 0.0
        deferred = 0
        sock.settimeout(_SCAN_INTERVAL_S)
        try:
            while live:
                try:
                    nbytes = sock.recv_into(buf)
                except TimeoutError:
                    nbytes = 0
                now = time.monotonic()
                if nbytes:
                    rel = self._match(buf, nbytes, expected_len, tsi0, issued, outstanding)
                    if rel is not None:
                        i = outstanding[rel]
                        done += 1
                        self.stats.results += 1
                        last_progress = now
                        newest_answered = max(newest_answered, sent_at[rel])
                        if not resent[rel]:  # Karn's rule: a clean sample; the backoff ends
                            self._sample_rtt(now - sent_at[rel], w)
                        if i == 0:  # every rank's descriptor, before any rank sent a payload
                            lanes = np.frombuffer(buf, dtype=">u4", count=n, offset=PREAMBLE_BYTES)
                            if np.any(lanes != desc):
                                mismatch = self._shape_mismatch(n_el, flat.dtype, lanes)
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
                            out[i - w] = quantize.dequantize(total, int(global_exp[i - w]), n) if is_float else total
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
                self._check_alive(now - last_progress, done, n_packets, outstanding)
                oldest = -1
                for rel in range(slots):
                    if outstanding[rel] < 0:
                        continue
                    if sent_at[rel] < newest_answered:  # a later packet came back: this one was lost
                        if now - sent_at[rel] >= lost_rto[rel]:
                            self._resend(rel, packets, sent_at, resent, rto, lost_rto, now)
                    elif now - sent_at[rel] >= rto[rel] and (oldest < 0 or sent_at[rel] < sent_at[oldest]):
                        oldest = rel
                if oldest >= 0 and now >= next_probe:  # nothing came back since: probe with the oldest only
                    self._resend(oldest, packets, sent_at, resent, rto, lost_rto, now)
                    next_probe = now + rto[oldest]
        except SwitchMLError as exc:
            if mismatch is None:
                raise
            raise ShapeMismatch(f"{mismatch}; then the job's slots could not be brought back in step ({exc}), so "
                                "this worker refuses further calls", mismatch.own, mismatch.peers, in_step=False) from exc
        if mismatch is not None:
            for rel in range(n_packets):
                self._slot_uses[rel] += 1
            self._next_tsi = (tsi0 + n_packets) % _TSI_MOD
            raise mismatch
        for rel in range(w):
            self._slot_uses[rel] += len(range(rel, n_packets, w))
        self._next_tsi = (tsi0 + n_packets) % _TSI_MOD
        return out.reshape(-1)[:n_el]

    def _allreduce_flat_native(self, flat: np.ndarray) -> np.ndarray:
        """``_allreduce_flat`` through ``switchml._native.allreduce`` (same packets, same state after)."""
        info = self.info
        n_el, k, n = flat.size, info.k, info.num_workers
        is_float = flat.dtype == np.float32
        w = first_window(info.window, n_el, k)
        flat = np.ascontiguousarray(flat)
        out = np.empty(n_el, dtype=flat.dtype)
        parity = bytes(u & 1 for u in self._slot_uses)
        counts = np.zeros(_NATIVE_STATS, dtype=np.int64)  # sent, retransmissions, results, stale, duplicates
        outstanding = np.full(info.window, -1, dtype=np.int64)
        lanes = np.zeros(n, dtype=np.uint32)  # packet 0's result: every rank's descriptor word (0: not back)
        desc = descriptor_word(n_el, flat.dtype)
        host, port = info.switch
        ip = int.from_bytes(socket.inet_aton(socket.gethostbyname(host)), "big")
        tsi0 = self._next_tsi
        try:
            code, done, n_packets, silent_for = self._native.allreduce(
                self._sock.fileno(), ip, port, flat, out, is_float, k, info.window, info.job_number, info.pool_base,
                n, tsi0, parity, desc, info.worker_id, lanes, self.retransmit_timeout,
                defaults.RETRANSMIT_TIMEOUT_MAX_S, (defaults.RTT_ALPHA, defaults.RTT_BETA, defaults.RTT_K),
                self.timeout, _SCAN_INTERVAL_S, self._rtt_state, counts, self._flags, outstanding, self._offload)
        finally:
            self.stats.packets_sent += int(counts[0])
            self.stats.retransmissions += int(counts[1])
            self.stats.results += int(counts[2])
            self.stats.stale_results += int(counts[3])
            self.stats.duplicate_results += int(counts[4])
        mismatch = self._shape_mismatch(n_el, flat.dtype, lanes) if lanes[info.worker_id] and np.any(lanes != desc) \
            else None
        if code == _RC_MISMATCH and mismatch is not None:  # drained: n_packets first-window slots used once
            for rel in range(n_packets):
                self._slot_uses[rel] += 1
            self._next_tsi = (tsi0 + n_packets) % _TSI_MOD
            raise mismatch
        if code != 0:  # stopped early: the same errors, in the same order, as the Python loop
            try:
                self._check_alive(silent_for, done, n_packets, outstanding.tolist())
                raise SwitchMLError(f"rank {self.rank}: the native engine stopped early (code {code})")
            except SwitchMLError as exc:
                if mismatch is None:
                    raise
                raise ShapeMismatch(f"{mismatch}; then the job's slots could not be brought back in step ({exc}), "
                                    "so this worker refuses further calls", mismatch.own, mismatch.peers,
                                    in_step=False) from exc
        for rel in range(w):
            self._slot_uses[rel] += len(range(rel, n_packets, w))
        self._next_tsi = (tsi0 + n_packets) % _TSI_MOD
        return out

    def _rto(self) -> float:
        """Retransmission timeout of a fresh packet (``retransmit_timeout`` of the estimator's state)."""
        srtt, backed_off, rttvar = self._rtt_state
        return retransmit_timeout(float(srtt), float(rttvar), float(backed_off), self.retransmit_timeout,
                                  defaults.RETRANSMIT_TIMEOUT_MAX_S, _SCAN_INTERVAL_S)

    def _sample_rtt(self, sample: float, per_rtt: int) -> None:
        """A clean round trip (a first transmission's): update the estimator; the backoff ends."""
        self._rtt_state[0], self._rtt_state[2] = rtt_sample(float(self._rtt_state[0]), float(self._rtt_state[2]),
                                                            sample, per_rtt)
        self._rtt_state[1] = 0.0

    def _lost_timeout(self) -> float:
        """Timeout of a packet that a later one overtook (RACK's rule): one smoothed round trip
        and a tick, between the floor and the cap, at least a backoff in force. No deviation
        term: the deviation measures peers' delays, which do not hold a packet that is lost."""
        srtt, backed_off, _ = self._rtt_state
        return retransmit_timeout(float(srtt), 0.0, float(backed_off), self.retransmit_timeout,
                                  defaults.RETRANSMIT_TIMEOUT_MAX_S, _SCAN_INTERVAL_S)

    def _resend(self, rel: int, packets: list[bytes], sent_at: list[float], resent: list[bool], rto: list[float],
                lost_rto: list[float], now: float) -> None:
        """Resend slot rel's packet unchanged; its timeouts double (capped), and the loss timeout
        holds for the next packets until a clean round trip."""
        self._sock.sendto(packets[rel], self.info.switch)
        sent_at[rel], resent[rel] = now, True
        rto[rel] = min(rto[rel] * 2, defaults.RETRANSMIT_TIMEOUT_MAX_S)
        lost_rto[rel] = min(lost_rto[rel] * 2, defaults.RETRANSMIT_TIMEOUT_MAX_S)
        self._rtt_state[1] = max(self._rtt_state[1], lost_rto[rel])
        self.stats.retransmissions += 1

    def _match(self, buf: bytearray, nbytes: int, expected_len: int, tsi0: int, issued: int,
               outstanding: list[int]) -> int | None:
        """The window slot a RESULT answers, or None for a stale, duplicate or foreign packet.

        A duplicate is a result of this call's job and slots for a packet already answered
        (``issued``: packets 0..issued-1 were sent): a resend of it was spurious.
        """
        if nbytes != expected_len:
            self.stats.stale_results += 1
            return None
        byte0, job, tsi, pidx, _, _ = PREAMBLE.unpack_from(buf)
        rel = (pidx & SLOT_MASK) - self.info.pool_base
        if byte0 >> MSG_TYPE_SHIFT != MsgType.RESULT or job != self.info.job_number or not 0 <= rel < len(outstanding):
            self.stats.stale_results += 1
            return None
        i = (tsi - tsi0) % _TSI_MOD
        if i == outstanding[rel]:
            return rel
        if i < issued:
            self.stats.duplicate_results += 1
        else:
            self.stats.stale_results += 1
        return None

    def _shape_mismatch(self, n_el: int, dtype: np.dtype, lanes: np.ndarray) -> ShapeMismatch:
        """The error of a call whose descriptor lanes (every rank's word) differ from this rank's."""
        own = (n_el, np.dtype(dtype).name)
        desc = descriptor_word(n_el, dtype)
        peers = {r: describe_word(int(word)) for r, word in enumerate(lanes) if int(word) != desc}
        shown = "; ".join(f"rank {r} has {_count_text(c)} {d}" for r, (c, d) in list(peers.items())[:4])
        return ShapeMismatch(
            f"rank {self.rank} of job {self.job!r}: the ranks passed different arrays to the same allreduce call: "
            f"this rank has {_count_text(n_el)} {own[1]} elements; {shown}{'; ...' if len(peers) > 4 else ''} "
            "(every rank must pass the same element count and dtype, call by call)", own, peers)

    def _check_alive(self, silent_for: float, done: int, n_packets: int, outstanding: list[int]) -> None:
        if self._abort is not None:
            raise JobFailed(f"rank {self.rank}: {self._abort}")
        if self._closing.is_set():
            raise WorkerClosed("the worker was closed during an allreduce")
        if silent_for > self.timeout:
            waiting = [self.info.pool_base + r for r, i in enumerate(outstanding) if i >= 0]
            raise AllreduceTimeout(
                f"rank {self.rank} of job {self.job!r}: no result from the switch at {self.info.switch[0]}:"
                f"{self.info.switch[1]} for {silent_for:.1f} s ({done}/{n_packets} packets complete, slots "
                f"{waiting[:8]}{'...' if len(waiting) > 8 else ''} waiting): a peer died or the switch is unreachable"
            )


@dataclass
class _Staged:
    """A caller's array as a flat float32/int32 numpy array, and how to give the result back."""

    flat: np.ndarray
    shape: tuple[int, ...]
    torch_dtype: Any = None  # set for torch tensors
    device: Any = None

    def restore(self, total: np.ndarray) -> Any:
        result = total.reshape(self.shape)
        if self.torch_dtype is None:
            return result
        import torch

        return torch.from_numpy(result).to(device=self.device, dtype=self.torch_dtype)


class _SpareBuffers:
    """Staging buffers of finished calls, kept by (dtype, size) for the next call's copy.

    DDP and the benchmarks stage buffers of the same sizes call after call; reusing one
    skips the page faults and the kernel's zeroing of a fresh allocation of that size
    (about a tenth of a 25 MB call's CPU here). Small buffers are not worth keeping.
    """

    MIN_BYTES = 1 << 20
    MAX_KEPT = 8

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def take(self, dtype: np.dtype, size: int) -> np.ndarray | None:
        with self._lock:
            return self._kept.pop((np.dtype(dtype).str, size), None)

    def give(self, array: np.ndarray) -> None:
        if array.nbytes < self.MIN_BYTES or not array.flags.c_contiguous or not array.flags.writeable:
            return
        with self._lock:
            if len(self._kept) >= self.MAX_KEPT:
                self._kept.pop(next(iter(self._kept)))
            self._kept[(array.dtype.str, array.size)] = array


def _stage(x: Any, spare: Callable[[np.dtype, int], np.ndarray | None] | None = None) -> _Staged:
    """Copy ``x`` (numpy or torch, any device) to a flat host array the engine owns
    (``spare(dtype, size)``: a recycled array to copy into, or None)."""
    if type(x).__module__.startswith("torch"):
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            dtype = np.dtype(np.float32)
        elif x.dtype == torch.int32:
            dtype = np.dtype(np.int32)
        else:
            raise TypeError(f"tensor dtype {x.dtype}: switchml sums float32 (float16/bfloat16 via float32) or int32")
        buffer = spare(dtype, x.numel()) if spare is not None else None
        if buffer is not None:
            torch.from_numpy(buffer).view(x.shape).copy_(x.detach())  # any device and dtype, one copy
            return _Staged(buffer, tuple(x.shape), x.dtype, x.device)
        host = x.detach().to(device="cpu", dtype=torch.float32 if dtype == np.float32 else torch.int32, copy=True)
        return _Staged(host.numpy().reshape(-1), tuple(x.shape), x.dtype, x.device)
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.int32):
        raise TypeError(f"array dtype {arr.dtype}: switchml sums float32 or int32 (convert with .astype)")
    buffer = spare(arr.dtype, arr.size) if spare is not None else None
    if buffer is not None:
        np.copyto(buffer.reshape(arr.shape), arr)
        return _Staged(buffer, arr.shape)
    return _Staged(np.array(arr, copy=True).reshape(-1), arr.shape)
