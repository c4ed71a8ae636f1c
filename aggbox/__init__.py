"""AggBox: in-kernel broadcast and aggregation with eBPF.

Applications import :mod:`aggbox.collectives`; everything else is machinery.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The project's root (where bpf/, experiments/ and results/ live).
ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = ROOT / "bpf"
RESULTS_DIR = ROOT / "results"
