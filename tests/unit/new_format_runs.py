"""SYNTHETIC runs in the current results format, for the report and figure tests.

The committed reference runs under tests/data/ were recorded before samples carried a
promise, CPU per operation and an overcommit flag (and before mapreduce's ``reduce_s``
became ``after_last_send_s``). These builders take those samples and add what a run
records now, with made-up but plausible values, so that the report and every figure can
be tested on the columns they are written for. The runs say ``synthetic: true`` (every
figure and the report label them); they are not measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from aggbox.results import (
    FORMAT_VERSION,
    META_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    bootstrap_median_ci,
    summarize,
)

DATA = Path(__file__).resolve().parent.parent / "data"

BROADCAST_METRICS = ["completion_us", "delivery_us", "sender_cpu_us", "cpu_us_per_op",
                     "root_cpu_us_per_op", "members_cpu_us_per_op"]
ALLREDUCE_METRICS = ["time_ms", "algbw_gbps", "max_abs_err", "err_bound", "cpu_us_per_op",
                     "workers_cpu_us_per_op", "aggregator_cpu_us_per_op"]
MAPREDUCE_METRICS = ["job_s", "after_last_send_s", "reducer_cpu_s", "pairs_per_s",
                     "cpu_us_per_op", "mappers_cpu_us_per_op", "reducers_cpu_us_per_op"]
CPUS = 2


def _meta(source: Path, **changes) -> dict:
    meta = json.loads((source / META_FILE).read_text())
    meta.update(changes)
    meta["synthetic"] = True
    meta["format_version"] = FORMAT_VERSION  # written as this AggBox writes: no upgrade
    meta["machine"] = {"kernel": "6.18-test", "cpu_count": CPUS, "cpu_model": "test",
                       **(meta.get("machine") or {})}
    return meta


def _write(results_dir: Path, meta: dict, samples: pd.DataFrame) -> Path:
    """A run folder as the runner writes it: samples, meta and a summary.csv that has the
    median's CI (computed here if this AggBox's summarize does not write it)."""
    path = Path(results_dir) / meta["experiment"] / meta["run_id"]
    path.mkdir(parents=True)
    samples = samples.reset_index(drop=True)
    samples.to_parquet(path / SAMPLES_FILE, index=False)
    summary = summarize(samples, [*meta["param_columns"], "system"], meta["metrics"])
    keys = [*meta["param_columns"], "system"]
    for m in meta["metrics"]:
        if f"{m}_p50_ci_low" not in summary:
            cis = [bootstrap_median_ci(g[m].to_numpy(float))
                   for _, g in samples.groupby(keys, sort=False, dropna=False)]
            summary[f"{m}_p50_ci_low"] = [c[0] for c in cis]
            summary[f"{m}_p50_ci_high"] = [c[1] for c in cis]
    summary.to_csv(path / SUMMARY_FILE, index=False)
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return path



def broadcast_run(results_dir: Path) -> Path:
    """The synthetic broadcast run plus the kernel-promise TCP (tcp_kack) and IP
    multicast, both CPU placements, CPU per broadcast and the overcommit flag."""
    src = DATA / "broadcast-synthetic"
    old = pd.read_parquet(src / SAMPLES_FILE)
    old = old[[c for c in old.columns if c not in ("promise", "procs_per_cpu", "overcommitted",
                                                   "cpu_source", "root_cpus", "member_cpus")]]
    rng = np.random.default_rng(3)
    parts = [old]
    for name, source, factor in (("tcp_kack", "tcp", 0.55), ("mcast", "udp", 0.85)):
        extra = old[old["system"] == source].copy()
        extra["system"] = name
        noise = rng.lognormal(0, 0.05, len(extra))
        extra["completion_us"] = (extra["completion_us"] * factor * noise).round(2)
        extra["delivery_us"] = (extra["delivery_us"] * (factor + 0.3) * noise).round(2)
        parts.append(extra)
    one = pd.concat(parts, ignore_index=True)
    placements = []
    for placement, slow in (("root-alone", 1.0), ("shared", 1.25)):
        p = one.copy()
        p["placement"] = placement
        app = ~p["system"].isin(["aggbox", "tcp_kack"])
        p.loc[app, "completion_us"] = (p.loc[app, "completion_us"] * slow).round(2)
        p["cell"] = p["cell"].str.replace(",rep=", f",placement={placement},rep=")
        placements.append(p)
    s = pd.concat(placements, ignore_index=True)
    kernel = s["system"].isin(["aggbox", "tcp_kack"])
    s["promise"] = np.where(kernel, "kernel", "app")
    members = (s["hosts"] - 1).astype(float)
    # root-alone: the root on CPU 0, the members on the other CPU; shared: all on all CPUs
    alone = s["placement"] == "root-alone"
    s["procs_per_cpu"] = np.where(kernel, np.where(alone, 1.0, 1.0 / CPUS),
                                  np.where(alone, members / (CPUS - 1),
                                           (members + 1) / CPUS))
    s["overcommitted"] = s["procs_per_cpu"] > 1.0
    s["cpu_source"] = "cpuidle"
    per_member = s["system"].map({"aggbox": 0.6, "tcp_kack": 3.5, "tcp": 6.0, "udp": 4.5,
                                  "mcast": 2.5})
    s["cpu_us_per_op"] = (6.0 + per_member * members).round(2)
    s["root_cpu_us_per_op"] = (s["cpu_us_per_op"] * 0.4).round(2)
    s["members_cpu_us_per_op"] = (s["cpu_us_per_op"] * 0.5).round(2)
    grid = {**json.loads((src / META_FILE).read_text())["grid"],
            "placement": ["root-alone", "shared"]}
    meta = _meta(src, experiment="broadcast", workload="broadcast", run_id="20270101-000000-bc01",
                 systems=["aggbox", "tcp_kack", "tcp", "udp", "mcast"],
                 metrics=BROADCAST_METRICS, primary_metric="completion_us", grid=grid,
                 param_columns=["hosts", "size", "receivers", "placement", "loss"],
                 figures=["broadcast_latency", "broadcast_cdf", "broadcast_cpu"])
    return _write(results_dir, meta, s)


def allreduce_run(results_dir: Path) -> Path:
    src = DATA / "allreduce-reference"
    s = pd.read_parquet(src / SAMPLES_FILE).copy()
    s["promise"] = "app"
    server = (s["system"] == "tcp_ps").astype(float)  # the PS process must run too
    s["procs_per_cpu"] = (s["workers"] + server) / CPUS
    s["overcommitted"] = s["procs_per_cpu"] > 1.0
    s["cpu_source"] = "cpuidle"
    per_float = s["system"].map({"aggbox": 0.004, "gloo": 0.02, "tcp_ps": 0.012})
    s["cpu_us_per_op"] = (40 + per_float * s["floats"] * s["workers"]).round(1)
    s["workers_cpu_us_per_op"] = (s["cpu_us_per_op"] * 0.7).round(1)
    s["aggregator_cpu_us_per_op"] = np.where(s["system"] == "tcp_ps",
                                             (s["cpu_us_per_op"] * 0.25).round(1), np.nan)
    meta = _meta(src, run_id="20270101-000000-ar01", metrics=ALLREDUCE_METRICS,
                 figures=["allreduce_time", "allreduce_cpu"])
    return _write(results_dir, meta, s)


def mapreduce_run(results_dir: Path) -> Path:
    src = DATA / "mapreduce-reference"
    s = pd.read_parquet(src / SAMPLES_FILE).rename(columns={"reduce_s": "after_last_send_s"})
    s["promise"] = "app"
    s["procs_per_cpu"] = (s["mappers"] + s["reducers"]) / CPUS
    s["overcommitted"] = s["procs_per_cpu"] > 1.0
    s["cpu_source"] = "cpuidle"
    busy = s["system"].map({"aggbox": 1.1, "aggbox_nocombiner": 1.3, "tcp": 1.6,
                            "tcp_combiner": 1.4})
    s["cpu_us_per_op"] = (s.groupby(["cell", "system"])["job_s"].transform("median")
                          * busy * 1e6).round(0)
    s["mappers_cpu_us_per_op"] = (s["cpu_us_per_op"] * 0.6).round(0)
    s["reducers_cpu_us_per_op"] = (s["cpu_us_per_op"] * 0.3).round(0)
    meta = _meta(src, run_id="20270101-000000-mr01", metrics=MAPREDUCE_METRICS,
                 primary_metric="job_s",
                 figures=["mapreduce_speedup", "mapreduce_times", "mapreduce_cpu"])
    return _write(results_dir, meta, s)


TRAINING_METRICS = ["iter_ms", "comm_ms", "cpu_us_per_op", "test_accuracy", "test_loss", "loss"]


def training_run(results_dir: Path, old: bool = False) -> Path:
    """Made up from nothing (training has no reference run): digits and comm-heavy at 2
    and 4 ranks, 2 repetitions of 2 seeds, 30 steps each; ``old``: without the CPU and
    overcommit columns, as the old-format runs of the other workloads."""
    rng = np.random.default_rng(12)
    rows = []
    speed = {"gloo": 1.0, "gloo_fp16": 1.1, "aggbox": 0.7}
    for task in ("digits", "comm-heavy"):
        for workers in (2, 4):
            for rep in (0, 1):
                for seed in (1, 2):
                    for system, f in speed.items():
                        acc = 0.965 + rng.normal(0, 0.004)
                        base = (5.0 if task == "digits" else 200.0) * workers / 2 * f
                        for i in range(30):
                            rows.append({
                                "experiment": "training", "task": task, "workers": workers,
                                "cell": f"task={task},workers={workers},rep={rep}",
                                "repetition": rep, "system": system, "iter": i, "seed": seed,
                                "iter_ms": base * rng.lognormal(0, 0.05),
                                "comm_ms": 0.7 * base * rng.lognormal(0, 0.05),
                                "cpu_us_per_op": round(base * 1.6e3, 1),
                                "test_accuracy": acc if task == "digits" else np.nan,
                                "test_loss": 0.12 if task == "digits" else np.nan,
                                "loss": 2.3 * np.exp(-i / 10) + 0.05 * rng.random(),
                                "promise": "app", "procs_per_cpu": workers / CPUS,
                                "overcommitted": workers > CPUS, "cpu_source": "cpuidle"})
    frame = pd.DataFrame(rows)
    metrics = list(TRAINING_METRICS)
    if old:
        frame = frame.drop(columns=["cpu_us_per_op", "promise", "procs_per_cpu",
                                    "overcommitted", "cpu_source"])
        metrics.remove("cpu_us_per_op")
    meta = _meta(DATA / "allreduce-reference", experiment="training", workload="training",
                 run_id="20270101-000000-tr01", systems=["aggbox", "gloo", "gloo_fp16"],
                 metrics=metrics, primary_metric="iter_ms",
                 grid={"task": ["digits", "comm-heavy"], "workers": [2, 4]},
                 param_columns=["task", "workers"],
                 figures=["training_loss", "training_time", "training_cpu"])
    return _write(results_dir, meta, frame)


BUILDERS = {"broadcast": broadcast_run, "allreduce": allreduce_run, "mapreduce": mapreduce_run,
            "training": training_run}


def new_format_results(results_dir: Path) -> dict[str, Path]:
    """All three synthetic runs under ``results_dir``/<experiment>/<run-id>/."""
    return {name: build(results_dir) for name, build in BUILDERS.items()}


def old_format_results(results_dir: Path) -> dict[str, Path]:
    """The committed reference runs as they are (old columns), laid out as a results folder."""
    import shutil

    out = {}
    for name, folder in (("broadcast", "broadcast-synthetic"),
                         ("allreduce", "allreduce-reference"),
                         ("mapreduce", "mapreduce-reference")):
        meta = json.loads((DATA / folder / META_FILE).read_text())
        dest = Path(results_dir) / name / meta["run_id"]
        shutil.copytree(DATA / folder, dest)
        out[name] = dest
    # training has no run older than its columns: its current-format run stands in
    out["training"] = training_run(results_dir, old=True)
    return out
