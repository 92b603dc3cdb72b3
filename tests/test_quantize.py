"""The exponent quantizer: no overflow, bounded error, NaN/Inf sentinel (property tests)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from switchml import quantize
from switchml.protocol import EXP_MIN, EXP_NAN

K = 64
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.0e38, -3.0e38, 2.0**126, 1.0, -1.0, 2.0**30])
BIG = float(np.float32(3.0e38))
finite = st.floats(min_value=-BIG, max_value=BIG, allow_nan=False, width=32) | special
blocks = st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(arrays(np.float32, K, elements=finite), min_size=n, max_size=n)))


def aggregate(worker_blocks: list[np.ndarray]) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """What the switch computes: max exponent and the wrapping int32 sum of quantized blocks."""
    n = len(worker_blocks)
    exps = [int(quantize.block_exponents(b[None, :])[0]) for b in worker_blocks]
    e = max(exps)
    qs = [quantize.quantize(b, e, n) for b in worker_blocks]
    total = np.zeros(K, dtype=np.int64)
    for q in qs:
        total += q
    return total, e, qs


@settings(max_examples=300, deadline=None)
@given(blocks)
def test_sum_never_overflows_and_error_is_bounded(case):
    n, worker_blocks = case
    total, e, qs = aggregate(worker_blocks)
    if e == EXP_NAN:
        assert np.isnan(quantize.dequantize(total.astype(np.int32), e, n)).all()
        return
    limit = 2 ** (30 - quantize.sum_bits(n))
    assert all(np.abs(q.astype(np.int64)).max() <= limit for q in qs)
    assert np.abs(total).max() < 2**30 + 1  # the n-way sum fits int32 with room to spare
    exact = np.sum([b.astype(np.float64) for b in worker_blocks], axis=0)
    got = quantize.dequantize(total.astype(np.int32), e, n).astype(np.float64)
    bound = quantize.error_bound(e, n)
    # plus the float32 rounding of the result itself
    assert np.all(np.abs(got - exact) <= bound + np.abs(exact) * 2.0**-23 + 1e-45)


@given(st.integers(1, 32), arrays(np.float32, K, elements=finite))
def test_exponent_bounds_the_block(n, block):
    e = int(quantize.block_exponents(block[None, :])[0])
    peak = float(np.abs(block).max())
    if peak >= 2.0**126:
        assert e == EXP_NAN
    elif peak == 0:
        assert e == EXP_MIN
    else:
        assert peak < 2.0**e
        assert e == EXP_MIN or peak >= 2.0 ** (e - 1)  # the smallest such exponent


def test_nan_and_inf_blocks_send_the_sentinel():
    b = np.ones((3, K), dtype=np.float32)
    b[0, 5], b[1, 7] = np.nan, -np.inf
    assert quantize.block_exponents(b).tolist() == [EXP_NAN, EXP_NAN, 1]
    assert np.isnan(quantize.dequantize(np.zeros(K, np.int32), EXP_NAN, 4)).all()


def test_zero_block_and_denormals():
    z = np.zeros((1, K), dtype=np.float32)
    assert quantize.block_exponents(z)[0] == EXP_MIN
    d = np.full((1, K), 1e-45, dtype=np.float32)  # denormal
    assert quantize.block_exponents(d)[0] == EXP_MIN


def test_large_exponent_gives_scale_below_one_not_zero():
    f = quantize.scale_factor(100, 4)
    assert 0 < f < 1
    x = np.full(K, 2.0**99, dtype=np.float32)
    q = quantize.quantize(x, 100, 4)
    assert np.all(q == 2**27) and np.all(quantize.dequantize(q, 100, 4) == x)


def test_scale_is_exact_power_of_two():
    x = np.float32(0.375) * np.ones(K, dtype=np.float32)
    e = int(quantize.block_exponents(x[None, :])[0])
    assert np.array_equal(quantize.dequantize(quantize.quantize(x, e, 1), e, 1), x)
