"""The training workload's pure parts: data order, split, summary and ratios."""

from __future__ import annotations

import numpy as np

from aggbox.workloads import registry
from aggbox.workloads.training import digits_batches, digits_split, ratios, summarize


def test_every_rank_gets_its_own_part_of_the_same_global_batch():
    parts = [digits_batches(1347, 4, r, 30, seed=2) for r in range(4)]
    for step in range(30):
        rows = np.concatenate([p[step] for p in parts])
        assert len(rows) == 64 and len(set(rows)) == 64
    assert all(np.array_equal(a, b) for a, b in
               zip(parts[0], digits_batches(1347, 4, 0, 30, seed=2), strict=True))
    assert not np.array_equal(parts[0][0], digits_batches(1347, 4, 0, 1, seed=3)[0])


def test_digits_split_is_fixed_by_the_seed():
    a, b = digits_split(1), digits_split(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].shape[1] == 64 and len(a[2]) == 450


def _rows(system, seed, acc, ms):
    return [{"system": system, "seed": seed, "iter": i, "iter_ms": ms, "comm_ms": ms / 2,
             "loss": 2.0 / (i + 1), "test_accuracy": acc, "test_loss": 0.1,
             "err_bound": 1e-8 if system == "aggbox" else float("nan"), "promise": "app",
             "cpu_us_per_op": 100.0 * ms, "procs_per_cpu": 2.0, "overcommitted": True,
             "cpu_source": "cpuidle"} for i in range(20)]


def test_summary_has_per_seed_accuracy_and_the_ratios():
    samples = (_rows("gloo", 1, 0.96, 10.0) + _rows("gloo", 2, 0.98, 10.0)
               + _rows("aggbox", 1, 0.97, 5.0) + _rows("aggbox", 2, 0.97, 5.0))
    per = summarize(samples, ["gloo", "aggbox"])
    assert per["gloo"]["per_seed"]["2"]["test_accuracy"] == 0.98
    assert per["aggbox"]["test_accuracy_mean"] == 0.97 and per["aggbox"]["converged"]
    assert per["aggbox"]["err_bound_max"] == 1e-8 and "err_bound_max" not in per["gloo"]
    assert list(per["gloo"]["loss_curve"]) == ["0", "10"]
    r = ratios(samples, per)["aggbox/gloo"]
    assert r["iter_ms_ratio"] == 0.5 and r["cpu_ratio"] == 0.5 and r["accuracy_diff_pp"] == 0.0


def test_training_is_in_every_registry_table():
    for table in (registry.WORKLOADS, registry.METRICS, registry.PRIMARY_METRIC,
                  registry.SYSTEMS, registry.PARAMS, registry.COST):
        assert "training" in table
