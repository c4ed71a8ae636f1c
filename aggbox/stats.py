"""``aggbox stats``: the kernel programs' counters on the hosts of a running testbed.

Every program family pins its per-CPU counters map at
/sys/fs/bpf/aggbox/<tag>/<family>_counters while it is loaded (aggbox/bpf.py); this reads
them with bpftool, so it works from any process, on any running testbed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from aggbox.bpf import PIN_ROOT
from aggbox.errors import AggBoxError
from aggbox.protocol import COUNTERS


def read_pinned_counters(path: Path) -> dict[str, int]:
    """Sum a pinned per-CPU counters map over CPUs, by counter name."""
    proc = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AggBoxError(f"cannot read {path}: {proc.stderr.strip()}")
    totals = dict.fromkeys(COUNTERS, 0)
    for entry in json.loads(proc.stdout):
        index = _as_int(entry.get("key"))
        if index < len(COUNTERS):
            totals[COUNTERS[index]] = sum(_as_int(v["value"]) for v in entry["values"])
    return totals


def _as_int(value) -> int:
    """bpftool prints numbers with BTF, and lists of hex byte strings without it."""
    if isinstance(value, list):
        return int.from_bytes(bytes(int(b, 16) for b in value), "little")
    return int(value)


def collect(tag: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """{tag: {family: counters}} for every pinned counters map (of one tag if given)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    if not PIN_ROOT.exists():
        return out
    for tag_dir in sorted(PIN_ROOT.iterdir()):
        if tag and tag_dir.name != tag:
            continue
        for pin in sorted(tag_dir.glob("*_counters")):
            family = pin.name.removesuffix("_counters")
            out.setdefault(tag_dir.name, {})[family] = read_pinned_counters(pin)
    return out


def show_stats(args) -> int:
    data = collect(args.tag)
    if not data:
        raise AggBoxError("no AggBox programs are loaded now (nothing pinned under "
                          f"{PIN_ROOT}); start a benchmark or an experiment first")
    if args.json:
        print(json.dumps(data))
        return 0
    for tag, families in data.items():
        for family, counters in families.items():
            print(f"{tag}  {family}")
            for name, value in counters.items():
                if value or args.all:
                    print(f"  {name:<22} {value:>12}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("stats", help="kernel counters (accepted, drops by reason, ...)",
                              epilog="examples:\n  aggbox stats\n  aggbox stats --all --json")
    p.add_argument("tag", nargs="?", help="a host tag (<testbed id>-h<i>) (default: every host)")
    p.add_argument("--all", action="store_true", help="show zero counters too")
    p.add_argument("--json", action="store_true", help="print the counters as JSON")
    p.set_defaults(func=show_stats)
