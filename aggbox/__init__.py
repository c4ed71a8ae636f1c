"""AggBox: in-kernel broadcast and aggregation with eBPF.

Applications call :func:`aggbox.init` (aggbox/api.py, docs/api.md), which finds the
hosts, installs the programs and returns a context with the operations;
:mod:`aggbox.collectives` is the layer below it. Everything else is machinery.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

#: The project's root (where bpf/, experiments/ and results/ live).
ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = ROOT / "bpf"
#: Where runs are stored and read; ``AGGBOX_RESULTS`` points everything (``aggbox run``,
#: ``report``, the loader, results/analysis.ipynb) at another folder, e.g. a copy.
RESULTS_DIR = Path(os.environ.get("AGGBOX_RESULTS") or ROOT / "results")

# aggbox.init and aggbox.Context come from aggbox/api.py on first use: importing the
# package (the CLI, the testbeds, the BPF loader) stays as light as before.
_API = ("init", "Context", "OPERATIONS")


def __getattr__(name: str):
    if name in _API:
        from aggbox import api

        return getattr(api, name)
    raise AttributeError(f"module 'aggbox' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
