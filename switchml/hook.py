"""A DDP communication hook that averages gradient buckets through switchml.

    from switchml.hook import register      # (trainer.hook re-exports it)
    state = register(ddp_model, controller="tcp://127.0.0.1:48865", job="train")
    ... train as usual ...
    state.close()                      # before dist.destroy_process_group()

In the style of ``torch.distributed.algorithms.ddp_comm_hooks``: ``SwitchMLState`` holds
the knobs, ``switchml_hook(state, bucket)`` is the hook. Per bucket:

1. DDP calls the hook with bucket b (in index order, on every rank). The hook copies the
   bucket to host memory (pinned, for a CUDA bucket) and queues it to the Worker, whose
   engine streams buckets through the switch in the order they were queued.
2. A completion thread takes the buckets in the same order, waits for the switch's sum,
   and agrees with the other ranks whether every rank got its sum: a one-integer MAX
   allreduce on a private Gloo group that only this thread uses, so its collectives
   are in the same order on every rank and never interleave with DDP's own.
3. If every rank succeeded, the sum is divided by the world size (DDP expects the mean)
   and the bucket's Future completes. If any rank failed, every rank sums that bucket
   with a Gloo allreduce on the private group instead, and switchml is marked failed.
4. The failure is acted on at the next step's first bucket (every rank has agreed on all
   of the previous step's buckets by then, since DDP waits for them): from then on the
   hook returns the process group's own allreduce (Gloo on CPU, NCCL on GPU), logged once.
   With ``retry_after_steps`` set, the ranks later try a new switch job together.

A rank that hangs (SIGSTOP, a stuck process) would block the agreement of 2. until the
group's timeout. The controller notices it first (no heartbeats) and fails the job; each
survivor's Worker hears that verdict with its next heartbeat, and the agreement, which
waits for the collective while watching for the verdict, gives up at once: every survivor
fails the step with ``RanksFailed`` naming the silent ranks. No fallback is possible then,
since the process group's allreduce needs those ranks too.

A failure always reaches DDP's Future (never a hang) when even the fallback fails. DDP
cannot show a Python exception set on the hook's Future (it reports ``Unable to cast
... to Tensor``), so the Future the hook returns re-raises it from a ``then`` callback,
whose error DDP does show: the error's type, message and causes, in one line.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations as
# objects (dist.GradBucket, torch.futures.Future[torch.Tensor]), not as strings.
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from switchml import defaults
from switchml.errors import RanksFailed, SwitchMLError
from switchml.worker import Worker

log = logging.getLogger(__name__)

__all__ = ["SwitchMLState", "register", "switchml_hook"]

#: How often an agreement waiting on the process group checks for the controller's verdict:
#: a small fraction of the default heartbeat interval, and only while a collective is pending.
_VERDICT_POLL_S = 0.02


@dataclass
class SwitchMLState:
    """State of the switchml hook on one rank.

    Attributes:
        worker_factory: makes this rank's Worker for attempt ``a`` (0 first, then one per
            retry); all ranks call it at the same point, as registration is collective.
        process_group: the group DDP uses (None: the default group); its allreduce is
            the fallback.
        fallback: on a failure, fall back to the process group's allreduce and keep
            training (True), or fail the step with the error (False).
        retry_after_steps: after this many steps on the fallback, try switchml again
            (None: never).
        result_timeout: seconds the completion thread waits for the switch's sum of one
            bucket before it counts as failed (the Worker's own progress timeout is the
            finer one; this is the backstop).
        agree_timeout: timeout of the private Gloo group's collectives.
    """

    worker_factory: Callable[[int], Worker]
    process_group: dist.ProcessGroup | None = None
    fallback: bool = True
    retry_after_steps: int | None = None
    result_timeout: float = defaults.PROGRESS_TIMEOUT_S + 10
    agree_timeout: float = 120.0

    worker: Worker | None = field(default=None, init=False)
    using_switch: bool = field(default=False, init=False)  #: the path of the current step
    steps_on_fallback: int = field(default=0, init=False)
    buckets_through_switch: int = field(default=0, init=False)
    buckets_on_fallback: int = field(default=0, init=False)
    last_error: str = field(default="", init=False)
    _attempt: int = field(default=0, init=False)
    _switch_failed: bool = field(default=False, init=False)  # agreed by all ranks
    _agree_group: dist.ProcessGroup | None = field(default=None, init=False)
    _pending: queue.Queue = field(default_factory=queue.Queue, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _world_size: int = field(default=1, init=False)
    _silent_ranks: tuple[int, ...] = field(default=(), init=False)  # the controller's verdict, once heard

    def setup(self) -> None:
        """Collective: make the private group, connect every rank's Worker, agree on the path."""
        self._world_size = dist.get_world_size(self.process_group)
        ranks = None if self.process_group is None else dist.get_process_group_ranks(self.process_group)
        self._agree_group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=self.agree_timeout))
        self._thread = threading.Thread(target=self._complete_buckets, name="switchml-hook", daemon=True)
        self._thread.start()
        self._connect()

    def _connect(self) -> None:
        """Collective: (re)create the Worker on every rank; use it only if every rank has one."""
        error = ""
        try:
            self.worker = self.worker_factory(self._attempt)
        except Exception as exc:  # noqa: BLE001 - any failure means "no switch" for everyone
            error = f"{type(exc).__name__}: {exc}"
            self.worker = None
        self._attempt += 1
        all_ok = self._agree(not error)
        if all_ok:
            self.using_switch, self._switch_failed, self.steps_on_fallback = True, False, 0
            log.info("switchml hook: aggregating through the switch (job attempt %d)", self._attempt - 1)
            return
        self._drop_worker()
        self.using_switch, self._switch_failed = False, True
        self.last_error = error or "another rank could not connect to the switch"
        self._on_failure(f"could not connect to the switch: {self.last_error}")

    def _agree(self, ok: bool) -> bool:
        """True iff ``ok`` holds on every rank (a MAX allreduce of the failure flag).

        Raises ``RanksFailed`` instead when the controller declared ranks silent: they would
        never join the collective, which would block until the group's timeout.
        """
        self._check_verdict()
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._agree_group, async_op=True)
        done = threading.Event()
        work.get_future().add_done_callback(lambda _: done.set())
        while not done.wait(_VERDICT_POLL_S):
            self._check_verdict()  # the collective stays pending; the group is not used again
        work.wait()  # raises the collective's own error (a peer's connection closed, its timeout)
        return int(flag.item()) == 0

    def _check_verdict(self) -> None:
        """Raise ``RanksFailed`` if the controller declared ranks of this job silent (sticky)."""
        if not self._silent_ranks and self.worker is not None and self.worker.failed_ranks:
            self._silent_ranks = self.worker.failed_ranks
            self.last_error = self.worker.failure or "the controller declared them failed"
            self._switch_failed = True
        if self._silent_ranks:
            raise RanksFailed(
                f"the controller declared rank(s) {list(self._silent_ranks)} silent ({self.last_error}); "
                "no collective over the process group can complete without them (nor can the fallback), so this "
                "rank stops instead of waiting for them", self._silent_ranks)

    def _on_failure(self, message: str) -> None:
        if not self.fallback:
            raise SwitchMLError(f"switchml hook: {message} (fallback disabled)")
        log.warning("switchml hook: %s; all ranks fall back to the process group's allreduce%s", message,
                    f" and retry the switch after {self.retry_after_steps} steps" if self.retry_after_steps else "")

    def _drop_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def begin_step(self) -> None:
        """Called at each step's first bucket: act on last step's agreed failure, or retry."""
        if self.using_switch and self._switch_failed:
            self.using_switch = False
            self._drop_worker()
            self._on_failure(f"an allreduce through the switch failed: {self.last_error}")
        elif not self.using_switch:
            self.steps_on_fallback += 1
            if self.retry_after_steps is not None and self.steps_on_fallback > self.retry_after_steps:
                log.info("switchml hook: retrying the switch after %d steps on the fallback", self.retry_after_steps)
                self._connect()

    def close(self) -> None:
        """Stop the completion thread and the Worker; call before destroy_process_group()."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join(timeout=self.result_timeout + self.agree_timeout)
            self._thread = None
        self._drop_worker()

    # --------------------------------------------------------- completion
    def _complete_buckets(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            switch_future, host, device, out = item
            try:
                self._finish_bucket(switch_future, host, device, out)
            except BaseException as exc:  # noqa: BLE001 - DDP must hear of it, or training hangs
                log.exception("switchml hook: bucket failed")
                if not out.done():
                    out.set_exception(exc)

    def _finish_bucket(self, switch_future: ConcurrentFuture, host: torch.Tensor, device: torch.device,
                       out: torch.futures.Future) -> None:
        total, error, cause = None, "", None
        try:
            total = switch_future.result(timeout=self.result_timeout)
        except Exception as exc:  # noqa: BLE001 - the other ranks decide with us below
            error, cause = f"{type(exc).__name__}: {exc}", exc
        if self._agree(total is not None):
            self.buckets_through_switch += 1
        else:
            if not self._switch_failed:
                self._switch_failed = True
                self.last_error = error or "the allreduce failed on another rank"
            if not self.fallback:
                raise SwitchMLError(f"switchml allreduce failed: {self.last_error}") from cause
            total = host.clone()
            dist.all_reduce(total, group=self._agree_group)  # this bucket, on the private group
            self.buckets_on_fallback += 1
        total.div_(self._world_size)
        out.set_result(total if device.type == "cpu" else total.to(device))


def _describe(exc: BaseException) -> str:
    """``Type: message``, then each cause the same way: what DDP's error shows of a hook failure."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(parts) < 5:
        seen.add(id(exc))
        text = f"{type(exc).__name__}: {exc}"
        if not any(text in part for part in parts):  # a cause the message already quotes is not repeated
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    return " <- caused by ".join(parts)


def _readable(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
    """The bucket's result; a failure is re-raised with its causes in the message (DDP shows it)."""
    try:
        return fut.value()
    except Exception as exc:
        raise SwitchMLError(f"switchml hook failed: {_describe(exc)}") from exc


def _fallback_allreduce(state: SwitchMLState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default, torch's own ``allreduce_hook``: divide by the world size, allreduce on the group."""
    state.buckets_on_fallback += 1
    return default_hooks.allreduce_hook(state.process_group, bucket)


def switchml_hook(state: SwitchMLState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over all ranks through the switch (or the agreed fallback)."""
    if bucket.index() == 0:
        state.begin_step()
    if not state.using_switch:
        return _fallback_allreduce(state, bucket)
    buffer = bucket.buffer()
    # The Worker's thread reads this copy later, while DDP reuses the bucket: copy it now.
    if buffer.is_cuda:
        host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
        host.copy_(buffer, non_blocking=True)
        torch.cuda.current_stream(buffer.device).synchronize()
    else:
        host = buffer.detach().clone()
    out: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    switch_future = state.worker.allreduce_async(host)
    state._pending.put((switch_future, host, buffer.device, out))
    return out.then(_readable)


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    controller: str = defaults.CONTROLLER,
    job: str = "train",
    worker: Worker | None = None,
    *,
    fallback: bool = True,
    retry_after_steps: int | None = None,
    **worker_options,
) -> SwitchMLState:
    """Make ``ddp_model`` average its gradients through switchml; collective over DDP's group.

    Each rank connects a Worker to ``controller`` as rank ``dist.get_rank()`` of ``job``
    (or uses ``worker`` for the first attempt). Returns the hook's state: close it before
    ``dist.destroy_process_group()``. ``worker_options`` go to ``Worker`` (k, timeout, ...).
    """
    group = ddp_model.process_group
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)

    def factory(attempt: int) -> Worker:
        if attempt == 0 and worker is not None:
            return worker
        name = job if attempt == 0 else f"{job}.retry{attempt}"
        return Worker(controller, name, rank, world_size, **worker_options)

    state = SwitchMLState(factory, process_group=group, fallback=fallback, retry_after_steps=retry_after_steps)
    state.setup()
    ddp_model.register_comm_hook(state, switchml_hook)
    return state
