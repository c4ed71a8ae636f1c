"""aggbox.torch's hook is asynchronous: buckets are averaged on the state's one worker
thread, in order, while the caller (DDP's backward) goes on; errors reach the future."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_torch_hook import Bucket, FakeReducer, state

from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.torch import allreduce_hook


class GatedReducer(FakeReducer):
    """Blocks every call until ``gate`` is set, recording the thread and bucket order."""

    def __init__(self, n: int):
        super().__init__(n)
        self.gate, self.threads = threading.Event(), set()

    def allreduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        assert self.gate.wait(10), "the test never opened the gate"
        self.threads.add(threading.get_ident())
        return super().allreduce(x, op)


def test_the_hook_returns_before_the_bucket_is_averaged_and_buckets_keep_their_order():
    s = state()
    s.reducer = GatedReducer(3)
    bufs = [torch.full((100 + k,), float(k)) for k in range(5)]
    futs = [allreduce_hook(s, Bucket(b, k)) for k, b in enumerate(bufs)]
    # every call returned while the reducer is still blocked: backward would go on here
    assert not any(f.done() for f in futs) and s.calls == 0
    s.reducer.gate.set()
    outs = [f.wait() for f in futs]
    assert [o.numel() for o in outs] == [100, 101, 102, 103, 104]
    assert all(torch.equal(o, b * 3 / 3) for o, b in zip(outs, bufs, strict=True))
    assert [x.size for x in s.reducer.seen] == [100, 101, 102, 103, 104], "in order"
    assert len(s.reducer.threads) == 1 and threading.get_ident() not in s.reducer.threads
    assert s.calls == 5 and sorted(s.bucket_bounds) == [0, 1, 2, 3, 4]
    s.close()


class FailingReducer(FakeReducer):
    def __init__(self, n: int, exc: Exception, fail_on: int):
        super().__init__(n)
        self.exc, self.fail_on = exc, fail_on

    def allreduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        if len(self.seen) == self.fail_on:
            self.seen.append(x)
            raise self.exc
        return super().allreduce(x, op)


def test_a_timeout_reaches_the_future_naming_the_bucket_and_later_buckets_are_refused():
    s = state()
    s.reducer = FailingReducer(3, CollectiveTimeout("the aggregator waits for rank 2",
                                                    [2]), fail_on=1)
    futs = [allreduce_hook(s, Bucket(torch.ones(10), k)) for k in range(3)]
    assert torch.equal(futs[0].wait(), torch.ones(10))
    with pytest.raises(CollectiveTimeout, match=r"gradient bucket 1 \(10 values\) failed "
                       r"on rank 0: the aggregator waits for rank 2"):
        futs[1].wait()
    with pytest.raises(AggBoxError, match="gradient bucket 2 was not sent on rank 0: an "
                       "earlier bucket failed"):
        futs[2].wait()
    assert len(s.reducer.seen) == 2, "bucket 2 was never handed to the reducer"
    s.close()


def test_an_unexpected_error_is_named_with_its_bucket():
    s = state()
    s.reducer = FailingReducer(3, OSError(101, "Network is unreachable"), fail_on=0)
    with pytest.raises(AggBoxError, match="gradient bucket 4 failed on rank 0: OSError: "
                       r"\[Errno 101\] Network is unreachable"):
        allreduce_hook(s, Bucket(torch.ones(3), 4)).wait()
    s.close()


def test_ddp_backward_raises_the_buckets_error():
    """Through real DDP (a one-rank gloo group): the future's error fails backward()."""
    import os
    import tempfile

    import torch.distributed as dist

    with tempfile.NamedTemporaryFile() as f:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            s = state(1)
            ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
            ddp.register_comm_hook(s, allreduce_hook)
            ddp(torch.ones(3, 4)).sum().backward()  # a good step first
            assert s.calls >= 1
            s.reducer = FailingReducer(1, OSError(5, "I/O error"), fail_on=0)
            with pytest.raises(RuntimeError, match="gradient bucket 0 failed on rank 0"):
                ddp(torch.ones(3, 4)).sum().backward()
            s.close()
        finally:
            dist.destroy_process_group()
