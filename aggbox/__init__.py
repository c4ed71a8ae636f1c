"""AggBox: in-kernel broadcast and aggregation with eBPF.

Applications import :mod:`aggbox.collectives`; everything else is machinery.
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
