"""One rank of an allreduce job, as a script, for tests that run ranks on Mininet hosts.

    python tests/host_allreduce.py --controller tcp://IP:PORT --job J --rank R --world-size N \
        --sizes 3000,700 --dtypes int32,float32 --seed S --out FILE.npz

Sums ``make_input(seed + i, rank, size_i, dtype_i)`` (``tests/mpworkers.py``) for each i and
saves the results as ``r0``, ``r1``, ... in FILE.npz, with the worker's counters; on failure
it writes the error to FILE.npz.err and exits 1. ``run_on_hosts`` starts one such rank on every
worker host of a Mininet network and collects the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

from mpworkers import make_input  # noqa: E402

from switchml import Worker  # noqa: E402


def run_on_hosts(net: Any, endpoint: str, job: str, workdir: Path, seed: int, sizes: Sequence[int],
                 dtypes: Sequence[str], timeout: float = 240.0) -> list[dict]:
    """One rank of this script on each of ``net.hosts`` (an ``emulation.mininet`` network), in
    rank order; each rank's saved results (``r0``, ``r1``, ..., its counters) once all have exited 0.
    A rank that fails fails the caller's test with its error or its log's tail."""
    from emulation.spawn import child_env

    env = child_env({"OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] += os.pathsep + str(TESTS)
    procs = []
    for rank, host in enumerate(net.hosts):
        out = workdir / f"{job}-r{rank}.npz"
        args = [sys.executable, str(TESTS / "host_allreduce.py"), "--controller", endpoint, "--job", job,
                "--rank", str(rank), "--world-size", str(len(net.hosts)), "--sizes", ",".join(map(str, sizes)),
                "--dtypes", ",".join(dtypes), "--seed", str(seed), "--out", str(out)]
        procs.append((net.popen(host, args, env=env, log_path=str(workdir / f"{job}-r{rank}.log")), out))
    results = []
    for rank, (proc, out) in enumerate(procs):
        code = proc.wait(timeout=timeout)
        err = Path(str(out) + ".err")
        assert code == 0, err.read_text() if err.exists() else (workdir / f"{job}-r{rank}.log").read_text()[-3000:]
        with np.load(out) as saved:
            results.append({key: saved[key] for key in saved.files})
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controller", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--sizes", required=True, help="comma-separated element counts, one allreduce each")
    p.add_argument("--dtypes", required=True, help="comma-separated dtypes (int32, float32), one per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="the worker's progress timeout")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sizes, dtypes = [int(s) for s in args.sizes.split(",")], args.dtypes.split(",")
    try:
        with Worker(args.controller, args.job, args.rank, args.world_size, timeout=args.timeout,
                    control_timeout=args.timeout) as w:
            results = {f"r{i}": w.allreduce(make_input(args.seed + i, args.rank, size, dtype))
                       for i, (size, dtype) in enumerate(zip(sizes, dtypes, strict=True))}
            np.savez(args.out, k=w.info.k, retransmissions=w.stats.retransmissions,
                     packets_sent=w.stats.packets_sent, **results)
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        Path(args.out + ".err").write_text(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
