"""Worker processes for the tests: real processes (spawned), real sockets.

Each function runs in its own process, builds its input from (seed, rank) so that nothing
large crosses the process boundary, and puts ``(rank, result or exception text)`` on a queue.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CTX = mp.get_context("spawn")


def make_input(seed: int, rank: int, size: int, dtype: str = "float32", scale: float = 1.0) -> np.ndarray:
    """The deterministic input of ``rank``."""
    rng = np.random.default_rng([seed, rank])
    if dtype == "int32":
        return rng.integers(-(2**20), 2**20, size, dtype=np.int32)
    return (rng.standard_normal(size) * scale).astype(np.float32)


def allreduce_worker(queue, endpoint: str, job: str, rank: int, n: int, sizes: Sequence[int], seed: int,
                     dtype: str = "float32", worker_kwargs: dict | None = None) -> None:
    """Sum one array per entry of ``sizes``; report the list of results."""
    from switchml import Worker

    try:
        with Worker(endpoint, job, rank, n, **(worker_kwargs or {})) as w:
            results = [w.allreduce(make_input(seed + i, rank, size, dtype)) for i, size in enumerate(sizes)]
            queue.put((rank, results, w.stats.retransmissions))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", 0))


def run_processes(target: Callable, args_of_rank: Callable[[int], tuple], n: int, timeout: float = 90) -> list[Any]:
    """Start ``n`` processes of ``target(queue, *args_of_rank(rank))``; collect one report each."""
    queue = CTX.Queue()
    procs = [CTX.Process(target=target, args=(queue, *args_of_rank(r)), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    try:
        reports = [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    reports.sort(key=lambda r: r[0])
    return reports


def run_threads(target: Callable[[int], Any], n: int, timeout: float = 90) -> list[Any]:
    """``target(rank)`` for ranks 0..n-1 in threads of this process (a rank's ``Worker``
    registers and blocks until all have): each rank's return value, or the exception it raised."""
    out: list[Any] = [None] * n

    def one(rank: int) -> None:
        try:
            out[rank] = target(rank)
        except BaseException as exc:  # noqa: BLE001 - returned to the caller
            out[rank] = exc

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


def allreduce_job(endpoint: str, job: str, n: int, sizes: Sequence[int], seed: int = 0, dtype: str = "float32",
                  worker_kwargs: dict | None = None, timeout: float = 90) -> list[list[np.ndarray]]:
    """Run ``n`` worker processes of ``job``; return each rank's results, failing on any error."""
    reports = run_processes(allreduce_worker, lambda r: (endpoint, job, r, n, sizes, seed, dtype, worker_kwargs),
                            n, timeout)
    errors = [r[1] for r in reports if isinstance(r[1], str)]
    assert not errors, errors[0]
    return [r[1] for r in reports]


def expected_sum(n: int, size: int, seed: int, dtype: str = "float32") -> np.ndarray:
    """The exact (float64 or int64) sum the job should produce."""
    wide = np.int64 if dtype == "int32" else np.float64
    return np.sum([make_input(seed, r, size, dtype).astype(wide) for r in range(n)], axis=0)


def assert_within_quantization_bound(got: np.ndarray, n: int, size: int, seed: int, k: int) -> None:
    """``got`` is the sum of the ranks' ``make_input(seed, r, size)`` within each block's quantization bound."""
    from switchml import quantize

    inputs = [make_input(seed, r, size) for r in range(n)]
    exact = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    pad = (-size) % k
    exps = np.max([quantize.block_exponents(np.pad(x, (0, pad)).reshape(-1, k)) for x in inputs], axis=0)
    bound = np.repeat([quantize.error_bound(int(e), n) for e in exps], k)[:size]
    assert np.all(np.abs(got.astype(np.float64) - exact) <= bound + np.abs(exact) * 2.0**-23)


def slow_worker(queue, endpoint: str, job: str, rank: int, n: int, size: int, die_after: float | None,
                worker_kwargs: dict) -> None:
    """Start an allreduce; with ``die_after``, kill this process that many seconds into the call
    (SIGKILL, no goodbye). Keep it short: the native data path sums 1M floats in ~0.2 s here."""
    from switchml import Worker

    try:
        with Worker(endpoint, job, rank, n, **worker_kwargs) as w:
            x = make_input(0, rank, size)
            if die_after is not None:
                fut = w.allreduce_async(x)
                while not (fut.running() or fut.done()):  # count from the start of the call, not of the queue
                    time.sleep(0.001)
                time.sleep(die_after)
                if not fut.done():
                    os.kill(os.getpid(), signal.SIGKILL)
            start = time.monotonic()
            w.allreduce(x)
            queue.put((rank, "completed", time.monotonic() - start))
    except BaseException as exc:  # noqa: BLE001
        queue.put((rank, f"{type(exc).__name__}: {exc}", time.monotonic()))
