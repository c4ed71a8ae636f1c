"""results/REPORT.md: each paper claim next to what this machine measured.

``aggbox report`` (run at the end of ``make experiment``) reads the latest run of every
experiment through the shared loader (aggbox/results.py) and writes the report
atomically. A claim whose experiment has not run yet says so instead of a number.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggbox import RESULTS_DIR
from aggbox.results import Run, atomic_write_text, latest_run


@dataclass
class Claim:
    experiment: str
    paper: str  # the paper's words
    measure: Callable[[Run], list[str]]  # markdown lines: what this run shows


def _broadcast(run: Run) -> list[str]:
    s = run.summary
    metric = "completion_us_p50"
    if "placement" not in s:
        s = s.assign(placement="root-alone")
    lines = ["Completion latency p50 (send until the root knows every member has the "
             "message). CPU placement: `root-alone` = the root alone on CPU 0, members on "
             "the rest; `shared` = every host on every CPU (see docs/broadcast.md).", "",
             "| placement | receivers | hosts | AggBox p50 (µs) | TCP p50 (µs) | UDP p50 (µs) | "
             "reduction vs TCP | n per system |", "|---|---|---|---|---|---|---|---|"]
    for (placement, receivers), part in s.groupby(["placement", "receivers"]):
        for hosts in sorted(part["hosts"].unique()):
            row = part[part["hosts"] == hosts].set_index("system")
            if "aggbox" not in row.index or "tcp" not in row.index:
                continue
            agg, tcp = row.loc["aggbox", metric], row.loc["tcp", metric]
            udp = f"{row.loc['udp', metric]:.0f}" if "udp" in row.index else "–"
            n = int(row.loc["aggbox", "completion_us_n"])
            lines.append(f"| {placement} | {receivers} | {hosts} | {agg:.0f} | {tcp:.0f} | {udp} | "
                         f"**{100 * (1 - agg / tcp):.1f}%** | {n} |")
    return lines


def _allreduce(run: Run) -> list[str]:
    s = run.summary
    lines = ["Time per call, p50 on rank 0 (AggBox = in-kernel aggregation, one round, "
             "aligned scales). Faster = 1 - AggBox / baseline.", "",
             "| workers | floats | AggBox (ms) | gloo (ms) | TCP PS (ms) | faster than gloo | "
             "vs TCP PS | max err AggBox / bound | n |", "|---|---|---|---|---|---|---|---|---|"]
    for (workers, floats), part in s.groupby(["workers", "floats"]):
        row = part.set_index("system")
        if "aggbox" not in row.index:
            continue
        agg = row.loc["aggbox", "time_ms_p50"]
        base = {sys_: row.loc[sys_, "time_ms_p50"] for sys_ in ("gloo", "tcp_ps")
                if sys_ in row.index}
        cell = {k: f"{v:.2f}" for k, v in base.items()}
        faster = {k: f"{100 * (1 - agg / v):.1f}%" for k, v in base.items()}
        err = (f"{row.loc['aggbox', 'max_abs_err_p99']:.1e} / "
               f"{row.loc['aggbox', 'err_bound_p99']:.1e}")
        lines.append(f"| {workers} | {floats} | {agg:.2f} | {cell.get('gloo', '–')} | "
                     f"{cell.get('tcp_ps', '–')} | **{faster.get('gloo', '–')}** | "
                     f"{faster.get('tcp_ps', '–')} | {err} | "
                     f"{int(row.loc['aggbox', 'time_ms_n'])} |")
    return lines


def _mapreduce(run: Run) -> list[str]:
    s, samples = run.summary, run.samples
    keys = [k for k in ("words", "mappers", "reducers", "skew") if k in s]
    lines = ["Word count, medians per configuration. Reduce phase: the last mapper's last "
             "byte sent -> the reducer's counts are final; job: first mapper starts reading "
             "-> counts written. Speed-up = TCP time / AggBox time (AggBox with its mapper "
             "combiner; the classic TCP shuffle has none). Exact: every job's counts equal "
             "collections.Counter's (see docs/mapreduce.md).", "",
             "| " + " | ".join(keys) + " | reduce AggBox (ms) | reduce TCP (ms) | "
             "reduce TCP+comb. (ms) | **reduce speed-up vs TCP** | vs TCP+comb. | job AggBox (s) "
             "| job TCP (s) | job TCP+comb. (s) | job speed-up vs TCP | exact | n |",
             "|" + "---|" * (len(keys) + 11)]
    for config, part in s.groupby(keys):
        row = part.set_index("system")
        if not {"aggbox", "tcp"} <= set(row.index):
            continue
        red = {x: row.loc[x, "reduce_s_p50"] for x in row.index}
        job = {x: row.loc[x, "job_s_p50"] for x in row.index}
        mask = np.ones(len(samples), dtype=bool)
        for k, v in zip(keys, config, strict=True):
            mask &= (samples[k] == v).to_numpy()
        exact = bool(samples.loc[mask, "exact"].all()) if "exact" in samples else None
        comb = "tcp_combiner" in red
        lines.append(
            "| " + " | ".join(str(v) for v in config)
            + f" | {red['aggbox'] * 1e3:.2f} | {red['tcp'] * 1e3:.1f} | "
            + (f"{red['tcp_combiner'] * 1e3:.1f}" if comb else "–")
            + f" | **{red['tcp'] / red['aggbox']:.0f}x** | "
            + (f"{red['tcp_combiner'] / red['aggbox']:.0f}x" if comb else "–")
            + f" | {job['aggbox']:.3f} | {job['tcp']:.3f} | "
            + (f"{job['tcp_combiner']:.3f}" if comb else "–")
            + f" | {job['tcp'] / job['aggbox']:.2f}x | {exact} | "
            + f"{int(row.loc['aggbox', 'reduce_s_n'])} |")
    return lines


CLAIMS: list[Claim] = [
    Claim("broadcast", "84.5% lower broadcast latency", _broadcast),
    Claim("allreduce", "56.1% faster gradient aggregation", _allreduce),
    Claim("mapreduce", "43x faster MapReduce", _mapreduce),
]


def _machine(run: Run) -> str:
    m = run.meta.get("machine", {})
    cpu = m.get("cpu_model", "?")
    return (f"{m.get('kernel', '?')}, {m.get('cpu_count', '?')} × {cpu}; "
            f"testbed {run.meta.get('testbed', {}).get('backend', 'netns')}")


def build_report(results_dir: Path = RESULTS_DIR) -> str:
    out = ["# AggBox: the paper's claims, measured on this machine", "",
           "Written by `aggbox report` (the last step of `make experiment`) from the latest "
           "run of each experiment. Every ratio compares systems measured side by side in "
           "the same run, on the same testbed.", ""]
    for claim in CLAIMS:
        out += [f"## {claim.experiment}: {claim.paper}", ""]
        try:
            run = latest_run(claim.experiment, results_dir)
        except Exception:  # no run yet: say so rather than fail the report
            out += [f"Not measured yet: run `aggbox run experiments/{claim.experiment}.yaml`.",
                    ""]
            continue
        rel = os.path.relpath(run.path, results_dir)
        out += [f"Run `{run.run_id}` ({run.meta.get('mode', '?')} mode), machine: "
                f"{_machine(run)}.", ""]
        out += claim.measure(run)
        for fig in run.figures:  # a figure may be split per parameter: name-param=value.png
            for png in sorted(run.path.glob(f"{fig}*.png")):
                out += ["", f"![{png.stem}]({rel}/{png.name})"]
        out.append("")
    return "\n".join(out)


def write_report(results_dir: Path = RESULTS_DIR) -> Path:
    path = results_dir / "REPORT.md"
    atomic_write_text(path, build_report(results_dir))
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write results/REPORT.md from the latest runs")
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    print(write_report(args.results))
    return 0
