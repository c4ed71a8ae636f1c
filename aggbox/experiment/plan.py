"""What a run will do before it starts: a new run, or one resumed from its ``.tmp-<run-id>/``.

:func:`prepare` touches nothing: it reads a resumed run's state and its stored cells and
returns a :class:`Plan` (cells in run order, those already done); :func:`print_plan` is
the ``--dry-run`` view.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aggbox import RESULTS_DIR
from aggbox.experiment.grid import Cell, estimate_seconds, expand, shuffled
from aggbox.experiment.schema import (
    TESTBEDS,
    Experiment,
    ExperimentError,
    Settings,
    parse_experiment,
)
from aggbox.workloads import registry

STATE_FILE = "run.json"  # inside .tmp-<run-id>/: what a resume needs


CELLS_DIR = "cells"  # inside .tmp-<run-id>/: one parquet file per finished cell


TMP_PREFIX = ".tmp-"


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class Plan:
    """A run about to start or be resumed: what to run and where it goes."""

    experiment: Experiment
    full: bool
    backend: str
    run_id: str
    results_dir: Path
    cells: list[Cell]  # in run order
    done: set[str]  # keys of cells already stored (resume)
    state: dict | None  # the stored run.json of a resumed run
    experiment_arg: str  # how the user named the experiment (for the resume hint)

    @property
    def mode(self) -> str:
        return "full" if self.full else "quick"

    @property
    def settings(self) -> Settings:
        """The mode's settings, without the systems this machine cannot run (see
        :attr:`skipped`)."""
        settings = self.experiment.settings(self.full)
        skipped = self.skipped
        if not skipped:
            return settings
        return replace(settings, systems=tuple(s for s in settings.systems if s not in skipped))

    @property
    def skipped(self) -> dict[str, str]:
        """Systems left out because the controller's Python lacks what they need (netns
        hosts run that Python; docker and ansible hosts bring their own), with why."""
        if self.backend != "netns":
            return {}
        return registry.unavailable(self.experiment.workload,
                                    list(self.experiment.settings(self.full).systems))

    @property
    def exp_dir(self) -> Path:
        return self.results_dir / self.experiment.name

    @property
    def tmp_dir(self) -> Path:
        return self.exp_dir / f"{TMP_PREFIX}{self.run_id}"

    @property
    def final_dir(self) -> Path:
        return self.exp_dir / self.run_id

    @property
    def remaining(self) -> list[Cell]:
        return [c for c in self.cells if c.key not in self.done]

    def resume_command(self) -> str:
        out = "" if self.results_dir == RESULTS_DIR else f" --out {self.results_dir}"
        return f"aggbox run {self.experiment_arg} --resume {self.run_id}{out}"


def prepare(
    experiment: Experiment,
    *,
    full: bool | None = None,
    results_dir: str | Path = RESULTS_DIR,
    resume: str | None = None,
    testbed: str | None = None,
    experiment_arg: str | None = None,
) -> Plan:
    """Work out what a run (new, or resumed from ``.tmp-<resume>``) will do; touches nothing."""
    results_dir = Path(results_dir)
    experiment_arg = experiment_arg or str(experiment.path)
    state = None
    if resume:
        exp_dir = results_dir / experiment.name
        if (exp_dir / resume).exists():
            raise ExperimentError(
                f"run {resume} is complete ({exp_dir / resume}); nothing to resume"
            )
        tmp_dir = exp_dir / f"{TMP_PREFIX}{resume}"
        state_path = tmp_dir / STATE_FILE
        if not state_path.is_file():
            found = sorted(p.name[len(TMP_PREFIX) :] for p in exp_dir.glob(f"{TMP_PREFIX}*"))
            hint = f"resumable runs: {', '.join(found)}" if found else "there is no unfinished run"
            raise ExperimentError(
                f"no unfinished run {resume} of {experiment.name!r} in {exp_dir}; {hint}"
            )
        state = json.loads(state_path.read_text())
        stored_mode_full = state["mode"] == "full"
        if full is not None and full != stored_mode_full:
            raise ExperimentError(
                f"run {resume} was started in {state['mode']} mode; resume it "
                + ("with --full" if stored_mode_full else "without --full")
            )
        if testbed is not None and testbed != state["testbed"]:
            raise ExperimentError(
                f"run {resume} was started on testbed {state['testbed']!r}; resume it there"
            )
        if state["experiment_text"] != experiment.text:
            print(
                f"aggbox: note: {experiment.path} changed since run {resume} started; "
                "resuming with the experiment as it was then",
                file=sys.stderr,
            )
            experiment = parse_experiment(state["experiment_text"], experiment.path)
        full, backend, run_id = stored_mode_full, state["testbed"], resume
        done = {_key_of_cell_file(p) for p in (tmp_dir / CELLS_DIR).glob("*.parquet")}
    else:
        full = bool(full)
        backend = testbed or experiment.testbed
        if backend not in TESTBEDS:
            raise ExperimentError(
                f"unknown testbed {backend!r}; expected one of {', '.join(TESTBEDS)}"
            )
        run_id = new_run_id()
        done = set()
    cells = shuffled(expand(experiment, full), experiment.seed)
    plan = Plan(experiment, full, backend, run_id, results_dir, cells, done, state, experiment_arg)
    if plan.skipped and not plan.settings.systems:
        reasons = sorted(set(plan.skipped.values()))
        raise ExperimentError(f"{experiment.name}: no system can run here: {'; '.join(reasons)}")
    return plan


def _key_of_cell_file(path: Path) -> str:
    return pd.read_parquet(path, columns=["cell"])["cell"].iloc[0]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def print_plan(plan: Plan, console=None) -> None:
    """The ``--dry-run`` view: every cell in run order with its estimated time."""
    console = console or Console()
    exp, settings = plan.experiment, plan.settings
    model = registry.cost_model(exp.workload)
    grid = " x ".join(f"{k} [{', '.join(map(str, v))}]" for k, v in settings.params.items())
    remaining = plan.remaining
    total = estimate_seconds(exp, remaining, plan.full)
    configurations = len(plan.cells) // settings.repetitions
    output = plan.exp_dir / (plan.run_id if plan.state else "<run-id>")
    lines = [
        f"[bold]{escape(exp.name)}[/]"
        + (f": {escape(exp.description)}" if exp.description else ""),
        f"  mode      {plan.mode}" + ("" if plan.full else " (--full for the full grid)"),
        f"  workload  {exp.workload}; systems {', '.join(settings.systems)}"
        + "".join(f"\n  skipped   {k}: {v}" for k, v in plan.skipped.items()),
        f"  grid      {escape(grid)}",
        f"  cells     {len(plan.cells)} = {configurations} configurations"
        f" x {settings.repetitions} repetition(s)"
        + (" (smoke: a pipeline check, not a measurement)" if exp.smoke else ""),
        f"  each      {settings.iters} iterations after {settings.warmup} warm-up, per system",
        f"  testbed   {plan.backend}",
        f"  output    {_display_path(output)}",
    ]
    if plan.state:
        lines.append(f"  resuming  {len(plan.done)} cells done, {len(remaining)} to go")
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    table = Table(box=None, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("cell (in run order)")
    table.add_column("seed", justify="right")
    table.add_column("estimate", justify="right")
    for n, cell in enumerate(plan.cells, 1):
        est = model.seconds(cell.params, list(settings.systems), settings.iters, settings.warmup)
        status = "done" if cell.key in plan.done else format_duration(est)
        table.add_row(str(n), cell.key, str(cell.seed), status)
    console.print(table)
    console.print(
        f"estimated time: ~{format_duration(total)} (rough; the progress bar corrects it)",
        highlight=False,
    )


def _display_path(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
