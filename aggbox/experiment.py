"""Run a declared matrix of (workload x systems x parameters) and store it under results/.

An experiment file (``experiments/<name>.yaml``) declares a workload, the systems to
compare, a parameter grid, iterations and the figures to draw; see
``experiments/broadcast.yaml``. This module reads and checks it (:func:`load_experiment`),
expands the grid into cells (:func:`expand`), and runs them (:func:`run_experiment`): one
fresh testbed per cell, cells in a seeded shuffled order, each finished cell stored at once
so that an interrupted run can be resumed, and the whole run renamed into place only when
complete (DESIGN.md section 7).

``aggbox run experiments/<name>.yaml [--full] [--dry-run] [--resume RUN_ID]``
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from aggbox import RESULTS_DIR, ROOT, __version__
from aggbox.cpu import USER_HZ, MachineCpu, load_snapshot
from aggbox.errors import AggBoxError, SetupError
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

EXPERIMENTS_DIR = ROOT / "experiments"
TESTBEDS = ("netns", "docker", "ansible")
STATE_FILE = "run.json"  # inside .tmp-<run-id>/: what a resume needs
CELLS_DIR = "cells"  # inside .tmp-<run-id>/: one parquet file per finished cell
TMP_PREFIX = ".tmp-"

TestbedFactory = Callable[[str, dict, str], object]

#: Every cell runs at least this many times, each on a fresh testbed, so that run-to-run
#: variance (placement, caches, the other tenants of the machine) shows in the results.
MIN_REPETITIONS = {"quick": 3, "full": 5}


class ExperimentError(AggBoxError):
    """An experiment file is wrong; the message names the file, the line and what is expected."""


class RunInterrupted(AggBoxError):
    """Ctrl-C or SIGTERM stopped a run; its finished cells are kept for ``--resume``."""

    def __init__(self, message: str, run_id: str, tmp_dir: Path, resume_command: str):
        super().__init__(message)
        self.run_id = run_id
        self.tmp_dir = tmp_dir
        self.resume_command = resume_command


# ============================================================================ the experiment


@dataclass(frozen=True)
class Settings:
    """What one mode (quick or full) of an experiment runs."""

    systems: tuple[str, ...]
    params: dict[str, list]  # axis -> values, in the file's order
    iters: int
    warmup: int
    repetitions: int


@dataclass(frozen=True)
class Experiment:
    """A checked experiment file."""

    path: Path
    text: str
    name: str
    workload: str
    systems: tuple[str, ...]
    params: dict[str, list]
    iters: int
    description: str = ""
    testbed: str = "netns"
    warmup: int = 0
    repetitions: int | None = None  # None: the mode's floor (MIN_REPETITIONS; smoke: 1)
    seed: int = 1
    quick: dict = field(default_factory=dict)
    figures: tuple[str, ...] = ()
    smoke: bool = False  # a check of the pipeline, not a measurement: no repetition floor

    def settings(self, full: bool = False) -> Settings:
        """Full mode uses the top-level values; quick mode (the default) applies ``quick:``."""
        over = {} if full else self.quick
        default_reps = 1 if self.smoke else MIN_REPETITIONS["full" if full else "quick"]
        return Settings(
            systems=tuple(over.get("systems", self.systems)),
            params={**self.params, **over.get("params", {})},
            iters=over.get("iters", self.iters),
            warmup=over.get("warmup", self.warmup),
            repetitions=over.get(
                "repetitions", default_reps if self.repetitions is None else self.repetitions
            ),
        )


# The schema: key -> (expected, required). "expected" is what an error message says.
_TOP_KEYS = {
    "name": ("a name of letters, digits, '-', '_' or '.'", True),
    "description": ("a string", False),
    "workload": ("a workload name", True),
    "systems": ("a non-empty list of system names", True),
    "testbed": ("one of " + ", ".join(TESTBEDS), False),
    "params": ("a mapping of parameter name -> list of values", True),
    "iters": ("an integer >= 1", True),
    "warmup": ("an integer >= 0", False),
    "repetitions": (f"an integer >= {MIN_REPETITIONS['full']} (full mode)", False),
    "seed": ("an integer", False),
    "quick": ("a mapping of overrides for quick mode", False),
    "figures": ("a list of figure names", False),
    "smoke": ("true or false (true: a pipeline check, not a measurement)", False),
}
_QUICK_KEYS = ("systems", "params", "iters", "warmup", "repetitions")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Checker:
    """Knows the line of every key and list item, and raises errors that point at them."""

    def __init__(self, path: Path, root: yaml.Node):
        self.path = path
        self.lines: dict[tuple, int] = {(): root.start_mark.line + 1}
        self._walk(root, ())

    def _walk(self, node: yaml.Node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    self.fail_at(line, "a key must be a plain name")
                key = key_node.value
                if key in seen:
                    self.fail_at(line, f"key {key!r} appears twice; keep one")
                seen.add(key)
                self.lines[(*prefix, key)] = line
                self._walk(value_node, (*prefix, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*prefix, i)] = item.start_mark.line + 1
                self._walk(item, (*prefix, i))

    def line(self, where: tuple) -> int:
        while where not in self.lines:
            where = where[:-1]
        return self.lines[where]

    def fail_at(self, line: int, message: str) -> None:
        raise ExperimentError(f"{self.path}:{line}: {message}")

    def fail(self, where: tuple, message: str) -> None:
        self.fail_at(self.line(where), message)

    def unknown_keys(self, mapping: dict, allowed, where: tuple, what: str) -> None:
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(
                    (*where, key),
                    f"unknown key {key!r} in {what}{hint}; expected one of: {', '.join(allowed)}",
                )

    def integer(
        self, data: dict, key: str, where: tuple, minimum: int | None, why: str = ""
    ) -> None:
        if key not in data:
            return
        value = data[key]
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            self.fail((*where, key), f"{key} is {value!r}; expected an integer{bound}{why}")

    def name_list(self, data: dict, key: str, where: tuple, known: list[str] | None, what: str):
        value = data.get(key)
        if not isinstance(value, list) or not value:
            self.fail((*where, key), f"{key} is {value!r}; expected a non-empty list of {what}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail((*where, key, i), f"{key}[{i}] is {item!r}; expected a {what[:-1]} name")
            if known and item not in known:
                self.fail(
                    (*where, key, i),
                    f"unknown {what[:-1]} {item!r}; expected one of: {', '.join(known)}",
                )
        if len(set(value)) != len(value):
            self.fail((*where, key), f"{key} lists a {what[:-1]} twice")

    def grid(self, params: object, where: tuple, workload: str, complete: bool) -> dict[str, list]:
        if not isinstance(params, dict) or not params:
            self.fail(where, f"params is {params!r}; expected {_TOP_KEYS['params'][0]}")
        schema = registry.PARAMS.get(workload) or {}
        grid: dict[str, list] = {}
        for name, values in params.items():
            at = (*where, name)
            if schema and name not in schema:
                self.fail(
                    at,
                    f"workload {workload!r} has no parameter {name!r}; its parameters: "
                    + ", ".join(f"{k} ({p.describe()})" for k, p in schema.items()),
                )
            values = values if isinstance(values, list) else [values]
            if not values:
                self.fail(at, f"params.{name} is an empty list; give at least one value")
            for i, value in enumerate(values):
                if schema:
                    expected = schema[name].check(value)
                elif isinstance(value, str | int | float | bool):
                    expected = None
                else:
                    expected = "a number or a string"
                if expected:
                    self.fail((*at, i), f"params.{name} value {value!r}; expected {expected}")
            if len(set(map(repr, values))) != len(values):
                self.fail(at, f"params.{name} lists a value twice")
            grid[name] = values
        if complete:
            missing = [k for k, p in schema.items() if p.required and k not in grid]
            if missing:
                self.fail(where, f"params lacks {', '.join(missing)} (required by {workload!r})")
        return grid


def parse_experiment(text: str, path: str | Path = "<experiment>") -> Experiment:
    """Check the experiment in ``text`` (read from ``path``, named in errors)."""
    path = Path(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ExperimentError(f"{path}:{line}: not valid YAML: {problem}") from None
    if root is None or not isinstance(data, dict):
        raise ExperimentError(f"{path}:1: expected a mapping of experiment keys (name:, ...)")
    check = _Checker(path, root)
    check.unknown_keys(data, list(_TOP_KEYS), (), "the experiment")
    for key, (expected, required) in _TOP_KEYS.items():
        if required and key not in data:
            check.fail((), f"the experiment lacks {key!r}: {expected}")

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        check.fail(("name",), f"name is {name!r}; expected {_TOP_KEYS['name'][0]}")
    for key in ("description", "workload"):
        if key in data and not isinstance(data[key], str):
            check.fail((key,), f"{key} is {data[key]!r}; expected a string")
    workload = data["workload"]
    if workload not in registry.WORKLOADS:
        check.fail(
            ("workload",),
            f"unknown workload {workload!r}; expected one of: "
            + ", ".join(sorted(registry.WORKLOADS)),
        )
    known_systems = registry.SYSTEMS.get(workload) or None
    check.name_list(data, "systems", (), known_systems, "systems")
    testbed = data.get("testbed", "netns")
    if testbed not in TESTBEDS:
        check.fail(("testbed",), f"testbed is {testbed!r}; expected one of: {', '.join(TESTBEDS)}")
    smoke = data.get("smoke", False)
    if not isinstance(smoke, bool):
        check.fail(("smoke",), f"smoke is {smoke!r}; expected {_TOP_KEYS['smoke'][0]}")
    check.integer(data, "iters", (), 1)
    check.integer(data, "warmup", (), 0)
    check.integer(
        data,
        "repetitions",
        (),
        1 if smoke else MIN_REPETITIONS["full"],
        "" if smoke else _repetitions_why("full"),
    )
    check.integer(data, "seed", (), None)
    params = check.grid(data["params"], ("params",), workload, complete=True)

    quick = data.get("quick") or {}
    if not isinstance(quick, dict):
        check.fail(("quick",), f"quick is {quick!r}; expected {_TOP_KEYS['quick'][0]}")
    check.unknown_keys(quick, list(_QUICK_KEYS), ("quick",), "quick")
    if "systems" in quick:
        check.name_list(quick, "systems", ("quick",), known_systems, "systems")
    check.integer(quick, "iters", ("quick",), 1)
    check.integer(quick, "warmup", ("quick",), 0)
    check.integer(
        quick,
        "repetitions",
        ("quick",),
        1 if smoke else MIN_REPETITIONS["quick"],
        "" if smoke else _repetitions_why("quick"),
    )
    if "params" in quick:
        quick = {
            **quick,
            "params": check.grid(quick["params"], ("quick", "params"), workload, False),
        }

    figures = data.get("figures", [])
    if figures:
        from aggbox.plots import FIGURES  # matplotlib: only when figures are named

        check.name_list(data, "figures", (), sorted(FIGURES), "figures")

    return Experiment(
        path=path,
        text=text,
        name=name,
        description=data.get("description", ""),
        workload=workload,
        systems=tuple(data["systems"]),
        testbed=testbed,
        params=params,
        iters=data["iters"],
        warmup=data.get("warmup", 0),
        repetitions=data.get("repetitions"),
        seed=data.get("seed", 1),
        quick=quick,
        figures=tuple(figures),
        smoke=smoke,
    )


def _repetitions_why(mode: str) -> str:
    where = "" if mode == "full" else " under quick:"
    return (
        f" in {mode} mode{where}: every cell runs at least {MIN_REPETITIONS[mode]} times, each"
        " on a fresh testbed, so that run-to-run variance shows in the confidence intervals"
        f" (leave repetitions out for {MIN_REPETITIONS[mode]}, or set smoke: true for a"
        " pipeline check that is not a measurement)"
    )


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExperimentError(f"cannot read experiment file {path}: {exc.strerror}") from None
    return parse_experiment(text, path)


def resolve_experiment_path(arg: str | Path) -> Path:
    """``experiments/x.yaml``, or just ``x`` for ``experiments/x.yaml``."""
    path = Path(arg)
    if path.is_file():
        return path
    candidate = EXPERIMENTS_DIR / f"{arg}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))) or "(none)"
    raise ExperimentError(f"no experiment file {arg}; experiments in {EXPERIMENTS_DIR}: {known}")


# ============================================================================ cells


@dataclass(frozen=True)
class Cell:
    """One point of the grid, one repetition: one call of the workload on a fresh testbed."""

    index: int  # position in the unshuffled grid (the order of samples.parquet)
    axes: tuple[tuple[str, object], ...]  # the grid's values for this cell, in the file's order
    defaults: tuple[tuple[str, object], ...]  # workload defaults for parameters not in the grid
    repetition: int
    seed: int

    @property
    def params(self) -> dict:
        """What the workload and the testbed factory get: the grid values plus defaults."""
        return dict(self.axes) | dict(self.defaults)

    @property
    def config(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.axes)

    @property
    def key(self) -> str:
        """Names the cell in samples (column ``cell``), in file names and for ``--resume``."""
        return f"{self.config},rep={self.repetition}"

    @property
    def file_name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9=.-]+", "_", self.key)[:120]
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:8]
        return f"{slug}-{digest}.parquet"


def cell_seed(experiment_seed: int, key: str) -> int:
    """A cell's seed depends on the experiment's seed and the cell, never on run order."""
    digest = hashlib.sha256(f"{experiment_seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def expand(experiment: Experiment, full: bool = False) -> list[Cell]:
    """The cross product of the mode's parameter grid, times its repetitions, in grid order."""
    settings = experiment.settings(full)
    schema = registry.PARAMS.get(experiment.workload) or {}
    defaults = tuple(
        (k, p.default) for k, p in schema.items() if not p.required and k not in settings.params
    )
    names = list(settings.params)
    cells = []
    for values in itertools.product(*settings.params.values()):
        for rep in range(settings.repetitions):
            axes = tuple(zip(names, values, strict=True))
            key = Cell(0, axes, defaults, rep, 0).key
            seed = cell_seed(experiment.seed, key)
            cells.append(Cell(len(cells), axes, defaults, rep, seed))
    return cells


def shuffled(cells: list[Cell], seed: int) -> list[Cell]:
    """Run order: shuffled (so drift over time does not line up with a parameter), seeded."""
    order = list(cells)
    random.Random(seed).shuffle(order)
    return order


def estimate_seconds(experiment: Experiment, cells: list[Cell], full: bool = False) -> float:
    settings = experiment.settings(full)
    model = registry.cost_model(experiment.workload)
    return sum(
        model.seconds(c.params, list(settings.systems), settings.iters, settings.warmup)
        for c in cells
    )


# ============================================================================ the plan


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
        return self.experiment.settings(self.full)

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
    return Plan(experiment, full, backend, run_id, results_dir, cells, done, state, experiment_arg)


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
        f"  workload  {exp.workload}; systems {', '.join(settings.systems)}",
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


# ============================================================================ running


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
    factory = testbed_factory or default_testbed_factory
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


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


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


# ============================================================================ machine metadata


def _run_quietly(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine_info() -> dict:
    uname = platform.uname()
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    config_hz, hz_source = kernel_hz()
    return {
        "hostname": socket.gethostname(),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "arch": uname.machine,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "runner_cpus": sorted(os.sched_getaffinity(0)),
        # The scheduler tick (CONFIG_HZ) sets how long a preempted process waits for its
        # turn; USER_HZ is the unit of /proc/stat, the CPU meter's fallback.
        "config_hz": config_hz,
        "config_hz_source": hz_source,
        "user_hz": USER_HZ,
        "cpu_meter": cpu_meter_source(),
    }


def kernel_hz() -> tuple[int | None, str | None]:
    """CONFIG_HZ of the running kernel and the file it was read from; None where unreadable."""
    import gzip

    candidates = [
        (Path("/proc/config.gz"), gzip.open),
        (Path(f"/boot/config-{platform.release()}"), open),
    ]
    for path, opener in candidates:
        try:
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1]), str(path)
        except (OSError, ValueError, EOFError):
            continue
    return None, None


def cpu_meter_source() -> str | None:
    """What aggbox.cpu.MachineCpu measures with here: "cpuidle" (exact) or "proc_stat"."""
    try:
        with MachineCpu() as meter:
            return meter.source
    except Exception:  # metadata must never stop a run
        return None


def git_info() -> dict:
    revision = _run_quietly(["git", "rev-parse", "HEAD"], cwd=ROOT)
    status = _run_quietly(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    """Versions of what shapes the numbers; None where absent (never an error)."""
    from importlib import metadata

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    clang = _run_quietly(["clang", "--version"])
    return {
        "python": platform.python_version(),
        "aggbox": __version__,
        "bcc": dist("bcc"),
        "clang": clang.splitlines()[0] if clang else None,
        "torch": dist("torch"),
        "numpy": dist("numpy"),
        "pandas": dist("pandas"),
        "pyarrow": dist("pyarrow"),
    }


def _display_path(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ============================================================================ the command


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run an experiment file into results/",
        description="Run the cells of an experiment (quick mode unless --full) and store "
        "samples, summary, metadata and figures in results/<experiment>/<run-id>/.",
    )
    p.add_argument("experiment", help="experiments/<name>.yaml, or just <name>")
    p.add_argument(
        "--full", action="store_true", default=None, help="the full grid (default: quick)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the cells and an estimated time")
    p.add_argument("--resume", metavar="RUN_ID", help="finish an interrupted run")
    p.add_argument("--testbed", choices=TESTBEDS, help="override the experiment's testbed")
    p.add_argument(
        "--inventory",
        type=Path,
        help="Ansible inventory of the hosts (--testbed ansible; see playbooks/README.md)",
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results folder (default: results/)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument(
        "--no-plots", action="store_true", help="skip the figures (aggbox plot draws them later)"
    )
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    experiment = load_experiment(resolve_experiment_path(args.experiment))
    plan = prepare(
        experiment,
        full=args.full,
        results_dir=args.out,
        resume=args.resume,
        testbed=args.testbed,
        experiment_arg=args.experiment,
    )
    if args.dry_run:
        print_plan(plan)
        return 0
    if (plan.backend == "ansible") != (args.inventory is not None):
        raise ExperimentError(
            "--inventory goes with the ansible testbed: aggbox run EXPERIMENT "
            "--testbed ansible --inventory INVENTORY"
        )
    try:
        with _testbed_session(plan, args.inventory) as factory:
            execute(
                plan,
                testbed_factory=factory,
                progress=not args.no_progress,
                draw_figures=not args.no_plots,
            )
    except RunInterrupted as exc:
        print(f"aggbox: {exc}", file=sys.stderr)
        return 130
    return 0


@contextmanager
def _testbed_session(plan: Plan, inventory: Path | None) -> Iterator[TestbedFactory | None]:
    """What a run's cells share: for ansible, one provisioned and deployed set of hosts
    (torn down at the end); the other backends need nothing (None: the default factory)."""
    if plan.backend != "ansible":
        yield None
        return
    from aggbox.testbed.ansible import AnsibleSession

    # The nodes' raw output comes back into the run's folder (hosts/<host>/<cell>/...).
    with AnsibleSession(inventory, fetch_dir=(plan.tmp_dir / "hosts").resolve()) as session:
        yield session.factory
