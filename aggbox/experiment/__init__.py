"""Run a declared matrix of (workload x systems x parameters) and store it under results/.

An experiment file (``experiments/<name>.yaml``) declares a workload, the systems to
compare, a parameter grid, iterations and the figures to draw; see
``experiments/broadcast.yaml``. This package reads and checks it (:func:`load_experiment`),
expands the grid into cells (:func:`expand`), and runs them (:func:`run_experiment`): one
fresh testbed per cell, cells in a seeded shuffled order, each finished cell stored at once
so that an interrupted run can be resumed, and the whole run renamed into place only when
complete (docs/design.md, "From experiment file to figure").

One module per question:

- :mod:`~aggbox.experiment.schema`: is this experiment file valid? (:class:`Experiment`)
- :mod:`~aggbox.experiment.grid`: which cells, in which order, how long? (:class:`Cell`)
- :mod:`~aggbox.experiment.plan`: what will this run (new or resumed) do? (:class:`Plan`)
- :mod:`~aggbox.experiment.runner`: run the cells, one fresh testbed each
- :mod:`~aggbox.experiment.store`: a cell's samples as rows; the complete run's folder
- :mod:`~aggbox.experiment.metadata`: what machine, kernel, git revision and versions
- :mod:`~aggbox.experiment.cli`: ``aggbox run``

``aggbox run experiments/<name>.yaml [--full] [--dry-run] [--resume RUN_ID]``
"""

from aggbox.experiment.cli import cmd_run, register
from aggbox.experiment.grid import Cell, cell_seed, estimate_seconds, expand, shuffled
from aggbox.experiment.metadata import (
    cpu_meter_source,
    git_info,
    kernel_hz,
    machine_info,
    versions,
)
from aggbox.experiment.plan import (
    CELLS_DIR,
    STATE_FILE,
    TMP_PREFIX,
    Plan,
    format_duration,
    new_run_id,
    prepare,
    print_plan,
)
from aggbox.experiment.runner import (
    RunInterrupted,
    TestbedFactory,
    default_testbed_factory,
    execute,
    run_experiment,
)
from aggbox.experiment.schema import (
    EXPERIMENTS_DIR,
    MIN_REPETITIONS,
    TESTBEDS,
    Experiment,
    ExperimentError,
    Settings,
    load_experiment,
    parse_experiment,
    resolve_experiment_path,
)
from aggbox.experiment.store import cell_affinity, cell_frame

__all__ = [
    "CELLS_DIR",
    "EXPERIMENTS_DIR",
    "MIN_REPETITIONS",
    "STATE_FILE",
    "TESTBEDS",
    "TMP_PREFIX",
    "Cell",
    "Experiment",
    "ExperimentError",
    "Plan",
    "RunInterrupted",
    "Settings",
    "TestbedFactory",
    "cell_affinity",
    "cell_frame",
    "cell_seed",
    "cmd_run",
    "cpu_meter_source",
    "default_testbed_factory",
    "estimate_seconds",
    "execute",
    "expand",
    "format_duration",
    "git_info",
    "kernel_hz",
    "load_experiment",
    "machine_info",
    "new_run_id",
    "parse_experiment",
    "prepare",
    "print_plan",
    "register",
    "resolve_experiment_path",
    "run_experiment",
    "shuffled",
    "versions",
]
