"""Stored runs: the one loader that plots, reports and notebooks share.

A run is a folder ``results/<experiment>/<run-id>/`` holding ``samples.parquet`` (one row
per sample), ``summary.csv`` (one row per system and configuration), ``meta.json`` and the
figures (docs/design.md, README.md "Results"). ``meta.json`` carries ``format_version``;
a run written by an older AggBox is brought up to date on load by the functions in
:data:`UPGRADERS`, so an old result re-plots without a re-run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aggbox import RESULTS_DIR
from aggbox.errors import AggBoxError

#: The layout this code writes. Bump it when the layout changes, and add an upgrader.
#: 2: summary.csv gained the bootstrap CI of the median, per-repetition medians and the
#: per-system constants; p99 only from 100 samples on; meta.json gained "cells".
FORMAT_VERSION = 2

SAMPLES_FILE = "samples.parquet"
SUMMARY_FILE = "summary.csv"
META_FILE = "meta.json"
LATEST_LINK = "latest"

Upgrader = Callable[[dict, pd.DataFrame, pd.DataFrame | None], tuple[dict, pd.DataFrame]]

#: format_version N -> function taking (meta, samples, summary) of version N and returning
#: (meta, samples) of version N + 1 (the summary is recomputed after the last upgrade).
#: Example for a future version 3 that renamed a column:
#:   UPGRADERS[2] = lambda meta, s, _: ({**meta, "format_version": 3},
#:                                      s.rename(columns={"old": "new"}))
UPGRADERS: dict[int, Upgrader] = {}


def _upgrade_1_to_2(meta: dict, samples: pd.DataFrame, _summary) -> tuple[dict, pd.DataFrame]:
    """Version 1 kept the testbed of the first cell only and no per-cell record: give every
    cell what is known of it (its time), so readers of ``meta["cells"]`` need no special
    case. The samples are unchanged; the loader recomputes the summary (new columns)."""
    cells = meta.get("cells") or {
        key: {"seconds": seconds} for key, seconds in (meta.get("cell_seconds") or {}).items()
    }
    return {**meta, "format_version": 2, "cells": cells, "upgraded_from": 1}, samples


UPGRADERS[1] = _upgrade_1_to_2

#: Summary statistics computed for every metric, as ``<metric>_<stat>`` columns:
#: the median with its bootstrap 95% CI, p99 (NaN below :data:`P99_MIN_N` samples), the
#: mean with its t-based 95% CI, std and n.
STATS = (
    "p50", "p50_ci_low", "p50_ci_high", "p99", "mean", "std", "n", "ci95_low", "ci95_high",
)  # fmt: skip

#: Per-metric columns about the repetitions (separate testbeds) of a configuration: the
#: smallest and largest of the per-repetition medians. A pooled CI that does not reach
#: them says the run-to-run variance is larger than the within-run one.
REP_STATS = ("p50_rep_min", "p50_rep_max")

#: A p99 needs at least this many samples (at 100, one sample lies above it); fewer: NaN.
P99_MIN_N = 100

#: Columns the workloads put on every sample, constant per system within a cell, carried
#: into the summary (one value per row) and how a row's value is taken from its samples:
#: what the system promises, and whether the processes that must run at once outnumber
#: the CPUs (any overcommitted repetition marks the row). NaN where a run lacks them.
CARRIED: dict[str, str] = {
    "promise": "first",
    "procs_per_cpu": "max",
    "overcommitted": "any",
    "cpu_source": "first",
}


@dataclass
class Run:
    """One stored run, as loaded by :func:`load_run`."""

    path: Path
    meta: dict
    samples: pd.DataFrame
    summary: pd.DataFrame

    @property
    def experiment(self) -> str:
        return self.meta.get("experiment", self.path.parent.name)

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.name)

    @property
    def metrics(self) -> list[str]:
        return list(self.meta.get("metrics", []))

    @property
    def primary_metric(self) -> str:
        return self.meta.get("primary_metric") or self.metrics[0]

    @property
    def param_columns(self) -> list[str]:
        """Every parameter column of the samples (the grid's axes and the defaults)."""
        return list(self.meta.get("param_columns", []))

    @property
    def systems(self) -> list[str]:
        return list(self.meta.get("systems", sorted(self.samples["system"].unique())))

    @property
    def figures(self) -> list[str]:
        return list(self.meta.get("figures", []))


# ----------------------------------------------------------------------------- statistics


# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; beyond that the
# Cornish-Fisher expansion below is exact to 1e-6.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (no scipy needed)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)
    )


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]


def bootstrap_median_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of the median (scipy), seeded so a
    result re-summarizes to the same numbers. NaN where fewer than 3 finite values."""
    x = _finite(values)
    if x.size < 3 or np.all(x == x[0]):
        v = float(x[0]) if x.size and np.all(x == x[0]) else math.nan
        return (v, v) if x.size >= 3 else (math.nan, math.nan)
    from scipy.stats import bootstrap

    res = bootstrap(
        (x,),
        np.median,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_ratio_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(median(a) / median(b), low, high)``: the two samples resampled independently
    (they come from different systems), percentile interval of the ratio of medians."""
    x, y = _finite(a), _finite(b)
    if x.size == 0 or y.size == 0 or np.median(y) == 0:
        return (math.nan, math.nan, math.nan)
    ratio = float(np.median(x) / np.median(y))
    if x.size < 3 or y.size < 3:
        return (ratio, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    mx = np.median(rng.choice(x, size=(n_resamples, x.size)), axis=1)
    my = np.median(rng.choice(y, size=(n_resamples, y.size)), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = mx / my
    r = r[np.isfinite(r)]
    alpha = (1 - confidence) / 2
    return ratio, float(np.quantile(r, alpha)), float(np.quantile(r, 1 - alpha))


def describe(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Every stat in :data:`STATS` of ``values``.

    NaN values (a sample whose metric could not be measured) are left out and not counted
    in ``n``. Percentiles interpolate linearly between order statistics (numpy's default).
    The median's interval is a seeded percentile bootstrap (:func:`bootstrap_median_ci`;
    latencies are skewed, so no normal approximation); p99 is NaN below
    :data:`P99_MIN_N` values (a "p99" of 10 samples is their maximum, not a percentile).
    The mean's interval is t-based: mean +- t(0.975, n-1) * std / sqrt(n), with the sample
    standard deviation (ddof=1).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return dict.fromkeys(STATS, math.nan) | {"n": 0}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    ci_low, ci_high = bootstrap_median_ci(x)
    return {
        "p50": float(np.percentile(x, 50)),
        "p50_ci_low": ci_low,
        "p50_ci_high": ci_high,
        "p99": float(np.percentile(x, 99)) if n >= P99_MIN_N else math.nan,
        "mean": mean,
        "std": std,
        "n": n,
        "ci95_low": mean - half,
        "ci95_high": mean + half,
    }


def _carried_value(values: pd.Series, how: str) -> object:
    present = values.dropna()
    if present.empty:
        return math.nan
    if how == "any":
        return bool(present.astype(bool).any())
    if how == "max":
        return float(pd.to_numeric(present).max())
    return present.iloc[0]


def summarize(samples: pd.DataFrame, group_cols: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per group of ``group_cols``.

    Columns: the group columns, ``repetitions`` (how many separate testbeds were pooled),
    the :data:`CARRIED` columns (NaN where the samples lack them), then for every metric
    ``<metric>_<stat>`` for every stat in :data:`STATS` and :data:`REP_STATS`. Groups keep
    the order in which they first appear in ``samples``.
    """
    missing = [c for c in [*group_cols, *metrics] if c not in samples.columns]
    if missing:
        raise AggBoxError(f"cannot summarize: samples have no column(s) {', '.join(missing)}")
    rows = []
    grouped = (
        samples.groupby(group_cols, sort=False, dropna=False) if group_cols else [((), samples)]
    )
    has_reps = "repetition" in samples.columns
    carried = {c: how for c, how in CARRIED.items() if c not in group_cols}
    for key, group in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group_cols, key, strict=True))
        row["repetitions"] = int(group["repetition"].nunique()) if has_reps else 1
        for column, how in carried.items():
            row[column] = _carried_value(group[column], how) if column in group else math.nan
        for metric in metrics:
            for stat, value in describe(group[metric].to_numpy(dtype=float)).items():
                row[f"{metric}_{stat}"] = value
            per_rep = (
                group.groupby("repetition", sort=False)[metric].median()
                if has_reps
                else pd.Series([group[metric].median()])
            ).dropna()
            row[f"{metric}_p50_rep_min"] = float(per_rep.min()) if len(per_rep) else math.nan
            row[f"{metric}_p50_rep_max"] = float(per_rep.max()) if len(per_rep) else math.nan
        rows.append(row)
    columns = [
        *group_cols,
        "repetitions",
        *carried,
        *(f"{m}_{s}" for m in metrics for s in (*STATS, *REP_STATS)),
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["repetitions"] = frame["repetitions"].astype("int64")
    for metric in metrics:
        frame[f"{metric}_n"] = frame[f"{metric}_n"].astype("int64")
    return frame


def summary_group_columns(meta: dict) -> list[str]:
    """A configuration is every parameter plus the system; repetitions are pooled."""
    return [*meta.get("param_columns", []), "system"]


# ----------------------------------------------------------------------------- atomic files


def temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file next to ``path`` (same filesystem, so os.replace is atomic).

    Its mode follows the umask like any new file (mkstemp alone would make it 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def atomic_symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` (relative), replacing any old link in one step."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.part")
    _unlink_quietly(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- loading


def load_run(path: str | Path) -> Run:
    """Load the run in folder ``path`` (a run dir or a ``latest`` link), upgrading old formats."""
    path = Path(path)
    if path.is_symlink() or path.name == LATEST_LINK:
        path = path.resolve()
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if path.name.startswith(".tmp-"):
            raise AggBoxError(
                f"{path} is an unfinished run; finish it with "
                f"`aggbox run <experiment> --resume {path.name[5:]}`"
            )
        raise AggBoxError(f"{path} is not an AggBox run (no {META_FILE}); pass a run folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise AggBoxError(f"{meta_path} is not valid JSON ({exc})") from exc
    samples_path = path / SAMPLES_FILE
    if not samples_path.is_file():
        raise AggBoxError(f"{path} has no {SAMPLES_FILE}: the run is incomplete or damaged")
    samples = pd.read_parquet(samples_path)
    summary_path = path / SUMMARY_FILE
    summary = pd.read_csv(summary_path) if summary_path.is_file() else None

    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise AggBoxError(
            f"{path} was written in results format {version}, newer than this AggBox "
            f"understands ({FORMAT_VERSION}); update AggBox to read it"
        )
    upgraded = False
    while version < FORMAT_VERSION:
        if version not in UPGRADERS:
            raise AggBoxError(f"{path}: no upgrader from results format {version}; re-run it")
        meta, samples = UPGRADERS[version](meta, samples, summary)
        version = int(meta["format_version"])
        upgraded = True
    if summary is None or upgraded:
        metrics = meta.get("metrics") or []
        summary = summarize(samples, summary_group_columns(meta), metrics)
    return Run(path=path, meta=meta, samples=samples, summary=summary)


def list_runs(
    experiment: str | None = None,
    results_dir: str | Path = RESULTS_DIR,
    include_unfinished: bool = False,
) -> list[Path]:
    """Run folders, oldest first (run ids start with their start time).

    With ``experiment`` only that experiment's runs; ``include_unfinished`` adds the
    ``.tmp-<run-id>`` folders of interrupted runs (which ``--resume`` can finish).
    """
    results_dir = Path(results_dir)
    exp_dirs = [results_dir / experiment] if experiment else sorted(results_dir.glob("*/"))
    runs = []
    for exp_dir in exp_dirs:
        if not exp_dir.is_dir():
            continue
        for child in exp_dir.iterdir():
            if child.is_symlink() or not child.is_dir():
                continue
            if (child / META_FILE).is_file() or (
                include_unfinished and child.name.startswith(".tmp-")
            ):
                runs.append(child)
    return sorted(runs, key=lambda p: (p.parent.name, p.name.removeprefix(".tmp-")))


def latest_run(experiment: str, results_dir: str | Path = RESULTS_DIR) -> Run:
    """The newest complete run of ``experiment`` (the ``latest`` link, else the newest folder)."""
    exp_dir = Path(results_dir) / experiment
    link = exp_dir / LATEST_LINK
    if link.is_symlink() and (link / META_FILE).is_file():
        return load_run(link)
    runs = list_runs(experiment, results_dir)
    if not runs:
        raise AggBoxError(
            f"no complete run of {experiment!r} under {results_dir}; "
            f"run `aggbox run experiments/{experiment}.yaml` first"
        )
    return load_run(runs[-1])
