"""Which cells an experiment has, in which order, and roughly how long they take.

:func:`expand` crosses the mode's parameter grid with its repetitions (grid order);
:func:`shuffled` gives the seeded run order; every cell's seed depends on the experiment's
seed and the cell only (:func:`cell_seed`), never on run order.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass

from aggbox.experiment.schema import Experiment
from aggbox.workloads import registry


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
