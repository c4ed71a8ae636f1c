"""``aggbox run EXPERIMENT [--full] [--dry-run] [--resume RUN_ID]``: the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aggbox import RESULTS_DIR
from aggbox.experiment.plan import Plan, prepare, print_plan
from aggbox.experiment.runner import RunInterrupted, TestbedFactory, execute
from aggbox.experiment.schema import (
    TESTBEDS,
    ExperimentError,
    load_experiment,
    resolve_experiment_path,
)


def register(subparsers) -> None:
    from aggbox.cli import examples

    p = subparsers.add_parser(
        "run",
        help="run an experiment file into results/",
        description="Run the cells of an experiment (quick mode unless --full) and store "
        "samples, summary, metadata and figures in results/<experiment>/<run-id>/.",
        epilog=examples(
            "aggbox run broadcast --dry-run",
            "aggbox run experiments/allreduce.yaml --full --resume RUN_ID",
        ),
    )
    p.add_argument("experiment", help="experiments/<name>.yaml, or just <name>")
    p.add_argument(
        "--full", action="store_true", default=None, help="the full grid (default: quick)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the cells and an estimated time")
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="finish an interrupted run (default: start a new run)",
    )
    p.add_argument(
        "--testbed",
        choices=TESTBEDS,
        help="override the experiment's testbed (default: the file's testbed:, else netns)",
    )
    p.add_argument(
        "--inventory",
        type=Path,
        help="Ansible inventory of the hosts (--testbed ansible; see playbooks/README.md) "
        "(default: none)",
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
