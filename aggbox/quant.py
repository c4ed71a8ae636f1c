"""Edge quantization: float tensors to int32 blocks that the kernel can sum, and back.

The kernel adds integers only. Before quantizing, the workers agree on one power-of-two
exponent per block: each worker computes ``e`` with ``max|x| < 2**e`` over its block, and
the group takes the element-wise MAX (itself an in-kernel aggregation, see
aggbox/collectives/allreduce.py). With that shared exponent every worker quantizes

    q = rint(x * 2**(B - e)),   B = 30 - ceil(log2(N))

so that ``|q| <= 2**B`` and the sum of N contributions satisfies
``|sum q| <= N * 2**B <= 2**30 < 2**31 - 1``: no overflow, by construction.

Error bound (per element of the SUM, before the final cast to the input's dtype): each
worker's rounding error is at most half a quantization step ``2**(e - B)``, so

    |sum_hat - sum| <= N * 2**(e - B - 1)

and casting the float64 result to float32 adds at most ``|sum_hat| * 2**-24``.
``error_bound`` returns both terms for every element; for a mean, divide by N.
Inputs with NaN or Inf are refused before anything is sent.

Aligned mode (one round instead of two; the default of aggbox.collectives.allreduce):
each worker quantizes with its OWN block exponent ``e_w`` and sends it along; the kernel
keeps every chunk of a slot at the largest exponent seen so far, shifting (rounding to
nearest) whichever side has the smaller one. At completion every chunk is at the group's
``E = max e_w``: exactly the scale the two-phase agreement would have chosen, reached
without a separate MAX round. Each value still satisfies ``|q| <= 2**B``, so no overflow.
Rounding events: N quantizations (each <= half a step of 2**(e_w - B) <= 2**(E - B)) and
at most N - 1 alignment shifts (each <= half a step of 2**(E - B)), hence

    |sum_hat - sum| < N * 2**(E - B)      (``error_bound(..., aligned=True)``)

plus the same cast term.
"""

from __future__ import annotations

import math

import numpy as np

#: exponent for an all-zero block (smaller than any float32's): its step is tiny, its q 0.
ZERO_BLOCK_EXPONENT = -200
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)


class QuantizationError(ValueError):
    """The input cannot be quantized (NaN, Inf, or not a float tensor)."""


def headroom_bits(n_workers: int) -> int:
    """B: the bits each quantized value may use so that N of them sum without overflow."""
    if n_workers < 1:
        raise ValueError("n_workers must be >= 1")
    return 30 - math.ceil(math.log2(n_workers)) if n_workers > 1 else 30


def check_finite(x: np.ndarray) -> None:
    if not np.issubdtype(x.dtype, np.floating):
        raise QuantizationError(f"quantization takes a float tensor, got {x.dtype}")
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise QuantizationError(f"the tensor has {bad} NaN or Inf value(s): nothing was sent; "
                                "clean the input (e.g. np.nan_to_num) before the allreduce")


def _blocks(x: np.ndarray, block: int, dtype: np.dtype) -> np.ndarray:
    """``x`` as a (n_blocks, block) array of ``dtype``, zero-padded at the end (a view of
    ``x`` when no padding or conversion is needed)."""
    flat = np.asarray(x).reshape(-1)
    n_blocks = max(1, -(-flat.size // block))
    if flat.size == n_blocks * block and flat.dtype == dtype:
        return flat.reshape(n_blocks, block)
    padded = np.zeros(n_blocks * block, dtype=dtype)
    padded[: flat.size] = flat
    return padded.reshape(n_blocks, block)


def _work_dtype(x: np.ndarray) -> np.dtype:
    # float32 inputs are scaled in float32: multiplying by a power of two is exact, so
    # nothing is lost against float64, at half the memory traffic.
    return np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)


def block_exponents(x: np.ndarray, block: int) -> np.ndarray:
    """Per block, the smallest e with max|x| < 2**e (int32; ZERO_BLOCK_EXPONENT if all 0)."""
    check_finite(x)
    blocks = _blocks(x, block, _work_dtype(x))
    peak = np.maximum(blocks.max(axis=1), -blocks.min(axis=1)).astype(np.float64)
    _, exp = np.frexp(peak)  # peak = m * 2**exp with 0.5 <= m < 1, so peak < 2**exp
    exp = exp.astype(np.int32)
    exp[peak == 0] = ZERO_BLOCK_EXPONENT
    return exp


def _pow2(exponents: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """2**exponents as ``dtype``, clipped to its finite range."""
    info = np.finfo(dtype)
    e = np.clip(exponents.astype(np.int64), info.minexp, info.maxexp - 1)
    return np.ldexp(np.ones(e.shape, dtype=dtype), e.astype(np.int32))


def quantize(x: np.ndarray, exponents: np.ndarray, block: int, n_workers: int) -> np.ndarray:
    """int32 values (len(x) of them) scaled per block by the agreed ``exponents``."""
    check_finite(x)
    bits = headroom_bits(n_workers)
    dtype = _work_dtype(x)
    scaled = _blocks(x, block, dtype) * _pow2(bits - exponents.astype(np.int64), dtype)[:, None]
    np.rint(scaled, out=scaled)
    if np.abs(scaled).max(initial=0.0) > float(2**bits):
        raise QuantizationError("a value exceeds its block's agreed exponent: every worker "
                                "must quantize with the group's MAX exponents")
    return scaled.astype(np.int32).reshape(-1)[: np.size(x)]


def dequantize(q_sum: np.ndarray, exponents: np.ndarray, block: int, n_workers: int,
               size: int, dtype: np.dtype = FLOAT64) -> np.ndarray:
    """The int32 sums as ``dtype`` values: one rounding (int to float), then an exact
    multiplication by a power of two."""
    bits = headroom_bits(n_workers)
    blocks = _blocks(q_sum[:size], block, np.dtype(np.int32)).astype(dtype)
    blocks *= _pow2(exponents.astype(np.int64) - bits, dtype)[:, None]
    return blocks.reshape(-1)[:size]


def error_bound(result: np.ndarray, exponents: np.ndarray, block: int, n_workers: int,
                dtype: np.dtype = FLOAT32, aligned: bool = False) -> np.ndarray:
    """Per element, the bound on |allreduce_sum - exact_sum| (see the module docstring);
    ``aligned``: the one-round mode, where ``exponents`` are the results' exponents."""
    bits = headroom_bits(n_workers)
    size = np.size(result)
    step = np.ldexp(1.0, (exponents.astype(np.int64) - bits).clip(-1074, 1023))
    per_step = n_workers if aligned else n_workers / 2
    quant = np.repeat(per_step * step, block)[:size]
    cast = np.abs(np.asarray(result, dtype=np.float64)) * float(np.finfo(dtype).eps) / 2
    return quant + cast
