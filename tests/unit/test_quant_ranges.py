"""Quantization at the ends of the float ranges (aggbox/quant.py), kernel simulated as in
test_quant.py: float32 blocks far below 1 (down to subnormals), whose scales do not fit
float32, and float16 tensors, whose int32 sums do not fit float16."""

from __future__ import annotations

import numpy as np
import pytest
from test_quant import allreduce, kernel_sum

from aggbox import quant
from aggbox.quant import QuantizationError, block_exponents, dequantize_into, quantize

BLOCK = 256


def tiny_inputs(n: int, size: int, magnitude: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(size) * magnitude).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("magnitude", [1e-31, 1e-35, 1e-38, 1e-40, 1e-44])
@pytest.mark.parametrize("scale", ["align", "agree"])
@pytest.mark.parametrize("n", [2, 4])
def test_tiny_float32_blocks_are_within_the_bound(magnitude, scale, n):
    """Below about 2**-99 the scale 2**(B - e) is above float32's largest power of two;
    it used to be clipped there, so the values came back off by a power of two (>= 2x)
    while the bound, computed from the right exponents, said they were exact to 1e-9."""
    xs = tiny_inputs(n, 1000, magnitude, seed=n)
    xs[0][:BLOCK] = 0  # an all-zero block among tiny ones
    result, bound, _ = allreduce(xs, BLOCK, scale, seed=n)
    want = np.sum([x.astype(np.float64) for x in xs], axis=0)
    err = np.abs(result.astype(np.float64) - want)
    assert result.dtype == np.float32
    assert (err <= bound).all(), float((err - bound).max())
    # and the bound says something: a few ulps of the block peak, or one float32 rounding
    # of a subnormal (2**-150) where the values are that small
    peak = float(np.abs(want).max())
    assert err.max() <= peak * 1e-6 + 2.0**-149
    assert bound.max() <= peak * 1e-6 + 2.0**-149


def test_tiny_and_normal_blocks_in_one_tensor():
    """One block of 1e-35 among blocks of 1: the tiny block right, the others bit for bit
    what they are when the tensor has no tiny block (the float32 path)."""
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(4 * BLOCK).astype(np.float32) for _ in range(2)]
    ref, _, _ = allreduce(xs, BLOCK, "align")
    for x in xs:
        x[BLOCK:2 * BLOCK] *= np.float32(1e-35)
    result, bound, _ = allreduce(xs, BLOCK, "align")
    want = np.sum([x.astype(np.float64) for x in xs], axis=0)
    assert (np.abs(result - want) <= bound).all()
    keep = np.r_[0:BLOCK, 2 * BLOCK:4 * BLOCK]
    assert np.array_equal(result[keep], ref[keep])


def float16_sums(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = len(xs)
    own = [block_exponents(x, BLOCK) for x in xs]
    qs = [quantize(x, e, BLOCK, n) for x, e in zip(xs, own, strict=True)]
    return kernel_sum(qs, BLOCK, own)


def test_float16_sums_come_back_finite_and_within_the_bound():
    """int32 sums near 2**28 are inf in float16: they are dequantized in float32 first."""
    rng = np.random.default_rng(5)
    xs = [(rng.standard_normal(1000) * 100).astype(np.float16) for _ in range(3)]
    result, bound, _ = allreduce(xs, BLOCK, "align")
    want = np.sum([x.astype(np.float64) for x in xs], axis=0)
    assert result.dtype == np.float16 and np.isfinite(result).all()
    assert (np.abs(result.astype(np.float64) - want) <= bound).all()


def test_float16_mean_of_a_sum_beyond_float16_is_returned():
    xs = [np.full(300, 40000.0, dtype=np.float16), np.full(300, 50000.0, dtype=np.float16)]
    sums, exps = float16_sums(xs)
    out = np.empty(300, dtype=np.float16)
    dequantize_into(sums, exps, BLOCK, 2, out, mean=True)
    assert (out == np.float16(45000.0)).all()


def test_float16_sum_beyond_float16_is_a_clear_error_not_inf():
    xs = [np.full(300, 40000.0, dtype=np.float16), np.full(300, 50000.0, dtype=np.float16)]
    xs[0][:10] = 1.0
    sums, exps = float16_sums(xs)
    with pytest.raises(QuantizationError, match=r"sum does not fit float16: 290 value"):
        dequantize_into(sums, exps, BLOCK, 2, np.empty(300, dtype=np.float16))
    # a sum that only just fits comes back (65504 is float16's largest finite value)
    ok = [np.full(300, 32752.0, dtype=np.float16), np.full(300, 32752.0, dtype=np.float16)]
    sums, exps = float16_sums(ok)
    out = dequantize_into(sums, exps, BLOCK, 2, np.empty(300, dtype=np.float16))
    assert (out == np.float16(65504.0)).all()


def test_zero_blocks_keep_the_float32_path():
    """An all-zero block's exponent (-200) is out of float32's range but does not send the
    call to float64: its values are 0 whatever the scale."""
    e = np.array([quant.ZERO_BLOCK_EXPONENT, 0, -5], dtype=np.int32)
    assert quant._scales(e, 29, quant.FLOAT32).dtype == np.float32
    assert quant._scales(e, 29, quant.FLOAT32, inverse=True).dtype == np.float32
    assert quant._scales(np.array([-110]), 29, quant.FLOAT32).dtype == np.float64
