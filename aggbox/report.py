"""results/REPORT.md: each paper claim, a like-for-like measurement and a verdict.

``aggbox report`` (run at the end of ``make experiment``) reads the latest run of every
experiment through the shared loader (aggbox/results.py) and writes the report
atomically. For each claim it compares AggBox with the strongest baseline that keeps the
same promise (what "done" means), with bootstrap confidence intervals, puts the CPU cost
per operation beside every time, and ends in a ``Verdict:`` line under a rule stated in
the report itself. A claim whose experiment has not run says so; a column an older run
lacks is replaced by a line saying what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from aggbox import RESULTS_DIR
from aggbox.results import (
    Run,
    atomic_write_text,
    bootstrap_median_ci,
    bootstrap_ratio_ci,
    latest_run,
)

#: A p99 needs this many samples to mean anything (below it the summary leaves it NaN).
MIN_P99_SAMPLES = 100

#: What "done" means for runs recorded before samples carried a ``promise`` column.
DEFAULT_PROMISE = {
    "broadcast": {"aggbox": "kernel", "tcp_kack": "kernel"},  # every other system: app
}

#: Columns renamed since the committed reference runs were recorded: old -> new.
RENAMED = {"reduce_s": "after_last_send_s"}

DAGGER = "†"
OVERCOMMIT_LEGEND = (f"{DAGGER} overcommitted: the processes that must run at once for this "
                     "operation outnumber the CPUs they are pinned to, so the scheduler, not "
                     "the network path, can set the time. Such a row never decides a verdict "
                     "alone.")


# ----------------------------------------------------------------------------- cells


def _upgrade_columns(frame: pd.DataFrame) -> pd.DataFrame:
    renames = {}
    for old, new in RENAMED.items():
        for col in frame.columns:
            if (col == old or col.startswith(old + "_")) and new + col[len(old):] not in frame:
                renames[col] = new + col[len(old):]
    return frame.rename(columns=renames) if renames else frame


def samples_of(run: Run) -> pd.DataFrame:
    """The run's samples with the current column names (an old ``reduce_s`` becomes
    ``after_last_send_s``)."""
    return _upgrade_columns(run.samples)


def renamed_columns(run: Run) -> list[str]:
    """Old column names this run still uses (for a line saying so)."""
    return [old for old in RENAMED if old in run.samples and RENAMED[old] not in run.samples]


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[np.isfinite(x)]


class Cells:
    """One row per configuration and system: p50, its 95% CI, p99 (with enough samples),
    n, promise, overcommit, CPU per operation; and the samples behind each row.

    Built once per run and metric list (the bootstrap is not free). The CI comes from
    summary.csv's ``<metric>_p50_ci_low/_high`` where the run has them, else it is
    computed here with the same function.
    """

    def __init__(self, run: Run, metrics: Sequence[str]):
        self.run = run
        self.samples = samples_of(run)
        s = self.samples
        workload = run.meta.get("workload", run.experiment)
        self.params = [c for c in run.param_columns if c in s] or [
            c for c in s.columns if c in run.meta.get("grid", {})
        ]
        #: the parameters that differ between configurations (the ones worth a label)
        self.varying = [p for p in self.params if s[p].nunique(dropna=False) > 1]
        self.metrics = [m for m in metrics if m in s]
        self.missing = [m for m in metrics if m not in s]
        self.has = {c: c in s for c in ("promise", "overcommitted", "cpu_us_per_op",
                                        "procs_per_cpu", "delivered", "cpu_source")}
        summary = _upgrade_columns(run.summary)
        keys = [*self.params, "system"]
        groups = list(s.groupby(keys, sort=False, dropna=False))
        # summarize() groups the same way, so summary.csv's rows are in the same order.
        aligned = (len(summary) == len(groups)
                   and list(summary["system"]) == [k[-1] for k, _ in groups])
        self.groups: dict[tuple, pd.DataFrame] = {}
        rows = []
        # (a test's fake broadcast workload counts as broadcast)
        defaults = next((v for k, v in DEFAULT_PROMISE.items() if k in str(workload)), {})
        for i, (key, g) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            self.groups[key] = g
            row: dict = dict(zip(keys, key, strict=True))
            system = row["system"]
            for m in self.metrics:
                x = _finite(g[m].to_numpy())
                row[f"{m}_n"] = x.size
                row[f"{m}_p50"] = float(np.median(x)) if x.size else math.nan
                row[f"{m}_p99"] = (float(np.percentile(x, 99)) if x.size >= MIN_P99_SAMPLES
                                   else math.nan)
                lo_col, hi_col = f"{m}_p50_ci_low", f"{m}_p50_ci_high"
                if aligned and lo_col in summary and hi_col in summary:
                    lo, hi = float(summary[lo_col].iloc[i]), float(summary[hi_col].iloc[i])
                else:
                    lo, hi = bootstrap_median_ci(x)
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo, hi
            promise = g["promise"].dropna() if self.has["promise"] else g.iloc[:0, 0]
            row["promise"] = (str(promise.iloc[0]) if len(promise)
                              else defaults.get(system, "app"))
            # NaN (not measurable) is not "overcommitted"; no value at all is "unknown"
            oc = g["overcommitted"].dropna() if self.has["overcommitted"] else g.iloc[:0, 0]
            row["overcommitted"] = bool(oc.astype(bool).any()) if len(oc) else None
            row["procs_per_cpu"] = (float(g["procs_per_cpu"].max())
                                    if self.has["procs_per_cpu"] else math.nan)
            cpu = _finite(g["cpu_us_per_op"].to_numpy()) if self.has["cpu_us_per_op"] else []
            row["cpu_us_per_op"] = float(np.median(cpu)) if len(cpu) else math.nan
            row["delivered"] = (float(g["delivered"].astype(bool).mean())
                                if self.has["delivered"] else math.nan)
            rows.append(row)
        self.table = pd.DataFrame(rows)

    def _rank(self, param: str, value) -> int:
        """A value's place in the experiment file's list (else in sorted order)."""
        values = list(self.run.meta.get("grid", {}).get(param) or [])
        present = sorted(pd.unique(self.samples[param]), key=lambda v: (str(type(v)), v))
        values += [v for v in present if v not in values]
        return values.index(value) if value in values else len(values)

    def configs(self, order: Sequence[str] = ()) -> list[tuple[tuple, pd.DataFrame]]:
        """(configuration key, its rows indexed by system in the run's system order),
        sorted by the parameters in ``order`` first, then the other varying ones."""
        out = []
        if self.table.empty:
            return out
        systems = self.run.systems
        for key, part in self.table.groupby(self.params, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            part = part.set_index("system")
            ranked = sorted(part.index, key=lambda s: (systems.index(s) if s in systems
                                                       else len(systems), s))
            out.append((key, part.loc[ranked]))
        sort_by = [p for p in order if p in self.varying]
        sort_by += [p for p in self.varying if p not in sort_by]
        idx = {p: self.params.index(p) for p in sort_by}
        out.sort(key=lambda kv: tuple(self._rank(p, kv[0][idx[p]]) for p in sort_by))
        return out

    def values(self, config: tuple, system: str, metric: str) -> np.ndarray:
        g = self.groups.get((*config, system))
        if g is None or metric not in g:
            return np.array([])
        return _finite(g[metric].to_numpy())

    def config_dict(self, config: tuple) -> dict:
        return dict(zip(self.params, config, strict=True))


def cells_of(run: Run, metrics: Sequence[str]) -> Cells:
    """Cells of ``run`` for ``metrics``, cached on the run (figures and the report share it)."""
    cache = run.__dict__.setdefault("_aggbox_cells", {})
    key = tuple(metrics)
    if key not in cache:
        cache[key] = Cells(run, metrics)
    return cache[key]


# ----------------------------------------------------------------------------- formatting


def num(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` significant digits, no exponent for everyday magnitudes."""
    if v is None or not np.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits - 1:
        return f"{v:,.0f}".replace(",", " ")
    if mag < -4:
        return f"{v:.1e}"
    return f"{v:.{digits - 1 - mag}f}"


def with_ci(p50: float, lo: float, hi: float, scale: float = 1.0) -> str:
    if not np.isfinite(p50):
        return "–"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return num(p50 * scale)
    return f"{num(p50 * scale)} [{num(lo * scale)}, {num(hi * scale)}]"


def change(ratio: float, lo: float, hi: float) -> str:
    """A time ratio as a signed change: 0.155 -> "−84.5%" (AggBox took 84.5% less time)."""
    if not np.isfinite(ratio):
        return "–"

    def pct(r: float) -> str:
        v = 100 * (r - 1)
        return f"{'−' if v < 0 else '+'}{abs(v):.1f}%"

    if np.isfinite(lo) and np.isfinite(hi):
        return f"{pct(ratio)} [{pct(lo)}, {pct(hi)}]"
    return pct(ratio)


def speedup(ratio: float, lo: float, hi: float) -> str:
    """A time ratio (AggBox / baseline) as a speed-up: 0.5 -> "2.0x"."""
    if not (np.isfinite(ratio) and ratio > 0):
        return "–"

    def x(r: float) -> str:
        return f"{num(1 / r)}x"

    if np.isfinite(lo) and np.isfinite(hi) and lo > 0:
        return f"{x(ratio)} [{x(hi)}, {x(lo)}]"
    return x(ratio)


def cpu_ratio(ours: float, theirs: float) -> str:
    if not (np.isfinite(ours) and np.isfinite(theirs) and theirs > 0):
        return "–"
    return f"{num(ours / theirs)}x"


def short_value(v) -> str:
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()
                                            and abs(v) >= 1000):
        v = int(v)
        for unit, size in (("M", 1_000_000), ("k", 1000)):
            if v >= size and v % (size // 10) == 0:
                return f"{v / size:g}{unit}"
        return str(v)
    return str(v)


def format_bytes(n) -> str:
    n = int(n)
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# ----------------------------------------------------------------------------- comparisons


@dataclass
class Comparison:
    """AggBox against one baseline in one configuration, on one time metric."""

    label: str  # the configuration, readable
    ours: str
    base: str
    ratio: float  # median(ours) / median(base)
    low: float  # 95% bootstrap CI of the ratio
    high: float
    overcommitted: bool | None  # either side; None: the run does not record it
    meets: bool  # reaches the paper's number, CI clear of "no difference"
    ours_p50: float = math.nan
    base_p50: float = math.nan
    ours_cpu: float = math.nan
    base_cpu: float = math.nan
    group: str = ""  # a sub-table this row belongs to (e.g. "with combiner")


def compare(cells: Cells, config: tuple, rows: pd.DataFrame, ours: str, base: str, metric: str,
            target: float, label: str, group: str = "") -> Comparison:
    """AggBox vs ``base``: ratio of medians with its bootstrap CI; the cell meets the
    claim when the ratio is at or below ``target`` and the whole CI is below 1."""
    a, b = cells.values(config, ours, metric), cells.values(config, base, metric)
    ratio, low, high = bootstrap_ratio_ci(a, b)
    oc = [rows.loc[s, "overcommitted"] for s in (ours, base)]
    overcommitted = None if any(v is None for v in oc) else bool(any(oc))
    meets = bool(np.isfinite(ratio) and ratio <= target and np.isfinite(high) and high < 1)
    return Comparison(label=label, ours=ours, base=base, ratio=ratio, low=low, high=high,
                      overcommitted=overcommitted, meets=meets,
                      ours_p50=float(rows.loc[ours, f"{metric}_p50"]),
                      base_p50=float(rows.loc[base, f"{metric}_p50"]),
                      ours_cpu=float(rows.loc[ours, "cpu_us_per_op"]),
                      base_cpu=float(rows.loc[base, "cpu_us_per_op"]), group=group)


def strongest(rows: pd.DataFrame, ours: str, metric: str, promise: str | None = None,
              exclude: Sequence[str] = ()) -> str | None:
    """The baseline with the lowest median of ``metric`` among those keeping ``promise``
    (any promise when None); AggBox's own variants are not baselines."""
    col = f"{metric}_p50"
    peers = [s for s in rows.index
             if not s.startswith("aggbox") and s != ours and s not in exclude
             and (promise is None or rows.loc[s, "promise"] == promise)
             and np.isfinite(rows.loc[s, col])]
    return min(peers, key=lambda s: rows.loc[s, col]) if peers else None


def mark(label: str, overcommitted: bool | None) -> str:
    flagged = isinstance(overcommitted, (bool, np.bool_)) and bool(overcommitted)
    return f"{label} {DAGGER}" if flagged else label


def verdict(comps: list[Comparison], paper: str, how: Callable[[Comparison], str],
            what: str, lacking: str) -> str:
    """The ``Verdict:`` line (see the rule in the report's introduction).

    ``how`` formats one comparison's measured value; ``what`` names the baseline and
    ``lacking`` says what a run without one lacks.
    """
    if not comps:
        return (f"Verdict: not judged — the run has no {lacking}, so the claim cannot be "
                "checked on like-for-like terms.")
    clean = [c for c in comps if c.overcommitted is False]
    met_clean = [c for c in clean if c.meets]
    met_any = [c for c in comps if c.meets]
    misses = [c for c in (clean or comps) if not c.meets]
    worst = max(misses or comps, key=lambda c: c.ratio if np.isfinite(c.ratio) else -1)
    best = min(comps, key=lambda c: c.ratio if np.isfinite(c.ratio) else math.inf)
    unknown = all(c.overcommitted is None for c in comps)
    if clean and len(met_clean) == len(clean):
        least = max(clean, key=lambda c: c.ratio)
        return (f"Verdict: met — AggBox reaches {paper} against {what} in all {len(clean)} "
                f"configurations that are not overcommitted (least: {how(least)} at "
                f"{least.label}).")
    if met_any:
        where = (f"{len(met_clean)} of {len(clean)} configurations that are not overcommitted"
                 if clean else f"{len(met_any)} of {len(comps)} configurations, "
                 + ("and the run does not record overcommit" if unknown
                    else "all of them overcommitted"))
        if clean and len(met_any) > len(met_clean):
            where += f" (and {len(met_any) - len(met_clean)} overcommitted)"
        return (f"Verdict: partly met — AggBox reaches {paper} against {what} in {where}; "
                f"elsewhere as little as {how(worst)} at {worst.label}.")
    return (f"Verdict: not met — AggBox reaches {paper} against {what} in none of the "
            f"{len(comps)} configurations; its best is {how(best)} at {best.label}, its "
            f"worst {how(worst)} at {worst.label}.")


# ----------------------------------------------------------------------------- sections


@dataclass
class Section:
    lines: list[str]
    verdict: str
    headline: str  # the measured range, for the summary table
    notes: list[str] = field(default_factory=list)  # what this run lacks
    overcommitted: int = 0  # headline rows marked with the dagger
    rows: int = 0
    overcommit_known: bool = True


#: workload -> (per-role CPU columns with their labels, the doc section that explains them)
ROLES: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "broadcast": ((("root_cpu_us_per_op", "root"), ("members_cpu_us_per_op", "members")),
                  "docs/broadcast.md (Measured)"),
    "allreduce": ((("workers_cpu_us_per_op", "workers"),
                   ("aggregator_cpu_us_per_op", "aggregator process")),
                  "docs/allreduce.md (Where the time goes)"),
    "mapreduce": ((("mappers_cpu_us_per_op", "mappers"), ("reducers_cpu_us_per_op", "reducers")),
                  "docs/mapreduce.md (Where the time goes)"),
}


def where_time_goes(cells: Cells, workload: str, order: Sequence[str], label_fmt,
                    scale: float = 1.0, unit: str = "µs") -> list[str]:
    """Per-role CPU per operation of every system in the largest configuration: where
    each system spends its CPU, the first thing to read when a claim is not met."""
    roles, doc = ROLES[workload]
    present = [(c, name) for c, name in roles if c in cells.samples]
    configs = cells.configs(order)
    if not present or not configs:
        return []
    config, rows = configs[-1]
    table = []
    for system, r in rows.iterrows():
        cols = [num(float(np.median(v)) / scale) if (v := cells.values(config, system, c)).size
                else "–" for c, _ in present]
        table.append([system, r["promise"], num(r["cpu_us_per_op"] / scale), *cols])
    lines = ["", f"#### Where the time goes: CPU per operation by role "
             f"({_label(cells, config, fmt=label_fmt) or 'the only configuration'})", "",
             f"The whole machine's CPU per operation ({unit}, background subtracted) and "
             f"each role's own processes' CPU ({unit}; in-kernel work shows in the role "
             f"whose system call or softirq ran it, and always in the whole machine's). "
             f"The measured breakdown and what would close the gap: {doc}.", ""]
    return lines + md_table(["system", "promise", f"whole machine ({unit})",
                             *(f"{name} ({unit})" for _, name in present)], table)


def _missing_notes(cells: Cells, run: Run, needed: Sequence[str]) -> list[str]:
    notes = []
    if cells.missing:
        notes.append("This run has no " + ", ".join(f"`{m}`" for m in cells.missing)
                     + " (recorded by newer runs): those columns show –.")
    for old in renamed_columns(run):
        notes.append(f"This run predates the rename of `{old}` to `{RENAMED[old]}`; its "
                     f"`{old}` is shown under the new name.")
    if "cpu_us_per_op" in needed and not cells.has["cpu_us_per_op"]:
        notes.append("This run records no CPU per operation (`cpu_us_per_op`): the CPU "
                     "columns show –.")
    if not cells.has["overcommitted"]:
        notes.append("This run does not record which cells overcommit the CPUs, so no row "
                     "can decide a verdict alone (at most partly met).")
    if "promise" in needed and not cells.has["promise"]:
        notes.append("This run records no `promise` per system; the promises used are the "
                     "documented ones (AggBox and tcp_kack: kernel; every other system: app).")
    return notes


def _headline_range(comps: list[Comparison], how: Callable[[Comparison], str]) -> str:
    """Best to worst over the rows that may decide the verdict (else over all rows)."""
    clean = [c for c in comps if c.overcommitted is False]
    if clean:
        scope = f"{len(clean)} rows not overcommitted"
    elif all(c.overcommitted is None for c in comps):
        scope = f"{len(comps)} rows, overcommit not recorded"
    else:
        scope = f"{len(comps)} rows, all overcommitted"
    rows = clean or comps
    if not rows:
        return "no like-for-like comparison"
    best = min(rows, key=lambda c: c.ratio if np.isfinite(c.ratio) else math.inf)
    worst = max(rows, key=lambda c: c.ratio if np.isfinite(c.ratio) else -math.inf)
    if best is worst:
        return f"{how(best)} ({scope})"
    return f"best {how(best)}, worst {how(worst)} ({scope})"


def _label(cells: Cells, config: tuple, skip: Sequence[str] = (),
           fmt: Callable[[str, object], str] | None = None, order: Sequence[str] = ()) -> str:
    d = cells.config_dict(config)
    parts = []
    params = [p for p in order if p in cells.varying]
    for p in [*params, *(p for p in cells.varying if p not in params)]:
        if p in skip:
            continue
        parts.append(fmt(p, d[p]) if fmt else f"{p}={short_value(d[p])}")
    return " · ".join(parts) or "the one configuration"


# broadcast ------------------------------------------------------------------------------

BROADCAST_TARGET = 1 - 0.845


def against_strongest(cells: Cells, order: Sequence[str], fmt, metric: str, target: float,
                      also: Sequence[str] = (), skip: Sequence[str] = (),
                      keep: Callable[[dict], bool] | None = None,
                      ) -> tuple[list[Comparison], dict[str, list[Comparison]]]:
    """AggBox against the strongest baseline with its promise in every configuration
    (the headline comparisons), and against each system named in ``also`` where it ran.
    ``keep`` filters configurations by their parameter dict."""
    comps: list[Comparison] = []
    by_base: dict[str, list[Comparison]] = {b: [] for b in also}
    for config, rows in cells.configs(order):
        if "aggbox" not in rows.index or (keep and not keep(cells.config_dict(config))):
            continue
        label = _label(cells, config, skip=skip, fmt=fmt)
        base = strongest(rows, "aggbox", metric, promise=rows.loc["aggbox", "promise"])
        if base is not None:
            comps.append(compare(cells, config, rows, "aggbox", base, metric, target, label))
        for b in also:
            if b in rows.index:
                by_base[b].append(compare(cells, config, rows, "aggbox", b, metric, target,
                                          label))
    return comps, by_base


def every_system(cells: Cells, order: Sequence[str], fmt, metric: str,
                 extra: Callable[[pd.Series], list[str]]) -> list[list[str]]:
    """One row per (configuration, system): label, system (marked when overcommitted),
    the metric's p50 with its CI, the ``extra`` columns, n."""
    rows_out = []
    for config, rows in cells.configs(order):
        label = _label(cells, config, fmt=fmt)
        for system, r in rows.iterrows():
            rows_out.append([label, mark(system, r["overcommitted"]),
                             with_ci(r[f"{metric}_p50"], r[f"{metric}_ci_low"],
                                     r[f"{metric}_ci_high"]),
                             *extra(r), str(int(r[f"{metric}_n"]))])
    return rows_out


def _broadcast_fmt(p: str, v) -> str:
    if p == "hosts":
        return f"{v} hosts"
    if p == "size":
        return format_bytes(v)
    if p == "receivers":
        return f"{v} receivers"
    return str(v) if p == "placement" else f"{p}={short_value(v)}"


def broadcast_section(run: Run) -> Section:
    metric = "completion_us"
    cells = cells_of(run, ["completion_us", "delivery_us"])
    headline: list[Comparison] = []
    paper_cmp: dict[str, Comparison] = {}
    order = ("placement", "receivers", "size", "hosts")
    for config, rows in cells.configs(order):
        if "aggbox" not in rows.index:
            continue
        label = _label(cells, config, fmt=_broadcast_fmt, order=order)
        base = strongest(rows, "aggbox", metric, promise=rows.loc["aggbox", "promise"])
        if base is not None:
            headline.append(compare(cells, config, rows, "aggbox", base, metric,
                                    BROADCAST_TARGET, label))
        if "tcp" in rows.index:
            paper_cmp[label] = compare(cells, config, rows, "aggbox", "tcp", metric,
                                       BROADCAST_TARGET, label)

    def how(c: Comparison) -> str:
        return change(c.ratio, c.low, c.high)

    lines = [
        "Completion: the send until the root knows every member has the message. "
        "Delivery: the send until the last member's application has read it. AggBox "
        "completes when every member's kernel holds the message (promise `kernel`); the "
        "like-for-like baseline is the strongest one with the same promise (`tcp_kack`: "
        "TCP whose completion is every member's kernel ACK). The paper compared with "
        "application-level TCP (promise `app`, a weaker baseline for AggBox's promise); "
        "that comparison is shown beside it, labelled. Change = AggBox p50 / baseline "
        "p50 − 1, with its 95% bootstrap CI; the paper's claim is −84.5%.", ""]
    comps_by_label = {c.label: c for c in headline}
    labels = list(dict.fromkeys([*comps_by_label, *paper_cmp]))
    rows_out = []
    for label in labels:
        c, p = comps_by_label.get(label), paper_cmp.get(label)
        ref = c or p
        oc = c.overcommitted if c else None
        rows_out.append([
            mark(label, oc),
            c.base if c else "none recorded",
            num(ref.ours_p50),
            num(c.base_p50) if c else "–",
            how(c) if c else "–",
            cpu_ratio(c.ours_cpu, c.base_cpu) if c else "–",
            ("yes" if c.meets else "no") if c else "–",
            how(p) if p else "–",
        ])
    lines += md_table(["configuration", "same-promise baseline", "AggBox p50 (µs)",
                       "baseline p50 (µs)", "change [95% CI]", "CPU/op vs baseline",
                       "reaches −84.5%", "paper's comparison: vs tcp (app)"], rows_out)
    n_oc = sum(1 for c in headline if c.overcommitted)
    if n_oc:
        lines += ["", OVERCOMMIT_LEGEND]
    lines += ["", "Every system, per configuration: p50 with its 95% bootstrap CI "
              "(µs), the whole machine's CPU per broadcast (µs, background subtracted), "
              "the share of broadcasts every member received."]
    group_params = [p for p in order if p in cells.varying and p != "hosts"]
    group_params += [p for p in cells.varying if p not in (*group_params, "hosts")]
    by_group: dict[tuple, list[list[str]]] = {}
    for config, rows in cells.configs(order):
        d = cells.config_dict(config)
        gkey = tuple(d[p] for p in group_params)
        for system, r in rows.iterrows():
            by_group.setdefault(gkey, []).append([
                str(d.get("hosts", "–")),
                mark(system, r["overcommitted"]),
                r["promise"],
                with_ci(r["completion_us_p50"], r["completion_us_ci_low"],
                        r["completion_us_ci_high"]),
                with_ci(r.get("delivery_us_p50", math.nan), r.get("delivery_us_ci_low", math.nan),
                        r.get("delivery_us_ci_high", math.nan)),
                num(r["cpu_us_per_op"]),
                f"{100 * r['delivered']:.0f}%" if np.isfinite(r["delivered"]) else "–",
                str(int(r["completion_us_n"])),
            ])
    for gkey, rows_ in by_group.items():
        title = " · ".join(_broadcast_fmt(p, v) for p, v in zip(group_params, gkey,
                                                                 strict=True))
        lines += ["", f"#### {title or 'all configurations'}", ""]
        lines += md_table(["hosts", "system", "promise", "completion p50 (µs)",
                           "delivery p50 (µs)", "CPU/op (µs)", "delivered", "n"], rows_)
    if any(r[1].endswith(DAGGER) for rs in by_group.values() for r in rs):
        lines += ["", OVERCOMMIT_LEGEND]
    lines += where_time_goes(cells, "broadcast", order, _broadcast_fmt)
    notes = _missing_notes(cells, run, ["cpu_us_per_op", "promise"])
    if not headline:
        notes.append("This run has no baseline with AggBox's promise (`tcp_kack`), so the "
                     "like-for-like comparison is missing; only the paper's comparison "
                     "with `tcp` is shown.")
    return Section(lines=lines, notes=notes, overcommitted=n_oc,
                   overcommit_known=cells.has["overcommitted"], rows=len(headline),
                   verdict=verdict(headline, "−84.5%", how,
                                   "the strongest same-promise baseline",
                                   "baseline with AggBox's kernel promise (tcp_kack)"),
                   headline=(_headline_range(headline, how) + " vs "
                             + ", ".join(sorted({c.base for c in headline})) if headline
                             else "no same-promise baseline in this run; the paper's "
                             "comparison vs tcp (app): "
                             + _headline_range(list(paper_cmp.values()), how)))


# mapreduce ------------------------------------------------------------------------------

MAPREDUCE_TARGET = 1 / 43
MAPREDUCE_PAIRS = (("aggbox", "tcp_combiner", "with combiner"),
                   ("aggbox_nocombiner", "tcp", "without combiner"))
_MR_ORDER = ("aggbox", "aggbox_nocombiner", "tcp_combiner", "tcp")


def _mr_fmt(p: str, v) -> str:
    if p == "words":
        return f"{short_value(v)} words"
    if p in ("mappers", "reducers"):
        return f"{v} {p}"
    return f"{p} {short_value(v)}"


def mapreduce_section(run: Run) -> Section:
    metric = "job_s"
    cells = cells_of(run, ["job_s", "after_last_send_s"])
    comps: list[Comparison] = []
    for config, rows in cells.configs():
        label = _label(cells, config, fmt=_mr_fmt)
        for ours, base, group in MAPREDUCE_PAIRS:
            if {ours, base} <= set(rows.index) and metric in cells.metrics:
                comps.append(compare(cells, config, rows, ours, base, metric,
                                     MAPREDUCE_TARGET, label, group))

    def how(c: Comparison) -> str:
        return speedup(c.ratio, c.low, c.high)

    lines = [
        "Word count. Whole-job time (the first mapper starts reading until the counts are "
        "written) is the headline, like for like: AggBox with its mapper combiner against "
        "the TCP shuffle with a combiner, and AggBox without a combiner against TCP "
        "without one. Speed-up = baseline p50 / AggBox p50 with its 95% bootstrap CI; the "
        "paper's claim is 43x. CPU per job is the whole machine's busy CPU over the job "
        "(background subtracted), which includes AggBox's in-kernel work.", ""]
    for _ours, _base, group in MAPREDUCE_PAIRS:
        part = [c for c in comps if c.group == group]
        if not part:
            continue
        o, b = part[0].ours, part[0].base
        lines += [f"#### Job time, {group}: {o} vs {b}", ""]
        lines += md_table(
            ["configuration", f"{o} job (s)", f"{b} job (s)", "speed-up [95% CI]",
             f"{o} CPU/job (ms)", f"{b} CPU/job (ms)", "CPU vs baseline", "reaches 43x"],
            [[mark(c.label, c.overcommitted), num(c.ours_p50), num(c.base_p50), how(c),
              num(c.ours_cpu / 1e3), num(c.base_cpu / 1e3), cpu_ratio(c.ours_cpu, c.base_cpu),
              "yes" if c.meets else "no"] for c in part])
        lines.append("")
    n_oc = sum(1 for c in comps if c.overcommitted)
    if n_oc:
        lines += [OVERCOMMIT_LEGEND, ""]
    if "after_last_send_s" in cells.metrics:
        systems = [s for s in _MR_ORDER if s in set(cells.table["system"])]
        lines += [
            "#### After the last send",
            "",
            "`after_last_send_s`: the last mapper's last send until the reducer's counts are "
            "final. It is not a fair speed measure on its own: AggBox has already done its "
            "reduce work inside the mappers' sendto (in the kernel) by then, while a TCP "
            "reducer still has to read and merge. Read it next to the CPU per job, which "
            "counts that work wherever it ran.", ""]
        rows_out = []
        for config, rows in cells.configs():
            row = [mark(_label(cells, config, fmt=_mr_fmt),
                        any(bool(rows.loc[s, "overcommitted"]) for s in systems
                            if s in rows.index))]
            for s in systems:
                if s not in rows.index:
                    row.append("–")
                    continue
                r = rows.loc[s]
                row.append(f"{num(r['after_last_send_s_p50'] * 1e3)} / "
                           f"{num(r['cpu_us_per_op'] / 1e3)}")
            rows_out.append(row)
        lines += md_table(["configuration", *(f"{s} (ms / CPU ms)" for s in systems)],
                          rows_out)
    exact = cells.samples["exact"] if "exact" in cells.samples else None
    if exact is not None:
        lines += ["", f"Exact counts (equal to collections.Counter's) in "
                  f"{int(exact.astype(bool).sum())} of {len(exact)} jobs."]
    lines += where_time_goes(cells, "mapreduce", (), _mr_fmt, scale=1e3, unit="ms")
    notes = _missing_notes(cells, run, ["cpu_us_per_op"])
    missing_pairs = [f"{o} vs {b}" for o, b, _ in MAPREDUCE_PAIRS
                     if not any(c.ours == o and c.base == b for c in comps)]
    if missing_pairs:
        notes.append("This run lacks the like-for-like pair(s) " + ", ".join(missing_pairs)
                     + ".")
    return Section(lines=lines, notes=notes, overcommitted=n_oc,
                   overcommit_known=cells.has["overcommitted"], rows=len(comps),
                   verdict=verdict(comps, "43x", how,
                                   "the TCP shuffle with the same combiner setting",
                                   "TCP shuffle to pair with an AggBox variant"),
                   headline=_headline_range(comps, how))


# allreduce ------------------------------------------------------------------------------

ALLREDUCE_TARGET = 1 - 0.561


def _ar_fmt(p: str, v) -> str:
    if p == "floats":
        return format_bytes(4 * int(v))
    if p == "workers":
        return f"{v} workers"
    return f"{p}={short_value(v)}"


def allreduce_section(run: Run) -> Section:
    metric = "time_ms"
    cells = cells_of(run, ["time_ms", "max_abs_err", "err_bound"])
    comps, by_base = against_strongest(cells, ("workers", "floats"), _ar_fmt, metric,
                                       ALLREDUCE_TARGET, also=("gloo",))
    gloo = {g.label: g for g in by_base["gloo"]}

    def how(c: Comparison) -> str:
        return change(c.ratio, c.low, c.high)

    lines = [
        "Time per allreduce call on rank 0, float32 gradients (size = bytes per worker). "
        "Every system's result is in each worker's application (promise `app`); the "
        "baseline is the strongest one measured in the same configuration. Change = AggBox "
        "p50 / baseline p50 − 1 with its 95% bootstrap CI; the paper's claim is −56.1% "
        "(56.1% faster). CPU per call is the whole machine's.", ""]
    rows_out = []
    for c in comps:
        g = gloo.get(c.label) if c.base != "gloo" else None
        rows_out.append([mark(c.label, c.overcommitted), c.base, num(c.ours_p50),
                         num(c.base_p50), how(c), cpu_ratio(c.ours_cpu, c.base_cpu),
                         "yes" if c.meets else "no",
                         how(g) if g else ("(gloo is the baseline)" if c.base == "gloo"
                                           else "–")])
    lines += md_table(["configuration", "strongest baseline", "AggBox p50 (ms)",
                       "baseline p50 (ms)", "change [95% CI]", "CPU/call vs baseline",
                       "reaches −56.1%", "vs gloo"], rows_out)
    n_oc = sum(1 for c in comps if c.overcommitted)
    if n_oc:
        lines += ["", OVERCOMMIT_LEGEND]
    lines += ["", "Every system: p50 with its 95% bootstrap CI (ms), CPU per call (µs), "
              "busy processes per CPU.", ""]
    rows_out = every_system(cells, ("workers", "floats"), _ar_fmt, metric,
                            lambda r: [num(r["cpu_us_per_op"]), num(r["procs_per_cpu"], 2)])
    lines += md_table(["configuration", "system", "time p50 (ms)", "CPU/call (µs)",
                       "procs/CPU", "n"], rows_out)
    lines += where_time_goes(cells, "allreduce", ("workers", "floats"), _ar_fmt, scale=1e3,
                             unit="ms")
    notes = _missing_notes(cells, run, ["cpu_us_per_op"])
    return Section(lines=lines, notes=notes, overcommitted=n_oc,
                   overcommit_known=cells.has["overcommitted"], rows=len(comps),
                   verdict=verdict(comps, "−56.1%", how, "the strongest baseline",
                                   "baseline"),
                   headline=_headline_range(comps, how) + " vs " + (
                       ", ".join(sorted({c.base for c in comps})) or "–"))


def quantization_bound(run: Run) -> str | None:
    """One sentence on AggBox's allreduce error against its stated bound, or None."""
    s = samples_of(run)
    if not {"max_abs_err", "err_bound"} <= set(s.columns):
        return None
    ours = s[s["system"] == "aggbox"]
    err, bound = _finite(ours["max_abs_err"].to_numpy()), _finite(ours["err_bound"].to_numpy())
    if not err.size or not bound.size:
        return None
    inside = (ours["max_abs_err"] <= ours["err_bound"]).sum()
    return (f"AggBox's allreduce sums quantized values (fixed point with a shared scale per "
            f"block), so its float result differs from the exact sum within a stated bound: "
            f"{inside} of {len(ours)} calls within it; largest error {err.max():.1e}, bound "
            f"{bound.min():.1e} to {bound.max():.1e}. The baselines sum floats.")


# training -------------------------------------------------------------------------------

TRAINING_PARITY_PP = 0.5  # AggBox's mean final test accuracy within this of gloo's


def _tr_fmt(p: str, v) -> str:
    if p == "workers":
        return f"{v} ranks"
    if p == "task":
        return str(v)
    return f"{p}={short_value(v)}"


def training_accuracy(run: Run) -> dict[tuple, dict[str, np.ndarray]]:
    """(configuration without the task) -> system -> final test accuracy per (repetition,
    seed): every sample of a seed carries its model's final figure."""
    s = samples_of(run)
    if "test_accuracy" not in s or "task" not in s:
        return {}
    s = s[(s["task"] == "digits") & np.isfinite(s["test_accuracy"].astype(float))]
    params = [c for c in run.param_columns if c in s and c != "task"]
    keys = [*params, "system", *(c for c in ("repetition", "seed") if c in s)]
    per = s.groupby(keys, dropna=False)["test_accuracy"].first().reset_index()
    out: dict[tuple, dict[str, np.ndarray]] = {}
    for key, g in per.groupby(params, dropna=False) if params else [((), per)]:
        key = key if isinstance(key, tuple) else (key,)
        out[key] = {system: x["test_accuracy"].to_numpy(float)
                    for system, x in g.groupby("system")}
    return out


def training_section(run: Run) -> Section:
    metric = "iter_ms"
    cells = cells_of(run, ["iter_ms", "comm_ms"])
    s = samples_of(run)
    heavy_tasks = {"comm-heavy"} if "task" in s else set()
    comps, by_base = against_strongest(
        cells, ("task", "workers"), _tr_fmt, metric, ALLREDUCE_TARGET,
        also=("gloo", "gloo_fp16"), skip=("task",),
        keep=lambda d: not heavy_tasks or d.get("task") in heavy_tasks)

    def how(c: Comparison) -> str:
        return change(c.ratio, c.low, c.high)

    lines = [
        "DistributedDataParallel training over a gloo process group; the gradient buckets "
        "averaged by gloo's allreduce, gloo with fp16 compression (`fp16_compress_hook`) or "
        "AggBox's hook (`aggbox.torch.allreduce_hook`), every system from the same weights "
        "on the same data order. Time per iteration (forward, backward, step) on rank 0 of "
        "the communication-heavy model (about 3.2 M parameters); change = AggBox p50 / "
        "baseline p50 − 1 with its 95% bootstrap CI (the paper's claim for the aggregation "
        "itself: −56.1%). CPU per iteration is the whole machine's.", ""]
    rows_out = []
    for c in comps:
        g, f = ({x.label: x for x in by_base[b]}.get(c.label) for b in ("gloo", "gloo_fp16"))
        rows_out.append([mark(c.label, c.overcommitted), c.base, num(c.ours_p50),
                         num(c.base_p50), how(c), cpu_ratio(c.ours_cpu, c.base_cpu),
                         how(g) if g else "–", how(f) if f else "–"])
    lines += md_table(["configuration", "strongest baseline", "AggBox p50 (ms)",
                       "baseline p50 (ms)", "change [95% CI]", "CPU/iteration vs baseline",
                       "vs gloo", "vs gloo fp16"], rows_out)
    n_oc = sum(1 for c in comps if c.overcommitted)
    if n_oc:
        lines += ["", OVERCOMMIT_LEGEND]
    lines += ["", "Every system: time per iteration p50 with its 95% bootstrap CI (ms), the "
              "part in the gradient hook (p50, ms), CPU per iteration (µs).", ""]
    rows_out = every_system(cells, ("task", "workers"), _tr_fmt, metric,
                            lambda r: [num(r.get("comm_ms_p50", math.nan)),
                                       num(r["cpu_us_per_op"])])
    lines += md_table(["configuration", "system", "iteration p50 (ms)", "in hook (ms)",
                       "CPU/iteration (µs)", "n"], rows_out)
    # accuracy parity (digits)
    acc = training_accuracy(run)
    parity: list[tuple[str, float]] = []
    rows_out = []
    params = [c for c in run.param_columns if c in s and c != "task"]
    for key, systems in acc.items():
        label = " · ".join(_tr_fmt(p, v) for p, v in zip(params, key, strict=True)
                           if p in cells.varying) or "digits"
        ref = systems.get("gloo")
        for system, x in systems.items():
            diff = (100 * (x.mean() - ref.mean()) if ref is not None and system != "gloo"
                    else math.nan)
            if system == "aggbox" and np.isfinite(diff):
                parity.append((label, diff))
            rows_out.append([label, system, f"{100 * x.mean():.2f} ± {100 * x.std():.2f}",
                             str(x.size), "–" if not np.isfinite(diff) else f"{diff:+.2f}"])
    if rows_out:
        lines += ["", "Final test accuracy on scikit-learn's digits (held-out 25%), mean ± "
                  "std over seeds and repetitions (%), and the difference from gloo's "
                  f"(percentage points; parity: within ±{TRAINING_PARITY_PP}).", ""]
        lines += md_table(["configuration", "system", "test accuracy (%)", "models",
                           "vs gloo (pp)"], rows_out)
    notes = _missing_notes(cells, run, ["cpu_us_per_op"])
    if not acc:
        notes.append("no digits task in this run: accuracy parity is not checked")
    time_verdict = verdict(comps, "−56.1%", how, "the strongest baseline", "baseline")
    worst = max(parity, key=lambda p: abs(p[1])) if parity else None
    if worst is None:
        acc_text = "accuracy parity not measured"
    else:
        ok = abs(worst[1]) <= TRAINING_PARITY_PP
        acc_text = (f"accuracy {'within' if ok else 'NOT within'} {TRAINING_PARITY_PP} pp "
                    f"of gloo (largest difference {worst[1]:+.2f} pp at {worst[0]})")
        if not ok and " — " in time_verdict and not time_verdict.startswith(
                "Verdict: not judged"):
            time_verdict = "Verdict: not met — " + time_verdict.split(" — ", 1)[1]
    head, _, tail = time_verdict.partition(" — ")
    final = f"{head} — {tail.rstrip('.')}; {acc_text}."
    fp16 = by_base["gloo_fp16"]
    headline = _headline_range(comps, how) + " vs " + (
        ", ".join(sorted({c.base for c in comps})) or "–")
    if fp16 and not all(c.base == "gloo_fp16" for c in comps):
        headline += "; vs fp16 compression " + _headline_range(fp16, how)
    return Section(lines=lines, notes=notes, overcommitted=n_oc,
                   overcommit_known=cells.has["overcommitted"], rows=len(comps),
                   verdict=final, headline=headline + "; " + acc_text)


# ----------------------------------------------------------------------------- the report


@dataclass
class Claim:
    experiment: str
    title: str
    paper: str  # the paper's number, in its words
    build: Callable[[Run], Section]


CLAIMS: list[Claim] = [
    Claim("broadcast", "Broadcast", "84.5% lower broadcast latency", broadcast_section),
    Claim("mapreduce", "MapReduce", "43x faster MapReduce", mapreduce_section),
    Claim("allreduce", "ML gradient aggregation (allreduce)",
          "56.1% faster gradient aggregation", allreduce_section),
    Claim("training", "ML gradient aggregation (training)",
          "56.1% faster gradient aggregation", training_section),
]

RULE = (
    "How to read a verdict. Each claim is checked per configuration (a cell of the "
    "experiment's grid) against the strongest like-for-like baseline: the one with the "
    "lowest median among the baselines that keep AggBox's promise (what \"done\" means: "
    "`kernel` = every member's kernel holds the data, `app` = every member's application "
    "read it); for MapReduce, the TCP shuffle with the same combiner setting. A "
    "configuration reaches the paper's number when the ratio of medians does (AggBox / "
    "baseline at most 0.155 for −84.5%, at most 0.439 for −56.1%, baseline / AggBox at "
    "least 43 for 43x), and its 95% bootstrap CI lies wholly on AggBox's side of no "
    "difference. The claim is **met** "
    "when every configuration that is not overcommitted reaches it, **partly met** when "
    "some do (or only overcommitted ones), **not met** when none does; **not judged** when "
    "the run has no like-for-like baseline. An overcommitted configuration "
    f"({DAGGER}: more processes that must run at once than CPUs) is shown but never "
    "decides a verdict alone."
).replace("**", "")  # no bold anywhere: a loss must not look like a headline


def _machine(run: Run) -> str:
    m = run.meta.get("machine") or {}
    cpu = m.get("cpu_model", "?")
    return (f"kernel {m.get('kernel', '?')}, {m.get('cpu_count', '?')} × {cpu}; "
            f"testbed {run.meta.get('testbed', {}).get('backend', 'netns')}")


def _run_line(run: Run) -> str:
    m = run.meta
    s = samples_of(run)
    per = s.groupby([*(c for c in run.param_columns if c in s), "system"], dropna=False).size()
    n = f"{per.min()}" if per.min() == per.max() else f"{per.min()}–{per.max()}"
    extra = []
    for key in ("load_before", "load_after"):
        load = m.get(key) or m.get("load", {}).get(key.split("_")[1])
        if isinstance(load, dict) and "loadavg" in load:
            extra.append(f"load average {key.split('_')[1]}: "
                         f"{' '.join(f'{x:.2f}' for x in load['loadavg'])}")
    if "cpu_source" in s:
        extra.append("CPU from " + ", ".join(sorted(s["cpu_source"].dropna().astype(str)
                                                    .unique())))
    return (f"Run `{run.run_id}` ({m.get('mode', '?')} mode): {m.get('repetitions', '?')} "
            f"repetition(s) of {m.get('iters', '?')} measured operations per system and "
            f"cell after {m.get('warmup', '?')} warm-up; n = {n} per system and "
            f"configuration; {_machine(run)}" + ("; " + "; ".join(extra) if extra else "")
            + ".")


def _figures(run: Run, rel: str) -> list[str]:
    names = list(dict.fromkeys([*run.figures, f"{run.meta.get('workload', '')}_cpu"]))
    out = []
    for fig in names:  # a figure may be split per parameter: name-param=value.png
        for png in sorted(run.path.glob("*.png")):
            if png.stem == fig or png.stem.startswith(fig + "-"):
                out += ["", f"![{png.stem}]({rel}/{png.name})"]
    return out


def _caveats(runs: dict[str, Run], sections: dict[str, Section]) -> list[str]:
    out = ["## Caveats", ""]
    cpus = {(r.meta.get("machine") or {}).get("cpu_count") for r in runs.values()}
    cpus.discard(None)
    n_cpu = ", ".join(str(c) for c in sorted(cpus)) or "?"
    out.append(f"- One machine with {n_cpu} shared vCPU(s) runs every host (network "
               "namespaces): the hosts compete for the same CPUs, which real machines "
               "would not. CPU per operation is the comparison that survives the move to "
               "one machine per host.")
    oc = [f"{name} {s.overcommitted} of {s.rows}" if s.overcommit_known
          else f"{name} not recorded" for name, s in sections.items() if s.rows]
    if oc:
        out.append("- Overcommitted headline rows (" + DAGGER + "): " + "; ".join(oc)
                   + ". They are shown, never decisive alone.")
    if "allreduce" in runs:
        out.append("- Allreduce: AggBox uses an extra host, the aggregator, whose kernel "
                   "sums the blocks; gloo gets no such host (its ranks exchange among "
                   "themselves). The TCP parameter server runs on that same extra host.")
        q = quantization_bound(runs["allreduce"])
        if q:
            out.append(f"- {q}")
    for name, run in runs.items():
        out.append(f"- {name}: {_run_line(run)}")
    old = [name for name, s in sections.items() if s.notes]
    if old:
        out.append("- Recorded before some columns existed: " + ", ".join(old)
                   + " (each section's Missing lines say what is not shown).")
    for name, run in runs.items():
        for system, why in (run.meta.get("skipped_systems") or {}).items():
            out.append(f"- {name}: {system} did not run ({why}); its comparisons are "
                       "missing, and a headline may lack its strongest baseline.")
    if any(r.meta.get("synthetic") for r in runs.values()):
        out.append("- SYNTHETIC TEST DATA in at least one run: not a measurement.")
    return out + [""]


def build_report(results_dir: Path = RESULTS_DIR) -> str:
    runs: dict[str, Run] = {}
    sections: dict[str, Section] = {}
    body: list[str] = []
    summary_rows = []
    for i, claim in enumerate(CLAIMS, 1):
        body += [f"## {i}. {claim.title}: \"{claim.paper}\"", ""]
        try:
            run = latest_run(claim.experiment, results_dir)
        except Exception:  # no run yet: say so rather than fail the report
            body += [f"The paper: {claim.paper}.", "",
                     f"Verdict: not judged — not measured yet: run `aggbox run "
                     f"experiments/{claim.experiment}.yaml`.", ""]
            summary_rows.append([claim.title, claim.paper, "not measured", "not judged"])
            continue
        runs[claim.experiment] = run
        section = claim.build(run)
        sections[claim.experiment] = section
        rel = os.path.relpath(run.path, results_dir)
        body += [f"The paper: {claim.paper}. Measured: {section.headline}.", "",
                 section.verdict, ""]
        body += [f"{_run_line(run)}", ""]
        for note in section.notes:
            body += [f"Missing: {note}", ""]
        body += section.lines
        body += _figures(run, rel)
        body.append("")
        summary_rows.append([claim.title, claim.paper, section.headline,
                             section.verdict.split(" — ")[0].removeprefix("Verdict: ")])
    head = [
        "# AggBox: the paper's claims, measured on this machine", "",
        "Written by `aggbox report` (the last step of `make experiment`) from the latest "
        "run of each experiment. Every ratio compares systems measured side by side in the "
        "same run, on the same testbed; p50 is the median, and every interval is a 95% "
        "bootstrap confidence interval (of the median, or of the ratio of medians).", "",
        RULE, "",
    ]
    head += md_table(["claim", "paper", "measured (like for like)", "verdict"], summary_rows)
    head.append("")
    return "\n".join([*head, *_caveats(runs, sections), *body,
                      *reliability_section(results_dir)])


def latest_chaos(results_dir: Path) -> Path | None:
    """The newest ``results/chaos/<run>/cells.json`` (``aggbox chaos``), if any."""
    runs = sorted((p for p in (results_dir / "chaos").glob("*/cells.json")
                   if not p.parent.is_symlink()),  # not `latest`: a clone has no link
                  key=lambda p: p.parent.name)
    return runs[-1] if runs else None


def reliability_section(results_dir: Path = RESULTS_DIR) -> list[str]:
    """"Reliability": the fault campaign's verdicts per workload and the failed cells."""
    out = ["## Reliability: the fault campaign", ""]
    path = latest_chaos(results_dir)
    if path is None:
        return out + ["Not run yet: `sudo .venv/bin/aggbox chaos --quick` (or without "
                      "`--quick` for larger cells) writes results/chaos/chaos-<time>/cells.json "
                      "and table.md; what a cell and its verdict mean: docs/reliability.md.", ""]
    campaign = json.loads(path.read_text())
    cells = campaign.get("cells", [])
    rel = os.path.relpath(path.parent, results_dir)
    out += [f"{campaign.get('n_ok', 0)} of {len(cells)} cells ok "
            f"({'quick' if campaign.get('quick') else 'full'} campaign, "
            f"{campaign.get('seconds', '?')} s, git {campaign.get('git', '?')}, kernel "
            f"{campaign.get('kernel', '?')}); every cell: [{rel}/table.md]({rel}/table.md). "
            "A cell is ok when every result is exact (allreduce: within its quantization "
            "bound) or the first error names the failed host, the expected kernel counter "
            "moved, dmesg shows no new warning and nothing is left behind "
            "(docs/reliability.md).", ""]
    rows = []
    for w in sorted({c["workload"] for c in cells}):
        mine = [c for c in cells if c["workload"] == w]
        rows.append([w, str(len(mine)), str(sum(c["verdict"] == "ok" for c in mine)),
                     ", ".join(c["fault"] for c in mine if c["verdict"] != "ok") or "-"])
    out += md_table(["workload", "cells", "ok", "failed cells"], rows)
    failed = [c for c in cells if c["verdict"] != "ok"]
    if failed:
        out += ["", "Failed cells:", ""]
        out += [f"- {c['workload']}/{c['fault']}: {c['detail'][:400]}" for c in failed]
    return out + [""]


def write_report(results_dir: Path = RESULTS_DIR) -> Path:
    path = results_dir / "REPORT.md"
    atomic_write_text(path, build_report(results_dir))
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write results/REPORT.md from the latest runs",
                              epilog="examples:\n  aggbox report\n"
                              "  aggbox report --results /tmp/results-copy")
    p.add_argument("--results", type=Path, default=RESULTS_DIR,
                   help="the results folder whose latest runs are read and where REPORT.md "
                   "is written (default: results/, or $AGGBOX_RESULTS)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    print(write_report(args.results))
    return 0
