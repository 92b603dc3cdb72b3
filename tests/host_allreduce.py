"""One rank of an allreduce job, as a script, for tests that run ranks on Mininet hosts.

    python tests/host_allreduce.py --controller tcp://IP:PORT --job J --rank R --world-size N \
        --sizes 3000,700 --dtypes int32,float32 --seed S --out FILE.npz

Sums ``make_input(seed + i, rank, size_i, dtype_i)`` (``tests/mpworkers.py``) for each i and
saves the results as ``r0``, ``r1``, ... in FILE.npz, with the worker's counters; on failure
it writes the error to FILE.npz.err and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpworkers import make_input  # noqa: E402

from switchml import Worker  # noqa: E402


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
