"""What the docker and ansible backend tests share: running experiments through the CLI,
and the check that a run's results have the same schema as a netns run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "tests" / "data" / "experiments"
AGGBOX = [sys.executable, "-m", "aggbox"]


def run_experiment(name: str, out: Path, *extra: str, timeout: float = 1500) -> tuple[Path, float]:
    """``aggbox run tests/data/experiments/<name>.yaml --out OUT ...``; (run dir, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([*AGGBOX, "run", str(EXPERIMENTS / f"{name}.yaml"), "--out", str(out),
                           "--no-progress", "--no-plots", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"aggbox run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run = (out / name / "latest").resolve()
    assert (run / "meta.json").is_file(), proc.stdout
    return run, seconds


def schema(run: Path) -> dict:
    """What must not differ between backends: columns and dtypes of samples and summary,
    and the keys of meta.json."""
    samples = pd.read_parquet(run / "samples.parquet")
    summary = pd.read_csv(run / "summary.csv")
    meta = json.loads((run / "meta.json").read_text())
    return {"samples": {c: str(t) for c, t in samples.dtypes.items()},
            "summary": list(summary.columns),
            "meta": sorted(meta),
            "testbed_keys": sorted(meta["testbed"])}


def assert_same_schema(run: Path, reference: Path) -> None:
    got, want = schema(run), schema(reference)
    assert got == want


def assert_broadcast_delivered(run: Path, systems: set[str]) -> pd.DataFrame:
    samples = pd.read_parquet(run / "samples.parquet")
    assert set(samples["system"]) == systems
    assert samples["delivered"].all()
    assert samples["completion_us"].gt(0).all()
    return samples
