"""The ``aggbox`` command. Each subcommand lives beside the code it drives.

A module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` to a callable taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aggbox.errors import AggBoxError

COMMAND_MODULES = [
    "aggbox.doctor",  # aggbox doctor
    "aggbox.testbed.cli",  # aggbox testbed up|status|down
    "aggbox.stats",  # aggbox stats
    "aggbox.bench",  # aggbox bench <workload>
    "aggbox.experiment",  # aggbox run
    "aggbox.plots",  # aggbox plot
    "aggbox.report",  # aggbox report
    "aggbox.chaos",  # aggbox chaos
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggbox",
        description="In-kernel broadcast and aggregation with eBPF: testbed, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AggBoxError as exc:
        print(f"aggbox: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aggbox: interrupted; resources were released", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
