"""What a run stores: each cell's samples as tidy rows, and the complete run's folder.

:func:`cell_frame` checks a workload's samples against the contract and makes them rows;
:func:`cell_affinity` records the CPUs a cell got; :func:`_finish` assembles
samples.parquet, summary.csv and meta.json, draws the figures and renames the run into
place (results/<experiment>/<run-id>/, ``latest`` pointing at it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
from rich.markup import escape

from aggbox import __version__
from aggbox.cpu import load_snapshot
from aggbox.errors import AggBoxError
from aggbox.experiment.grid import Cell
from aggbox.experiment.metadata import _now
from aggbox.experiment.plan import CELLS_DIR, STATE_FILE, Plan, _display_path
from aggbox.experiment.schema import Experiment, ExperimentError, Settings
from aggbox.results import (
    FORMAT_VERSION,
    LATEST_LINK,
    META_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    atomic_symlink,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_parquet,
    load_run,
    summarize,
    summary_group_columns,
)
from aggbox.workloads import registry


def _steal_between(before: dict, after: dict) -> float | None:
    """Seconds of CPU the hypervisor gave to others during the cell (all CPUs summed)."""
    if "steal_s" not in before or "steal_s" not in after:
        return None
    return round(after["steal_s"] - before["steal_s"], 3)


def cell_affinity(frame: pd.DataFrame, params: dict, backend: str) -> dict:
    """The CPUs a cell's processes were given: per system, every ``*_cpus`` column the
    workload put on its samples (what was applied, e.g. root_cpus, member_cpus). A workload
    that records none gets the launcher's plan for the cell's ``placement`` (marked
    ``planned``: what was asked for, not read back) or nothing."""
    columns = [c for c in frame.columns if c.endswith("_cpus")]
    if columns:
        applied: dict = {}
        for system, group in frame.groupby("system", sort=False):
            applied[str(system)] = {
                c: _one_or_all(group[c].dropna().astype(str).unique()) for c in columns
            }
        return {"source": "samples", "by_system": applied}
    if "placement" in params:
        from aggbox.workloads.launcher import cpu_placement

        first, rest = cpu_placement(backend, str(params["placement"]))
        return {
            "source": "planned",
            "placement": params["placement"],
            "first_cpus": first or "all",  # the root (broadcast) or reducers (mapreduce)
            "other_cpus": rest or "all",
        }
    return {"source": "none"}


def _one_or_all(values) -> str | list[str] | None:
    values = sorted(v or "all" for v in values)  # "": not pinned, every CPU
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cell_frame(experiment: Experiment, settings: Settings, cell: Cell, samples) -> pd.DataFrame:
    """A workload's samples as tidy rows.

    Columns: experiment, cell, repetition, every parameter, system, iter, the metrics, then
    whatever else the workload reported (e.g. ``delivered``).
    """
    where = f"workload {experiment.workload!r}, cell {cell.key}"
    if (
        not isinstance(samples, list)
        or not samples
        or not all(isinstance(s, dict) for s in samples)
    ):
        raise AggBoxError(
            f"{where}: expected a non-empty list of sample dicts, got {type(samples).__name__}"
        )
    frame = pd.DataFrame(samples)
    metrics = registry.METRICS.get(experiment.workload, [])
    missing = [c for c in ("system", "iter", *metrics) if c not in frame.columns]
    if missing:
        raise AggBoxError(f"{where}: samples lack column(s) {', '.join(missing)}")
    unknown = sorted(set(frame["system"]) - set(settings.systems))
    if unknown:
        raise AggBoxError(
            f"{where}: samples of systems not asked for: {', '.join(map(str, unknown))}"
        )
    for metric in metrics:
        try:
            frame[metric] = frame[metric].astype("float64")
        except (TypeError, ValueError) as exc:
            raise AggBoxError(f"{where}: metric {metric!r} is not numeric ({exc})") from None
    frame["iter"] = frame["iter"].astype("int64")
    params = cell.params
    fixed = {
        "experiment": experiment.name,
        "cell": cell.key,
        "repetition": cell.repetition,
        **params,
    }
    extra = [c for c in frame.columns if c not in fixed and c not in ("system", "iter", *metrics)]
    out = pd.DataFrame({k: [v] * len(frame) for k, v in fixed.items()})
    for column in ("system", "iter", *metrics, *extra):
        out[column] = frame[column].to_numpy()
    return out


def _finish(plan: Plan, state: dict, draw_figures: bool, console) -> Path:
    exp, settings = plan.experiment, plan.settings
    by_key = {c.key: c for c in plan.cells}
    files = sorted((plan.tmp_dir / CELLS_DIR).glob("*.parquet"))
    frames = {}
    for path in files:
        frame = pd.read_parquet(path)
        frames[frame["cell"].iloc[0]] = frame
    missing = [c.key for c in plan.cells if c.key not in frames]
    if missing:
        raise AggBoxError(f"run {plan.run_id}: cells not stored: {', '.join(missing)}")
    ordered = [frames[c.key] for c in sorted(by_key.values(), key=lambda c: c.index)]
    samples = pd.concat(ordered, ignore_index=True)
    atomic_write_parquet(plan.tmp_dir / SAMPLES_FILE, samples)

    param_columns = list(plan.cells[0].params)
    metrics = registry.METRICS.get(exp.workload, [])
    cells_meta = state.get("cells") or {}
    summary = summarize(samples, summary_group_columns({"param_columns": param_columns}), metrics)
    # summary.csv: one row per configuration and system; repetitions are pooled.
    atomic_write_csv(plan.tmp_dir / SUMMARY_FILE, summary)

    meta = {
        "format_version": FORMAT_VERSION,
        "experiment": exp.name,
        "description": exp.description,
        "run_id": plan.run_id,
        "complete": True,
        "mode": plan.mode,
        "workload": exp.workload,
        "systems": list(settings.systems),
        "skipped_systems": plan.skipped,
        "metrics": metrics,
        "primary_metric": registry.PRIMARY_METRIC.get(
            exp.workload, metrics[0] if metrics else None
        ),
        "figures": list(exp.figures),
        "grid": settings.params,
        "param_columns": param_columns,
        "defaults": dict(plan.cells[0].defaults),
        "iters": settings.iters,
        "warmup": settings.warmup,
        "repetitions": settings.repetitions,
        "seed": exp.seed,
        "cell_seeds": {c.key: c.seed for c in sorted(plan.cells, key=lambda c: c.index)},
        "cell_order": [c.key for c in plan.cells],
        "cell_seconds": state["cell_seconds"],
        # Per cell (grid order): testbed, load and steal before/after, CPU affinity, time.
        "cells": {
            c.key: cells_meta.get(c.key, {}) for c in sorted(plan.cells, key=lambda c: c.index)
        },
        "smoke": exp.smoke,
        # The first cell's testbed (every cell's is under "cells"), for older readers.
        "testbed": {"backend": plan.backend, "describe": state.get("testbed_describe")},
        "load": {"start": state.get("load_start"), "end": load_snapshot()},
        "machine": state["machine"],
        "git": state["git"],
        "versions": state["versions"],
        "aggbox_version": __version__,
        "command": state["command"],
        "experiment_file": state["experiment_file"],
        "experiment_text": state["experiment_text"],
        "started": state["started"],
        "resumed": state["resumed"],
        "finished": _now(),
    }
    atomic_write_json(plan.tmp_dir / META_FILE, meta)

    figures: list[Path] = []
    if draw_figures and exp.figures:
        from aggbox import plots

        try:
            figures = plots.draw(load_run(plan.tmp_dir), list(exp.figures))
        except Exception as exc:  # the data matter more than the pictures
            console.print(
                "[yellow]figures failed[/] "
                + escape(
                    f"({type(exc).__name__}: {exc}); redraw with: aggbox plot {plan.final_dir}"
                ),
                soft_wrap=True,
            )

    if plan.final_dir.exists():
        raise ExperimentError(f"{plan.final_dir} exists already; it is never overwritten")
    os.rename(plan.tmp_dir, plan.final_dir)
    shutil.rmtree(plan.final_dir / CELLS_DIR, ignore_errors=True)
    (plan.final_dir / STATE_FILE).unlink(missing_ok=True)
    atomic_symlink(plan.run_id, plan.exp_dir / LATEST_LINK)

    console.print(f"[green]done[/]: {len(samples)} samples in {len(plan.cells)} cells")
    latest = _display_path(plan.exp_dir / LATEST_LINK)
    console.print(
        f"results: {_display_path(plan.final_dir)}  (also {latest})", soft_wrap=True, markup=False
    )
    for path in figures:
        console.print(
            f"figure:  {_display_path(plan.final_dir / path.name)}", soft_wrap=True, markup=False
        )
    return plan.final_dir
