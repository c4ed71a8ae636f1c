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
Inputs with NaN or Inf are refused before anything is sent (found from the block peaks).

Cost: for float32, each direction is one C loop per block (aggbox/edge.c, built by
aggbox/native.py): quantize finds the block's peak and writes rint(x * s) into the int32
send buffer while the block is in cache; dequantize writes float(q) * s into the result.
Without a C compiler (or with AGGBOX_NATIVE=0) the numpy path below gives the same bits:
quantize is peaks (max, min), multiply into a scratch, rint cast into the send buffer;
dequantize is one multiply that casts int32 to the result's dtype into the result
(``aggbox bench quant`` measures both; docs/allreduce.md).

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

from aggbox import native

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
    """Refuse a non-float tensor or one with NaN or Inf, naming how many (a full scan:
    the hot path finds NaN/Inf from the block peaks and calls this only to explain)."""
    _check_float(x)
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise QuantizationError(f"the tensor has {bad} NaN or Inf value(s): nothing was sent; "
                                "clean the input (e.g. np.nan_to_num) before the allreduce")


def _check_float(x: np.ndarray) -> None:
    if not np.issubdtype(x.dtype, np.floating):
        raise QuantizationError(f"quantization takes a float tensor, got {x.dtype}")


def _work_dtype(x: np.ndarray) -> np.dtype:
    # float32 inputs are scaled in float32: multiplying by a power of two is exact, so
    # nothing is lost against float64, at half the memory traffic.
    return np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)


def _flat(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as a flat array of ``dtype``: a view when it already is one (no copy)."""
    flat = np.asarray(x).reshape(-1)
    return flat if flat.dtype == dtype else flat.astype(dtype)


def n_blocks(size: int, block: int) -> int:
    """Blocks of ``block`` values a tensor of ``size`` values is cut into (at least 1)."""
    return max(1, -(-size // block))


def _split(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The full blocks as a (n_full, block) view and the short last block (maybe empty):
    no zero padding, no copy; every pass below runs on these two views."""
    full = flat.size // block
    return flat[: full * block].reshape(full, block), flat[full * block:]


def _peaks(flat: np.ndarray, block: int) -> np.ndarray:
    """Per block of ``flat``, max|x| as float64: NaN where a block holds a NaN, Inf where
    it holds an Inf (max and min propagate both), 0 for an empty tensor's one block."""
    full, tail = _split(flat, block)
    peaks = np.zeros(n_blocks(flat.size, block), dtype=np.float64)
    if full.shape[0]:
        peaks[: full.shape[0]] = np.maximum(full.max(axis=1), -full.min(axis=1))
    if tail.size:
        peaks[full.shape[0]] = max(tail.max(), -tail.min())
    return peaks


def block_peaks(x: np.ndarray, block: int) -> np.ndarray:
    """Per block, max|x| (float64; 0 for an all-zero or empty block). Raises
    QuantizationError on NaN or Inf, found from the peaks themselves (a NaN makes its
    block's max NaN, an Inf makes it Inf): no separate isfinite pass."""
    _check_float(x)
    peaks = _peaks(_flat(x, _work_dtype(x)), block)
    if not np.isfinite(peaks).all():
        check_finite(x)  # names how many; raises
    return peaks


def exponents_of(peaks: np.ndarray) -> np.ndarray:
    """Per block, the smallest e with peak < 2**e (int32; ZERO_BLOCK_EXPONENT if 0)."""
    _, exp = np.frexp(peaks)  # peak = m * 2**exp with 0.5 <= m < 1, so peak < 2**exp
    exp = exp.astype(np.int32)
    exp[peaks == 0] = ZERO_BLOCK_EXPONENT
    return exp


def block_exponents(x: np.ndarray, block: int) -> np.ndarray:
    """Per block, the smallest e with max|x| < 2**e (int32; ZERO_BLOCK_EXPONENT if all 0)."""
    return exponents_of(block_peaks(x, block))


def _scales(exponents: np.ndarray, bits: int, dtype: np.dtype,
            inverse: bool = False) -> np.ndarray:
    """Per block, the quantization scale ``2**(B - e)`` (``inverse``: ``2**(e - B)``) as
    ``dtype``, or as float64 when one of them is outside ``dtype``'s normal range.

    A float32 tensor's block below about 2**-97 needs a scale above float32's largest
    power of two (2**127) to quantize and one below its smallest normal (2**-126) to
    dequantize; clipping it there would scale the values by the wrong power of two. In
    float64 the product is still exact (x times a power of two) and the float64 to
    float32 cast at the end is the one rounding, which the bound covers. All-zero blocks
    (ZERO_BLOCK_EXPONENT) do not count: their values are 0 whatever the scale."""
    # A handful of numpy calls on a few dozen values: their count, not their size, is
    # the cost (this runs two or three times per call).
    k = exponents.astype(np.int64)
    k = k - bits if inverse else bits - k
    live = k[exponents > ZERO_BLOCK_EXPONENT]
    lo, hi = _NORMAL_EXPONENTS[dtype]
    if live.size and (live.min() < lo or live.max() > hi):
        dtype = FLOAT64
        lo, hi = _NORMAL_EXPONENTS[dtype]
    return _powers_of_two(np.minimum(np.maximum(k, lo), hi), dtype)  # np.clip: 3x slower


#: the exponents k whose 2**k is a normal number of the dtype
_NORMAL_EXPONENTS = {d: (int(np.finfo(d).minexp), int(np.finfo(d).maxexp) - 1)
                     for d in (FLOAT32, FLOAT64)}


def _powers_of_two(k: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """2**k as ``dtype`` (k within its normal exponents), built from the bits: the
    biased exponent in its field, a zero mantissa (exact; np.ldexp did the same slower)."""
    info = np.finfo(dtype)
    itype = np.int32 if dtype == np.float32 else np.int64
    return ((k.astype(itype) + (info.maxexp - 1)) << info.nmant).view(dtype)


#: values quantize works through at a time: 1 MiB of float32 scratch, which stays in a
#: core's L2 (2 MiB here) between the multiply that writes it and the rint that reads it.
CACHE_VALUES = 262144


def _step(block: int) -> int:
    return max(1, CACHE_VALUES // block) * block


def scratch_size(size: int, block: int) -> int:
    """The scratch (values of the work dtype) quantize_into needs for ``size`` values."""
    step = _step(block)
    return min(size, step + step // 2)


def _chunks(size: int, block: int):
    """(start, end) of groups of whole blocks of ~CACHE_VALUES values; a last group under
    half that joins the one before (a group's fixed cost is ~25 us of numpy calls: 256 Ki
    values in blocks of 16 235 were a group of 16 blocks and one of 1)."""
    step = _step(block)
    lo = 0
    while lo < size:
        hi = size if size - lo < step + step // 2 else lo + step
        yield lo, hi
        lo = hi


def _scale_rint(flat: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray,
                scratch: np.ndarray) -> None:
    """out = rint(flat * scales[block]) for one group of blocks: a multiply into the
    scratch, then rint cast straight into the int32 ``out`` (float to int32 as astype)."""
    full, tail = _split(flat, block)
    nf = full.shape[0]
    qfull, qtail = _split(out, block)
    if scratch.dtype != scales.dtype:  # tiny blocks of a float32 tensor: float64 scales
        scratch = np.empty(flat.size, dtype=scales.dtype)
    # rint in place, then the cast: 20 % faster than rint casting into int32 (numpy's
    # buffered cast loop), the same values (rint's are integers: the cast is exact)
    if nf:
        sfull = scratch[: nf * block].reshape(nf, block)
        np.multiply(full, scales[:nf, None], out=sfull)
        np.rint(sfull, out=sfull)
        np.copyto(qfull, sfull, casting="unsafe")
    if tail.size:
        stail = scratch[: tail.size]
        np.multiply(tail, scales[nf], out=stail)
        np.rint(stail, out=stail)
        np.copyto(qtail, stail, casting="unsafe")


def quantize_into(x: np.ndarray, exponents: np.ndarray, block: int, n_workers: int,
                  out: np.ndarray, peaks: np.ndarray | None = None,
                  scratch: np.ndarray | None = None) -> np.ndarray:
    """``q = rint(x * 2**(B - e))`` per block into ``out`` (int32, >= x.size values), a
    cache-sized group of blocks at a time: a multiply into ``scratch`` (the work dtype,
    scratch_size() values; allocated if None), a rint cast into ``out``. ``peaks``
    (block_peaks(x), computed if None) give the NaN/Inf refusal and the overflow check
    without another pass."""
    if peaks is None:
        peaks = block_peaks(x, block)
    bits = headroom_bits(n_workers)
    dtype = _work_dtype(x)
    flat = _flat(x, dtype)
    scales = _scales(exponents, bits, dtype)
    # max|rint(x * s)| is rint(max|x| * s): rint and the power-of-two scale are monotone
    # and odd, so the block's peak alone tells whether any value exceeds 2**B.
    if (np.rint(peaks.astype(dtype) * scales) > float(2**bits)).any():
        raise QuantizationError("a value exceeds its block's agreed exponent: every worker "
                                "must quantize with the group's MAX exponents")
    lib = _native_for(flat, out)
    exps = _int32s(exponents)  # held here: ctypes gets only its address
    if lib is not None and lib.aggbox_quantize_f32(
            flat.ctypes.data, flat.size, block, bits, exps.ctypes.data, out.ctypes.data) == 0:
        return out
    if scratch is None:
        scratch = np.empty(scratch_size(flat.size, block), dtype=dtype)
    for lo, hi in _chunks(flat.size, block):
        _scale_rint(flat[lo:hi], scales[lo // block:], block, out[lo:hi], scratch)
    return out


def quantize(x: np.ndarray, exponents: np.ndarray, block: int, n_workers: int) -> np.ndarray:
    """int32 values (len(x) of them) scaled per block by the agreed ``exponents``."""
    return quantize_into(x, exponents, block, n_workers, np.empty(np.size(x), np.int32))


def quantize_own_into(x: np.ndarray, block: int, n_workers: int, out: np.ndarray,
                      scratch: np.ndarray | None = None) -> np.ndarray:
    """Aligned mode's edge in one sweep over memory: per cache-sized group of blocks, the
    peaks (NaN/Inf refused from them), each block's own exponent, and
    ``rint(x * 2**(B - e))`` into ``out``. Returns the exponents (int32); the values are
    bit for bit ``quantize(x, block_exponents(x, block), block, n_workers)``. NaN/Inf
    raise before anything is returned, so nothing of the tensor is sent."""
    _check_float(x)
    bits = headroom_bits(n_workers)
    dtype = _work_dtype(x)
    flat = _flat(x, dtype)
    exps = np.full(n_blocks(flat.size, block), ZERO_BLOCK_EXPONENT, dtype=np.int32)
    lib = _native_for(flat, out)
    if lib is not None and lib.aggbox_quantize_own_f32(
            flat.ctypes.data, flat.size, block, bits, out.ctypes.data, exps.ctypes.data) == 0:
        return exps
    # numpy: also what raises on NaN/Inf, and a block whose scale float32 cannot hold
    if scratch is None:
        scratch = np.empty(scratch_size(flat.size, block), dtype=dtype)
    for lo, hi in _chunks(flat.size, block):
        peaks = _peaks(flat[lo:hi], block)
        if not np.isfinite(peaks).all():
            check_finite(x)  # names how many; raises
        e = exps[lo // block: lo // block + peaks.size] = exponents_of(peaks)
        _scale_rint(flat[lo:hi], _scales(e, bits, dtype), block, out[lo:hi], scratch)
    return exps


def dequantize_into(q_sum: np.ndarray, exponents: np.ndarray, block: int, n_workers: int,
                    out: np.ndarray, mean: bool = False) -> np.ndarray:
    """The int32 sums as ``out.dtype`` values written into ``out`` (flat, its size is the
    tensor's); ``mean``: divided by ``n_workers`` before the cast to ``out.dtype``.

    float32 and float64: per block one ufunc that casts int to float (one rounding) and
    multiplies by a power of two (exact) in ``out.dtype``; in float64, then one cast, for a
    call with a block outside ``out.dtype``'s normal range (see :func:`_scales`).
    Narrower floats (float16): an int32 sum does not fit float16 (2**28 is inf there), so
    the sums are dequantized (and averaged) in float32 and cast once; a result beyond
    ``out.dtype``'s range raises QuantizationError instead of returning inf."""
    if out.dtype.itemsize < 4:
        wide = dequantize_into(q_sum, exponents, block, n_workers,
                               np.empty(out.size, dtype=FLOAT32), mean)
        _cast_into(wide, out, mean)
        return out
    bits = headroom_bits(n_workers)
    lib = _native_for(out, q_sum)
    exps = _int32s(exponents)  # held here: ctypes gets only its address
    if lib is not None and lib.aggbox_dequantize_f32(
            q_sum.ctypes.data, out.size, block, bits, exps.ctypes.data,
            n_workers if mean else 0, out.ctypes.data) == 0:
        return out
    scales = _scales(exponents, bits, out.dtype, inverse=True)
    target = out if scales.dtype == out.dtype else np.empty(out.size, dtype=scales.dtype)
    # one ufunc per run of full blocks: the int to float cast (one rounding) and the exact
    # multiply (a cast first and a multiply in place was faster at 256 Ki, 71 against 86
    # us, but 10-30 % slower from 1 Mi on: left out)
    qfull, qtail = _split(q_sum[: out.size], block)
    ofull, otail = _split(target, block)
    nf = qfull.shape[0]
    dtype = target.dtype
    if nf:
        np.multiply(qfull, scales[:nf, None], out=ofull, dtype=dtype, casting="unsafe")
    if qtail.size:
        np.multiply(qtail, scales[nf], out=otail, dtype=dtype, casting="unsafe")
    if mean:
        target /= n_workers
    if target is not out:
        out[...] = target  # the one rounding to out.dtype (subnormals included)
    return out


def _native_for(floats: np.ndarray, ints: np.ndarray):
    """The C edge (aggbox/native.py) when it loads and takes these arrays: C-contiguous
    native-order float32 and int32 (``ints`` at least as long); else None (numpy)."""
    if (floats.dtype != FLOAT32 or ints.dtype != np.int32 or ints.size < floats.size
            or not (floats.flags.c_contiguous and ints.flags.c_contiguous)):
        return None
    return native.library()


def _int32s(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int32)


def _cast_into(wide: np.ndarray, out: np.ndarray, mean: bool) -> None:
    """``out[...] = wide`` for a narrower float dtype, refusing values it cannot hold."""
    limit = float(np.finfo(out.dtype).max)
    # values within half an ulp above max still round to max; from there on the cast is inf
    inf_from = limit * (1 + float(np.finfo(out.dtype).eps) / 4)
    peak = float(np.abs(wide).max()) if wide.size else 0.0
    if peak >= inf_from:
        over = int(np.count_nonzero(np.abs(wide) >= inf_from))
        what = "mean" if mean else "sum"
        raise QuantizationError(
            f"the {what} does not fit {out.dtype}: {over} value(s) up to {peak:.6g} exceed "
            f"its largest finite value {limit:g}; allreduce a float32 copy (or use "
            f"op='mean') to get it")
    out[...] = wide


def dequantize(q_sum: np.ndarray, exponents: np.ndarray, block: int, n_workers: int,
               size: int, dtype: np.dtype = FLOAT64) -> np.ndarray:
    """The int32 sums as ``dtype`` values: one rounding (int to float), then an exact
    multiplication by a power of two."""
    return dequantize_into(q_sum, exponents, block, n_workers, np.empty(size, dtype))


def error_bound(result: np.ndarray, exponents: np.ndarray, block: int, n_workers: int,
                dtype: np.dtype = FLOAT32, aligned: bool = False) -> np.ndarray:
    """Per element, the bound on |allreduce_sum - exact_sum| (see the module docstring);
    ``aligned``: the one-round mode, where ``exponents`` are the results' exponents."""
    bits = headroom_bits(n_workers)
    size = np.size(result)
    step = np.ldexp(1.0, (exponents.astype(np.int64) - bits).clip(-1074, 1023))
    per_step = n_workers if aligned else n_workers / 2
    quant = np.repeat(per_step * step, block)[:size]
    info = np.finfo(dtype)
    # the cast to dtype: half an ulp relative, and half the smallest subnormal absolute
    # (a result in dtype's subnormal range is rounded to a multiple of that); a float16
    # result went through float32 first (dequantize_into): one more float32 rounding
    rel = float(info.eps) / 2 + (2.0**-24 if info.bits < 32 else 0.0)
    cast = (np.abs(np.asarray(result, dtype=np.float64)) * rel
            + float(info.smallest_subnormal) / 2)
    return quant + cast
