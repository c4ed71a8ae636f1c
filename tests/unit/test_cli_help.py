"""`aggbox --version` and the help of every subcommand: defaults, help texts, examples."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys

import pytest

from aggbox import cli
from aggbox.workloads.registry import SYSTEMS

NOT_YET_POLISHED: set[str] = set()  # subcommands exempted from the checks below: none


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for every parser under ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _subcommands(child, (*path, name))


ALL = [(" ".join(path), p) for path, p in _subcommands(cli.build_parser())
       if path[0] not in NOT_YET_POLISHED]
IDS = [name for name, _ in ALL]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings
            and not isinstance(a, argparse._HelpAction | argparse._VersionAction)]


def _needs_default(action: argparse.Action) -> bool:
    """An option that takes a value and may be left out: its help must say what then."""
    return action.nargs != 0 and not action.required


def _entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's lines exactly as ``--help`` prints them."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


def test_the_walk_finds_every_subcommand():
    names = set(IDS)
    for expected in ("doctor", "testbed up", "testbed down", "stats", "bench allreduce",
                     "bench broadcast", "bench mapreduce", "bench training", "bench quant",
                     "run", "plot", "report"):
        assert expected in names


def test_version_prints_the_installed_version():
    done = subprocess.run([sys.executable, "-m", "aggbox", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"aggbox {importlib.metadata.version('aggbox')}"


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    import aggbox

    assert cli.package_version() == aggbox.__version__


@pytest.mark.parametrize("name, parser", ALL, ids=IDS)
def test_every_option_has_help_and_shows_its_default(name, parser):
    for action in _options(parser):
        assert action.help and action.help.strip(), f"aggbox {name} {action.option_strings[0]}"
        text = _entry(parser, action)
        if _needs_default(action):
            assert "(default: " in text, f"aggbox {name}: {text}"
        assert "(default: None)" not in text, f"aggbox {name}: {text}"
        assert "(default: )" not in text, f"aggbox {name}: {text}"


@pytest.mark.parametrize("name, parser", ALL, ids=IDS)
def test_every_subcommand_has_two_examples_printed_as_written(name, parser):
    assert parser.epilog and parser.epilog.startswith("examples:"), f"aggbox {name}"
    lines = [line.strip() for line in parser.epilog.splitlines()[1:] if line.strip()]
    assert len(lines) >= 2, f"aggbox {name}: {lines}"
    help_text = parser.format_help()
    for line in lines:
        assert line.startswith("aggbox " + name.split()[0]), f"aggbox {name}: {line}"
        assert f"\n  {line}\n" in help_text, f"aggbox {name}: example wrapped: {line}"


@pytest.mark.parametrize("workload", sorted(SYSTEMS))
def test_bench_lists_and_checks_each_workloads_systems(workload, capsys):
    parser = cli.build_parser()
    bench = dict(ALL)[f"bench {workload}"]
    (systems,) = [a for a in _options(bench) if "--systems" in a.option_strings]
    text = _entry(bench, systems)
    for system in SYSTEMS[workload]:
        assert re.search(rf"\b{system}\b", text.split("(default:")[0]), (workload, system, text)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["bench", workload, "--systems", "aggbox,nosuch"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown system(s) nosuch" in err and ", ".join(SYSTEMS[workload]) in err


def test_bench_allreduce_help_shows_a_default_for_every_option():
    """What a user sees: `aggbox bench allreduce --help`, read as text."""
    done = subprocess.run([sys.executable, "-m", "aggbox", "bench", "allreduce", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    for line in options.splitlines():
        if line.startswith("  -"):
            first = line.split()[0].rstrip(",")
            entries[first] = line
        else:
            entries[first] += " " + line.strip()
    bench = dict(ALL)["bench allreduce"]
    checked = 0
    for action in _options(bench):
        text = entries[action.option_strings[0]]
        if _needs_default(action):
            assert re.search(r"\(default: [^)]+\)", text), text
            checked += 1
    # workers, floats, iters, warmup, block, mtu, distribution, loss, burst-loss, systems, seed
    assert checked == 11
    assert "(default: 8)" in entries["--workers"]
    assert "(default: aggbox,gloo,tcp_ps)" in entries["--systems"]


def test_descriptions_wrap_and_example_lines_stay_as_written():
    formatter = cli.HelpFormatter("prog", width=40)
    text = formatter._fill_text("one two three four five six seven eight nine ten eleven\n"
                                "twelve\n\nexamples:\n  aggbox bench allreduce --workers 4 "
                                "--floats 262144 --iters 50", 40, "")
    lines = text.splitlines()
    assert all(len(line) <= 40 for line in lines[:-1])
    assert "twelve" in lines[1]  # the prose lines were joined, then wrapped
    assert lines[-1] == "  aggbox bench allreduce --workers 4 --floats 262144 --iters 50"
