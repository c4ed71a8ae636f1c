"""What a valid experiment file is: the schema, its checker, and the checked Experiment.

:func:`parse_experiment` and :func:`load_experiment` read a file and raise
:class:`ExperimentError` naming the file, the line and what is expected;
:meth:`Experiment.settings` is what one mode (quick or full) runs.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aggbox import ROOT
from aggbox.errors import AggBoxError
from aggbox.workloads import registry

EXPERIMENTS_DIR = ROOT / "experiments"


TESTBEDS = ("netns", "docker", "ansible")


#: Every cell runs at least this many times, each on a fresh testbed, so that run-to-run
#: variance (placement, caches, the other tenants of the machine) shows in the results.
MIN_REPETITIONS = {"quick": 3, "full": 5}


class ExperimentError(AggBoxError):
    """An experiment file is wrong; the message names the file, the line and what is expected."""


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
