"""aggbox.torch's hook without a kernel: a fake Allreducer that sums copies of its input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggbox import quant
from aggbox.collectives.allreduce import Allreducer, make_group
from aggbox.collectives.group import Member
from aggbox.errors import AggBoxError
from aggbox.torch import AggBoxState, _mean_bound, _mean_bound_max, allreduce_hook


class FakeReducer:
    """n ranks holding the same bucket: the sum is n times it (exact), bound 0."""

    def __init__(self, n: int):
        self.n, self.seen = n, []
        self.block = 256

    def allreduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        quant.block_peaks(x, self.block)  # as the real one: NaN/Inf refused before sending
        self.seen.append(x)
        return x.astype(np.float32) * self.n

    def error_bound(self, result: np.ndarray, exponents=None, block=None) -> np.ndarray:
        return np.zeros(result.shape)

    def close(self) -> None:
        pass


class Bucket:
    def __init__(self, t: torch.Tensor, i: int):
        self.t, self.i = t, i

    def buffer(self) -> torch.Tensor:
        return self.t

    def index(self) -> int:
        return self.i


def state(n: int = 3) -> AggBoxState:
    members = [Member(r, f"10.0.0.{r + 2}") for r in range(n)]
    group = make_group(1, 2, members, Member(0, "10.0.0.1"), rank=0)
    return AggBoxState(FakeReducer(n), group, timeout=1.0)  # type: ignore[arg-type]


def test_float32_bucket_reaches_the_quantizer_without_a_copy():
    s = state()
    buf = torch.randn(1001)
    out = allreduce_hook(s, Bucket(buf, 0)).wait()
    assert np.shares_memory(s.reducer.seen[0], buf.numpy())
    assert torch.allclose(out, buf) and out.dtype == torch.float32
    assert s.last_error_bound.shape == buf.shape and s.calls == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_buckets_come_back_in_their_dtype(dtype):
    s = state()
    buf = torch.randn(257).to(dtype)
    out = allreduce_hook(s, Bucket(buf, 4)).wait()
    assert out.dtype == dtype and out.shape == buf.shape
    err = (out.double() - buf.double()).abs()
    assert (err <= s.last_error_bound).all()
    assert s.bucket_bounds[4] == s.last_error_bound_max > 0  # the cast back is bounded


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_bucket_is_refused_naming_it(bad):
    s = state()
    buf = torch.zeros(10)
    buf[3] = bad
    with pytest.raises(AggBoxError, match="gradient bucket 7 holds 1 NaN/Inf"):
        allreduce_hook(s, Bucket(buf, 7)).wait()  # the future carries the error
    assert s.reducer.seen == [], "nothing was sent"


def test_the_hook_passes_ddps_signature_check():
    # DDP refuses a hook whose annotations are not these objects
    import inspect

    sig = inspect.signature(allreduce_hook)
    assert sig.parameters["bucket"].annotation is torch.distributed.GradBucket
    assert sig.return_annotation == torch.futures.Future[torch.Tensor]


class QuantReducer:
    """The bound side of a real Allreducer (Allreducer.error_bound), without a kernel."""

    error_bound = Allreducer.error_bound

    def __init__(self, n: int, block: int, exponents: np.ndarray, scale: str):
        members = [Member(r, f"10.0.0.{r + 2}") for r in range(n)]
        self.group = make_group(1, 2, members, Member(0, "10.0.0.1"), rank=0)
        self.block, self.last_exponents, self.scale = block, exponents, scale


@pytest.mark.parametrize("size", [1, 257, 16235, 40001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["align", "agree"])
def test_the_largest_bound_from_one_value_per_block_is_the_largest_of_every_element(
        size, dtype, scale):
    rng = np.random.default_rng(size)
    n, block = 3, 4000
    total = (rng.standard_normal(size) * 10.0 ** rng.integers(-6, 3, size)).astype(np.float32)
    exponents = quant.block_exponents(total, block)
    s = AggBoxState(QuantReducer(n, block, exponents, scale), state(n).group, timeout=1.0)
    mean = np.divide(total, np.float32(n), dtype=np.float32)
    full = _mean_bound(s, total, mean, exponents, dtype)
    assert full.shape == (size,)
    assert _mean_bound_max(s, total, mean, exponents, dtype) == full.max()


@pytest.mark.parametrize("size", [1, 7, 4000, 4001, 12345])
def test_largest_per_block_finds_each_blocks_largest_magnitude(size):
    from aggbox.torch import _largest_per_block

    x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    x[:: 5] *= -3  # large negatives too
    at = _largest_per_block(x, 4000)
    peaks = [np.abs(x[lo:lo + 4000]).max() for lo in range(0, size, 4000)]
    assert at.size == len(peaks)
    assert np.array_equal(np.abs(x[at]), np.array(peaks, dtype=np.float32))
    assert all(lo <= i < lo + 4000 for lo, i in zip(range(0, size, 4000), at, strict=True))
