"""Stored runs: statistics, the loader, format upgrades and finding runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pipeline_fakes import REFERENCE_DIR, FakeTestbed, experiment_text, quiet_console, registered

from aggbox import results
from aggbox.errors import AggBoxError
from aggbox.experiment import run_experiment
from aggbox.results import describe, latest_run, list_runs, load_run, summarize, t975


def test_percentiles_and_counts_are_exact_on_known_data():
    stats = describe(np.arange(101.0))  # 0, 1, ..., 100
    assert stats["p50"] == 50.0
    assert stats["p99"] == 99.0
    assert stats["n"] == 101
    assert stats["mean"] == 50.0


def test_the_confidence_interval_of_the_mean_is_t_based():
    stats = describe([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * s / sqrt(n)
    assert stats["std"] == pytest.approx(math.sqrt(2.5))
    assert stats["ci95_low"] == pytest.approx(3.0 - half)
    assert stats["ci95_high"] == pytest.approx(3.0 + half)


def test_t_quantiles_match_the_tables():
    assert t975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t975(30) == pytest.approx(2.0423, abs=1e-4)
    assert t975(60) == pytest.approx(2.0003, abs=1e-4)
    assert t975(1000) == pytest.approx(1.9623, abs=1e-4)


def test_unmeasured_samples_are_left_out_and_not_counted():
    stats = describe([10.0, float("nan"), 30.0])
    assert stats["n"] == 2 and stats["p50"] == 20.0
    empty = describe([float("nan")])
    assert empty["n"] == 0 and math.isnan(empty["p50"])


def test_summarize_gives_one_row_per_group_with_every_stat():
    samples = pd.DataFrame(
        {
            "hosts": [2] * 4 + [8] * 4,
            "system": ["aggbox", "aggbox", "tcp", "tcp"] * 2,
            "completion_us": [1.0, 3.0, 10.0, 30.0, 2.0, 4.0, 20.0, 40.0],
        }
    )
    summary = summarize(samples, ["hosts", "system"], ["completion_us"])
    assert list(summary[["hosts", "system"]].itertuples(index=False, name=None)) == [
        (2, "aggbox"),
        (2, "tcp"),
        (8, "aggbox"),
        (8, "tcp"),
    ]
    assert list(summary["completion_us_p50"]) == [2.0, 20.0, 3.0, 30.0]
    assert list(summary["completion_us_n"]) == [2, 2, 2, 2]
    for stat in results.STATS:
        assert f"completion_us_{stat}" in summary


def test_summarize_names_missing_columns():
    with pytest.raises(AggBoxError, match="no column"):
        summarize(pd.DataFrame({"system": ["a"]}), ["system"], ["completion_us"])


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "broadcast-synthetic"
    shutil.copytree(REFERENCE_DIR, path)
    return path


def test_the_reference_result_is_labelled_synthetic():
    meta = json.loads((REFERENCE_DIR / "meta.json").read_text())
    assert meta["synthetic"] is True and "SYNTHETIC" in meta["note"]
    assert "SYNTHETIC" in (REFERENCE_DIR / "README.md").read_text()


def test_load_run_round_trip(tmp_path):
    with registered():
        (tmp_path / "x.yaml").write_text(experiment_text(repetitions=2))
        run_dir = run_experiment(
            tmp_path / "x.yaml",
            results_dir=tmp_path / "results",
            testbed_factory=FakeTestbed,
            progress=False,
            draw_figures=False,
            console=quiet_console(),
        )
    run = load_run(run_dir)
    assert run.path == run_dir and run.run_id == run_dir.name
    assert run.experiment == "fakecast" and run.primary_metric == "completion_us"
    assert run.param_columns == ["hosts", "size", "receivers", "loss"]
    assert run.systems == ["aggbox", "tcp", "udp"]
    assert len(run.samples) == 8 * 3 * 20
    recomputed = summarize(run.samples, [*run.param_columns, "system"], run.metrics)
    pd.testing.assert_frame_equal(run.summary, recomputed, check_dtype=False)


def test_the_reference_loads_and_its_summary_matches_its_samples(reference):
    run = load_run(reference)
    recomputed = summarize(run.samples, [*run.param_columns, "system"], run.metrics)
    pd.testing.assert_frame_equal(run.summary, recomputed, check_dtype=False)


def test_an_older_format_is_upgraded_on_load(reference, monkeypatch):
    meta = json.loads((reference / "meta.json").read_text())
    meta["format_version"] = 0
    meta["metrics"] = ["latency_us"]  # what version 0 called it (in this made-up history)
    (reference / "meta.json").write_text(json.dumps(meta))
    samples = pd.read_parquet(reference / "samples.parquet")
    samples.rename(columns={"completion_us": "latency_us"}).to_parquet(
        reference / "samples.parquet"
    )

    def v0_to_v1(meta, samples, summary):
        meta = {**meta, "format_version": 1, "metrics": ["completion_us"]}
        return meta, samples.rename(columns={"latency_us": "completion_us"})

    monkeypatch.setitem(results.UPGRADERS, 0, v0_to_v1)
    run = load_run(reference)
    assert "completion_us" in run.samples and "completion_us_p50" in run.summary
    assert run.meta["format_version"] == results.FORMAT_VERSION


def test_a_newer_format_is_refused_with_advice(reference):
    meta = json.loads((reference / "meta.json").read_text())
    meta["format_version"] = results.FORMAT_VERSION + 1
    (reference / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(AggBoxError, match="update AggBox"):
        load_run(reference)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(AggBoxError, match="not an AggBox run"):
        load_run(tmp_path)
    unfinished = tmp_path / ".tmp-20250101-000000-abcd"
    unfinished.mkdir()
    with pytest.raises(AggBoxError, match="--resume 20250101-000000-abcd"):
        load_run(unfinished)


def test_list_runs_and_latest_run(tmp_path):
    exp_dir = tmp_path / "results" / "broadcast"
    for run_id in ("20250101-000000-aaaa", "20250102-000000-bbbb"):
        shutil.copytree(REFERENCE_DIR, exp_dir / run_id)
    (exp_dir / ".tmp-20250103-000000-cccc").mkdir()
    names = [p.name for p in list_runs("broadcast", tmp_path / "results")]
    assert names == ["20250101-000000-aaaa", "20250102-000000-bbbb"]
    with_unfinished = list_runs("broadcast", tmp_path / "results", include_unfinished=True)
    assert len(with_unfinished) == 3
    assert list_runs(results_dir=tmp_path / "results") == list_runs(
        "broadcast", tmp_path / "results"
    )

    assert latest_run("broadcast", tmp_path / "results").path.name == "20250102-000000-bbbb"
    results.atomic_symlink("20250101-000000-aaaa", exp_dir / "latest")
    assert latest_run("broadcast", tmp_path / "results").path.name == "20250101-000000-aaaa"
    with pytest.raises(AggBoxError, match="aggbox run experiments/nothing.yaml"):
        latest_run("nothing", tmp_path / "results")


def test_the_bootstrap_interval_of_the_median_covers_it_and_narrows_with_n():
    rng = np.random.default_rng(3)
    small, large = rng.exponential(1.0, 30), rng.exponential(1.0, 3000)
    lo_s, hi_s = results.bootstrap_median_ci(small)
    lo_l, hi_l = results.bootstrap_median_ci(large)
    assert lo_s <= np.median(small) <= hi_s
    assert lo_l <= np.median(large) <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~sqrt(100) = 10x narrower in theory
    assert results.bootstrap_median_ci(small) == (lo_s, hi_s)  # seeded: reproducible
    assert all(math.isnan(v) for v in results.bootstrap_median_ci([1.0, 2.0]))
    assert results.bootstrap_median_ci([4.0, 4.0, 4.0]) == (4.0, 4.0)


def test_the_bootstrap_ratio_of_medians_brackets_the_true_ratio():
    rng = np.random.default_rng(4)
    a, b = rng.normal(10.0, 1.0, 400), rng.normal(20.0, 2.0, 400)
    ratio, lo, hi = results.bootstrap_ratio_ci(a, b)
    assert ratio == pytest.approx(np.median(a) / np.median(b))
    assert lo < 0.5 < hi and hi - lo < 0.05
    assert math.isnan(results.bootstrap_ratio_ci(a, [])[0])


def test_p99_needs_a_hundred_samples():
    assert math.isnan(describe(np.arange(99.0))["p99"])  # a "p99" of 99 samples: none
    assert describe(np.arange(100.0))["p99"] == pytest.approx(98.01)
    assert math.isnan(describe(np.arange(10.0))["p99"])


def test_the_median_interval_is_in_the_summary_and_brackets_the_median():
    rng = np.random.default_rng(5)
    samples = pd.DataFrame(
        {
            "system": ["aggbox"] * 150 + ["tcp"] * 40,
            "repetition": [0, 1, 2] * 50 + [0, 1] * 20,
            "completion_us": np.concatenate([rng.lognormal(3, 0.4, 150), rng.lognormal(4, 1, 40)]),
        }
    )
    summary = summarize(samples, ["system"], ["completion_us"]).set_index("system")
    for system in ("aggbox", "tcp"):
        row = summary.loc[system]
        assert row["completion_us_p50_ci_low"] < row["completion_us_p50"]
        assert row["completion_us_p50"] < row["completion_us_p50_ci_high"]
        low, high = results.bootstrap_median_ci(
            samples.loc[samples.system == system, "completion_us"]
        )
        assert (row["completion_us_p50_ci_low"], row["completion_us_p50_ci_high"]) == (low, high)
        assert row["completion_us_p50_rep_min"] <= row["completion_us_p50_rep_max"]
    assert summary.loc["aggbox", "completion_us_p99"] > summary.loc["aggbox", "completion_us_p50"]
    assert math.isnan(summary.loc["tcp", "completion_us_p99"])  # 40 samples
    assert list(summary["repetitions"]) == [3, 2]
    per_rep = samples[samples.system == "aggbox"].groupby("repetition")["completion_us"].median()
    assert summary.loc["aggbox", "completion_us_p50_rep_min"] == per_rep.min()


def test_the_per_system_constants_are_carried_and_missing_ones_are_nan():
    samples = pd.DataFrame(
        {
            "system": ["tcp"] * 4,
            "repetition": [0, 0, 1, 1],
            "completion_us": [1.0, 2.0, 3.0, 4.0],
            "promise": ["app"] * 4,
            "procs_per_cpu": [1.0, 1.0, 1.5, 1.5],
            "overcommitted": [False, False, True, True],  # one overcommitted repetition
        }
    )
    row = summarize(samples, ["system"], ["completion_us"]).iloc[0]
    assert row["promise"] == "app" and row["procs_per_cpu"] == 1.5
    assert row["overcommitted"] == True  # noqa: E712 (numpy bool)
    assert math.isnan(row["cpu_source"])  # not recorded by this run
    columns = list(summarize(samples, ["system"], ["completion_us"]).columns)
    assert columns[:6] == ["system", "repetitions", *results.CARRIED]


@pytest.mark.parametrize(
    "path",
    [
        REFERENCE_DIR.parent / "allreduce-reference",
        REFERENCE_DIR.parent / "mapreduce-reference",
        *sorted(Path(results.RESULTS_DIR).glob("*/2*")),
    ],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_format_1_runs_are_upgraded_and_resummarized(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    if meta["format_version"] != 1:
        pytest.skip(f"{path} is not a format-1 run any more")
    old_summary = pd.read_csv(copy / "summary.csv")
    run = load_run(copy)
    assert run.meta["format_version"] == results.FORMAT_VERSION
    assert run.meta["upgraded_from"] == 1
    assert list(run.meta["cells"]) == list(meta["cell_seconds"])
    assert all("seconds" in c for c in run.meta["cells"].values())
    metric = run.primary_metric
    for column in (f"{metric}_p50_ci_low", f"{metric}_p50_ci_high", "repetitions", "promise"):
        assert column in run.summary
    assert len(run.summary) == len(old_summary)
    pd.testing.assert_series_equal(
        run.summary[f"{metric}_p50"], old_summary[f"{metric}_p50"], check_exact=False
    )
    few = run.summary[f"{metric}_n"] < results.P99_MIN_N
    assert run.summary.loc[few, f"{metric}_p99"].isna().all()
    assert run.summary.loc[~few, f"{metric}_p99"].notna().all()
