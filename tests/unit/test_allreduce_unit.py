"""The allreduce workload's bookkeeping, without a testbed: segments of the schedule,
every rank's result checked, CPU per call and the overcommit flag from the nodes' records,
and the bench summary (CI, no p99 of a few calls, ratios, strongest baseline)."""

from __future__ import annotations

import math

import numpy as np

from aggbox.bench import allreduce_ratios, summarize_allreduce
from aggbox.workloads.allreduce import (
    SYNC,
    SYNC_WINDOWS,
    concurrency_groups,
    cpu_columns,
    cpu_list,
    make_input,
    merge_calls,
    reference,
    segments,
)


def test_segments_split_warmup_from_measured_calls_and_start_with_barrier_probes():
    schedule = [("gloo", 10), ("aggbox", 10), ("aggbox", 5), ("gloo", 5)]
    segs = segments(schedule, warmup=3, floats=1024)
    assert segs[:SYNC_WINDOWS] == [(SYNC, 0, True)] * SYNC_WINDOWS
    assert segs[SYNC_WINDOWS:] == [("gloo", 3, False), ("gloo", 7, True),
                                   ("aggbox", 3, False), ("aggbox", 7, True),
                                   ("aggbox", 5, True), ("gloo", 5, True)]
    # Big tensors: measured segments small enough to keep their results for the check.
    big = segments([("tcp_ps", 10)], warmup=0, floats=64 << 20)
    assert [n for s, n, m in big if s == "tcp_ps"] == [1] * 10


def test_reference_is_the_float64_sum_of_every_input():
    ref = reference(3, 100, "gaussian", 7)
    exact = sum(make_input(r, 100, "gaussian", 7).astype(np.float64) for r in range(3))
    assert np.array_equal(ref, exact)


def test_cpu_list_and_concurrency_groups():
    assert cpu_list({0, 1, 2, 5}) == "0-2,5" and cpu_list({3}) == "3"
    one = [{"cpus": "0-1", "machine": "m"}] * 8
    assert concurrency_groups(one) == [(8, 2)]
    # The PS server alone on CPU 0, workers on CPU 1: both groups and their union.
    split = [{"cpus": "1", "machine": "m"}] * 4 + [{"cpus": "0", "machine": "m"}]
    assert sorted(concurrency_groups(split)) == [(1, 1), (4, 1), (5, 2)]
    # One process per real machine does not overcommit.
    apart = [{"cpus": "0-1", "machine": f"m{i}"} for i in range(4)]
    assert concurrency_groups(apart) == [(1, 2)] * 4


def _call(system, it, rank, err, **extra):
    return {"kind": "call", "system": system, "iter": it, "rank": rank, "max_abs_err": err,
            **extra}


def test_every_ranks_result_is_checked():
    records = [_call("aggbox", 2, 0, 1e-6, time_ns=2_000_000, err_bound=1e-5,
                     within_bound=True),
               _call("aggbox", 2, 1, 3e-5, err_bound=1e-5, within_bound=False),
               _call("gloo", 2, 0, 0.0, time_ns=1_000_000), _call("gloo", 2, 1, 2e-7),
               _call("gloo", 1, 0, 0.0, time_ns=1)]  # a warm-up call: dropped
    samples = {s["system"]: s for s in merge_calls(records, warmup=2, floats=1000)}
    agg, gloo = samples["aggbox"], samples["gloo"]
    assert agg["time_ms"] == 2.0 and agg["iter"] == 0 and agg["ranks_checked"] == 2
    assert agg["max_abs_err"] == 3e-5 and agg["within_bound"] is False
    assert gloo["max_abs_err"] == 2e-7 and gloo["err_bound"] is None and gloo["within_bound"]
    assert math.isclose(gloo["algbw_gbps"], 4000 / 1e6)


def _events(rate=0.1):
    tally = {"busy_ns": 0, "wall_ns": 0, "ops": 0, "windows": 0}
    machine = {"source": "cpuidle", "background_rate": rate, "window_overhead_ns": 0.0,
               "tallies": {
                   # 10 empty windows: 1000 ns each beyond the background
                   SYNC: dict(tally, busy_ns=10 * 1000 + int(rate * 10_000), wall_ns=10_000,
                              windows=10),
                   "aggbox": {"busy_ns": 2_000_000 + int(rate * 1_000_000) + 2 * 1000,
                              "wall_ns": 1_000_000, "ops": 20, "windows": 2},
                   "tcp_ps": {"busy_ns": 4_000_000, "wall_ns": 0, "ops": 20, "windows": 0}}}
    place = {"cpus": "0-1", "machine": "m"}
    workers = [{"event": "done", "role": "worker", "rank": r, "placement": place,
                "process_cpu": {"aggbox": {"busy_ns": 500_000, "ops": 20},
                                "tcp_ps": {"busy_ns": 300_000, "ops": 20}}} for r in range(2)]
    workers[0]["machine_cpu"] = machine
    agg = {"event": "done", "role": "aggregator", "placement": place,
           "process_cpu": {"tcp_ps": {"busy_ns": 1_000_000, "ops": 20},
                           "aggbox": {"busy_ns": 0, "ops": 25}}}
    return [*workers, agg]


def test_cpu_columns_subtract_background_and_barrier_and_count_the_ps_server():
    cols = cpu_columns(_events(), ["aggbox", "gloo", "tcp_ps"])
    agg, gloo, ps = cols["aggbox"], cols["gloo"], cols["tcp_ps"]
    assert math.isclose(agg["cpu_us_per_op"], 100.0)  # 2 ms over 20 calls
    assert math.isclose(ps["cpu_us_per_op"], 200.0)
    assert math.isnan(gloo["cpu_us_per_op"])  # no windows in this fake
    assert math.isclose(agg["workers_cpu_us_per_op"], 50.0)  # 2 x 0.5 ms / 20
    assert agg["aggregator_cpu_us_per_op"] == 0.0 and math.isclose(
        ps["aggregator_cpu_us_per_op"], 50.0)
    assert math.isnan(gloo["aggregator_cpu_us_per_op"])  # gloo has no aggregator
    assert {c["promise"] for c in cols.values()} == {"app"}
    assert (agg["procs_per_cpu"], agg["overcommitted"]) == (1.0, False)  # 2 workers, 2 CPUs
    assert (ps["procs_per_cpu"], ps["overcommitted"]) == (1.5, True)  # + the PS server
    assert agg["worker_cpus"] == "0-1" and agg["cpu_source"] == "cpuidle"


def _samples(system, times, cpu):
    return [{"system": system, "iter": i, "time_ms": t, "algbw_gbps": 1.0, "max_abs_err": 0.0,
             "err_bound": 1e-3 if system == "aggbox" else None, "within_bound": True,
             "ranks_checked": 4, "promise": "app", "cpu_us_per_op": cpu,
             "workers_cpu_us_per_op": cpu / 2, "aggregator_cpu_us_per_op": float("nan"),
             "procs_per_cpu": 2.0, "overcommitted": True, "cpu_source": "cpuidle",
             "worker_cpus": "0-1", "aggregator_cpus": "0-1"} for i, t in enumerate(times)]


def test_summary_has_ci_no_p99_of_few_calls_and_names_the_strongest_baseline():
    rng = np.random.default_rng(0)
    samples = (_samples("aggbox", 2 + rng.random(20), 300.0)
               + _samples("gloo", 8 + rng.random(20), 900.0)
               + _samples("tcp_ps", 1 + rng.random(20), 600.0))
    per = summarize_allreduce(samples, ["aggbox", "gloo", "tcp_ps"], 1024)
    agg = per["aggbox"]
    lo, hi = agg["time_ms_p50_ci"]
    assert lo <= agg["p50_ms"] <= hi and agg["p99_ms"] is None and agg["n"] == 20
    assert agg["cpu_us_per_op"] == 300.0 and agg["aggregator_cpu_us_per_op"] is None
    assert agg["overcommitted"] is True and agg["promise"] == "app"
    many = summarize_allreduce(_samples("gloo", rng.random(100), 1.0), ["gloo"], 1024)
    assert many["gloo"]["p99_ms"] is not None
    out = allreduce_ratios(samples, per)
    assert out["strongest_baseline"] == "tcp_ps"
    r = out["ratios"]["aggbox/tcp_ps time p50"]
    assert r["ratio"] > 1 and r["ci95"][0] <= r["ratio"] <= r["ci95"][1]
    assert out["ratios"]["aggbox/gloo cpu_us_per_op"]["ratio"] == round(300 / 900, 4)
    assert out["strongest_baseline_ratio"]["time p50"] == r
