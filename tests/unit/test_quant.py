"""Edge quantization (aggbox/quant.py) without a kernel: headroom, error bounds, refusals.

The in-kernel sum is simulated here exactly as bpf/aggregate.c computes it: plain int32
additions for ``scale="agree"``; for ``scale="align"`` each chunk of AGG_CHUNK values
keeps the largest (biased) exponent seen so far and the smaller side is brought to it
with rounding right shifts (``rshift_round``), contributions arriving in any order.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggbox import quant
from aggbox.errors import CollectiveTimeout
from aggbox.quant import (
    ZERO_BLOCK_EXPONENT,
    QuantizationError,
    block_exponents,
    check_finite,
    dequantize,
    error_bound,
    headroom_bits,
    quantize,
)

INT32_MAX = 2**31 - 1
CHUNK = 1024  # AGG_CHUNK in bpf/aggregate.c
EXP_BIAS = 1024  # EXP_BIAS in bpf/aggregate.c


# ------------------------------------------------------------ the kernel, in Python


def s32(x: np.ndarray) -> np.ndarray:
    """A value the kernel holds in an __s32: it must fit (no wrap, by construction)."""
    x = np.asarray(x, dtype=np.int64)
    assert (x >= -(2**31)).all() and (x <= INT32_MAX).all(), "int32 overflow in the kernel"
    return x


def rshift_round(x: np.ndarray, d: int) -> np.ndarray:
    """bpf/aggregate.c rshift_round: x / 2**d rounded to nearest (an arithmetic shift)."""
    if d == 0:
        return x
    if d > 30:
        return np.zeros_like(x)
    return s32(s32(x + (1 << (d - 1))) >> d)


def kernel_sum(qs: list[np.ndarray], block: int, exps: list[np.ndarray] | None = None,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The aggregator's result for workers' int32 vectors ``qs``: per block, the sum and
    (``exps`` given: AGG_F_ALIGN) the exponent it comes back with. Every chunk takes the
    contributions in its own random order (the kernel locks per chunk, so two workers'
    packets may interleave chunk by chunk)."""
    rng = np.random.default_rng(seed)
    size = qs[0].size
    n_blocks = max(1, -(-size // block))
    out = np.zeros(size, dtype=np.int64)
    out_exp = np.zeros(n_blocks, dtype=np.int32)
    for b in range(n_blocks):
        start, end = b * block, min((b + 1) * block, size)
        chunk_exp0 = 0
        for c0 in range(start, end, CHUNK):
            c1 = min(c0 + CHUNK, end)
            values = np.zeros(c1 - c0, dtype=np.int64)
            cur = 0  # chunk_exp[c]: 0 means no value yet
            for w in rng.permutation(len(qs)):
                v = qs[w][c0:c1].astype(np.int64)
                shift_sum = shift_in = 0
                if exps is not None:
                    mine = int(exps[w][b]) + EXP_BIAS
                    if cur == 0 or mine > cur:
                        shift_sum = mine - cur if cur else 0
                        cur = mine
                    else:
                        shift_in = cur - mine
                values = s32(rshift_round(values, shift_sum) + rshift_round(v, shift_in))
            out[c0:c1] = values
            if c0 == start:
                chunk_exp0 = cur
        out_exp[b] = chunk_exp0 - EXP_BIAS  # set_scale: chunk_exp[0] - EXP_BIAS
    return s32(out).astype(np.int32), out_exp


def allreduce(xs: list[np.ndarray], block: int, scale: str, seed: int = 0):
    """What Allreducer.allreduce computes, with the kernel simulated: (result, bound)."""
    n = len(xs)
    if scale == "agree":
        exps = np.max([block_exponents(x, block) for x in xs], axis=0)  # the MAX round
        qs = [quantize(x, exps, block, n) for x in xs]
        sums, _ = kernel_sum(qs, block, seed=seed)
    else:
        own = [block_exponents(x, block) for x in xs]
        qs = [quantize(x, e, block, n) for x, e in zip(xs, own, strict=True)]
        sums, exps = kernel_sum(qs, block, own, seed=seed)
    dtype = xs[0].dtype
    result = dequantize(sums, exps, block, n, xs[0].size, dtype)
    bound = error_bound(result, exps, block, n, dtype, aligned=scale == "align")
    return result, bound, exps


def inputs(n: int, size: int, dist: str, seed: int, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = []
    for w in range(n):
        if dist == "uniform":
            x = rng.uniform(-1.0, 1.0, size)
        elif dist == "gaussian":
            x = rng.standard_normal(size)
        elif dist == "heavy":  # Student's t, 1.5 degrees of freedom
            x = rng.standard_t(1.5, size)
        elif dist == "zeros":
            x = np.zeros(size)
        elif dist == "magnitudes":  # workers 2**-20 .. 2**20 apart: many alignment shifts
            x = rng.standard_normal(size) * 2.0 ** rng.integers(-20, 21)
        elif dist == "some-zero":  # half the workers contribute exact zeros
            x = np.zeros(size) if w % 2 else rng.standard_normal(size)
        else:
            raise ValueError(dist)
        xs.append(x.astype(dtype))
    return xs


# ------------------------------------------------------------ headroom


@pytest.mark.parametrize("n", range(1, 65))
def test_n_quantized_extremes_sum_without_overflow(n):
    bits = headroom_bits(n)
    assert n * 2**bits <= 2**30 < INT32_MAX
    # The most extreme inputs: the largest values below the block's power of two, of
    # either sign, in float64 (which rounds them up to exactly 2**bits) and float32.
    for dtype in (np.float64, np.float32):
        for e in (-30, 0, 7, 100):
            top = np.nextafter(dtype(2.0**e), dtype(0))
            x = np.array([top, -top, top, dtype(2.0 ** (e - 1))], dtype=dtype)
            exps = block_exponents(x, 4)
            assert exps.tolist() == [e]
            q = quantize(x, exps, 4, n)
            assert np.abs(q.astype(np.int64)).max() <= 2**bits
            if dtype is np.float64:
                assert q[0] == 2**bits and q[1] == -(2**bits)  # the bound is reached
            for sign in (1, -1):
                total = sign * n * q.astype(np.int64)  # every worker sends the extreme
                assert np.abs(total).max() <= 2**30
            # ... and the kernel's own int32 arithmetic never wraps on it, in either mode.
            kernel_sum([q] * n, 4)
            kernel_sum([q] * n, 4, [exps] * n)


def test_headroom_bits():
    assert headroom_bits(1) == 30
    assert headroom_bits(2) == 29
    assert headroom_bits(3) == headroom_bits(4) == 28
    assert headroom_bits(64) == 24
    with pytest.raises(ValueError):
        headroom_bits(0)


def test_a_value_above_the_agreed_exponent_is_refused():
    x = np.array([4.0, 1.0])
    with pytest.raises(QuantizationError, match="agreed exponent"):
        quantize(x, np.array([1]), 2, 4)  # 4.0 needs e = 3


# ------------------------------------------------------------ error bounds


@pytest.mark.parametrize("scale", ["align", "agree"])
@pytest.mark.parametrize("dist", ["uniform", "gaussian", "heavy", "zeros", "magnitudes",
                                  "some-zero"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 64])
def test_error_is_within_the_bound_for_simulated_aggregation(n, dist, scale):
    size, block = 3001, 256
    xs = inputs(n, size, dist, seed=n * 100 + len(dist))
    result, bound, exps = allreduce(xs, block, scale, seed=n)
    want = np.sum([x.astype(np.float64) for x in xs], axis=0)
    err = np.abs(result.astype(np.float64) - want)
    assert result.dtype == np.float32 and result.shape == want.shape
    over = np.flatnonzero(err > bound)
    assert over.size == 0, f"{over.size} beyond the bound, e.g. {err[over[0]]} > {bound[over[0]]}"
    if dist == "zeros":
        assert not result.any()
    else:
        # The bound is tight enough to mean something: per block, within a few float32
        # ulps of the block's largest input.
        peak = np.max([np.abs(x).max() for x in xs])
        quant_part = 2 * n * peak * 2.0 ** -headroom_bits(n)  # n steps, 2**E <= 2 * peak
        assert bound.max() <= quant_part + np.abs(result).max() * 2.0**-24


@pytest.mark.parametrize("seed", range(5))
def test_aligned_mode_over_multi_chunk_blocks_and_any_arrival_order(seed):
    """Blocks of 4 chunks and workers whose scales differ: every chunk ends at the
    group's largest exponent whatever the order, and the error stays within the bound."""
    n, block, size = 8, 4 * CHUNK, 2 * 4 * CHUNK + 77
    xs = inputs(n, size, "magnitudes", seed=seed)
    result, bound, exps = allreduce(xs, block, "align", seed=seed)
    own = np.array([block_exponents(x, block) for x in xs])
    assert exps.tolist() == own.max(axis=0).tolist()  # E = max e_w, as the agree round
    want = np.sum([x.astype(np.float64) for x in xs], axis=0)
    assert (np.abs(result.astype(np.float64) - want) <= bound).all()


def test_float64_inputs_keep_float64_and_the_bound():
    xs = inputs(4, 1000, "gaussian", seed=7, dtype=np.float64)
    for scale in ("agree", "align"):
        result, bound, _ = allreduce(xs, 256, scale)
        assert result.dtype == np.float64
        want = np.sum(xs, axis=0)
        assert (np.abs(result - want) <= bound).all()
        assert bound.max() < 1e-6  # the quantization step 4 * 2**(e - 28), e <= 3


def test_the_aligned_bound_counts_the_shifts_the_agreed_one_does_not():
    exps = np.array([3])
    r = np.zeros(4, dtype=np.float32)
    agreed = error_bound(r, exps, 4, 8, aligned=False)
    aligned = error_bound(r, exps, 4, 8, aligned=True)
    step = 2.0 ** (3 - headroom_bits(8))
    assert agreed.tolist() == [8 / 2 * step] * 4
    assert aligned.tolist() == [8 * step] * 4


# ------------------------------------------------------------ refusals and zeros


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_a_clear_error(bad):
    x = np.ones(300, dtype=np.float32)
    x[123] = bad
    for fn in (check_finite, lambda v: block_exponents(v, 256),
               lambda v: quantize(v, np.zeros(2, dtype=np.int32), 256, 2)):
        with pytest.raises(QuantizationError, match="NaN or Inf") as info:
            fn(x)
        assert "1 NaN or Inf value" in str(info.value)
        assert "nothing was sent" in str(info.value)


def test_integer_tensors_are_not_quantized():
    with pytest.raises(QuantizationError, match="float tensor"):
        check_finite(np.arange(4, dtype=np.int32))


def test_zeros_give_zeros():
    x = np.zeros(1000, dtype=np.float32)
    exps = block_exponents(x, 256)
    assert (exps == ZERO_BLOCK_EXPONENT).all()
    q = quantize(x, exps, 256, 8)
    assert q.dtype == np.int32 and not q.any()
    back = dequantize(q, exps, 256, 8, x.size, np.dtype(np.float32))
    assert back.dtype == np.float32 and not back.any()
    # nothing but the cast's absolute floor: half float32's smallest subnormal
    assert error_bound(back, exps, 256, 8).max() == 2.0**-150


def test_a_zero_block_between_others_comes_back_exactly_zero():
    xs = inputs(3, 768, "gaussian", seed=3)
    for x in xs:
        x[256:512] = 0.0
    for scale in ("agree", "align"):
        result, _, exps = allreduce(xs, 256, scale)
        assert exps[1] == ZERO_BLOCK_EXPONENT
        assert not result[256:512].any() and result[:256].all()


def test_quantize_round_trips_exactly_representable_values():
    x = np.array([0.5, -0.25, 1.75, 0.0, -1.0], dtype=np.float32)
    exps = block_exponents(x, 8)
    assert exps.tolist() == [1]  # 1.75 < 2**1
    q = quantize(x, exps, 8, 2)
    assert (dequantize(q, exps, 8, 2, x.size, quant.FLOAT32) == x).all()


# ------------------------------------------------------------ the fused edge, bit for bit
#
# The edge was rewritten as one pass per block each way (no padding copies, no separate
# isfinite scans). The kernel and the bounds rely on exactly the old values, so the old
# implementation is kept here as the reference and compared bit for bit.


def _ref_blocks(x, block, dtype):
    flat = np.asarray(x).reshape(-1)
    n_blocks = max(1, -(-flat.size // block))
    padded = np.zeros(n_blocks * block, dtype=dtype)
    padded[: flat.size] = flat
    return padded.reshape(n_blocks, block)


def _ref_pow2(exponents, dtype):
    """2**exponents as dtype, clipped to its normal range (the inputs below stay in it)."""
    info = np.finfo(dtype)
    e = np.clip(exponents.astype(np.int64), info.minexp, info.maxexp - 1)
    return np.ldexp(np.ones(e.shape, dtype=dtype), e.astype(np.int32))


def _ref_work(x):
    return np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)


def _ref_block_exponents(x, block):
    blocks = _ref_blocks(x, block, _ref_work(x))
    peak = np.maximum(blocks.max(axis=1), -blocks.min(axis=1)).astype(np.float64)
    _, exp = np.frexp(peak)
    exp = exp.astype(np.int32)
    exp[peak == 0] = ZERO_BLOCK_EXPONENT
    return exp


def _ref_quantize(x, exponents, block, n):
    bits = headroom_bits(n)
    dtype = _ref_work(x)
    scaled = _ref_blocks(x, block, dtype) * _ref_pow2(bits - exponents.astype(np.int64),
                                                   dtype)[:, None]
    np.rint(scaled, out=scaled)
    assert np.abs(scaled).max(initial=0.0) <= float(2**bits)
    return scaled.astype(np.int32).reshape(-1)[: np.size(x)]


def _ref_dequantize(q_sum, exponents, block, n, size, dtype):
    bits = headroom_bits(n)
    blocks = _ref_blocks(q_sum[:size], block, np.dtype(np.int32)).astype(dtype)
    blocks *= _ref_pow2(exponents.astype(np.int64) - bits, dtype)[:, None]
    return blocks.reshape(-1)[:size]


def _edge_inputs(dtype, size, block, n, seed):
    rng = np.random.default_rng(seed)
    yield rng.standard_normal(size).astype(dtype)
    yield (rng.standard_normal(size) * 1e-3).astype(dtype)
    span = 10 if dtype == np.float16 else 30
    yield (rng.standard_t(1.5, size).clip(-100, 100) * 2.0 ** rng.integers(-span, span)
           ).astype(dtype)
    # exact ties of rint: k + 0.5 after scaling by 2**(B - e), both signs (the first
    # value pins every block's exponent to e)
    e, bits = 4, headroom_bits(n)
    k = 2**9 if dtype == np.float16 else 2**20
    ties = (rng.integers(-k, k, size) + 0.5) * 2.0 ** (e - bits)
    ties[::block] = 2.0 ** (e - 1)
    yield ties.astype(dtype)
    z = rng.standard_normal(size).astype(dtype)
    z[: size // 2] = 0.0
    z[size // 2] = -0.0
    yield z
    top = np.nextafter(dtype(2.0**5), dtype(0))
    yield np.resize(np.array([top, -top, dtype(2.0**4)], dtype=dtype), size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("size,block", [(4096, 256), (3001, 256), (100, 256), (1, 1),
                                        (16235 * 2 + 7, 16235), (513, 512)])
@pytest.mark.parametrize("n", [1, 2, 8, 64])
@pytest.mark.parametrize("cache", [quant.CACHE_VALUES, 700])  # 700: many groups of blocks
def test_the_fused_edge_is_bit_identical_to_the_reference(dtype, size, block, n, cache,
                                                          monkeypatch):
    monkeypatch.setattr(quant, "CACHE_VALUES", cache)
    for k, x in enumerate(_edge_inputs(dtype, size, block, n, seed=size + n)):
        exps = block_exponents(x, block)
        assert exps.dtype == np.int32
        assert (exps == _ref_block_exponents(x, block)).all(), k
        q = quantize(x, exps, block, n)
        assert q.dtype == np.int32 and q.shape == (size,)
        fused = np.empty(size, dtype=np.int32)
        assert (quant.quantize_own_into(x, block, n, fused) == exps).all(), k
        assert (fused == q).all(), k
        assert (q == _ref_quantize(x, exps, block, n)).all(), k
        # a kernel-like sum, then back, into every float dtype the API returns
        total = (q.astype(np.int64) * n).clip(-2**31, 2**31 - 1).astype(np.int32)
        # (float16 results go through float32: test_quant_ranges.py)
        for out_dtype in (quant.FLOAT32, quant.FLOAT64):
            got = dequantize(total, exps, block, n, size, out_dtype)
            want = _ref_dequantize(total, exps, block, n, size, out_dtype)
            assert got.dtype == want.dtype
            assert got.tobytes() == want.tobytes(), (k, out_dtype)


def test_into_variants_reuse_larger_buffers_and_touch_only_their_part():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    exps = block_exponents(x, 256)
    peaks = quant.block_peaks(x, 256)
    out = np.full(1500, 7, dtype=np.int32)
    scratch = np.empty(2000, dtype=np.float32)
    quant.quantize_into(x, exps, 256, 4, out, peaks=peaks, scratch=scratch)
    assert (out[:1000] == _ref_quantize(x, exps, 256, 4)).all() and (out[1000:] == 7).all()
    back = np.full(1000, np.nan, dtype=np.float32)
    assert quant.dequantize_into(out, exps, 256, 4, back) is back
    assert back.tobytes() == _ref_dequantize(out, exps, 256, 4, 1000, np.float32).tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 255, 256, 999])
def test_the_peaks_find_nan_and_inf_in_any_block(bad, where):
    x = np.ones(1000, dtype=np.float32)
    x[where] = bad
    with pytest.raises(QuantizationError, match="1 NaN or Inf value"):
        quant.block_peaks(x, 256)
    with pytest.raises(QuantizationError, match="1 NaN or Inf value"):
        quant.quantize_own_into(x, 256, 2, np.empty(1000, dtype=np.int32))


# ------------------------------------------------------------ the worker's edge end to end
#
# One worker and a stand-in aggregator on loopback (the sum over one worker is its own
# values, at its own exponents): the call's whole user-space path, quantize -> sendmsg ->
# peeked, checked recvmsg_into -> dequantize into out=, with forged results in front of
# the real ones that must not land in the result.


def _answer(block: bytes, token_xor: int = 0,
            epoch=lambda seq: 0) -> tuple[int, bytes, bytes]:
    """What a one-worker aggregator stand-in reads from a worker's block: its seq, the
    AGG_RESULT header that answers it (the block's own fields; the token XORed with
    ``token_xor``, to forge one; ``epoch(seq)``: the installation it says it comes from)
    and the block's values."""
    from aggbox.protocol import HEADER, HEADER_SIZE, MAGIC, VERSION, MsgType

    (_m, _v, _t, flags, job, token, seq, _r, rank, count, exp, _a) = HEADER.unpack_from(block)
    head = HEADER.pack(MAGIC, VERSION, MsgType.AGG_RESULT, flags, job, token ^ token_xor,
                       seq, epoch(seq), rank, count, exp, 0)
    return seq, head, block[HEADER_SIZE:HEADER_SIZE + 4 * count]


def _loopback_worker(monkeypatch, port: int):
    import socket as socketlib

    from aggbox.collectives import allreduce as ar
    from aggbox.collectives.group import Group, Member

    def bound(p: int) -> socketlib.socket:  # the worker at 127.0.0.1 (the real one: 0.0.0.0)
        s = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
        s.bind(("127.0.0.1", p))
        return s

    monkeypatch.setattr(ar, "udp_socket", bound)
    group = Group(job_id=77, token=0xC0FFEE, members=(Member(0, "127.0.0.1"),), rank=0,
                  port=port, aggregator=Member(0, "127.0.0.2"),
                  options={"results": "unicast"})
    return ar, group


def test_one_worker_round_trip_with_forged_results_refused(monkeypatch):
    import socket as socketlib
    import threading

    box = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
    box.bind(("127.0.0.2", 0))
    port = box.getsockname()[1]  # the worker's port too (a free one on 127.0.0.1, surely)
    ar, group = _loopback_worker(monkeypatch, port)
    forger = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
    forger.bind(("127.0.0.3", 0))
    worker = ("127.0.0.1", port)
    stop = threading.Event()

    def aggregator():
        box.settimeout(0.2)
        while not stop.is_set():
            try:
                data, _ = box.recvfrom(1 << 17)
            except TimeoutError:
                continue
            _, head, values = _answer(data)
            wrong_token = _answer(data, token_xor=1)[1]
            garbage = b"\x7f" * len(values)
            box.sendto(wrong_token + garbage, worker)   # wrong token
            forger.sendto(head + garbage, worker)       # wrong source
            box.sendto(head + values, worker)           # the real one
            # ... and after it, over the slice already taken (or the next call's)
            forger.sendto(head + garbage, worker)
            box.sendto(wrong_token + garbage, worker)

    t = threading.Thread(target=aggregator, daemon=True)
    t.start()
    try:
        # a pinned RTO: no resend on a loaded machine (the stand-in shares the GIL)
        reducer = ar.Allreducer(group, block=256, timeout=5.0, rto=1.0)
        rng = np.random.default_rng(5)
        for size in (1000, 256, 3001, 1000):  # buffers grow and are reused
            x = rng.standard_normal(size).astype(np.float32)
            out = np.full(size, np.nan, dtype=np.float32)
            got = reducer.allreduce(x, out=out)
            exps = block_exponents(x, 256)
            want = dequantize(quantize(x, exps, 256, 1), exps, 256, 1, size, quant.FLOAT32)
            assert got is out and got.tobytes() == want.tobytes()
            fresh = reducer.allreduce(x)  # a new array each call without out=
            assert fresh is not out and fresh.tobytes() == want.tobytes()
        assert reducer.stats["refused"] >= 2 * reducer.stats["results"]
        assert reducer.stats["retransmits"] == 0
        with pytest.raises(QuantizationError, match="1 NaN or Inf"):
            bad = np.ones(600, dtype=np.float32)
            bad[300] = np.inf
            reducer.allreduce(bad)
        reducer.close()
    finally:
        stop.set()
        t.join()
        box.close()
        forger.close()


# ------------------------------------------------------------ recovery, on loopback
#
# The same one-worker stand-in, losing on purpose: what is resent after a timeout, and
# which round trips reach the RTT estimator. Both socket loops (edge.c's and Python's).


class _StandIn:
    """A one-worker aggregator on loopback that answers each block with its own values,
    except that ``hold(seq, copies)`` (seq: the block's, copies: how many of each seq
    came so far) may keep a block's result back; held results go out, in order, as soon
    as ``hold`` lets go of them on a later copy of any block. ``epoch(seq)``: the
    installation a block's result says it comes from (a change: a restart)."""

    def __init__(self, hold, epoch=lambda seq: 0):
        import socket as socketlib
        import threading

        self.hold, self.epoch, self.copies, self.held = hold, epoch, {}, []
        self.box = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
        self.box.bind(("127.0.0.2", 0))
        self.port = self.box.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.box.settimeout(0.05)
        while not self.stop.is_set():
            try:
                data, src = self.box.recvfrom(1 << 17)
            except TimeoutError:
                continue
            seq, head, values = _answer(data, epoch=self.epoch)
            self.copies[seq] = self.copies.get(seq, 0) + 1
            result = head + values
            if seq not in {s for s, _ in self.held}:
                self.held.append((seq, result))
            for s, r in list(self.held):
                if not self.hold(s, self.copies):
                    self.box.sendto(r, src)
                    self.held.remove((s, r))

    def __enter__(self) -> _StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.box.close()


def _recovering_reducer(monkeypatch, stand_in: _StandIn, io: str):
    ar, group = _loopback_worker(monkeypatch, stand_in.port)
    # Every timeout planned, even on a loaded machine (the stand-in shares the GIL): at
    # least 0.1 s, which results not held back never take.
    reducer = ar.Allreducer(group, block=256, timeout=5.0, rto=0.1)
    reducer.min_probe_s = 0.1
    if io == "python":
        reducer._io = None
    elif reducer._io is None:
        reducer.close()
        pytest.skip("aggbox/edge.c did not build here (no C compiler)")
    return reducer


def _int_call(reducer, blocks: int) -> None:
    x = np.arange(256 * blocks, dtype=np.int32) - 1000
    assert np.array_equal(reducer.reduce_int32(x), x)


@pytest.mark.parametrize("io", ["c", "python"])
def test_a_lost_tail_block_is_probed_alone(monkeypatch, io):
    # The last block's first copy is lost: no later result can reveal it (no fast
    # resend), so the first timeout is a tail-loss probe, and it resends that block only.
    with _StandIn(lambda seq, copies: seq == 7 and copies[seq] < 2) as agg:
        reducer = _recovering_reducer(monkeypatch, agg, io)
        try:
            _int_call(reducer, 8)
            assert reducer.stats["probes"] == 1, reducer.stats
        finally:
            reducer.close()
        assert agg.copies[7] == 2, agg.copies
        assert all(agg.copies[s] == 1 for s in range(7)), (agg.copies, reducer.stats)


@pytest.mark.parametrize("io", ["c", "python"])
def test_blocks_that_waited_out_a_stall_give_no_rtt_sample(monkeypatch, io):
    # Every result waits until block 0 comes twice (a stalled peer, as the worker sees
    # it): one probe of the lowest block (not the window), and none of the eight round
    # trips, all longer than the timeout, reaches the RTO estimator; they drove it to its
    # ceiling under loss. The next call, without a stall, gives samples again (one per
    # block, but for any that a loaded machine delays past the 5 ms RTO floor).
    with _StandIn(lambda seq, copies: copies.get(0, 0) < 2 and seq < 8) as agg:
        reducer = _recovering_reducer(monkeypatch, agg, io)
        try:
            _int_call(reducer, 8)
            assert all(agg.copies[s] == 1 for s in range(1, 8)), agg.copies
            assert reducer.timer.samples == 0, reducer.timer.as_dict()
            _int_call(reducer, 8)
            assert reducer.timer.samples > 0, reducer.timer.as_dict()
        finally:
            reducer.close()
        assert agg.copies[0] == 2


@pytest.mark.parametrize("io", ["c", "python"])
@pytest.mark.parametrize("calls_after", [0, 9])
def test_a_restart_in_an_earlier_call_is_named_by_a_stall_soon_after(monkeypatch, io,
                                                                     calls_after):
    # The aggregator restarts during one call (its results' epoch changes at block 4) and
    # that call completes; a later call then stalls. With calls of a few blocks, a peer a
    # window behind may be stuck on a block this worker took from the old aggregator, so
    # a stall within two windows (64 blocks) of the restart names it, besides the
    # missing answer (chaos cell allreduce/aggregator-killed-restarted named only a
    # worker). A stall 9 calls of 8 blocks later (72 blocks) does not.
    stall_at = 8 * (2 + calls_after)
    with _StandIn(lambda seq, copies: seq >= stall_at,
                  epoch=lambda seq: 7 if seq < 4 else 9) as agg:
        reducer = _recovering_reducer(monkeypatch, agg, io)
        reducer.timeout = 0.5
        try:
            for _ in range(2 + calls_after):
                _int_call(reducer, 8)
            with pytest.raises(CollectiveTimeout) as err:
                _int_call(reducer, 8)
        finally:
            reducer.close()
    message = str(err.value)
    assert f"block {stall_at} made no progress" in message, message
    assert "did not answer" in message and "during this call" not in message
    if calls_after == 0:
        assert ("the aggregator (127.0.0.2) restarted 12 blocks before this one, losing "
                "the blocks it had partly summed") in message, message
    else:
        assert "restarted" not in message, message


@pytest.mark.parametrize("io", ["c", "python"])
def test_a_forged_result_never_changes_what_an_authenticated_worker_resends(monkeypatch, io):
    # A spoofer who sniffed the token but has no key answers block 5 (the second call's
    # block 1, when edge.c's loop knows the epoch; its first copy the stand-in drops) from
    # the aggregator's own address, with garbage under a wrong tag. The worker refuses it
    # after its values were received into their slice: that slice must not be the
    # block's send buffer, or the resend after the timeout carries the spoofer's garbage
    # (the tag covers the header only) and the sum is wrong.
    import socket as socketlib
    import threading
    from dataclasses import replace

    from aggbox import auth

    key = auth.new_key()
    box = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
    box.bind(("127.0.0.2", 0))
    ar, group = _loopback_worker(monkeypatch, box.getsockname()[1])
    group = replace(group, auth_key=key.hex())
    sent: dict[int, list[bytes]] = {}
    stop = threading.Event()

    def aggregator():
        box.settimeout(0.05)
        while not stop.is_set():
            try:
                data, src = box.recvfrom(1 << 17)
            except TimeoutError:
                continue
            seq, head, payload = _answer(data)
            copies = sent.setdefault(seq, [])
            copies.append(payload)
            if seq == 5 and len(copies) == 1:  # lost; the spoofer answers instead
                box.sendto(head + b"\x5a" * len(payload) + bytes(auth.TAG_SIZE), src)
            else:
                box.sendto(head + payload + auth.tag_bytes(key, head), src)

    t = threading.Thread(target=aggregator, daemon=True)
    t.start()
    try:
        reducer = ar.Allreducer(group, block=256, timeout=5.0, rto=0.1)
        if io == "python":
            reducer._io = None
        elif reducer._io is None:
            reducer.close()
            pytest.skip("aggbox/edge.c did not build here (no C compiler)")
        reducer.next_seq = 0
        x = (np.arange(4 * 256, dtype=np.float32) - 500) / 7
        exps = block_exponents(x, 256)
        want = dequantize(quantize(x, exps, 256, 1), exps, 256, 1, x.size, quant.FLOAT32)
        for _ in range(2):
            got = reducer.allreduce(x)
            assert got.tobytes() == want.tobytes()
        assert reducer.stats["refused"] == 1, reducer.stats
        assert len(sent[5]) == 2 and sent[5][1] == sent[5][0], "the resend is the block"
        assert all(len(sent[s]) == 1 for s in range(8) if s != 5), sent.keys()
        # edge.c's loop ran the fused call (tags made in C), or the Python loop did all
        assert bool(reducer.__dict__.get("_fused_calls")) == (io == "c")
        reducer.close()
    finally:
        stop.set()
        t.join()
        box.close()
