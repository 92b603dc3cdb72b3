"""The worker engine: streams tensors through the switch and reassembles the sums.

One ``Worker`` per rank. It registers with the controller, then a single engine thread
runs allreduce calls one after another, in the order they were made, so every rank's
k-th call meets the other ranks' k-th call in the same slots.

One call on a float32 tensor of B blocks of k elements, window w = min(W, B):

1. Cut the tensor into blocks; compute each block's local exponent (one numpy pass).
2. Send packets 0..w-1: exponents of blocks 0..w-1, zero payload. Packet i uses slot
   ``pool_base + i mod w``; each reuse of a slot flips its set bit (the shadow copy).
3. On the RESULT of packet i: its exponent is block i's global max E_i; its payload, for
   i >= w, is the sum of block i-w, dequantized with E_(i-w). Then send packet i+w:
   block i quantized with E_i, plus block i+w's local exponent (self-clocked).
4. A slot without its RESULT after the retransmission timeout resends the same packet;
   the timeout doubles per resend. Timers are checked only once the socket is drained
   (a result still queued behind others is not lost). As in TCP, a backed-off timeout
   also holds for the slots' next packets until a first transmission is answered (a
   clean round-trip sample, Karn's rule). No progress at all for ``timeout`` fails the call.
5. After B + w results the sum is complete. int32 tensors skip 1 and 3's scaling: packet
   i carries block i, B packets in all.

RESULTs whose job number, slot or tsi (the packet id) do not match an outstanding packet
are stale or duplicate and are ignored.

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

from switchml import defaults, native, quantize
from switchml.control import ControlClient
from switchml.errors import AllreduceTimeout, ControllerError, ControllerTimeout, JobFailed, SwitchMLError, WorkerClosed
from switchml.net import local_ip_towards, open_udp_socket
from switchml.protocol import EXP_MIN, PREAMBLE_BYTES, MsgType, k_to_size, packet_bytes

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBIHbb")
_TSI_MOD = 1 << 32
_SCAN_INTERVAL_S = 0.002  # how often outstanding slots are checked for a due retransmission
#: Receives in a row that may postpone a due timer check while results keep arriving: they
#: may answer the very slots whose timers are due (a resend then would be spurious).
_SCAN_DEFER_MAX = 64
_FLAG_ABORT, _FLAG_CLOSED = 1, 2  # bits of Worker._flags, which the native loop polls


@dataclass(frozen=True)
class JobInfo:
    """What the controller assigned to this worker."""

    job_number: int
    worker_id: int
    num_workers: int
    k: int
    window: int
    pool_base: int
    switch: tuple[str, int]


@dataclass
class WorkerStats:
    """Counts since the worker started."""

    calls: int = 0
    packets_sent: int = 0
    retransmissions: int = 0
    results: int = 0
    stale_results: int = 0


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
        heartbeat_interval: seconds between heartbeats to the controller.
        dataplane: the engine's data path: "native" (C), "python" (the reference) or None:
            native where its extension is built, unless ``$SWITCHML_DATAPLANE`` says otherwise
            (``switchml.native``).
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
        hello = self._control.request({"op": "hello"})
        switch = (hello["switch"][0], int(hello["switch"][1]))
        self._sock = open_udp_socket(local_ip_towards(switch), 0)
        self.address: tuple[str, int] = self._sock.getsockname()
        try:
            answer = self._control.request({"op": "register", "job": job, "rank": rank, "world_size": world_size,
                                            "addr": list(self.address), "k": k})
        except SwitchMLError:
            self._sock.close()
            self._control.close()
            raise
        self.info = JobInfo(answer["job_number"], answer["worker_id"], answer["num_workers"], answer["k"],
                            answer["window"], answer["pool_base"], (answer["switch"][0], int(answer["switch"][1])))
        log.info("rank %d of job %r: job number %d, k=%d, window %d, slots from %d", rank, job,
                 self.info.job_number, self.info.k, self.info.window, self.info.pool_base)
        self._slot_uses = [0] * self.info.window  # per slot: how often it was used (its next set bit)
        self._next_tsi = 0
        # [smoothed round trip of a packet, backed-off timeout still in force (0: none)], in
        # seconds; kept across calls, and an array so the native loop updates it in place
        self._rtt_state = np.zeros(2, dtype=np.float64)
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
        self._control.request({"op": "barrier", "job": self.job, "rank": self.rank}, timeout)

    def close(self) -> None:
        """Finish queued calls' failure, leave the job and release sockets; idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._raise_flag(_FLAG_CLOSED)
        self._calls.put(None)
        self._engine.join(timeout=max(self.timeout, 1.0) + 5)
        self._heartbeat.join(timeout=5)
        try:
            self._control.request({"op": "leave", "job": self.job, "rank": self.rank}, timeout=2.0)
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
                # Slots of this job are now out of step with the other ranks: no later call can be trusted.
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

    def _run_heartbeat(self, controller: str, interval: float) -> None:
        client = ControlClient(controller, max(interval * 5, 2.0))
        try:
            while not self._closing.wait(interval):
                try:
                    client.request({"op": "heartbeat", "job": self.job, "rank": self.rank})
                except ControllerError as exc:
                    self._abort = str(exc)
                    self._raise_flag(_FLAG_ABORT)
                    log.error("rank %d: %s", self.rank, exc)
                    return
                except ControllerTimeout as exc:
                    log.warning("rank %d: %s", self.rank, exc)
        finally:
            client.close()

    def _raise_flag(self, bit: int) -> None:
        with self._flags_lock:
            self._flags[0] |= bit

    def _allreduce_flat(self, flat: np.ndarray) -> np.ndarray:
        """Sum a 1-D float32 or int32 array over the job; the engine's one call."""
        if self._native is not None:
            return self._allreduce_flat_native(flat)
        info = self.info
        n_el, k = flat.size, info.k
        if n_el == 0:
            return flat.copy()
        n_blocks = math.ceil(n_el / k)
        blocks = np.zeros((n_blocks, k), dtype=flat.dtype)
        blocks.reshape(-1)[:n_el] = flat
        out = np.empty((n_blocks, k), dtype=flat.dtype)
        is_float = flat.dtype == np.float32
        w = min(info.window, n_blocks)
        n_packets = n_blocks + w if is_float else n_blocks
        local_exp = quantize.block_exponents(blocks) if is_float else None
        global_exp = np.zeros(n_blocks, dtype=np.int16)
        size = k_to_size(k)
        n = info.num_workers
        tsi0 = self._next_tsi
        uses0 = list(self._slot_uses)
        zero_payload = bytes(4 * k)

        def make_packet(i: int) -> bytes:
            rel = i % w
            set_bit = (uses0[rel] + i // w) & 1
            if is_float:
                payload = (quantize.quantize(blocks[i - w], int(global_exp[i - w]), n).astype(">i4").tobytes()
                           if i >= w else zero_payload)
                e0 = int(local_exp[i]) if i < n_blocks else EXP_MIN
            else:
                payload, e0 = blocks[i].astype(">i4").tobytes(), 0
            return _HEADER.pack(size, info.job_number, (tsi0 + i) % _TSI_MOD,
                                (0x8000 if set_bit else 0) | (info.pool_base + rel), e0, 0) + payload

        sock, switch = self._sock, info.switch
        outstanding = list(range(w))  # per slot: index of the packet awaiting its result
        packets = [make_packet(i) for i in range(w)]
        sent_at = [0.0] * w
        resent = [False] * w  # Karn's rule: only first transmissions measure the round trip
        rto = [self._rto()] * w
        now = time.monotonic()
        for rel in range(w):
            sock.sendto(packets[rel], switch)
            sent_at[rel] = now
        self.stats.packets_sent += w
        done = 0
        expected_len = packet_bytes(k)
        buf = bytearray(expected_len + 64)
        last_progress = last_scan = now
        deferred = 0
        sock.settimeout(_SCAN_INTERVAL_S)
        while done < n_packets:
            try:
                nbytes = sock.recv_into(buf)
            except TimeoutError:
                nbytes = 0
            now = time.monotonic()
            if nbytes:
                rel = self._match(buf, nbytes, expected_len, tsi0, w, outstanding)
                if rel is not None:
                    i = outstanding[rel]
                    e0 = _HEADER.unpack_from(buf)[4]
                    if is_float:
                        if i < n_blocks:
                            global_exp[i] = e0
                        if i >= w:
                            total = np.frombuffer(buf, dtype=">i4", count=k, offset=PREAMBLE_BYTES)
                            out[i - w] = quantize.dequantize(total, int(global_exp[i - w]), n)
                    else:
                        out[i] = np.frombuffer(buf, dtype=">i4", count=k, offset=PREAMBLE_BYTES)
                    done += 1
                    self.stats.results += 1
                    last_progress = now
                    if not resent[rel]:  # Karn's rule: a clean sample; the backoff ends
                        self._rtt_state[0] += (now - sent_at[rel] - self._rtt_state[0]) / 8
                        self._rtt_state[1] = 0.0
                    nxt = i + w
                    if nxt < n_packets:
                        outstanding[rel] = nxt
                        packets[rel] = make_packet(nxt)
                        sock.sendto(packets[rel], switch)
                        sent_at[rel], rto[rel], resent[rel] = now, self._rto(), False
                        self.stats.packets_sent += 1
                    else:
                        outstanding[rel] = -1
            if now - last_scan < _SCAN_INTERVAL_S:
                continue
            if nbytes and deferred < _SCAN_DEFER_MAX:  # timers wait for the socket to drain, a bounded while
                deferred += 1
                continue
            last_scan, deferred = now, 0
            self._check_alive(now - last_progress, done, n_packets, outstanding)
            for rel in range(w):
                if outstanding[rel] >= 0 and now - sent_at[rel] >= rto[rel]:
                    sock.sendto(packets[rel], switch)
                    sent_at[rel], resent[rel] = now, True
                    rto[rel] = min(rto[rel] * 2, defaults.RETRANSMIT_TIMEOUT_MAX_S)
                    self._rtt_state[1] = max(self._rtt_state[1], rto[rel])
                    self.stats.retransmissions += 1
        for i in range(n_packets):
            self._slot_uses[i % w] += 1
        self._next_tsi = (tsi0 + n_packets) % _TSI_MOD
        return out.reshape(-1)[:n_el]

    def _allreduce_flat_native(self, flat: np.ndarray) -> np.ndarray:
        """``_allreduce_flat`` through ``switchml._native.allreduce`` (same packets, same state after)."""
        info = self.info
        n_el, k = flat.size, info.k
        if n_el == 0:
            return flat.copy()
        is_float = flat.dtype == np.float32
        n_blocks = math.ceil(n_el / k)
        w = min(info.window, n_blocks)
        flat = np.ascontiguousarray(flat)
        out = np.empty(n_el, dtype=flat.dtype)
        parity = bytes(u & 1 for u in self._slot_uses[:w])
        counts = np.zeros(4, dtype=np.int64)  # sent, retransmissions, results, stale
        outstanding = np.full(w, -1, dtype=np.int64)
        host, port = info.switch
        ip = int.from_bytes(socket.inet_aton(socket.gethostbyname(host)), "big")
        tsi0 = self._next_tsi
        try:
            code, done, n_packets, silent_for = self._native.allreduce(
                self._sock.fileno(), ip, port, flat, out, is_float, k, w, info.job_number, info.pool_base,
                info.num_workers, tsi0, parity, self.retransmit_timeout, defaults.RETRANSMIT_TIMEOUT_MAX_S,
                self.timeout, _SCAN_INTERVAL_S, self._rtt_state, counts, self._flags, outstanding, self._offload)
        finally:
            self.stats.packets_sent += int(counts[0])
            self.stats.retransmissions += int(counts[1])
            self.stats.results += int(counts[2])
            self.stats.stale_results += int(counts[3])
        if code != 0:  # stopped early: the same errors, in the same order, as the Python loop
            self._check_alive(silent_for, done, n_packets, outstanding.tolist())
            raise SwitchMLError(f"rank {self.rank}: the native engine stopped early (code {code})")
        for rel in range(w):
            self._slot_uses[rel] += len(range(rel, n_packets, w))
        self._next_tsi = (tsi0 + n_packets) % _TSI_MOD
        return out

    def _rto(self) -> float:
        """Retransmission timeout of a fresh packet: 3 smoothed round trips, at least the configured
        one, and at least a backed-off timeout no clean round trip has ended yet (capped)."""
        srtt, backed_off = self._rtt_state
        return float(min(max(self.retransmit_timeout, 3 * srtt, backed_off), defaults.RETRANSMIT_TIMEOUT_MAX_S))

    def _match(self, buf: bytearray, nbytes: int, expected_len: int, tsi0: int, w: int, outstanding: list[int]) -> int | None:
        """The window slot a RESULT answers, or None for a stale, duplicate or foreign packet."""
        if nbytes != expected_len:
            self.stats.stale_results += 1
            return None
        byte0, job, tsi, pidx, _, _ = _HEADER.unpack_from(buf)
        rel = (pidx & 0x3FFF) - self.info.pool_base
        if (byte0 >> 4 != MsgType.RESULT or job != self.info.job_number or not 0 <= rel < w
                or outstanding[rel] < 0 or (tsi0 + outstanding[rel]) % _TSI_MOD != tsi):
            self.stats.stale_results += 1
            return None
        return rel

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
