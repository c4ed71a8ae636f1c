"""The ``aggbox`` command. Each subcommand lives beside the code it drives.

A module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` to a callable taking the parsed args and returning an exit code.
Every parser below ``aggbox`` is a :class:`Parser`: its help shows each option's default
(:class:`HelpFormatter`) and keeps the epilog's examples as written.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import textwrap

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; descriptions and epilogs keep the lines
    that are indented (examples, to copy as they are) and wrap the others.

    An option whose help already says its default ("(default: ...)", e.g. one computed
    at run time) is left alone, and so are a flag (no value: present or not) and a
    required option (it has no default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or action.nargs == 0 or action.required:
            return help_text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent,
                                         subsequent_indent=indent))
                prose.clear()

        for line in text.strip("\n").splitlines():
            if line.startswith((" ", "\t")):  # an example line: as written
                flush()
                out.append(indent + line)
            elif not line.strip():
                flush()
                out.append("")
            else:
                prose.extend(line.split())
        flush()
        return "\n".join(out)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with :class:`HelpFormatter`; its subparsers are Parsers too
    (``add_subparsers`` makes children of the parent's class), so every subcommand's
    help shows its defaults without each module asking for it."""

    def __init__(self, *args, formatter_class: type = HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def examples(*lines: str) -> str:
    """An epilog of example command lines (kept as written by :class:`HelpFormatter`)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def package_version() -> str:
    """The installed distribution's version; the package's ``__version__`` when aggbox
    runs from a tree that was never installed."""
    try:
        return importlib.metadata.version("aggbox")
    except importlib.metadata.PackageNotFoundError:
        import aggbox

        return getattr(aggbox, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="aggbox",
        description="In-kernel broadcast and aggregation with eBPF: testbed, benchmarks.",
        epilog=examples("aggbox doctor", "aggbox bench allreduce --workers 4 --iters 50"),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")
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
