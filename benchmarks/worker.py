"""One rank of ``switchml-bench allreduce``: run as its own process (``python -m benchmarks.worker``).

The parent (``benchmarks.allreduce``) starts one such process per rank, on loopback or in
a Mininet host. Each rank builds its input from ``(seed, rank)``, so nothing large crosses
a process boundary, runs ``warmup`` untimed and ``repeats`` timed allreduces, each started
together with the other ranks (a barrier before every call), and writes one JSON report.

The report of rank 0 also holds the correctness check of the last result: the exact
(float64) sum of every rank's input and, for SwitchML, whether every element is within
the quantization bound of DESIGN.md (``n * 0.5 / f`` per element, plus the float32 rounding
of the result). Every rank reports a hash of its result, so the parent can check that all
ranks got the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import host_cpu_share, host_cpu_times

log = logging.getLogger(__name__)


def make_input(seed: int, rank: int, elements: int) -> np.ndarray:
    """The deterministic float32 input of ``rank`` (standard normal)."""
    return np.random.default_rng([seed, rank]).standard_normal(elements, dtype=np.float32)


def check_result(result: np.ndarray, seed: int, n: int, k: int | None) -> dict[str, Any]:
    """Compare ``result`` with the exact sum of the n inputs.

    With ``k`` (SwitchML), also check each element against the quantization bound of its
    block: ``n * 0.5 / f`` with ``f = 2^(30 - ceil(log2 n) - E)``, E the block's global
    exponent, plus ``|exact| * 2^-23`` for the cast of the result to float32.
    """
    from switchml import quantize

    elements = result.size
    exact = np.zeros(elements, dtype=np.float64)
    abs_sum = np.zeros(elements, dtype=np.float64) if not k else None
    blocks = math.ceil(elements / k) if k else 0
    exps = np.full(blocks, -128, dtype=np.int16)
    for r in range(n):
        x = make_input(seed, r, elements)
        exact += x
        if abs_sum is not None:
            abs_sum += np.abs(x)
        if k and elements:
            padded = np.zeros(blocks * k, dtype=np.float32)
            padded[:elements] = x
            exps = np.maximum(exps, quantize.block_exponents(padded.reshape(blocks, k)))
    err = np.abs(result.astype(np.float64) - exact)
    report: dict[str, Any] = {
        "max_abs_error": float(err.max()) if elements else 0.0,
        "max_abs_exact": float(np.abs(exact).max()) if elements else 0.0,
        "finite": bool(np.all(np.isfinite(result))),
    }
    if k:
        c = quantize.sum_bits(n)
        per_block = n * 0.5 * np.ldexp(1.0, exps.astype(np.int64) - (quantize.QUANT_BITS - c))
        bound = np.repeat(per_block, k)[:elements] + np.abs(exact) * 2.0**-23
        ratio = err / bound if elements else np.zeros(0)
        report.update({
            "bound": "n*0.5/f per element + |exact|*2^-23",
            "max_error_over_bound": float(ratio.max()) if elements else 0.0,
            "within_bound": bool(report["finite"] and np.all(err <= bound)),
        })
    else:
        # a float32 sum of n terms in any order: each addition rounds once (relative 2^-24)
        bound = (n - 1) * 2.0**-24 * abs_sum + np.abs(exact) * 2.0**-24
        report.update({"bound": "(n-1)*2^-24*sum|x| + |exact|*2^-24 (float32 summation)",
                       "within_bound": bool(report["finite"] and np.all(err <= bound + 1e-30))})
    return report


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()[:16]


def run_switchml(args: argparse.Namespace, x: np.ndarray) -> tuple[list[float], np.ndarray, dict[str, Any]]:
    from switchml import Worker

    kwargs = {"retransmit_timeout": args.rto} if args.rto else {}
    with Worker(args.controller, args.job, args.rank, args.world_size, k=args.k, timeout=args.timeout,
                control_timeout=args.timeout, **kwargs) as w:
        # the sum goes to one preallocated array, as Gloo's all_reduce works in place on its tensor
        out = np.empty_like(x)
        times, y, extra = time_calls(args, lambda: w.barrier(timeout=args.timeout), lambda: w.allreduce(x, out=out))
        w.barrier(timeout=args.timeout)  # nobody leaves (and frees the job's slots) while a peer still sums
        extra.update({"k": w.info.k, "window": w.info.window, "packets_sent": w.stats.packets_sent,
                      "retransmissions": w.stats.retransmissions, "stale_results": w.stats.stale_results,
                      "duplicate_results": w.stats.duplicate_results})
    return times, y, extra


def run_gloo(args: argparse.Namespace, x: np.ndarray) -> tuple[list[float], np.ndarray, dict[str, Any]]:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=args.timeout))
    source = torch.from_numpy(x)
    tensor = source.clone()

    def barrier() -> None:
        nonlocal tensor
        tensor = source.clone()  # all_reduce works in place: every call sums the original input
        dist.barrier()

    def call() -> np.ndarray:
        dist.all_reduce(tensor)
        return tensor.numpy()

    try:
        times, y, extra = time_calls(args, barrier, call)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return times, y, extra


def time_calls(args: argparse.Namespace, barrier: Callable[[], object],
               call: Callable[[], np.ndarray]) -> tuple[list[float], np.ndarray, dict[str, Any]]:
    """``args.warmup`` untimed then ``args.repeats`` timed calls, each after ``barrier()``.

    Returns the timed calls' seconds, the last result, this process's CPU seconds (every
    thread) per timed call and where the machine's CPU time went during the timed calls, all
    together (``benchmarks.common.host_cpu_share``; the kernel counts in ticks of 10 ms or so,
    too coarse for one short call: None if the calls spanned no tick). All namespaces share the
    kernel, so in Mininet this is every rank's, the switch's and the kernel's packet processing."""
    times: list[float] = []
    cpu: list[float] = []
    ticks: dict[str, int] | None = None  # the machine's CPU ticks by state, summed over the timed calls
    y = None
    for i in range(args.warmup + args.repeats):
        barrier()
        cpu0, host0 = time.process_time(), host_cpu_times()
        start = time.perf_counter()
        y = call()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            cpu.append(time.process_time() - cpu0)
            host1 = host_cpu_times()
            if host0 is not None and host1 is not None:
                ticks = {key: (ticks or {}).get(key, 0) + host1[key] - host0[key] for key in host0}
    host = host_cpu_share(dict.fromkeys(ticks, 0), ticks) if ticks else None
    return times, y, {"cpu_per_call_s": cpu, "host_cpu_timed": host}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker", description="One rank of switchml-bench allreduce.")
    p.add_argument("--backend", choices=["switchml", "gloo"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--elements", type=int, required=True, help="float32 elements to sum")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any one step may take before failing")
    p.add_argument("--out", required=True, help="JSON report to write")
    p.add_argument("--check", action="store_true", help="check the last result against the exact sum (rank 0)")
    p.add_argument("--controller", help="switchml: the controller's ZeroMQ endpoint")
    p.add_argument("--job", default="bench", help="switchml: job name")
    p.add_argument("--k", type=int, default=None, help="switchml: elements per packet")
    p.add_argument("--rto", type=float, default=None, help="switchml: first retransmission timeout (s)")
    p.add_argument("--master", help="gloo: host:port of rank 0's TCP store")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"rank {args.rank} %(name)s %(levelname)s %(message)s")
    report: dict[str, Any] = {"rank": args.rank, "backend": args.backend, "pid": os.getpid()}
    try:
        x = make_input(args.seed, args.rank, args.elements)
        cpu0 = time.process_time()
        runner = run_switchml if args.backend == "switchml" else run_gloo
        times, y, extra = runner(args, x)
        report.update(extra)
        report.update({"times_s": times, "cpu_s": time.process_time() - cpu0, "digest": _digest(y), "ok": True})
        if args.check and args.rank == 0:
            report["check"] = check_result(np.asarray(y), args.seed, args.world_size,
                                           extra.get("k") if args.backend == "switchml" else None)
    except BaseException as exc:  # noqa: BLE001 - every failure goes into the report
        report.update({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
