"""The worker: a rank's connection to the controller and the switch.

One ``Worker`` per rank. It registers with the controller, probes the switch, keeps a
heartbeat, and stages the caller's arrays; a single engine thread runs allreduce calls one
after another, in the order they were made, so every rank's k-th call meets the other
ranks' k-th call in the same slots. The packets of one call are the engine's
(``switchml.engine``: the Python reference or the native loop, chosen by ``dataplane``);
it returns an ``Outcome`` that the ``Worker`` turns into its result or its errors.
Its knobs are a ``WorkerOptions``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from switchml import defaults, engine, protocol
from switchml.control import ControlClient
from switchml.engine import (  # noqa: F401 - first_window .. retransmit_timeout: re-exported
    FLAG_ABORT,
    FLAG_CLOSED,
    TSI_MOD,
    CallState,
    Engine,
    Outcome,
    WorkerStats,
    _count_text,
    describe_word,
    descriptor_word,
    first_window,
    make_engine,
    rtt_sample,
)
from switchml.errors import (
    AllreduceTimeout,
    ControlAuthError,
    ControllerGone,
    ControllerTimeout,
    JobFailed,
    ShapeMismatch,
    SwitchMLError,
    SwitchUnreachable,
    WorkerClosed,
)
from switchml.messages import Barrier, Heartbeat, Hello, HelloAnswer, JobInfo, Leave, Refusal, Register
from switchml.net import local_ip_towards, open_udp_socket
from switchml.protocol import (
    EXP_MIN,
    PREAMBLE_BYTES,
    MsgType,
    k_to_size,
    packet_bytes,
)
from switchml.security import read_secret

log = logging.getLogger(__name__)

retransmit_timeout = engine.retransmit_timeout  # re-exported (a Worker argument shares its name)

#: How long the heartbeat thread waits on its connection at a time, between heartbeats, so that
#: close() is not held up by a long heartbeat interval.
_HEARTBEAT_SLICE_S = 0.05
#: tsi of the registration probe (``Worker._probe_switch``): the last a call would reach, after 2^32 packets
_PROBE_TSI = TSI_MOD - 1
#: The probe's first resend and its cap: ranks released by the controller at once probe within
#: a few ms of each other, and a resend before the last rank's probe arrived is a needless one
#: (counted by the switch as a retransmission to an incomplete slot)
_PROBE_RTO_S, _PROBE_RTO_MAX_S = 0.1, 1.0


_UNSET: Any = object()  # a Worker keyword argument not passed: the options' value holds


@dataclass(frozen=True)
class WorkerOptions:
    """Knobs of a ``Worker`` (its keyword arguments of the same names override them)."""

    #: Elements per packet to ask for (None: the controller's default).
    k: int | None = None
    #: Seconds an allreduce may go without any progress before it fails (``AllreduceTimeout``).
    timeout: float = defaults.PROGRESS_TIMEOUT_S
    #: Seconds to wait for the controller (registration waits for all ranks).
    control_timeout: float = defaults.CONTROL_TIMEOUT_S
    #: First retransmission timeout of a slot (the RTO's floor); it doubles up to
    #: ``defaults.RETRANSMIT_TIMEOUT_MAX_S``.
    retransmit_timeout: float = defaults.RETRANSMIT_TIMEOUT_S
    #: Seconds between heartbeats to the controller. When the controller's process ends (with
    #: the software switch, the switch's), its connection closes and calls fail with
    #: ``JobFailed`` at once; a controller's verdict on silent peers reaches them within one interval.
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL_S
    #: Seconds to wait, right after registration, for the switch to answer the probe every
    #: rank sends (one aggregation round); without an answer the Worker raises
    #: ``SwitchUnreachable`` naming the switch's address.
    probe_timeout: float = defaults.PROBE_TIMEOUT_S
    #: The engine's data path: "native" (C), "python" (the reference) or None: native where its
    #: extension is built, unless ``$SWITCHML_DATAPLANE`` says otherwise (``switchml.native``).
    dataplane: str | None = None
    #: The cluster secret of a secured controller (CurveZMQ, ``switchml.security``); None: the
    #: environment's ($SWITCHML_SECRET, $SWITCHML_SECRET_FILE), or an open channel without one.
    secret: bytes | None = dataclasses.field(default=None, repr=False)


class Worker:
    """A rank's connection to the switch: ``allreduce`` sums arrays over the job's ranks.

    Args:
        controller: ZeroMQ endpoint of the controller.
        job: job name; all ranks of one job use the same name.
        rank: this worker's rank, 0..world_size-1.
        world_size: number of ranks in the job (at most 32).
        options: the worker's knobs (``WorkerOptions``; None: the defaults).
        k, timeout, control_timeout, retransmit_timeout, heartbeat_interval, probe_timeout,
            dataplane, secret: each, when passed, overrides the field of ``options`` of the same name
            (see ``WorkerOptions``).

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
        options: WorkerOptions | None = None,
        k: int | None = _UNSET,
        timeout: float = _UNSET,
        control_timeout: float = _UNSET,
        retransmit_timeout: float = _UNSET,
        heartbeat_interval: float = _UNSET,
        probe_timeout: float = _UNSET,
        dataplane: str | None = _UNSET,
        secret: bytes | None = _UNSET,
    ) -> None:
        passed = {name: value for name, value in (
            ("k", k), ("timeout", timeout), ("control_timeout", control_timeout),
            ("retransmit_timeout", retransmit_timeout), ("heartbeat_interval", heartbeat_interval),
            ("probe_timeout", probe_timeout), ("dataplane", dataplane), ("secret", secret)) if value is not _UNSET}
        self.options = o = dataclasses.replace(options or WorkerOptions(), **passed)
        if o.k is not None:
            k_to_size(o.k)  # raises a clear error for a k the wire format lacks
        self.engine: Engine = make_engine(o.dataplane)
        self.dataplane = self.engine.name
        self.job, self.rank, self.world_size = job, rank, world_size
        self.timeout, self.retransmit_timeout = o.timeout, o.retransmit_timeout
        self.stats = WorkerStats()
        self._secret = o.secret if o.secret is not None else read_secret()
        self._control = ControlClient(controller, o.control_timeout, secret=self._secret)
        hello: HelloAnswer = self._control.request(Hello())
        self._sock = open_udp_socket(local_ip_towards(hello.switch), 0)
        self.address: tuple[str, int] = self._sock.getsockname()
        try:
            self.info: JobInfo = self._control.request(Register(job, rank, world_size, self.address, o.k))
        except SwitchMLError:
            self._sock.close()
            self._control.close()
            raise
        log.info("rank %d of job %r: job number %d, k=%d, window %d, slots from %d", rank, job,
                 self.info.job_number, self.info.k, self.info.window, self.info.pool_base)
        self.failed_ranks: tuple[int, ...] = ()
        self.controller_lost = False
        try:
            self._probe_switch(o.probe_timeout)
        except SwitchMLError:
            try:  # free the job's slots now rather than after the heartbeat timeout
                self._control.request(Leave(job, rank, self.info.session), timeout=2.0)
            except SwitchMLError as exc:
                log.debug("leave: %s", exc)
            self._sock.close()
            self._control.close()
            raise
        # what the engine works on, call after call (slot uses, next tsi, RTT estimator, stop flags)
        self._state = CallState(self.info, self._sock, self.stats, o.timeout, o.retransmit_timeout)
        self._calls: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._closing = threading.Event()
        self._abort: str | None = None  # set by the heartbeat thread when the job failed
        self._flags_lock = threading.Lock()  # _abort and _closing as bits of the state's flags
        self._spares = _SpareBuffers()
        self.engine.prepare(self._sock)
        self._broken: BaseException | None = None
        self._engine_thread = threading.Thread(target=self._run_engine, name=f"switchml-engine-{rank}", daemon=True)
        self._heartbeat = threading.Thread(target=self._run_heartbeat, args=(controller, o.heartbeat_interval),
                                           name=f"switchml-heartbeat-{rank}", daemon=True)
        self._engine_thread.start()
        self._heartbeat.start()

    @property
    def _next_tsi(self) -> int:
        return self._state.next_tsi

    @property
    def _rtt_state(self) -> np.ndarray:
        return self._state.rtt_state

    def _rto(self) -> float:
        """Retransmission timeout of a fresh packet (``retransmit_timeout`` of the estimator's state)."""
        return self._state.rto()

    # ------------------------------------------------------------------ API
    def allreduce_async(self, x: Any, out: Any = None) -> Future:
        """Queue the sum of ``x`` over all ranks; returns a Future of the same type, shape and dtype
        (of ``out`` itself, filled, when given; see :meth:`allreduce`)."""
        future: Future = Future()
        if self._closing.is_set():
            future.set_exception(WorkerClosed("the worker is closed"))
            return future
        try:
            staged = _stage(x, self._spares.take)
            if out is not None:
                staged = _with_output(staged, out)
        except (TypeError, ValueError) as exc:
            future.set_exception(exc)
            return future
        self._calls.put((staged, future))
        return future

    def allreduce(self, x: Any, timeout: float | None = None, out: Any = None) -> Any:
        """The sum of ``x`` over all ranks (blocking). ``x``: numpy array or torch tensor, float32 or int32.

        ``out``: where to write the sum, instead of a fresh array: a C-contiguous, writeable numpy
        array, or a contiguous CPU torch tensor, with ``x``'s number of elements and its dtype
        (float32 or int32); ``x`` itself works (in place, as ``torch.distributed.all_reduce``).
        Saves the allocation and page faults of a fresh result each call. Returns ``out``."""
        return self.allreduce_async(x, out).result(timeout=timeout)

    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every rank of the job has called ``barrier``."""
        self._control.request(Barrier(self.job, self.rank, self.info.session), timeout)

    @property
    def failure(self) -> str | None:
        """Why the job failed, as the heartbeat thread learned it (None while it runs)."""
        return self._abort

    def close(self) -> None:
        """Finish queued calls' failure, leave the job and release sockets; idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._raise_flag(FLAG_CLOSED)
        self._calls.put(None)
        self._engine_thread.join(timeout=max(self.timeout, 1.0) + 5)
        self._heartbeat.join(timeout=5)
        if not self.controller_lost:  # else nobody answers: a fallback step must not wait for it
            try:
                self._control.request(Leave(self.job, self.rank, self.info.session), timeout=2.0)
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
                total = self._allreduce_flat(flat, staged.out_flat)
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
        client = ControlClient(controller, max(interval * 5, 2.0), watch_connection=True, secret=self._secret)
        try:
            client.connect()  # watched from now on, before the first heartbeat
            due = time.monotonic() + interval
            while not self._closing.is_set():
                if (wait := due - time.monotonic()) > 0:
                    client.wait_for_disconnect(min(wait, _HEARTBEAT_SLICE_S))  # short slices: close() is prompt
                    continue
                due = time.monotonic() + interval
                try:
                    answer = client.call(Heartbeat(self.job, self.rank, self.info.session))
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
        except ControlAuthError as exc:  # the controller came back with another secret
            self._fail_job(str(exc))
        finally:
            client.close()

    def _fail_job(self, reason: str) -> None:
        """Make the job's calls fail with ``reason`` (the engine checks the abort flag)."""
        self._abort = reason
        self._raise_flag(FLAG_ABORT)
        log.error("rank %d: %s", self.rank, reason)

    def _raise_flag(self, bit: int) -> None:
        with self._flags_lock:
            self._state.flags[0] |= bit

    def _allreduce_flat(self, flat: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Sum a 1-D float32 or int32 array over the job (into ``out`` if given): the engine's
        outcome, or its error."""
        outcome = self.engine.allreduce(flat, self._state, out)
        mismatch = None if outcome.lanes is None else self._shape_mismatch(flat.size, flat.dtype, outcome.lanes)
        if not outcome.stopped:
            if mismatch is not None:  # the job's slots were brought back in step
                raise mismatch
            assert outcome.result is not None
            return outcome.result
        try:
            raise self._stop_error(outcome)
        except SwitchMLError as exc:
            if mismatch is None:
                raise
            raise ShapeMismatch(f"{mismatch}; then the job's slots could not be brought back in step ({exc}), so "
                                "this worker refuses further calls", mismatch.own, mismatch.peers, in_step=False) from exc

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

    def _stop_error(self, outcome: Outcome) -> SwitchMLError:
        """The error of a call the engine stopped early."""
        if self._abort is not None:
            return JobFailed(f"rank {self.rank}: {self._abort}")
        if self._closing.is_set():
            return WorkerClosed("the worker was closed during an allreduce")
        if outcome.silent_for > self.timeout:
            waiting = list(outcome.waiting)
            return AllreduceTimeout(
                f"rank {self.rank} of job {self.job!r}: no result from the switch at {self.info.switch[0]}:"
                f"{self.info.switch[1]} for {outcome.silent_for:.1f} s ({outcome.done}/{outcome.n_packets} packets "
                f"complete, slots {waiting[:8]}{'...' if len(waiting) > 8 else ''} waiting): a peer died or the "
                "switch is unreachable"
            )
        return SwitchMLError(f"rank {self.rank}: the native engine stopped early (code {outcome.code})")


@dataclass
class _Staged:
    """A caller's array as a flat float32/int32 numpy array, and how to give the result back."""

    flat: np.ndarray
    shape: tuple[int, ...]
    torch_dtype: Any = None  # set for torch tensors
    device: Any = None
    out: Any = None  #: the caller's ``out`` (returned as the result), if any
    out_flat: np.ndarray | None = None  #: a flat numpy view of ``out``, which the engine fills

    def restore(self, total: np.ndarray) -> Any:
        if self.out is not None:
            return self.out
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


def _with_output(staged: _Staged, out: Any) -> _Staged:
    """``staged`` with the caller's ``out``; ``TypeError``/``ValueError`` naming what does not fit."""
    if type(out).__module__.startswith("torch"):
        import torch

        if not isinstance(out, torch.Tensor) or out.device.type != "cpu" or not out.is_contiguous():
            raise TypeError(f"out: expected a contiguous CPU tensor, got {type(out).__name__} on "
                            f"{getattr(out, 'device', '?')}")
        view = out.detach().numpy().reshape(-1)
    elif isinstance(out, np.ndarray):
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out: expected a C-contiguous, writeable numpy array")
        view = out.reshape(-1)
    else:
        raise TypeError(f"out: expected a numpy array or torch tensor, got {type(out).__name__}")
    if view.dtype != staged.flat.dtype or view.size != staged.flat.size:
        raise ValueError(f"out: {view.size} elements of {view.dtype}; expected {staged.flat.size} of "
                         f"{staged.flat.dtype}, as the input")
    return dataclasses.replace(staged, out=out, out_flat=view)


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
