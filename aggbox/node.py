"""``python -m aggbox.node ROLE --spec FILE --rank R``: the one program every host runs.

A node loads its host's eBPF programs (if its role needs them), runs one role of a
workload, and prints its records as JSON lines on stdout for the runner to gather. The
same entry point serves every testbed backend: netns, docker and ansible hosts alike.

Roles are looked up in :data:`ROLES` ("module:function"); a role function takes the
parsed spec (a dict) and this node's rank and returns an exit code. It must print
``{"event": "ready"}`` once it can take traffic.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from typing import Any

ROLES: dict[str, str] = {
    "broadcast-root": "aggbox.workloads.broadcast:root_node",
    "broadcast-member": "aggbox.workloads.broadcast:member_node",
    "allreduce-aggregator": "aggbox.workloads.allreduce:aggregator_node",
    "allreduce-worker": "aggbox.workloads.allreduce:worker_node",
    "mapreduce-mapper": "aggbox.workloads.mapreduce:node",
    "mapreduce-reducer": "aggbox.workloads.mapreduce:node",
    "training-aggregator": "aggbox.workloads.training:aggregator_node",
    "training-worker": "aggbox.workloads.training:worker_node",
}


def emit(record: dict[str, Any]) -> None:
    """Print one JSON-lines record (the runner's only channel from a node)."""
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")


def emit_many(records: list[dict[str, Any]]) -> None:
    sys.stdout.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    sys.stdout.flush()


def parse_cpus(text: str) -> set[int]:
    """'0', '1-3' or '0,2-3' -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _terminate(signum: int, _frame: Any) -> None:
    # Turn SIGTERM (and SIGINT) into an exception so `with` blocks detach the eBPF
    # programs and unpin their maps. Only the first signal counts: Ctrl-C reaches every
    # process of the terminal's group, and the runner then sends SIGTERM to the nodes
    # still running; a second exception raised inside that cleanup would leave pins on
    # bpffs. From here on both are ignored (the runner's SIGKILL after a grace remains).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aggbox.node", description=__doc__)
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--spec", required=True, help="JSON file written by the runner")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--cpus", default="", help="CPUs to run on, e.g. 0 or 1-3 (see "
                        "aggbox.workloads.launcher.cpu_placement)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    if args.cpus:
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    with open(args.spec) as f:
        spec = json.load(f)
    module_name, _, fn = ROLES[args.role].partition(":")
    role = getattr(importlib.import_module(module_name), fn)
    try:
        return int(role(spec, args.rank) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
