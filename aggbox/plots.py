"""Figures from stored runs: every figure is drawn from results/, never from a live run.

A figure function takes a :class:`~aggbox.results.Run` and writes PNG (150 dpi) and PDF
(TrueType fonts embedded, ``pdf.fonttype = 42``) files into the run's folder, returning
their paths. Functions register under a name with :func:`figure`; experiment files list
names under ``figures:``, and ``aggbox plot RUN_DIR`` redraws them from stored results.

Figures are built on :class:`matplotlib.figure.Figure` directly, not pyplot: no global
backend is switched and nothing is shown, so this module is safe to import in notebooks
(where ``broadcast_latency_figures(run)`` returns the figures themselves).

What a reader can trust in every figure: a line is the median (p50) and its shaded band
the median's 95% bootstrap CI; an ``x`` marks the p99 where a point has the samples for
one (100 or more); a hollow marker is an overcommitted configuration (more processes that
must run at once than CPUs); every marker and band is in the legend; no bar stands on a
log axis (points and lines only). The per-configuration statistics come from the same
table as the report's (:func:`aggbox.report.cells_of`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from aggbox.errors import AggBoxError
from aggbox.report import Cells, cells_of, samples_of
from aggbox.results import Run, bootstrap_ratio_ci, load_run, temp_beside

FigureFn = Callable[..., list[Path]]
DrawFn = Callable[["Run"], list[tuple[str, "Figure"]]]

#: figure name -> function(run, out_dir=None) -> written paths.
FIGURES: dict[str, FigureFn] = {}

#: workload -> figures drawn when a run's meta.json names none.
DEFAULT_FIGURES: dict[str, list[str]] = {
    "broadcast": ["broadcast_latency", "broadcast_cdf", "broadcast_cpu"],
    "allreduce": ["allreduce_time", "allreduce_cpu"],
    "mapreduce": ["mapreduce_speedup", "mapreduce_times", "mapreduce_cpu"],
    "training": ["training_loss", "training_time", "training_cpu"],
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
# Markers differ within every workload; "x" is reserved for the p99.
SYSTEM_STYLE = {
    "aggbox": {"label": "AggBox", "color": "#c0392b", "marker": "o"},
    "tcp_kack": {"label": "TCP kernel-ACK", "color": "#8e44ad", "marker": "v"},
    "tcp": {"label": "TCP", "color": "#2c3e50", "marker": "s"},
    "udp": {"label": "UDP", "color": "#7f8c8d", "marker": "^"},
    "mcast": {"label": "IP multicast", "color": "#27ae60", "marker": "h"},
    "gloo": {"label": "Gloo", "color": "#2980b9", "marker": "D"},
    "aggbox_nocombiner": {"label": "AggBox, no combiner", "color": "#e67e22", "marker": "p"},
    "aggbox_auth": {"label": "AggBox, authenticated", "color": "#f1948a", "marker": "X"},
    "tcp_combiner": {"label": "TCP + combiner", "color": "#16a085", "marker": "P"},
    "tcp_ps": {"label": "TCP param. server", "color": "#2c3e50", "marker": "s"},
    "gloo_fp16": {"label": "Gloo fp16 compression", "color": "#16a085", "marker": "P"},
}
_FALLBACK_COLORS = itertools.cycle(["#d35400", "#7d3c98", "#1abc9c", "#b7950b"])
P99_MARKER = "x"
KEY_COLOR = "0.35"  # the grey of legend entries that explain a style, not a system

METRIC_LABELS = {
    "completion_us": "completion latency (µs)",
    "delivery_us": "delivery latency (µs)",
    "sender_cpu_us": "sender CPU time (µs)",
    "cpu_us_per_op": "CPU per operation (µs)",
    "time_ms": "time per call (ms)",
    "job_s": "whole job (s)",
    "after_last_send_s": "after the last send (s)",
    "iter_ms": "time per iteration (ms)",
}


def figure(name: str) -> Callable[[DrawFn], DrawFn]:
    """Register ``fn`` (run -> [(file stem, Figure)]) under ``name``, the name experiment
    files use; ``FIGURES[name](run, out_dir=None)`` draws and saves it."""

    def add(fn: DrawFn) -> DrawFn:
        def save_all(run: Run, out_dir: Path | None = None) -> list[Path]:
            return _save_all(run, fn(run), out_dir)

        FIGURES[name] = save_all
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
        SYSTEM_STYLE[system] = {"label": system, "color": next(_FALLBACK_COLORS), "marker": "*"}
    return SYSTEM_STYLE[system]


def metric_label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if metric.endswith("_us"):
        return f"{metric[:-3].replace('_', ' ')} (µs)"
    return metric.replace("_", " ")


def format_bytes(n: object) -> str:
    n = int(n)  # type: ignore[arg-type]
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def _n_text(counts: Sequence) -> str:
    counts = pd.Series(list(counts), dtype=float).dropna().astype(int)
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


def _facets(run: Run, axes: Sequence[str | None]) -> Iterator[tuple[str, dict]]:
    """One (file-name suffix, {param: value}) per figure, for varied parameters that are
    not axes: a run whose grid also varies, say, ``loss`` gets one figure per loss value."""
    params = run.param_columns or [a for a in axes if a]
    others = [
        p for p in params
        if p not in axes and p in run.samples and run.samples[p].nunique() > 1
    ]  # fmt: skip
    for combo in itertools.product(*(_values(run, p) for p in others)):
        fixed = dict(zip(others, combo, strict=True))
        suffix = "".join(f"-{k}={v}" for k, v in fixed.items())
        yield suffix, fixed


def _select(frame: pd.DataFrame, fixed: dict) -> pd.DataFrame:
    """Rows matching every {column: value}; columns the frame lacks are ignored."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in fixed.items():
        if column in frame and value is not None:
            mask &= (frame[column] == value).to_numpy()
    return frame[mask]


def _grid(run: Run, row: str, col: str) -> tuple[list, list]:
    rows = _values(run, row) if row in run.samples else [None]
    cols = _values(run, col) if col in run.samples else [None]
    return rows, cols


def _shown(values: list) -> list:
    """Panel-title values: None where the run has only one (it is said once, elsewhere)."""
    return values if len(values) > 1 else [None] * len(values)


def _fixed_text(run: Run, fixed: dict, also: Sequence[str] = ()) -> str:
    """The facet's parameters and the run's single-valued ones (e.g. the payload size)."""
    parts = [f"{k}={v}" for k, v in fixed.items()]
    for p in also:
        if p in run.samples and run.samples[p].nunique() == 1:
            v = run.samples[p].iloc[0]
            parts.append(f"{format_bytes(v)} payload" if p == "size" else f"{p}={v}")
    return ", ".join(parts)


def _panel_title(row_value, col_value, extra: str = "") -> str:
    parts = []
    if extra:
        parts.append(extra)
    if row_value is not None:  # None: the run has one payload size (the caption says it)
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
    return Figure(figsize=(0.4 + width * ncols, 1.3 + height * nrows), layout="constrained")


class Key:
    """The legend: one entry per system drawn, then one per style actually used."""

    def __init__(self, run: Run, promises: dict[str, str] | None = None):
        self.run = run
        self.promises = promises or {}  # system -> promise, shown in its legend entry
        self.counts: dict[str, list] = {}
        self.extra: dict[str, tuple] = {}  # label -> (kind, sort order)
        self.custom: dict[str, Line2D] = {}

    def system(self, system: str, counts: Sequence) -> None:
        self.counts.setdefault(system, []).extend(list(counts))

    def line(self, label: str, **kwargs) -> None:
        """A legend entry that is not a system (e.g. a pair of systems in a ratio)."""
        self.custom[label] = Line2D([], [], label=label, **{"ms": 4.5, "lw": 1.5, **kwargs})

    def uses(self, what: str) -> None:
        self.extra[what] = ()

    def handles(self) -> list:
        out = []
        for system, counts in self.counts.items():
            st = style(system)
            tag = f", {self.promises[system]}" if system in self.promises else ""
            out.append(Line2D([], [], color=st["color"], marker=st["marker"], ms=4.5, lw=1.5,
                              label=f"{st['label']} ({_n_text(counts)}{tag})"))
        out += list(self.custom.values())
        if "band" in self.extra:
            out.append(Patch(facecolor=KEY_COLOR, alpha=0.2, lw=0, label="95% CI of the p50"))
        if "errorbar" in self.extra:
            out.append(Line2D([], [], color=KEY_COLOR, marker="|", ms=8, ls="none",
                              label="95% CI (bar)"))
        if "p99" in self.extra:
            out.append(Line2D([], [], color=KEY_COLOR, marker=P99_MARKER, ms=5, ls="none",
                              label="p99 (points with n ≥ 100)"))
        if "overcommitted" in self.extra:
            out.append(Line2D([], [], color=KEY_COLOR, marker="o", mfc="white", ms=5,
                              ls="none", label="hollow: overcommitted"))
        if "paper" in self.extra:
            out.append(Line2D([], [], color=style("aggbox")["color"], lw=0.8, ls=":",
                              label="the paper's claim"))
        if "parity" in self.extra:
            out.append(Line2D([], [], color="0.5", lw=0.8, ls=":", label="parity (1x)"))
        return out


def _finish_figure(fig: Figure, title: str, caption: str, key: Key) -> None:
    """One legend for all panels on top; title and caption below, as a paper's caption.

    (No suptitle: constrained layout would stack it on top of an outside legend.)
    """
    handles = key.handles()
    if handles:
        # as many columns as fit the figure's width (a clipped legend hides a marker)
        ncols = max(1, min(len(handles), int(fig.get_figwidth() / 2.3)))
        fig.legend(handles=handles, loc="outside upper center", ncols=ncols, frameon=False)
    width = int(fig.get_figwidth() * 17)  # characters of 7 pt text per line
    text = "\n".join(textwrap.fill(line, width) for line in f"{title}. {caption}".split("\n"))
    fig.supxlabel(text, fontsize=7, color="0.3", linespacing=1.4)


def _log2_x(ax, values: list, labels: Callable[[object], str] | None = None) -> None:
    """A log-2 x axis with a labelled tick at every grid value (and nothing else)."""
    values = sorted(v for v in values if v is not None)
    ax.set_xscale("log", base=2)
    if values:
        ax.set_xlim(values[0] / 1.35, values[-1] * 1.9)
        ax.set_xticks(values, [labels(v) if labels else f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


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


def _missing_figure(run: Run, stem: str, title: str, what: str) -> list[tuple[str, Figure]]:
    """A figure that says what the run lacks, instead of an empty or misleading plot."""
    fig = _new_figure(1, 1, width=5.0, height=1.6)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"Not in this run: {what}.\nRecorded by newer runs; re-run the "
            "experiment to draw this figure.", ha="center", va="center", fontsize=9,
            transform=ax.transAxes)
    _finish_figure(fig, title, _caption(run, ""), Key(run))
    return [(stem, fig)]


def _oc(value) -> bool:
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _series(ax, rows: pd.DataFrame, x: str, metric: str, system: str, key: Key,
            xvalues: Callable[[pd.Series], pd.Series] | None = None, scale: float = 1.0,
            band: bool = True) -> None:
    """One system's p50 line with its CI band, p99 markers where they exist and hollow
    markers on overcommitted points; registers what it drew with ``key``."""
    rows = rows[np.isfinite(rows[f"{metric}_p50"].astype(float))]
    rows = rows[rows[f"{metric}_p50"] > 0].sort_values(x)
    if rows.empty:
        return
    st = style(system)
    xs = (xvalues(rows[x]) if xvalues else rows[x]).to_numpy(dtype=float)
    p50 = rows[f"{metric}_p50"].to_numpy(dtype=float) * scale
    ax.plot(xs, p50, color=st["color"], marker=st["marker"], ms=4.5, lw=1.5)
    lo = rows[f"{metric}_ci_low"].to_numpy(dtype=float) * scale
    hi = rows[f"{metric}_ci_high"].to_numpy(dtype=float) * scale
    if band and np.isfinite(lo).any() and (hi > lo).any():  # a band of zero width is no CI
        ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.2, lw=0)
        key.uses("band")
    p99 = rows[f"{metric}_p99"].to_numpy(dtype=float) * scale
    if np.isfinite(p99).any():
        ax.plot(xs, p99, color=st["color"], marker=P99_MARKER, ms=5, ls="none")
        key.uses("p99")
    oc = np.array([_oc(v) for v in rows["overcommitted"]])
    if oc.any():
        ax.plot(xs[oc], p50[oc], color=st["color"], marker=st["marker"], mfc="white", ms=4.5,
                ls="none", zorder=3)
        key.uses("overcommitted")
    key.system(system, rows[f"{metric}_n"])


def _no_cpu(cells: Cells) -> bool:
    return "cpu_us_per_op" not in cells.metrics or not np.isfinite(
        cells.table["cpu_us_per_op_p50"].astype(float)).any()


def _cpu_panel(ax, run: Run, part: pd.DataFrame, x: str, key: Key, **series) -> None:
    """One panel of a workload's CPU figure: every system's CPU per operation against
    ``x`` on a log axis (``series``: what _series takes beyond the defaults)."""
    for system in run.systems:
        _series(ax, part[part["system"] == system], x, "cpu_us_per_op", system, key, **series)
    ax.set_yscale("log")
    if key.counts:
        _readable_log(ax, "y")

@dataclass
class CpuPanel:
    """One panel of a row of CPU figures: its title, the cells it draws, the x column,
    how to dress the x axis, its label, and what _series takes beyond the defaults."""

    title: str
    part: pd.DataFrame
    x: str
    x_axis: Callable[[object], None]
    xlabel: str
    series: dict
    title_size: float | None = None


def _cpu_row_figure(run: Run, stem: str, title: str, panels: list[CpuPanel], op: str,
                    width: float, sharey: bool = False, note: str = "",
                    ) -> list[tuple[str, Figure]]:
    """A row of CPU panels in ms per ``op`` (the whole machine's, background subtracted)."""
    fig = _new_figure(1, max(1, len(panels)), width=width)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)), sharey=sharey, squeeze=False)[0])
    key = Key(run)
    for ax, panel in zip(axes, panels, strict=False):
        _cpu_panel(ax, run, panel.part, panel.x, key, scale=1e-3, **panel.series)
        panel.x_axis(ax)
        ax.set_title(panel.title, **({"fontsize": panel.title_size} if panel.title_size else {}))
        ax.set_xlabel(panel.xlabel)
    axes[0].set_ylabel(f"CPU per {op}, whole machine (ms)")
    _finish_figure(fig, title, _caption(
        run, f"Whole machine's busy CPU over the measured {op}s / their number, idle "
        f"background subtracted{note}"), key)
    return [(stem, fig)]



# ----------------------------------------------------------------------------- broadcast

BROADCAST_METRICS = ("completion_us", "delivery_us", "cpu_us_per_op")


def _broadcast_cells(run: Run) -> Cells:
    return cells_of(run, BROADCAST_METRICS)


def _promises(cells: Cells) -> dict[str, str]:
    """system -> promise, for the legend (documented defaults for runs without them)."""
    t = cells.table
    return dict(zip(t["system"], t["promise"], strict=True)) if len(t) else {}


def _reduction_note(ax, sub: pd.DataFrame, metric: str, x: str) -> None:
    """At the largest group, mark how much lower (or higher) AggBox is than the strongest
    like-for-like baseline: same promise for completion; any system for delivery (every
    system's delivery is the same promise, the application has it). A run without a
    same-promise baseline gets the note against TCP, labelled with TCP's promise."""
    col = f"{metric}_p50"
    at = sub[sub[x] == sub[x].max()].set_index("system")
    if "aggbox" not in at.index or not np.isfinite(at.loc["aggbox", col]):
        return
    peers = [s for s in at.index if not s.startswith("aggbox") and np.isfinite(at.loc[s, col])]
    if metric == "completion_us":
        same = [s for s in peers if at.loc[s, "promise"] == at.loc["aggbox", "promise"]]
        base = min(same, key=lambda s: at.loc[s, col]) if same else (
            "tcp" if "tcp" in peers else None)
    else:
        base = min(peers, key=lambda s: at.loc[s, col]) if peers else None
    if base is None:
        return
    ours, theirs = float(at.loc["aggbox", col]), float(at.loc[base, col])
    if not (ours > 0 and theirs > 0):
        return
    change = (ours - theirs) / theirs * 100
    sign = "−" if change < 0 else "+"
    tag = "" if at.loc[base, "promise"] == at.loc["aggbox", "promise"] or metric != \
        "completion_us" else f" ({at.loc[base, 'promise']})"
    xbar = float(sub[x].max()) * 1.22
    ax.annotate(
        "", xy=(xbar, ours), xytext=(xbar, theirs),
        arrowprops={"arrowstyle": "<->", "color": "0.25", "lw": 0.8, "shrinkA": 0, "shrinkB": 0},
    )  # fmt: skip
    ax.annotate(
        f"{sign}{abs(change):.0f}% vs {style(base)['label']}{tag}",
        xy=(xbar, (ours * theirs) ** 0.5),
        xytext=(3, 0),
        textcoords="offset points",
        rotation=90,
        ha="left",
        va="center",
        fontsize=7,
        color=style("aggbox")["color"],
    )


@figure("broadcast_latency")
@_styled
def broadcast_latency_figures(run: Run, metric: str | None = None) -> list[tuple[str, Figure]]:
    """Completion and delivery latency vs group size per system (p50 line, CI band, p99
    markers); a row per metric and payload size, a column per receiver model.

    Any other varied parameter (say ``placement``) gets a figure of its own, suffixed
    ``-placement=shared``.
    """
    cells = _broadcast_cells(run)
    metrics = [metric] if metric else [m for m in ("completion_us", "delivery_us")
                                       if m in cells.metrics]
    x, row, col = "hosts", "size", "receivers"
    sizes, cols = _grid(run, row, col)
    rows = [(m, s) for m in metrics for s in sizes]
    hosts = _values(run, x)
    out = []
    for suffix, fixed in _facets(run, (x, row, col)):
        fig = _new_figure(len(rows), len(cols))
        # Panels in a row (one metric and size) share their scale.
        axes = fig.subplots(len(rows), len(cols), sharex=True, sharey="row", squeeze=False)
        key = Key(run, _promises(cells))
        for (i, (m, rv)), (j, cv) in itertools.product(enumerate(rows), enumerate(cols)):
            ax = axes[i][j]
            sub = _select(cells.table, {**fixed, row: rv, col: cv})
            drew = False
            for system in run.systems:
                s = sub[sub["system"] == system]
                if not s.empty and np.isfinite(s[f"{m}_p50"].astype(float)).any():
                    _series(ax, s, x, m, system, key)
                    drew = True
            _log2_x(ax, hosts)
            ax.set_yscale("log")
            if drew:
                _readable_log(ax, "y")
                _reduction_note(ax, sub, m, x)
            what = metric_label(m).split(" (")[0]
            ax.set_title(_panel_title(_shown(sizes)[sizes.index(rv)], cv, what))
            if i == len(rows) - 1:
                ax.set_xlabel("group size (hosts)")
            if j == 0:
                ax.set_ylabel(metric_label(m))
        facet = _fixed_text(run, fixed, ("size",))
        _finish_figure(
            fig,
            "Broadcast latency vs group size" + (f" ({facet})" if facet else ""),
            _caption(run, "Completion: the root knows every member has it; delivery: the last "
                     "member's application has it. Legend: system (n per point, promise)"),
            key,
        )
        out.append((f"broadcast_latency{suffix}", fig))
    return out


@figure("broadcast_cdf")
@_styled
def broadcast_cdf_figures(run: Run, metric: str | None = None) -> list[tuple[str, Figure]]:
    """CDF of the primary metric per system at the largest group; a panel per receiver model."""
    metric = metric or run.primary_metric
    x, row, col = "hosts", "size", "receivers"
    rows, cols = _grid(run, row, col)
    largest = max(_values(run, x))
    out = []
    for suffix, fixed in _facets(run, (x, row, col)):
        fig = _new_figure(len(rows), len(cols))
        axes = fig.subplots(len(rows), len(cols), sharex="row", sharey=True, squeeze=False)
        key = Key(run, _promises(_broadcast_cells(run)))
        for (i, rv), (j, cv) in itertools.product(enumerate(rows), enumerate(cols)):
            ax = axes[i][j]
            sub = _select(run.samples, {**fixed, x: largest, row: rv, col: cv})
            for system in run.systems:
                values = np.sort(sub.loc[sub["system"] == system, metric].to_numpy(dtype=float))
                values = values[np.isfinite(values) & (values > 0)]
                if values.size == 0:
                    continue
                key.system(system, [values.size])
                y = np.arange(1, values.size + 1) / values.size
                st = style(system)
                ax.step(values, y, where="post", color=st["color"], lw=1.5)
                # the system's marker at its median, so the legend's markers mean something
                ax.plot([np.median(values)], [0.5], color=st["color"], marker=st["marker"],
                        ms=4.5, ls="none")
            ax.set_xscale("log")
            if key.counts:
                _readable_log(ax, "x")
            ax.set_ylim(0, 1.02)
            for q in (0.5, 0.99):
                ax.axhline(q, color="0.6", lw=0.6, ls=":")
            ax.set_title(_panel_title(_shown(rows)[rows.index(rv)], cv, f"{largest} hosts"))
            if i == len(rows) - 1:
                ax.set_xlabel(metric_label(metric))
            if j == 0:
                ax.set_ylabel("fraction of broadcasts ≤ x")
        facet = _fixed_text(run, fixed, ("size",))
        _finish_figure(
            fig,
            f"Broadcast {metric_label(metric).split(' (')[0]}: CDF at {largest} hosts"
            + (f" ({facet})" if facet else ""),
            _caption(run, "Dotted lines: p50 and p99; marker: the median; n: samples per curve"),
            key,
        )
        out.append((f"broadcast_cdf{suffix}", fig))
    return out


@figure("broadcast_cpu")
@_styled
def broadcast_cpu_figures(run: Run) -> list[tuple[str, Figure]]:
    """The whole machine's CPU per broadcast vs group size, per system (p50 over the
    repetitions, band: its CI); a row per payload size, a column per receiver model."""
    cells = _broadcast_cells(run)
    title = "Broadcast CPU per operation vs group size"
    if _no_cpu(cells):
        return _missing_figure(run, "broadcast_cpu", title, "cpu_us_per_op (CPU per broadcast)")
    x, row, col = "hosts", "size", "receivers"
    rows, cols = _grid(run, row, col)
    hosts = _values(run, x)
    out = []
    for suffix, fixed in _facets(run, (x, row, col)):
        fig = _new_figure(len(rows), len(cols))
        axes = fig.subplots(len(rows), len(cols), sharex=True, sharey="row", squeeze=False)
        key = Key(run, _promises(cells))
        for (i, rv), (j, cv) in itertools.product(enumerate(rows), enumerate(cols)):
            ax = axes[i][j]
            sub = _select(cells.table, {**fixed, row: rv, col: cv})
            _cpu_panel(ax, run, sub, x, key)
            _log2_x(ax, hosts)
            ax.set_title(_panel_title(_shown(rows)[rows.index(rv)], cv))
            if i == len(rows) - 1:
                ax.set_xlabel("group size (hosts)")
            if j == 0:
                ax.set_ylabel("CPU per broadcast (µs)")
        facet = _fixed_text(run, fixed, ("size",))
        _finish_figure(fig, title + (f" ({facet})" if facet else ""), _caption(
            run, "Whole machine's busy CPU over the measured broadcasts / their number, "
            "idle background subtracted"), key)
        out.append((f"broadcast_cpu{suffix}", fig))
    return out


# ----------------------------------------------------------------------------- allreduce

ALLREDUCE_METRICS = ("time_ms", "cpu_us_per_op")
ALLREDUCE_PAPER_SPEEDUP = 1 / (1 - 0.561)  # "56.1% faster": 56.1% less time per call


def _bytes(floats: pd.Series) -> pd.Series:
    return floats.astype(float) * 4  # float32 gradients


def _bytes_axis(ax, floats: list) -> None:
    _log2_x(ax, [4 * int(f) for f in floats], lambda b: format_bytes(b))
    ax.tick_params(axis="x", labelrotation=30)


@figure("allreduce_time")
@_styled
def allreduce_time_figures(run: Run) -> list[tuple[str, Figure]]:
    """Time per call vs tensor size in bytes, a column per worker count: p50 line, CI
    band, p99 markers (top row); AggBox's speed-up over each baseline with its CI (bottom
    row, ratio of medians, above 1: AggBox faster)."""
    cells = cells_of(run, ALLREDUCE_METRICS)
    t = cells.table
    workers = _values(run, "workers")
    floats = _values(run, "floats")
    systems = [x for x in run.systems if x in set(t["system"])]
    fig = _new_figure(2, len(workers), width=3.3, height=2.5)
    axes = fig.subplots(2, len(workers), sharex=True, sharey="row", squeeze=False)
    key = Key(run)
    for j, w in enumerate(workers):
        ax = axes[0][j]
        part = _select(t, {"workers": w})
        for system in systems:
            _series(ax, part[part["system"] == system], "floats", "time_ms", system, key,
                    xvalues=_bytes)
        ax.set_yscale("log")
        _readable_log(ax, "y")
        ax.set_title(f"{w} workers")
        if j == 0:
            ax.set_ylabel("time per call (ms)")
        ax = axes[1][j]
        for base in (s for s in systems if s != "aggbox"):
            xs, ys, lo, hi, oc = [], [], [], [], []
            for config, rows in cells.configs(("workers", "floats")):
                d = cells.config_dict(config)
                if d.get("workers") != w or not {"aggbox", base} <= set(rows.index):
                    continue
                # speed-up = baseline / AggBox; its CI from the same bootstrap as the report
                r, r_lo, r_hi = bootstrap_ratio_ci(cells.values(config, base, "time_ms"),
                                                   cells.values(config, "aggbox", "time_ms"))
                if not (np.isfinite(r) and r > 0):
                    continue
                xs.append(4 * float(d["floats"]))
                ys.append(r)
                lo.append(r - r_lo if np.isfinite(r_lo) else 0.0)
                hi.append(r_hi - r if np.isfinite(r_hi) else 0.0)
                oc.append(_oc(rows.loc["aggbox", "overcommitted"])
                          or _oc(rows.loc[base, "overcommitted"]))
            if not xs:
                continue
            st = style(base)
            order = np.argsort(xs)
            xs_, ys_ = np.array(xs)[order], np.array(ys)[order]
            ax.errorbar(xs_, ys_, yerr=[np.array(lo)[order], np.array(hi)[order]],
                        color=st["color"], marker=st["marker"], ms=4.5, lw=1.3, capsize=2)
            key.uses("errorbar")
            oc_ = np.array(oc)[order]
            if oc_.any():
                ax.plot(xs_[oc_], ys_[oc_], color=st["color"], marker=st["marker"],
                        mfc="white", ms=4.5, ls="none", zorder=3)
                key.uses("overcommitted")
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.axhline(ALLREDUCE_PAPER_SPEEDUP, color=style("aggbox")["color"], lw=0.8, ls=":")
        key.uses("parity")
        key.uses("paper")
        ax.set_yscale("log")
        _readable_log(ax, "y")
        _bytes_axis(ax, floats)
        ax.set_xlabel("gradient size per worker")
        if j == 0:
            ax.set_ylabel("baseline p50 / AggBox p50")
    _finish_figure(fig, "Allreduce time per call vs gradient size", _caption(
        run, "Rank 0's time. Bottom: speed-up over the baseline of that colour and marker, "
        ">1 = AggBox faster; the paper's claim, 56.1% less time, is 2.28x. n: calls per "
        "point"), key)
    return [("allreduce_time", fig)]


@figure("allreduce_cpu")
@_styled
def allreduce_cpu_figures(run: Run) -> list[tuple[str, Figure]]:
    """The whole machine's CPU per allreduce call vs gradient size, a panel per worker
    count (AggBox's aggregator works in softirq: counted here, in no process)."""
    cells = cells_of(run, ALLREDUCE_METRICS)
    title = "Allreduce CPU per call vs gradient size"
    if _no_cpu(cells):
        return _missing_figure(run, "allreduce_cpu", title, "cpu_us_per_op (CPU per call)")
    floats = _values(run, "floats")
    panels = [CpuPanel(f"{w} workers", _select(cells.table, {"workers": w}), "floats",
                       lambda ax: _bytes_axis(ax, floats), "gradient size per worker",
                       {"xvalues": _bytes})
              for w in _values(run, "workers")]
    return _cpu_row_figure(run, "allreduce_cpu", title, panels, "call", width=3.3,
                           sharey=True)


# ----------------------------------------------------------------------------- mapreduce

MAPREDUCE_METRICS = ("job_s", "after_last_send_s", "cpu_us_per_op")
MAPREDUCE_REFERENCE = {"words": 2_000_000, "mappers": 4, "skew": 1.0}
MAPREDUCE_AXES = (("words", "corpus size (words)"), ("mappers", "mappers"),
                  ("skew", "Zipf skew"))
#: like for like: (AggBox variant, baseline, label) — the same combiner setting
MAPREDUCE_PAIRS = (("aggbox", "tcp_combiner", "with combiner: TCP+comb. / AggBox"),
                   ("aggbox_nocombiner", "tcp", "no combiner: TCP / AggBox no comb."))


def _short_number(v) -> str:
    v = float(v)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if v >= size:
            return f"{v / size:g}{unit}"
    return f"{v:g}"


def _closest(values: list, target: float):
    return min(values, key=lambda v: (abs(float(v) - target), -float(v)))


def _mapreduce_cells(run: Run) -> Cells:
    return cells_of(run, MAPREDUCE_METRICS)


def mapreduce_slices(run: Run) -> dict[str, tuple[str, pd.DataFrame]]:
    """Per axis (words, mappers, skew) that the run varies: the configuration rows where
    the other two parameters sit at the reference point (their grid values closest to 2M
    words, 4 mappers, skew 1.0), and a title saying where that is. A run that varies none
    of them gets its first axis."""
    t = _mapreduce_cells(run).table
    fixed = {k: _closest(sorted(t[k].unique()), v) for k, v in MAPREDUCE_REFERENCE.items()
             if k in t}
    axes = [a for a, _ in MAPREDUCE_AXES if a in t and t[a].nunique() > 1]
    axes = axes or [a for a, _ in MAPREDUCE_AXES if a in t][:1]
    out = {}
    for axis in axes:
        others = {k: v for k, v in fixed.items() if k != axis}
        title = ", ".join(f"{k}={_short_number(v)}" for k, v in others.items())
        out[axis] = (title, _select(t, others))
    return out


def _mr_x_axis(ax, axis: str, values: list) -> None:
    if axis in ("words", "mappers") and len(values) > 1:
        _log2_x(ax, values, _short_number)
    else:
        ax.set_xticks(values, [_short_number(v) for v in values])
        if len(values) == 1:
            ax.set_xlim(values[0] * 0.8, values[0] * 1.2)


@figure("mapreduce_speedup")
@_styled
def mapreduce_speedup_figures(run: Run) -> list[tuple[str, Figure]]:
    """Whole-job speed-up, like for like (baseline p50 / AggBox p50, both with a combiner
    and both without), with its bootstrap CI, vs corpus size, mappers and skew."""
    cells = _mapreduce_cells(run)
    slices = mapreduce_slices(run)
    axes_ = [a for a in MAPREDUCE_AXES if a[0] in slices]
    fig = _new_figure(1, max(1, len(axes_)), width=3.2)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(axes_))))
    key = Key(run)
    for ax, (axis, label) in zip(axes, axes_, strict=False):
        title, part = slices[axis]
        values = sorted(part[axis].unique())
        for ours, base, pair_label in MAPREDUCE_PAIRS:
            pts = []
            for config, rows in cells.configs():
                d = cells.config_dict(config)
                if not {ours, base} <= set(rows.index):
                    continue
                if any(d.get(k) != v for k, v in _slice_fixed(part, axis).items()):
                    continue
                r, lo, hi = bootstrap_ratio_ci(cells.values(config, base, "job_s"),
                                               cells.values(config, ours, "job_s"))
                if np.isfinite(r) and r > 0:
                    oc = _oc(rows.loc[ours, "overcommitted"]) or _oc(
                        rows.loc[base, "overcommitted"])
                    pts.append((float(d[axis]), r, lo, hi, oc,
                                int(rows.loc[ours, "job_s_n"])))
            if not pts:
                continue
            pts.sort()
            st = style(base)
            xs = np.array([p[0] for p in pts])
            ys = np.array([p[1] for p in pts])
            err = [[p[1] - p[2] if np.isfinite(p[2]) else 0.0 for p in pts],
                   [p[3] - p[1] if np.isfinite(p[3]) else 0.0 for p in pts]]
            ax.errorbar(xs, ys, yerr=err, color=st["color"], marker=st["marker"], ms=4.5,
                        lw=1.3, capsize=2)
            key.uses("errorbar")
            oc = np.array([p[4] for p in pts])
            if oc.any():
                ax.plot(xs[oc], ys[oc], color=st["color"], marker=st["marker"], mfc="white",
                        ms=4.5, ls="none", zorder=3)
                key.uses("overcommitted")
            n = _n_text([p[5] for p in pts])
            key.line(f"{pair_label} ({n})", color=st["color"], marker=st["marker"])
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.axhline(43.0, color=style("aggbox")["color"], lw=0.8, ls=":")
        key.uses("parity")
        key.uses("paper")
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(ax.get_ylim()[0], 0.3), top=max(ax.get_ylim()[1], 60))
        _readable_log(ax, "y")
        _mr_x_axis(ax, axis, values)
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=7.5)
    axes[0].set_ylabel("whole-job speed-up of AggBox")
    _finish_figure(
        fig, "MapReduce word count: whole-job speed-up, like for like",
        _caption(run, "Ratio of job-time medians, >1 = AggBox faster; the paper's claim: "
                 "43x. n: jobs per point"), key)
    return [("mapreduce_speedup", fig)]


def _slice_fixed(part: pd.DataFrame, axis: str) -> dict:
    """The parameters held fixed in a slice (constant across its rows), but its axis."""
    return {k: part[k].iloc[0] for k in ("words", "mappers", "skew")
            if k in part and k != axis and part[k].nunique() == 1 and len(part)}


@figure("mapreduce_times")
@_styled
def mapreduce_times_figures(run: Run) -> list[tuple[str, Figure]]:
    """Whole-job time and the time after the last send per system at the reference point:
    the p50 with its CI as an error bar, the p99 where there are samples for one; points
    on a log axis (no bars)."""
    cells = _mapreduce_cells(run)
    _title, part = mapreduce_slices(run).get("words", ("", cells.table))
    at = part[part["words"] == part["words"].max()] if "words" in part else part
    if "mappers" in at and at["mappers"].nunique() > 1:
        at = at[at["mappers"] == _closest(sorted(at["mappers"].unique()), 4)]
    # like-for-like pairs side by side: with combiner, then without
    paired = [s for pair in MAPREDUCE_PAIRS for s in pair[:2]]
    systems = [x for x in (*paired, *run.systems) if x in set(at["system"])]
    systems = list(dict.fromkeys(systems))
    metrics = [m for m in ("job_s", "after_last_send_s") if m in cells.metrics]
    where = ", ".join(f"{k}={_short_number(at[k].iloc[0])}" for k in ("words", "mappers", "skew")
                      if k in at and len(at))
    fig = _new_figure(1, len(metrics), width=3.4)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    key = Key(run)
    for ax, metric in zip(axes, metrics, strict=True):
        for i, system in enumerate(systems):
            row = at[at["system"] == system]
            if row.empty or not np.isfinite(float(row[f"{metric}_p50"].iloc[0])):
                continue
            st = style(system)
            r = row.iloc[0]
            p50 = float(r[f"{metric}_p50"])
            lo, hi = float(r[f"{metric}_ci_low"]), float(r[f"{metric}_ci_high"])
            yerr = ([[p50 - lo], [hi - p50]] if np.isfinite(lo) and np.isfinite(hi)
                    else None)
            oc = _oc(r["overcommitted"])
            ax.errorbar([i], [p50], yerr=yerr, color=st["color"], marker=st["marker"], ms=6,
                        capsize=3, ls="none", mfc="white" if oc else st["color"])
            if yerr is not None:
                key.uses("errorbar")
            if oc:
                key.uses("overcommitted")
            if np.isfinite(float(r[f"{metric}_p99"])):
                ax.plot([i], [float(r[f"{metric}_p99"])], color=st["color"],
                        marker=P99_MARKER, ms=5, ls="none")
                key.uses("p99")
            ax.annotate(_seconds(p50), (i, p50), ha="left", va="center", fontsize=6.5,
                        xytext=(6, 0), textcoords="offset points")
            key.system(system, [int(r[f"{metric}_n"])])
        ax.set_xticks(range(len(systems)), [style(x)["label"] for x in systems], rotation=20,
                      fontsize=7)
        ax.set_xlim(-0.5, len(systems) - 0.3)
        ax.set_yscale("log")
        ax.set_ylabel(metric_label(metric))
        _readable_log(ax, "y")
        ax.set_title(f"{metric_label(metric).split(' (')[0]}, {where}", fontsize=7.5)
    _finish_figure(fig, "MapReduce word count: time per system", _caption(
        run, "Marker: median; n: jobs. After the last send, AggBox's reduction has "
        "already run inside the mappers' sends: read it with the CPU per job"), key)
    return [("mapreduce_times", fig)]


def _seconds(v: float) -> str:
    return f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.3g} ms"


@figure("mapreduce_cpu")
@_styled
def mapreduce_cpu_figures(run: Run) -> list[tuple[str, Figure]]:
    """The whole machine's CPU per job (ms) per system vs corpus size, mappers and skew
    (the same slices as the speed-up figure); it includes AggBox's in-kernel work."""
    cells = _mapreduce_cells(run)
    title = "MapReduce CPU per job"
    if _no_cpu(cells):
        return _missing_figure(run, "mapreduce_cpu", title, "cpu_us_per_op (CPU per job)")
    slices = mapreduce_slices(run)
    panels = []
    for axis, label in (a for a in MAPREDUCE_AXES if a[0] in slices):
        sub_title, part = slices[axis]
        values = sorted(part[axis].unique())
        panels.append(CpuPanel(sub_title, part, axis,
                               lambda ax, axis=axis, values=values: _mr_x_axis(ax, axis, values),
                               label, {}, title_size=7.5))
    return _cpu_row_figure(run, "mapreduce_cpu", title, panels, "job", width=3.2,
                           note="; n: jobs per point")


# ----------------------------------------------------------------------------- the command


# ----------------------------------------------------------------------------- training

TRAINING_METRICS = ("iter_ms", "comm_ms", "cpu_us_per_op")


def _task_cells(run: Run, task: str) -> pd.DataFrame:
    t = cells_of(run, TRAINING_METRICS).table
    return t[t["task"] == task] if "task" in t else t.iloc[:0]


@figure("training_loss")
@_styled
def training_loss_figures(run: Run) -> list[tuple[str, Figure]]:
    """Rank 0's training loss per step on the digits, a panel per rank count: per
    system the mean over seeds and repetitions, the band from the lowest to the highest
    run."""
    s = samples_of(run)
    title = "Training loss on the digits, per system"
    if not {"loss", "task"} <= set(s.columns) or not (s["task"] == "digits").any():
        return _missing_figure(run, "training_loss", title, "the digits task (loss per step)")
    s = s[s["task"] == "digits"]
    workers = sorted(s["workers"].unique()) if "workers" in s else [None]
    fig = _new_figure(1, len(workers), width=3.6)
    axes = fig.subplots(1, len(workers), sharey=True, squeeze=False)[0]
    key = Key(run)
    runs_of = [c for c in ("repetition", "seed") if c in s]
    for ax, w in zip(axes, workers, strict=True):
        part = s if w is None else s[s["workers"] == w]
        present = [x for x in run.systems if x in set(part["system"])]
        # AggBox last, on top: the curves of equal steps coincide and hide one another
        for system in sorted(present, key=lambda x: x == "aggbox"):
            mine = part[part["system"] == system]
            curves = mine.pivot_table(index="iter", columns=runs_of or None, values="loss",
                                      aggfunc="mean")
            st = style(system)
            xs = curves.index.to_numpy(float)
            ax.plot(xs, curves.mean(axis=1).to_numpy(float), color=st["color"], lw=1.2)
            ax.fill_between(xs, curves.min(axis=1).to_numpy(float),
                            curves.max(axis=1).to_numpy(float), color=st["color"], alpha=0.15,
                            lw=0)
            key.system(system, [curves.shape[1]])
        ax.set_yscale("log")
        _readable_log(ax, "y")
        ax.set_xlabel("step")
        ax.set_title(f"{w} ranks" if w is not None else "")
    axes[0].set_ylabel("training loss (rank 0's batch)")
    key.line("band: lowest to highest run", color=KEY_COLOR, lw=6, alpha=0.2)
    _finish_figure(fig, title, _caption(
        run, "Cross-entropy of rank 0's part of each global batch; mean over seeds and "
        "repetitions; AggBox drawn last (where it hides the others, the steps agree). n: "
        "runs per line"), key)
    return [("training_loss", fig)]


@figure("training_time")
@_styled
def training_time_figures(run: Run) -> list[tuple[str, Figure]]:
    """Time per iteration of the communication-heavy model vs the number of ranks: p50
    line, CI band; dashed, the part spent in the gradient hook (p50)."""
    t = _task_cells(run, "comm-heavy")
    title = "Training time per iteration vs ranks (comm-heavy model)"
    if t.empty:
        return _missing_figure(run, "training_time", title, "the comm-heavy task")
    workers = sorted(t["workers"].unique())
    fig = _new_figure(1, 1, width=4.4, height=3.0)
    ax = fig.subplots()
    key = Key(run)
    for system in (x for x in run.systems if x in set(t["system"])):
        rows = t[t["system"] == system]
        _series(ax, rows, "workers", "iter_ms", system, key)
        rows = rows[np.isfinite(rows["comm_ms_p50"].astype(float))].sort_values("workers")
        if len(rows):
            ax.plot(rows["workers"].to_numpy(float), rows["comm_ms_p50"].to_numpy(float),
                    color=style(system)["color"], lw=1.0, ls="--")
            key.line("dashed: time in the gradient hook", color=KEY_COLOR, lw=1.0, ls="--")
    ax.set_yscale("log")
    if key.counts:
        _readable_log(ax, "y")
    _log2_x(ax, workers)
    ax.set_xlabel("DDP ranks")
    ax.set_ylabel("time per iteration (ms)")
    _finish_figure(fig, title, _caption(
        run, "Rank 0's forward + backward + step; the hook time is summed over a step's "
        "buckets (gloo's overlaps backward, AggBox's is synchronous). n: iterations per "
        "point"), key)
    return [("training_time", fig)]


@figure("training_cpu")
@_styled
def training_cpu_figures(run: Run) -> list[tuple[str, Figure]]:
    """The whole machine's CPU per iteration vs ranks, a panel per task."""
    cells = cells_of(run, TRAINING_METRICS)
    title = "Training CPU per iteration vs ranks"
    if _no_cpu(cells) or "task" not in cells.table:
        return _missing_figure(run, "training_cpu", title, "cpu_us_per_op (CPU per iteration)")
    t = cells.table
    panels = []
    for task in (x for x in ("digits", "comm-heavy") if x in set(t["task"])):
        part = t[t["task"] == task]
        ranks = sorted(part["workers"].unique())
        panels.append(CpuPanel(task, part, "workers",
                               lambda ax, ranks=ranks: _log2_x(ax, ranks), "DDP ranks",
                               {"band": False}))
    return _cpu_row_figure(run, "training_cpu", title, panels, "iteration", width=3.4)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="redraw a run's figures from its stored results",
        description="Redraw figures from results/<experiment>/<run-id>/ without re-running: "
        "the figures its meta.json lists, or the ones named with --figure.",
        epilog="examples:\n  aggbox plot results/broadcast/latest\n"
        "  aggbox plot results/allreduce/latest --figure allreduce_time --out /tmp/figures",
    )
    p.add_argument("run_dir", type=Path, help="a run folder (or results/<experiment>/latest)")
    p.add_argument(
        "--figure",
        action="append",
        choices=sorted(FIGURES),
        help="draw only this figure (repeatable) (default: the figures meta.json lists)",
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

