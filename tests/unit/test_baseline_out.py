"""The allreduce baselines write into a caller's buffer (``out=``), as AggBox does: the
bench gives every system the same pre-faulted result rows (aggbox/workloads/allreduce.py
result_store), so no system's timed call pays page faults the others do not."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from aggbox.baselines import result_buffer
from aggbox.collectives.allreduce import make_group
from aggbox.collectives.group import Member
from aggbox.errors import AggBoxError
from aggbox.workloads.allreduce import result_store, segments


def test_result_buffer_takes_a_flat_float32_row_and_refuses_anything_else():
    x = np.ones(10, dtype=np.float32)
    row = np.zeros((3, 10), dtype=np.float32)[1]
    assert result_buffer(row, x).base is not None  # a view: written in place
    for bad in (np.zeros(10, np.float64), np.zeros(11, np.float32),
                np.zeros((10, 2), np.float32)[:, 0]):
        with pytest.raises(AggBoxError, match="out must be a C-contiguous float32"):
            result_buffer(bad, x)


def test_result_store_has_a_row_for_every_call_of_the_largest_measured_segment():
    x = np.zeros(1000, dtype=np.float32)
    plan = segments([("aggbox", 25), ("tcp_ps", 25)], warmup=5, floats=x.size)
    store = result_store(x, max(n for _, n, m in plan if m))
    assert store.shape == (20, 1000) and store.dtype == np.float32
    assert store.flags.c_contiguous and store[3].flags.c_contiguous


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_ps_sums_into_the_callers_buffer_over_loopback():
    from aggbox.baselines.tcp_ps import ParameterServer, TcpPsAllreducer

    port = _free_port()
    me = Member(0, "127.0.0.1")
    workers = [Member(0, "127.0.0.1"), Member(1, "127.0.0.1")]
    server = ParameterServer(make_group(1, 2, workers, me, 0), port)
    t = threading.Thread(target=server.serve, kwargs={"accept_timeout": 10.0}, daemon=True)
    t.start()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(5000).astype(np.float32) for _ in range(2)]
    outs = [np.full(5000, np.nan, dtype=np.float32) for _ in range(2)]
    got: list = [None, None]

    def work(r: int) -> None:
        red = TcpPsAllreducer(make_group(1, 2, workers, me, r), port)
        got[r] = red.allreduce(xs[r], out=outs[r])
        red.close()

    ws = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for w in ws:
        w.start()
    for w in ws:
        w.join(10)
    t.join(10)
    for r in range(2):
        assert got[r] is outs[r]
        assert np.array_equal(outs[r], xs[0] + xs[1])  # float32 sum, in the server's order


def _gloo_rank(rank: int, port: int, x: np.ndarray, q) -> None:
    from aggbox.baselines.gloo import GlooAllreducer

    workers = [Member(0, "127.0.0.1"), Member(1, "127.0.0.1")]
    group = make_group(1, 2, workers, workers[0], rank, ifname="lo")
    red = GlooAllreducer(group, port, timeout_s=30.0)
    out = np.full(x.size, np.nan, dtype=np.float32)
    got = red.allreduce(x, out=out)
    q.put((rank, got is out or np.shares_memory(got, out), out.copy(),
           red.allreduce(x, op="mean")))
    red.close()


def test_gloo_sums_into_the_callers_buffer():
    pytest.importorskip("torch")
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(3000).astype(np.float32) for _ in range(2)]
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, xs[r], q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(30)
    for _rank, in_place, out, mean in results:
        assert in_place
        np.testing.assert_allclose(out, xs[0] + xs[1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mean, (xs[0] + xs[1]) / 2, rtol=1e-6, atol=1e-6)
