"""Issue 15, item 1: ranks that pass different element counts or dtypes to the same allreduce
call each get a ShapeMismatch naming their own and a differing peer's (count, dtype), never
a wrong result, and the job's next call works. Real processes and sockets, both data paths."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
from mpworkers import make_input, run_processes

from switchml.protocol import DESCRIPTOR_MAX_ELEMENTS, DTYPE_CODES
from switchml.worker import describe_word, descriptor_word, first_window


def mismatch_worker(queue, endpoint: str, job: str, rank: int, n: int, specs: list[tuple[int, str]]) -> None:
    """One call with this rank's (size, dtype) of ``specs``, then one matching call."""
    from switchml import ShapeMismatch, Worker

    size, dtype = specs[rank]
    try:
        with Worker(endpoint, job, rank, n, timeout=20.0) as w:
            report: dict = {}
            try:
                w.allreduce(make_input(0, rank, size, dtype))
                report["first"] = "returned a result"
            except ShapeMismatch as exc:
                report["first"] = (str(exc), exc.own, exc.peers, exc.in_step)
            report["second"] = w.allreduce(make_input(1, rank, 3000, "float32"))
            report["third"] = w.allreduce(make_input(2, rank, 700, "int32"))
            report["duplicates"] = w.stats.duplicate_results
        queue.put((rank, report))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


CASES = {
    "1000-vs-1001": [(1000, "float32"), (1001, "float32")],
    "window-differs": [(1024, "float32"), (1025, "float32")],  # k=256, W=8: 4 blocks against 5
    "empty-vs-300": [(0, "float32"), (300, "float32")],
    "float32-vs-int32": [(1000, "float32"), (1000, "int32")],
    "int32-window-differs": [(256, "int32"), (2000, "int32")],
    "four-ranks-one-differs": [(5000, "float32"), (5000, "float32"), (4999, "float32"), (5000, "float32")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_raises_shape_mismatch_and_the_next_calls_work(make_switch, case):
    specs = CASES[case]
    n = len(specs)
    env = make_switch(window=8, k=256)
    reports = run_processes(mismatch_worker, lambda r: (env.endpoint, f"mm-{case}", r, n, specs), n, timeout=120)
    errors = [r[1] for r in reports if isinstance(r[1], str)]
    assert not errors, errors[0]
    for rank, report in reports:
        first = report["first"]
        assert isinstance(first, tuple), f"rank {rank}: {first}"
        message, own, peers, in_step = first
        assert own == specs[rank] and in_step
        differing = {r: spec for r, spec in enumerate(specs) if spec != specs[rank]}
        assert peers == differing, (rank, peers)
        size, dtype = specs[rank]
        other = next(iter(differing))
        assert f"this rank has {size} {dtype}" in message, message
        assert f"rank {other} has {specs[other][0]} {specs[other][1]}" in message, message
    # the next calls meet in step: every rank gets the same, correct sums
    exact = np.sum([make_input(1, r, 3000).astype(np.float64) for r in range(n)], axis=0)
    ints = np.sum([make_input(2, r, 700, "int32") for r in range(n)], axis=0, dtype=np.int32)
    for _, report in reports:
        assert np.array_equal(report["second"], reports[0][1]["second"])
        assert np.allclose(report["second"], exact, atol=1e-4)
        assert np.array_equal(report["third"], ints)


def test_descriptor_words_are_exact_and_saturate():
    assert describe_word(descriptor_word(1001, np.float32)) == (1001, "float32")
    assert describe_word(descriptor_word(0, np.int32)) == (0, "int32")
    assert descriptor_word(5, np.float32) != descriptor_word(5, np.int32)
    assert describe_word(descriptor_word(1 << 40, np.float32)) == (DESCRIPTOR_MAX_ELEMENTS, "float32")
    assert descriptor_word(1 << 40, np.int32) < 1 << 32  # one uint32 lane
    assert "no descriptor" in describe_word(0)[1]
    assert 0 not in DTYPE_CODES.values()  # a lane of zeros is never a descriptor
    assert [first_window(8, n_el, 256) for n_el in (0, 1, 256, 257, 1024, 1025, 10**6)] == [1, 1, 1, 2, 4, 5, 8]
