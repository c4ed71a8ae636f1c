"""The run loop: one fresh testbed per cell, each finished cell stored at once.

:func:`execute` runs a plan's remaining cells in run order, writing each cell's samples and
the run's state (``run.json``) as soon as the cell is done; Ctrl-C and SIGTERM raise
:class:`RunInterrupted`, keeping the finished cells for ``--resume``. A run whose every
cell is stored is assembled and renamed into place by :mod:`aggbox.experiment.store`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from aggbox import RESULTS_DIR
from aggbox.cpu import load_snapshot
from aggbox.errors import AggBoxError, SetupError
from aggbox.experiment.grid import Cell
from aggbox.experiment.metadata import _now, git_info, machine_info, versions
from aggbox.experiment.plan import (
    CELLS_DIR,
    STATE_FILE,
    Plan,
    _display_path,
    format_duration,
    prepare,
)
from aggbox.experiment.schema import Experiment, ExperimentError, load_experiment
from aggbox.experiment.store import _finish, _steal_between, cell_affinity, cell_frame
from aggbox.results import (
    atomic_write_json,
    atomic_write_parquet,
)
from aggbox.workloads import registry

TestbedFactory = Callable[[str, dict, str], object]


class RunInterrupted(AggBoxError):
    """Ctrl-C or SIGTERM stopped a run; its finished cells are kept for ``--resume``."""

    def __init__(self, message: str, run_id: str, tmp_dir: Path, resume_command: str):
        super().__init__(message)
        self.run_id = run_id
        self.tmp_dir = tmp_dir
        self.resume_command = resume_command


def default_testbed_factory(backend: str, params: dict, run_id: str):
    """The real testbeds (``aggbox.testbed.make_testbed``), imported when first needed."""
    try:
        from aggbox.testbed import make_testbed
    except ImportError as exc:
        raise SetupError(f"the testbed backends are not available ({exc})") from exc
    return make_testbed(backend, params, run_id)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run the way Ctrl-C does (finished cells kept, resumable)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_experiment(
    experiment: Experiment | str | Path,
    *,
    full: bool | None = None,
    results_dir: str | Path = RESULTS_DIR,
    resume: str | None = None,
    testbed: str | None = None,
    testbed_factory: TestbedFactory | None = None,
    progress: bool = True,
    draw_figures: bool = True,
    console=None,
) -> Path:
    """Run (or resume) ``experiment``; return the complete run's folder.

    Raises :class:`RunInterrupted` on Ctrl-C / SIGTERM, keeping the finished cells.
    """
    if not isinstance(experiment, Experiment):
        experiment = load_experiment(experiment)
    plan = prepare(experiment, full=full, results_dir=results_dir, resume=resume, testbed=testbed)
    return execute(
        plan,
        testbed_factory=testbed_factory,
        progress=progress,
        draw_figures=draw_figures,
        console=console,
    )


def execute(
    plan: Plan,
    *,
    testbed_factory: TestbedFactory | None = None,
    progress: bool = True,
    draw_figures: bool = True,
    console=None,
) -> Path:
    """Run the plan's remaining cells, then assemble, summarize, plot and rename into place."""
    console = console or Console()
    # Looked up on the package, as when this was one module: replacing
    # aggbox.experiment.default_testbed_factory (tests do) still takes effect.
    from aggbox import experiment

    factory = testbed_factory or experiment.default_testbed_factory
    workload = registry.get_workload(plan.experiment.workload)  # fail before creating anything
    if plan.final_dir.exists():
        raise ExperimentError(f"{plan.final_dir} exists already; it is never overwritten")

    state = plan.state or _new_state(plan)
    if plan.state is None:
        plan.exp_dir.mkdir(parents=True, exist_ok=True)
        (plan.tmp_dir / CELLS_DIR).mkdir(parents=True)
    else:
        state["resumed"].append(_now())
    atomic_write_json(plan.tmp_dir / STATE_FILE, state)

    try:
        with _sigterm_as_interrupt():
            _run_cells(plan, state, workload, factory, progress, console)
            return _finish(plan, state, draw_figures, console)
    except KeyboardInterrupt:
        finished = len(list((plan.tmp_dir / CELLS_DIR).glob("*.parquet")))
        raise RunInterrupted(
            f"interrupted: {finished} of {len(plan.cells)} cells finished, kept in "
            f"{plan.tmp_dir}\nresume with: {plan.resume_command()}",
            plan.run_id,
            plan.tmp_dir,
            plan.resume_command(),
        ) from None
    except Exception:
        if plan.tmp_dir.exists():
            console.print(
                f"[red]run {plan.run_id} failed[/]; "
                + escape(
                    f"finished cells are kept in {plan.tmp_dir}; "
                    f"after fixing the cause, resume with: {plan.resume_command()}"
                ),
                soft_wrap=True,
            )
        raise


def _new_state(plan: Plan) -> dict:
    exp = plan.experiment
    return {
        "run_id": plan.run_id,
        "experiment": exp.name,
        "experiment_file": _display_path(exp.path),
        "experiment_text": exp.text,
        "mode": plan.mode,
        "testbed": plan.backend,
        "command": " ".join(sys.argv),
        "started": _now(),
        "resumed": [],
        "machine": machine_info(),
        "git": git_info(),
        "versions": versions(),
        "load_start": load_snapshot(),
        "testbed_describe": None,  # the first cell's, for readers of meta["testbed"]
        "cell_seconds": {},
        "cells": {},  # cell key -> what ran it: see _run_cell
    }


def _run_cells(plan, state, workload, factory, progress, console) -> None:
    settings = plan.settings
    model = registry.cost_model(plan.experiment.workload)
    todo = plan.remaining
    if not todo:
        return

    def estimate(cell: Cell) -> float:
        return model.seconds(cell.params, list(settings.systems), settings.iters, settings.warmup)

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[cells]}"),
        TimeElapsedColumn(),
        _EtaColumn(),
    )
    bar = Progress(*columns, console=console, disable=not progress, transient=False)
    done_s = 0.0
    with bar:
        task = bar.add_task(
            f"{plan.experiment.name} {plan.run_id}",
            total=sum(estimate(c) for c in todo),
            cells=f"0/{len(todo)} cells",
            done_s=0.0,
            last=time.monotonic(),
        )
        for n, cell in enumerate(todo, 1):
            started = time.monotonic()
            frame, record = _run_cell(plan, state, cell, workload, factory)
            atomic_write_parquet(plan.tmp_dir / CELLS_DIR / cell.file_name, frame)
            seconds = time.monotonic() - started
            done_s += seconds
            state["cell_seconds"][cell.key] = round(seconds, 3)
            state.setdefault("cells", {})[cell.key] = {**record, "seconds": round(seconds, 3)}
            atomic_write_json(plan.tmp_dir / STATE_FILE, state)
            bar.update(
                task,
                advance=estimate(cell),
                cells=f"{n}/{len(todo)} cells",
                done_s=done_s,
                last=time.monotonic(),
            )
            bar.console.print(
                f"cell {n}/{len(todo)} {cell.key}: {len(frame)} samples, {seconds:.1f} s",
                soft_wrap=True,
                markup=False,
            )


def _run_cell(plan: Plan, state: dict, cell: Cell, workload, factory) -> tuple[pd.DataFrame, dict]:
    """Run one cell on a fresh testbed: its samples, and the record meta.json keeps of it
    (the testbed as described, the machine's load and steal time before and after, and the
    CPU affinity its processes got), so that a disturbed cell can be told apart."""
    settings = plan.settings
    record: dict = {
        "repetition": cell.repetition,
        "seed": cell.seed,
        "started": _now(),
        "load_before": load_snapshot(),
    }
    testbed = factory(plan.backend, cell.params, plan.run_id)
    with testbed as live:
        try:
            record["testbed"] = live.describe()
        except Exception as exc:  # metadata must never stop a run
            record["testbed"] = {"backend": plan.backend, "error": str(exc)}
        if state.get("testbed_describe") is None:
            state["testbed_describe"] = record["testbed"]
        samples = workload(
            live, cell.params, list(settings.systems), settings.iters, settings.warmup, cell.seed
        )
    record["load_after"] = load_snapshot()
    record["steal_s"] = _steal_between(record["load_before"], record["load_after"])
    frame = cell_frame(plan.experiment, settings, cell, samples)
    record["affinity"] = cell_affinity(frame, cell.params, plan.backend)
    return frame, record


class _EtaColumn(ProgressColumn):
    """Remaining time: the cost model's estimate, scaled by how fast cells really went."""

    def render(self, task) -> Text:
        if task.total is None or task.finished:
            return Text("")
        done_s, last = task.fields["done_s"], task.fields["last"]
        left = task.total - task.completed
        if task.completed > 0:
            eta = done_s / task.completed * left - (time.monotonic() - last)
        else:
            eta = left - (task.elapsed or 0.0)
        return Text(f"ETA {format_duration(max(eta, 0.0))}", style="progress.remaining")
