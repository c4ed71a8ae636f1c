"""Figures from stored runs: every figure is drawn from results/, never from a live run.

A figure function takes a :class:`~aggbox.results.Run` and writes PNG (150 dpi) and PDF
(TrueType fonts embedded, ``pdf.fonttype = 42``) files into the run's folder, returning
their paths. Functions register under a name with :func:`figure`; experiment files list
names under ``figures:``, and ``aggbox plot RUN_DIR`` redraws them from stored results.

Figures are built on :class:`matplotlib.figure.Figure` directly, not pyplot: no global
backend is switched and nothing is shown, so this module is safe to import in notebooks
(where ``broadcast_latency_figures(run)`` returns the figures themselves).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator, ScalarFormatter

from aggbox.errors import AggBoxError
from aggbox.results import Run, load_run, temp_beside

FigureFn = Callable[..., list[Path]]

#: figure name -> function(run, out_dir=None) -> written paths.
FIGURES: dict[str, FigureFn] = {}

#: workload -> figures drawn when a run's meta.json names none.
DEFAULT_FIGURES: dict[str, list[str]] = {
    "broadcast": ["broadcast_latency", "broadcast_cdf"],
    "allreduce": ["allreduce_time"],
    "mapreduce": ["mapreduce_speedup", "mapreduce_times"],
}

RC = {
    "pdf.fonttype": 42,  # embed TrueType, not Type 3: editable text, accepted by publishers
    "ps.fonttype": 42,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
PNG_DPI = 150

# One look per system, the same in every figure. AggBox stands out; baselines are muted.
SYSTEM_STYLE = {
    "aggbox": {"label": "AggBox", "color": "#c0392b", "marker": "o"},
    "tcp": {"label": "TCP", "color": "#2c3e50", "marker": "s"},
    "udp": {"label": "UDP", "color": "#7f8c8d", "marker": "^"},
    "gloo": {"label": "Gloo", "color": "#2980b9", "marker": "D"},
    "aggbox_nocombiner": {"label": "AggBox, no combiner", "color": "#e67e22", "marker": "o"},
    "tcp_combiner": {"label": "TCP + combiner", "color": "#16a085", "marker": "P"},
    "tcp_ps": {"label": "TCP param. server", "color": "#2c3e50", "marker": "s"},
}
_FALLBACK_COLORS = itertools.cycle(["#8e44ad", "#16a085", "#d35400", "#27ae60"])

METRIC_LABELS = {
    "completion_us": "completion latency (µs)",
    "delivery_us": "delivery latency (µs)",
    "sender_cpu_us": "sender CPU time (µs)",
    "time_ms": "time per call (ms)",
}


def figure(name: str) -> Callable[[FigureFn], FigureFn]:
    """Register a figure function under ``name`` (the name experiment files use)."""

    def add(fn: FigureFn) -> FigureFn:
        FIGURES[name] = fn
        return fn

    return add


def draw(run: Run, names: list[str] | None = None, out_dir: Path | None = None) -> list[Path]:
    """Draw ``names`` (default: the run's figures) for ``run``; return the written files."""
    names = names or figures_for(run)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise AggBoxError(
            f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(sorted(FIGURES))}"
        )
    paths: list[Path] = []
    for name in names:
        paths += FIGURES[name](run, out_dir=out_dir)
    return paths


def figures_for(run: Run) -> list[str]:
    return run.figures or DEFAULT_FIGURES.get(run.meta.get("workload", ""), [])


# ----------------------------------------------------------------------------- helpers


def style(system: str) -> dict:
    if system not in SYSTEM_STYLE:
        SYSTEM_STYLE[system] = {"label": system, "color": next(_FALLBACK_COLORS), "marker": "v"}
    return SYSTEM_STYLE[system]


def metric_label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if metric.endswith("_us"):
        return f"{metric[:-3].replace('_', ' ')} (µs)"
    return metric.replace("_", " ")


def format_bytes(n: object) -> str:
    n = int(n)  # type: ignore[arg-type]
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _n_text(counts: pd.Series) -> str:
    counts = counts.dropna().astype(int)
    if counts.empty:
        return "n=0"
    lo, hi = int(counts.min()), int(counts.max())
    return f"n={lo}" if lo == hi else f"n={lo}–{hi}"


def _values(run: Run, column: str) -> list:
    """A parameter's values in the experiment file's order (else sorted)."""
    present = list(pd.unique(run.samples[column]))
    grid = run.meta.get("grid", {}).get(column)
    if grid:
        return [v for v in grid if v in present] + [v for v in present if v not in grid]
    return sorted(present)


def _facets(run: Run, x: str, row: str | None, col: str | None) -> Iterator[tuple[str, dict]]:
    """One (file-name suffix, {param: value}) per figure, for parameters that are not axes.

    A run whose grid also varies, say, ``loss`` gets one figure per loss value.
    """
    params = run.param_columns or [c for c in (x, row, col) if c]
    others = [
        p for p in params
        if p not in (x, row, col) and p in run.samples and run.samples[p].nunique() > 1
    ]  # fmt: skip
    for combo in itertools.product(*(_values(run, p) for p in others)):
        fixed = dict(zip(others, combo, strict=True))
        suffix = "".join(f"-{k}={v}" for k, v in fixed.items())
        yield suffix, fixed


def _select(frame: pd.DataFrame, fixed: dict) -> pd.DataFrame:
    """Rows matching every {column: value}; columns the frame lacks are ignored."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in fixed.items():
        if column in frame:
            mask &= (frame[column] == value).to_numpy()
    return frame[mask]


def _grid(run: Run, row: str, col: str) -> tuple[list, list]:
    rows = _values(run, row) if row in run.samples else [None]
    cols = _values(run, col) if col in run.samples else [None]
    return rows, cols


def _panel_title(row_value, col_value, extra: str = "") -> str:
    parts = []
    if extra:
        parts.append(extra)
    if row_value is not None:
        parts.append(f"{format_bytes(row_value)} payload")
    if col_value is not None:
        parts.append(f"{col_value} receivers")
    return " · ".join(parts)


def _caption(run: Run, what: str) -> str:
    text = f"{what}\n{run.experiment} run {run.run_id} ({run.meta.get('mode', '?')} mode)"
    if run.meta.get("synthetic"):
        text += "  —  SYNTHETIC TEST DATA, not a measurement"
    return text


def _new_figure(nrows: int, ncols: int, width: float = 3.6, height: float = 2.7) -> Figure:
    return Figure(figsize=(0.4 + width * ncols, 1.1 + height * nrows), layout="constrained")


def _finish_figure(
    fig: Figure, title: str, caption: str, legend: dict[str, list], markers: bool = True
) -> None:
    """One legend for all panels on top; title and caption below, as a paper's caption.

    (No suptitle: constrained layout would stack it on top of an outside legend.)
    """
    handles = []
    for system, counts in legend.items():
        st = style(system)
        handles.append(
            Line2D(
                [], [], color=st["color"], marker=st["marker"] if markers else None, ms=4, lw=1.5,
                label=f"{st['label']} ({_n_text(pd.Series(counts))})",
            )
        )  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), frameon=False)
    fig.supxlabel(f"{title}. {caption}", fontsize=7, color="0.3", linespacing=1.4)


def _log2_x(ax, values: list) -> None:
    values = sorted(v for v in values if v is not None)
    ax.set_xscale("log", base=2)
    if values:
        ax.set_xlim(values[0] / 1.35, values[-1] * 1.9)
        ax.set_xticks(values)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _readable_log(ax, which: str) -> None:
    """Log ticks labelled as plain numbers (20, 50, 100), not 10^2; 1-2-5 steps when the
    range is narrow, decades when it is wide."""
    ax.autoscale_view()
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = sorted(axis.get_view_interval())
    narrow = lo > 0 and hi / lo < 1e3
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if narrow else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, kwargs in (("png", {"dpi": PNG_DPI}), ("pdf", {"metadata": {"CreationDate": None}})):
        path = out_dir / f"{stem}.{ext}"
        fd, tmp = temp_beside(path)
        os.close(fd)
        try:
            with matplotlib.rc_context(RC):
                fig.savefig(tmp, format=ext, **kwargs)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def _save_all(run: Run, figures: list[tuple[str, Figure]], out_dir: Path | None) -> list[Path]:
    paths: list[Path] = []
    for stem, fig in figures:
        paths += save(fig, out_dir or run.path, stem)
    return paths


def _styled(fn: Callable[..., list[tuple[str, Figure]]]) -> Callable[..., list[tuple[str, Figure]]]:
    """Build a figure under the house style (rcParams apply when artists are created)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- broadcast


def _reduction_note(ax, sub: pd.DataFrame, metric: str, x: str) -> None:
    """At the largest group, mark how much lower (or higher) AggBox is than TCP."""
    col = f"{metric}_p50"
    at = sub[sub[x] == sub[x].max()].set_index("system")[col]
    if not {"aggbox", "tcp"} <= set(at.index):
        return
    ours, theirs = float(at["aggbox"]), float(at["tcp"])
    if not (ours > 0 and theirs > 0):
        return
    change = (ours - theirs) / theirs * 100
    sign = "−" if change < 0 else "+"
    xbar = float(sub[x].max()) * 1.22
    ax.annotate(
        "", xy=(xbar, ours), xytext=(xbar, theirs),
        arrowprops={"arrowstyle": "<->", "color": "0.25", "lw": 0.8, "shrinkA": 0, "shrinkB": 0},
    )  # fmt: skip
    ax.annotate(
        f"{sign}{abs(change):.0f}% vs TCP",
        xy=(xbar, (ours * theirs) ** 0.5),
        xytext=(3, 0),
        textcoords="offset points",
        rotation=90,
        ha="left",
        va="center",
        fontsize=7.5,
        fontweight="bold",
        color=style("aggbox")["color"],
    )


@_styled
def broadcast_latency_figures(run: Run, metric: str | None = None) -> list[tuple[str, Figure]]:
    """Latency (p50 line, p50–p99 band) vs group size per system; a panel per receiver model.

    Rows are payload sizes when the run has several; any other varied parameter (say
    ``loss``) gets a figure of its own, suffixed ``-loss=1.0``.
    """
    metric = metric or run.primary_metric
    x, row, col = "hosts", "size", "receivers"
    rows, cols = _grid(run, row, col)
    hosts = _values(run, x)
    out = []
    for suffix, fixed in _facets(run, x, row, col):
        fig = _new_figure(len(rows), len(cols))
        # Panels in a row (one payload size) share their scale; sizes differ too much.
        axes = fig.subplots(len(rows), len(cols), sharex=True, sharey="row", squeeze=False)
        counts: dict[str, list] = {}
        for (i, rv), (j, cv) in itertools.product(enumerate(rows), enumerate(cols)):
            ax = axes[i][j]
            sub = _select(run.summary, {**fixed, row: rv, col: cv})
            for system in run.systems:
                s = sub[sub["system"] == system].sort_values(x)
                s = s[(s[f"{metric}_p50"] > 0) & s[f"{metric}_p99"].notna()]
                if s.empty:
                    continue
                st = style(system)
                counts.setdefault(system, []).extend(s[f"{metric}_n"])
                ax.plot(
                    s[x], s[f"{metric}_p50"], marker=st["marker"], color=st["color"], ms=4, lw=1.5
                )
                ax.fill_between(
                    s[x], s[f"{metric}_p50"], s[f"{metric}_p99"], color=st["color"], alpha=0.13,
                    lw=0,
                )  # fmt: skip
                ax.plot(s[x], s[f"{metric}_p99"], color=st["color"], lw=0.7, ls="--", alpha=0.8)
            _log2_x(ax, hosts)
            ax.set_yscale("log")
            if counts:
                _readable_log(ax, "y")
            if not sub.empty:
                _reduction_note(ax, sub, metric, x)
            ax.set_title(_panel_title(rv, cv, ", ".join(f"{k}={v}" for k, v in fixed.items())))
            if i == len(rows) - 1:
                ax.set_xlabel("group size (hosts)")
            if j == 0:
                ax.set_ylabel(metric_label(metric))
        _finish_figure(
            fig,
            f"Broadcast {metric_label(metric).split(' (')[0]} vs group size",
            _caption(
                run, "Solid line: median (p50); dashed line and band: p99; n: samples per point"
            ),
            counts,
        )
        out.append((f"broadcast_latency{suffix}", fig))
    return out


@_styled
def broadcast_cdf_figures(run: Run, metric: str | None = None) -> list[tuple[str, Figure]]:
    """CDF of the primary metric per system at the largest group; a panel per receiver model."""
    metric = metric or run.primary_metric
    x, row, col = "hosts", "size", "receivers"
    rows, cols = _grid(run, row, col)
    largest = max(_values(run, x))
    out = []
    for suffix, fixed in _facets(run, x, row, col):
        fig = _new_figure(len(rows), len(cols))
        axes = fig.subplots(len(rows), len(cols), sharex="row", sharey=True, squeeze=False)
        counts: dict[str, list] = {}
        for (i, rv), (j, cv) in itertools.product(enumerate(rows), enumerate(cols)):
            ax = axes[i][j]
            sub = _select(run.samples, {**fixed, x: largest, row: rv, col: cv})
            for system in run.systems:
                values = np.sort(sub.loc[sub["system"] == system, metric].to_numpy(dtype=float))
                values = values[np.isfinite(values) & (values > 0)]
                if values.size == 0:
                    continue
                counts.setdefault(system, []).append(values.size)
                y = np.arange(1, values.size + 1) / values.size
                ax.step(values, y, where="post", color=style(system)["color"], lw=1.5)
            ax.set_xscale("log")
            if counts:
                _readable_log(ax, "x")
            ax.set_ylim(0, 1.02)
            for q in (0.5, 0.99):
                ax.axhline(q, color="0.6", lw=0.6, ls=":")
            ax.set_title(_panel_title(rv, cv, f"{largest} hosts"))
            if i == len(rows) - 1:
                ax.set_xlabel(metric_label(metric))
            if j == 0:
                ax.set_ylabel("fraction of broadcasts ≤ x")
        _finish_figure(
            fig,
            f"Broadcast {metric_label(metric).split(' (')[0]}: CDF at {largest} hosts",
            _caption(run, "Dotted lines: p50 and p99; n: samples per curve"),
            counts,
            markers=False,
        )
        out.append((f"broadcast_cdf{suffix}", fig))
    return out


@figure("broadcast_latency")
def broadcast_latency(run: Run, out_dir: Path | None = None) -> list[Path]:
    return _save_all(run, broadcast_latency_figures(run), out_dir)


@figure("broadcast_cdf")
def broadcast_cdf(run: Run, out_dir: Path | None = None) -> list[Path]:
    return _save_all(run, broadcast_cdf_figures(run), out_dir)


@_styled
def allreduce_time_figures(run: Run) -> list[tuple[str, Figure]]:
    """Time per call vs tensor size (at the most workers) and vs workers (at the largest
    size), p50 line with p99 band, and AggBox's speedup over gloo on both axes."""
    s = run.summary
    systems = [x for x in run.systems if x in set(s["system"])]
    workers, floats = max(s["workers"]), max(s["floats"])
    fig = _new_figure(1, 3, width=3.3)
    axes = fig.subplots(1, 3)
    counts: dict[str, list] = {}
    for ax, (x, fixed, xlabel) in zip(axes[:2], (("floats", {"workers": workers},
                                                  "tensor size (float32 values)"),
                                                 ("workers", {"floats": floats}, "workers")),
                                      strict=True):
        part = _select(s, fixed)
        for system in systems:
            rows = part[part["system"] == system].sort_values(x)
            if rows.empty:
                continue
            st = style(system)
            ax.plot(rows[x], rows["time_ms_p50"], color=st["color"], marker=st["marker"],
                    ms=4, lw=1.5)
            ax.fill_between(rows[x], rows["time_ms_p50"], rows["time_ms_p99"],
                            color=st["color"], alpha=0.15, lw=0)
            counts.setdefault(system, []).extend(rows["time_ms_n"].tolist())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time per call (ms)")
        what = f"{workers} workers" if x == "floats" else f"{floats} floats"
        ax.set_title(what)
    ax = axes[2]
    table = s.pivot_table(index=["workers", "floats"], columns="system", values="time_ms_p50")
    if {"aggbox", "gloo"} <= set(table.columns):
        speedup = (table["gloo"] / table["aggbox"]).unstack("workers")
        shades = np.linspace(0.35, 1.0, max(1, speedup.shape[1]))
        for shade, w in zip(shades, speedup.columns, strict=True):
            col = speedup[w].dropna()
            ax.plot(col.index, col.values, marker="o", ms=4, lw=1.5,
                    color=style("aggbox")["color"], alpha=float(shade), label=f"{w} workers")
        ax.legend(fontsize=6.5)
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tensor size (float32 values)")
    ax.set_ylabel("gloo p50 / AggBox p50")
    ax.set_title("speedup over gloo (>1: AggBox faster)")
    _finish_figure(fig, "Allreduce time per call",
                   _caption(run, "Solid line: median (p50); band up to p99; rank 0's time."),
                   {k: [pd.Series(v).min()] for k, v in counts.items()})
    return [("allreduce_time", fig)]


@figure("allreduce_time")
def allreduce_time(run: Run, out_dir: Path | None = None) -> list[Path]:
    return _save_all(run, allreduce_time_figures(run), out_dir)


# ----------------------------------------------------------------------------- mapreduce

MAPREDUCE_REFERENCE = {"words": 2_000_000, "mappers": 4, "skew": 1.0}
MAPREDUCE_AXES = (("words", "corpus size (words)"), ("mappers", "mappers"),
                  ("skew", "Zipf skew"))
_BASELINE_DASH = {"tcp": "-", "tcp_combiner": "--"}


def _short_number(v) -> str:
    v = float(v)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if v >= size:
            return f"{v / size:g}{unit}"
    return f"{v:g}"


def _closest(values: list, target: float):
    return min(values, key=lambda v: (abs(float(v) - target), -float(v)))


def mapreduce_slices(run: Run) -> dict[str, tuple[str, pd.DataFrame]]:
    """Per axis (words, mappers, skew): the summary rows where the other two parameters
    sit at the reference point (their grid values closest to 2M words, 4 mappers, skew
    1.0), and a title saying where that is."""
    s = run.summary
    fixed = {k: _closest(sorted(s[k].unique()), v) for k, v in MAPREDUCE_REFERENCE.items()
             if k in s}
    out = {}
    for axis, _label in MAPREDUCE_AXES:
        if axis not in s:
            continue
        others = {k: v for k, v in fixed.items() if k != axis}
        title = ", ".join(f"{k}={_short_number(v)}" for k, v in others.items())
        out[axis] = (title, _select(s, others))
    return out


@_styled
def mapreduce_speedup_figures(run: Run) -> list[tuple[str, Figure]]:
    """Speed-up of AggBox over the TCP shuffles (baseline p50 / AggBox p50) vs corpus
    size, mappers and skew: reduce phase (markers, solid) and whole job (hollow)."""
    slices = mapreduce_slices(run)
    fig = _new_figure(1, max(1, len(slices)), width=3.2)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(slices))))
    counts: dict[str, list] = {}
    ours = "aggbox"
    for ax, (axis, label) in zip(axes, [a for a in MAPREDUCE_AXES if a[0] in slices],
                                 strict=False):
        title, part = slices[axis]
        table = part.pivot_table(index=axis, columns="system",
                                 values=["reduce_s_p50", "job_s_p50", "reduce_s_n"])
        for base in ("tcp", "tcp_combiner"):
            if (("reduce_s_p50", ours) not in table.columns
                    or ("reduce_s_p50", base) not in table.columns):
                continue
            st = style(base)
            for metric, filled in (("reduce_s_p50", True), ("job_s_p50", False)):
                ratio = (table[(metric, base)] / table[(metric, ours)]).dropna()
                ax.plot(ratio.index, ratio.values, color=st["color"], marker=st["marker"],
                        ms=4, lw=1.3 if filled else 0.9, ls=_BASELINE_DASH[base],
                        mfc=st["color"] if filled else "white")
            counts.setdefault(base, []).extend(table[("reduce_s_n", base)].dropna().tolist())
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.axhline(43.0, color=style(ours)["color"], lw=0.8, ls=":", alpha=0.7)
        ax.annotate("paper: 43x", xy=(0.02, 43.0), xycoords=("axes fraction", "data"),
                    fontsize=6.5, color=style(ours)["color"], va="bottom")
        ax.set_yscale("log")
        values = sorted(part[axis].unique())
        if axis in ("words", "mappers"):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(values, [_short_number(v) for v in values])
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=7.5)
        _readable_log(ax, "y")
    axes[0].set_ylabel("speed-up of AggBox (baseline / AggBox)")
    _finish_figure(
        fig, "MapReduce word count, AggBox vs TCP shuffles",
        _caption(run, "Filled: reduce phase (last byte sent -> counts final); hollow: whole "
                 "job.\nColour: the baseline; n: jobs per point"),
        counts)
    return [("mapreduce_speedup", fig)]


@_styled
def mapreduce_times_figures(run: Run) -> list[tuple[str, Figure]]:
    """Reduce-phase and job time per system at the reference point (p50, bar to p99)."""
    s = run.summary
    title, part = mapreduce_slices(run).get("words", ("", s))
    at = part[part["words"] == part["words"].max()] if "words" in part else part
    systems = [x for x in run.systems if x in set(at["system"])]
    fig = _new_figure(1, 2, width=3.4)
    axes = fig.subplots(1, 2)
    counts: dict[str, list] = {}
    for ax, metric in zip(axes, ("reduce_s", "job_s"), strict=True):
        for i, system in enumerate(systems):
            row = at[at["system"] == system]
            if row.empty:
                continue
            st = style(system)
            p50, p99 = float(row[f"{metric}_p50"].iloc[0]), float(row[f"{metric}_p99"].iloc[0])
            ax.bar(i, p50, color=st["color"], width=0.65)
            ax.plot([i, i], [p50, p99], color="0.2", lw=0.8)
            ax.annotate(f"{p50 * 1e3:.1f} ms", (i, p50), ha="center", va="bottom", fontsize=6.5,
                        xytext=(0, 2), textcoords="offset points")
            counts.setdefault(system, []).append(int(row[f"{metric}_n"].iloc[0]))
        ax.set_xticks(range(len(systems)), [style(x)["label"] for x in systems], rotation=20,
                      fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel({"reduce_s": "reduce phase (s)", "job_s": "whole job (s)"}[metric])
        _readable_log(ax, "y")
        ax.set_title(f"{title}, words={_short_number(at['words'].max())}" if "words" in at
                     else title, fontsize=7.5)
    _finish_figure(fig, "MapReduce word count: time per system",
                   _caption(run, "Bars: median; line: up to p99; n: jobs"), counts)
    return [("mapreduce_times", fig)]


@figure("mapreduce_speedup")
def mapreduce_speedup(run: Run, out_dir: Path | None = None) -> list[Path]:
    return _save_all(run, mapreduce_speedup_figures(run), out_dir)


@figure("mapreduce_times")
def mapreduce_times(run: Run, out_dir: Path | None = None) -> list[Path]:
    return _save_all(run, mapreduce_times_figures(run), out_dir)


# ----------------------------------------------------------------------------- the command


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="redraw a run's figures from its stored results",
        description="Redraw figures from results/<experiment>/<run-id>/ without re-running: "
        "the figures its meta.json lists, or the ones named with --figure.",
    )
    p.add_argument("run_dir", type=Path, help="a run folder (or results/<experiment>/latest)")
    p.add_argument(
        "--figure",
        action="append",
        choices=sorted(FIGURES),
        help="draw only this figure (repeatable)",
    )
    p.add_argument("--out", type=Path, help="write the figures here (default: the run folder)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    names = args.figure or figures_for(run)
    if not names:
        raise AggBoxError(f"{args.run_dir} names no figures; choose with --figure NAME")
    for path in draw(run, names, out_dir=args.out):
        print(path)
    return 0
