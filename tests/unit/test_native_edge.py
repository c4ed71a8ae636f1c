"""The C edge (aggbox/edge.c via aggbox/native.py) gives bit for bit what quant.py's
numpy path gives, on every kind of block: normal, all zero, signed zeros, subnormal,
huge, out of float32's scale range (handed back to numpy), NaN/Inf (refused), short tails,
strided inputs; quantize in both modes, dequantize for sums and means."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from aggbox import native, quant
from aggbox.quant import QuantizationError


@pytest.fixture
def numpy_only(monkeypatch):
    """Run a call on the numpy path: the reference the C path must equal."""
    def call(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(native, "library", lambda: None)
            with np.errstate(over="ignore"):  # sums near float32's max are inf either way
                return fn(*args, **kwargs)
    return call


def test_the_c_edge_builds_where_a_compiler_is():
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the numpy path is the edge here")
    assert native.library() is not None, native.unavailable_reason
    assert native.status().startswith("C ")


def _tensors():
    rng = np.random.default_rng(7)
    yield "normal", rng.standard_normal(5000).astype(np.float32)
    x = rng.standard_normal(4100).astype(np.float32)
    x[:256] = 0.0
    x[256:512] = -0.0
    x[512:600] = np.float32(1e-40)  # subnormal
    x[600:700] *= np.float32(1e-41)
    x[900] = np.float32(3e38)  # near float32's max
    yield "mixed", x
    yield "halves", (rng.integers(-64, 64, 3000) + 0.5).astype(np.float32) * 2.0**-10
    yield "tiny", rng.standard_normal(3000).astype(np.float32) * np.float32(1e-37)
    yield "gradients", rng.standard_normal(70000).astype(np.float32) * np.float32(1e-3)
    yield "empty", np.zeros(0, np.float32)
    yield "one", np.array([-2.5], np.float32)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (a.view(np.uint8) == b.view(np.uint8)).all())


@pytest.mark.parametrize("block", [1, 7, 256, 1024, 16235])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 8, 64])
def test_quantize_and_dequantize_match_numpy_bit_for_bit(numpy_only, block, n_workers):
    for name, x in _tensors():
        q_c, q_np = np.empty(x.size, np.int32), np.empty(x.size, np.int32)
        e_c = quant.quantize_own_into(x, block, n_workers, q_c)
        e_np = numpy_only(quant.quantize_own_into, x, block, n_workers, q_np)
        assert _same(e_c, e_np) and _same(q_c, q_np), name
        # agreed exponents: one above each block's own (what a MAX round gives)
        agreed = np.where(e_np > quant.ZERO_BLOCK_EXPONENT, e_np + 1, e_np).astype(np.int32)
        a_c = quant.quantize_into(x, agreed, block, n_workers, np.empty(x.size, np.int32))
        a_np = numpy_only(quant.quantize_into, x, agreed, block, n_workers,
                          np.empty(x.size, np.int32))
        assert _same(a_c, a_np), name
        # sums as large as n workers' can be
        sums = (q_np.astype(np.int64) * n_workers).clip(-2**31, 2**31 - 1).astype(np.int32)
        for mean in (False, True):
            y_c, y_np = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
            with np.errstate(over="ignore"):
                quant.dequantize_into(sums, e_np, block, n_workers, y_c, mean=mean)
            numpy_only(quant.dequantize_into, sums, e_np, block, n_workers, y_np, mean=mean)
            assert _same(y_c, y_np), (name, mean)


def test_nan_and_inf_are_refused_as_on_the_numpy_path():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones(40000, np.float32)
        x[33333] = bad
        with pytest.raises(QuantizationError, match="1 NaN or Inf"):
            quant.quantize_own_into(x, 16235, 2, np.empty(x.size, np.int32))


def test_strided_and_foreign_layouts_take_the_numpy_path_with_the_same_result(numpy_only):
    x = np.random.default_rng(3).standard_normal(20000).astype(np.float32)
    for view in (x[::2], x.astype(">f4")):
        q_c, q_np = np.empty(view.size, np.int32), np.empty(view.size, np.int32)
        e_c = quant.quantize_own_into(view, 1000, 4, q_c)
        e_np = numpy_only(quant.quantize_own_into, np.ascontiguousarray(view, np.float32),
                          1000, 4, q_np)
        assert _same(e_c, e_np) and _same(q_c, q_np)


def test_an_exponent_outside_float32s_scales_goes_to_float64_as_before(numpy_only):
    # the dequantize scale 2**(e - B) of a block of 1e-37 values is below float32's normal
    # range: the C path hands the call back and numpy does it in float64
    x = np.full(3000, 1e-37, np.float32)
    q = np.empty(x.size, np.int32)
    e = numpy_only(quant.quantize_own_into, x, 1000, 2, q)
    y_c, y_np = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    quant.dequantize_into(q, e, 1000, 2, y_c)
    numpy_only(quant.dequantize_into, q, e, 1000, 2, y_np)
    assert _same(y_c, y_np)
    assert np.abs(y_c - x).max() <= quant.error_bound(y_c, e, 1000, 2, aligned=True).max()


def test_the_c_header_tag_is_auth_py_siphash():
    # edge.c checks an authenticated job's results with its own SipHash-2-4: it must be
    # aggbox/auth.py's (whose reference vector tests/unit/test_auth.py checks) bit for bit
    import ctypes

    from aggbox import auth

    lib = native.library()
    if lib is None:
        pytest.skip(f"no C edge here: {native.unavailable_reason}")
    rng = np.random.default_rng(3)
    for _ in range(200):
        key, header = auth.new_key(), bytes(rng.integers(0, 256, 32, dtype=np.uint8))
        k0, k1 = auth.key_words(key)
        buf = ctypes.create_string_buffer(header, 32)
        assert lib.aggbox_header_tag(k0, k1, buf) == auth.tag(key, header)
