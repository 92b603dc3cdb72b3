"""SwitchML's exponent quantizer (DESIGN.md, "Quantization").

For block b each worker sends its local exponent ``e = biased_exponent(max|x|) - 126``
(so ``|x| < 2^e``); the switch returns the max E over workers. With ``c = ceil(log2 n)``
every worker scales by ``f = 2^(30 - c - E)``: |q| <= 2^(30 - c), so the n-way int32 sum
stays below 2^30. f is a power of two, so scaling and unscaling are exact; the only error is
the rounding, at most 0.5/f per worker and element. e = 127 marks a block with NaN/Inf
(or |x| >= 2^126): the whole block comes back NaN.

All functions work on whole blocks with numpy, never per element in Python.
"""

from __future__ import annotations

import math

import numpy as np

from switchml.protocol import EXP_MIN, EXP_NAN

QUANT_BITS = 30  #: |n-way sum| < 2^30


def sum_bits(num_workers: int) -> int:
    """c = ceil(log2 n): headroom bits the n-way sum needs."""
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}; expected >= 1")
    return math.ceil(math.log2(num_workers))


def block_exponents(blocks: np.ndarray) -> np.ndarray:
    """Local exponent of each row of ``blocks`` (float32, shape (B, k)) as int8.

    ``e`` is the smallest exponent with ``max|x| < 2^e``, clamped to -126 (zeros and
    denormals); 127 for a block holding NaN/Inf or a value >= 2^126.
    """
    if blocks.shape[0] == 0:
        return np.zeros(0, dtype=np.int8)
    with np.errstate(invalid="ignore"):
        peak = np.max(np.abs(blocks), axis=1).astype(np.float64)
    _, exps = np.frexp(peak)  # peak = m * 2^exps, 0.5 <= m < 1, so peak < 2^exps
    exps = np.where(peak == 0, EXP_MIN, np.maximum(exps, EXP_MIN))  # frexp(0) gives 0, not -inf
    exps = np.where(np.isfinite(peak), np.minimum(exps, EXP_NAN), EXP_NAN)
    return exps.astype(np.int8)


def scale_factor(global_exponent: int, num_workers: int) -> float:
    """f = 2^(30 - c - E) as float64 (f < 1 for blocks with E > 30-c, never 0)."""
    return math.ldexp(1.0, QUANT_BITS - sum_bits(num_workers) - int(global_exponent))


def quantize(block: np.ndarray, global_exponent: int, num_workers: int) -> np.ndarray:
    """int32 of ``round(block * f)``; zeros for a NaN block (its result is NaN anyway)."""
    if global_exponent == EXP_NAN:
        return np.zeros(block.shape, dtype=np.int32)
    f = scale_factor(global_exponent, num_workers)
    return np.rint(block.astype(np.float64) * f).astype(np.int32)


def dequantize(total: np.ndarray, global_exponent: int, num_workers: int) -> np.ndarray:
    """float32 of ``total / f``; all NaN for the NaN sentinel."""
    if global_exponent == EXP_NAN:
        return np.full(total.shape, np.nan, dtype=np.float32)
    f = scale_factor(global_exponent, num_workers)
    return (total.astype(np.float64) / f).astype(np.float32)


def error_bound(global_exponent: int, num_workers: int) -> float:
    """Largest |result - exact sum| per element before the float32 cast: n * 0.5 / f."""
    return num_workers * 0.5 / scale_factor(global_exponent, num_workers)
