/* SPDX-License-Identifier: Apache-2.0
 *
 * edge.c: the allreduce edge's float32 loops in one pass per block each way, called from
 * aggbox/quant.py through ctypes (aggbox/native.py compiles this file once per machine).
 *
 * Every function gives bit for bit what quant.py's numpy path gives, or returns non-zero
 * and writes nothing that the caller keeps: the caller then runs the numpy path, which
 * raises the error (NaN/Inf) or handles the rare case (a scale outside float32's normal
 * range, done in float64 there). tests/unit/test_native_edge.py holds them to that.
 *
 * Why it matches numpy: a block's peak is the largest |x| as float32 bits (the bit
 * patterns of non-negative floats order like the floats), its exponent what np.frexp
 * gives for it; the scale is an exact power of two; x * s is one float32 multiply (exact
 * but in the subnormal range, where it rounds like numpy's), rintf rounds half to even
 * like np.rint, and the cast of an integer-valued float to int32 is exact.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ZERO_BLOCK_EXPONENT (-200) /* quant.ZERO_BLOCK_EXPONENT */
#define ABS_BITS 0x7fffffffu
#define NONFINITE_BITS 0x7f800000u /* |x| bits from here on: Inf or NaN */
#define MIN_NORMAL_K (-126)        /* 2**k is a normal float32 for k in [-126, 127] */
#define MAX_NORMAL_K 127

enum { EDGE_OK = 0, EDGE_NONFINITE = 1, EDGE_OUT_OF_RANGE = 2 };

static inline float pow2(int k)
{
	uint32_t bits = (uint32_t)(k + 127) << 23;
	float f;
	memcpy(&f, &bits, sizeof(f));
	return f;
}

static inline int clamp_k(int k)
{
	return k < MIN_NORMAL_K ? MIN_NORMAL_K : k > MAX_NORMAL_K ? MAX_NORMAL_K : k;
}

/* np.frexp's exponent of a float32 peak given as |x| bits: peak < 2**e, the smallest e. */
static int exponent_of(uint32_t peak)
{
	if (peak == 0)
		return ZERO_BLOCK_EXPONENT;
	uint32_t biased = peak >> 23;
	if (biased)
		return (int)biased - 126;
	return (32 - __builtin_clz(peak)) - 149; /* subnormal: mantissa * 2**-149 */
}

static inline int64_t block_end(int64_t lo, int64_t block, int64_t size)
{
	return lo + block < size ? lo + block : size;
}

static inline int64_t blocks_of(int64_t size, int64_t block)
{
	return size ? (size + block - 1) / block : 1; /* quant.n_blocks */
}

static void scale_rint(const float *x, int64_t lo, int64_t hi, float s, int32_t *q)
{
	for (int64_t i = lo; i < hi; i++)
		q[i] = (int32_t)rintf(x[i] * s);
}

/* Aligned mode: per block its peak, its own exponent into exps, q = rint(x * 2**(bits -
 * e)). The block is still in L1/L2 for the second loop. */
int aggbox_quantize_own_f32(const float *x, int64_t size, int64_t block, int bits,
			    int32_t *q, int32_t *exps)
{
	const uint32_t *xu = (const uint32_t *)x;
	for (int64_t b = 0, n = blocks_of(size, block); b < n; b++) {
		int64_t lo = b * block, hi = block_end(lo, block, size);
		uint32_t peak = 0;
		for (int64_t i = lo; i < hi; i++) {
			uint32_t a = xu[i] & ABS_BITS;
			peak = a > peak ? a : peak;
		}
		if (peak >= NONFINITE_BITS)
			return EDGE_NONFINITE;
		int e = exponent_of(peak), k = bits - e;
		if (peak && (k < MIN_NORMAL_K || k > MAX_NORMAL_K))
			return EDGE_OUT_OF_RANGE;
		exps[b] = e;
		scale_rint(x, lo, hi, pow2(clamp_k(k)), q);
	}
	return EDGE_OK;
}

/* Any live block (not all zero) whose 2**(sign * (bits - e)) is not a normal float32. */
static int out_of_range(const int32_t *exps, int64_t n, int bits, int sign)
{
	for (int64_t b = 0; b < n; b++) {
		int k = sign * (bits - exps[b]);
		if (exps[b] > ZERO_BLOCK_EXPONENT && (k < MIN_NORMAL_K || k > MAX_NORMAL_K))
			return 1;
	}
	return 0;
}

/* Agreed exponents (two-round mode): q = rint(x * 2**(bits - e)); the caller checked the
 * peaks against them. */
int aggbox_quantize_f32(const float *x, int64_t size, int64_t block, int bits,
			const int32_t *exps, int32_t *q)
{
	int64_t n = blocks_of(size, block);
	if (out_of_range(exps, n, bits, 1))
		return EDGE_OUT_OF_RANGE;
	for (int64_t b = 0; b < n; b++) {
		int64_t lo = b * block;
		scale_rint(x, lo, block_end(lo, block, size), pow2(clamp_k(bits - exps[b])), q);
	}
	return EDGE_OK;
}

/* y = float(q) * 2**(e - bits), then / n_mean when n_mean > 1 (a mean): the same two
 * float32 roundings, in the same order, as quant.dequantize_into. */
int aggbox_dequantize_f32(const int32_t *q, int64_t size, int64_t block, int bits,
			  const int32_t *exps, int32_t n_mean, float *y)
{
	int64_t n = blocks_of(size, block);
	if (out_of_range(exps, n, bits, -1))
		return EDGE_OUT_OF_RANGE;
	float d = (float)n_mean;
	for (int64_t b = 0; b < n; b++) {
		int64_t lo = b * block, hi = block_end(lo, block, size);
		float s = pow2(clamp_k(exps[b] - bits));
		if (n_mean > 1) {
			for (int64_t i = lo; i < hi; i++)
				y[i] = ((float)q[i] * s) / d;
		} else {
			for (int64_t i = lo; i < hi; i++)
				y[i] = (float)q[i] * s;
		}
	}
	return EDGE_OK;
}
