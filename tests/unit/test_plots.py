"""Figures: every registered figure renders from a result, warnings as errors.

Two kinds of result: SYNTHETIC runs in the current format (tests/unit/new_format_runs.py:
the committed references plus promise, CPU per operation and the overcommit flag), and
the committed references as they are (older columns), from which every figure must still
render, saying what is missing rather than failing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from new_format_runs import BUILDERS, old_format_results
from pipeline_fakes import REFERENCE_DIR, FakeTestbed, experiment_text, quiet_console, registered

from aggbox import plots
from aggbox.errors import AggBoxError
from aggbox.experiment import run_experiment
from aggbox.results import load_run


def workload_of(figure: str) -> str:
    for workload, names in plots.DEFAULT_FIGURES.items():
        if figure in names:
            return workload
    raise AssertionError(f"figure {figure} belongs to no workload's DEFAULT_FIGURES")


@pytest.fixture(scope="session")
def new_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("new-format")
    return {name: build(root) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def old_runs(tmp_path_factory) -> dict[str, Path]:
    return old_format_results(tmp_path_factory.mktemp("old-format"))


@pytest.fixture
def run_of(tmp_path, new_runs, old_runs):
    """A private copy of a workload's run (figures are written into it)."""

    def copy(workload: str, old: bool = False) -> Path:
        source = (old_runs if old else new_runs)[workload]
        path = tmp_path / ("old" if old else "new") / workload / source.name
        if not path.exists():
            shutil.copytree(source, path)
        return path

    return copy


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "broadcast-synthetic"
    shutil.copytree(REFERENCE_DIR, path)
    return path


@pytest.fixture
def strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_every_figure_belongs_to_a_workload_and_each_workload_has_a_cpu_figure():
    for name in plots.FIGURES:
        workload_of(name)
    for workload, names in plots.DEFAULT_FIGURES.items():
        assert f"{workload}_cpu" in names


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_every_figure_renders_from_a_current_run_without_warnings(name, run_of,
                                                                 strict_warnings):
    path = run_of(workload_of(name))
    paths = plots.FIGURES[name](load_run(path))
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for p in paths:
        assert p.parent == path and p.stat().st_size > 5_000
    png = next(p for p in paths if p.suffix == ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_every_figure_renders_from_an_old_run_without_warnings(name, run_of, strict_warnings):
    paths = plots.FIGURES[name](load_run(run_of(workload_of(name), old=True)))
    assert {p.suffix for p in paths} == {".png", ".pdf"}


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_pdfs_embed_truetype_fonts(name, run_of, strict_warnings):
    pdf = next(p for p in plots.FIGURES[name](load_run(run_of(workload_of(name))))
               if p.suffix == ".pdf")
    data = pdf.read_bytes()
    assert b"/FontFile2" in data  # an embedded TrueType font program
    assert b"/Type3" not in data


def _figures(name: str, run) -> list:
    return [fig for _stem, fig in getattr(plots, f"{name}_figures")(run)]


def _legend_markers(fig) -> set[tuple[str, bool]]:
    out = set()
    for legend in fig.legends:
        for h in legend.legend_handles:
            if isinstance(h, Line2D) and h.get_marker() not in ("None", "", None):
                out.add((str(h.get_marker()), h.get_markerfacecolor() == "white"))
    return out


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_every_marker_style_drawn_is_in_the_legend(name, run_of, strict_warnings):
    run = load_run(run_of(workload_of(name)))
    for fig in _figures(name, run):
        keys = _legend_markers(fig)
        shapes = {m for m, _hollow in keys}
        for ax in fig.axes:
            for line in ax.get_lines():
                marker = str(line.get_marker())
                if marker in ("None", "", "|", "_") or not len(line.get_xdata()):
                    continue  # error-bar caps are explained by the "95% CI (bar)" entry
                assert marker in shapes, f"{name}: marker {marker!r} not in the legend"
                if line.get_markerfacecolor() == "white":
                    assert any(h for _m, h in keys), f"{name}: hollow markers unexplained"


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_no_bars_on_a_log_axis(name, run_of, strict_warnings):
    run = load_run(run_of(workload_of(name)))
    for fig in _figures(name, run):
        for ax in fig.axes:
            if ax.get_yscale() == "log":
                assert not [p for p in ax.patches if isinstance(p, Rectangle)]


def test_latency_figure_marks_the_reduction_against_the_same_promise_baseline(run_of):
    run = load_run(run_of("broadcast"))
    figures = plots.broadcast_latency_figures(run)
    assert [stem for stem, _ in figures] == ["broadcast_latency-placement=root-alone",
                                             "broadcast_latency-placement=shared"]
    fig = figures[0][1]
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == [
        "completion latency · idle receivers", "completion latency · busy receivers",
        "delivery latency · idle receivers", "delivery latency · busy receivers"]
    s = run.samples
    for ax, receivers in zip(axes[:2], ("idle", "busy"), strict=True):
        at = s[(s["hosts"] == 32) & (s["receivers"] == receivers)
               & (s["placement"] == "root-alone")]
        ours = at.loc[at["system"] == "aggbox", "completion_us"].median()
        kack = at.loc[at["system"] == "tcp_kack", "completion_us"].median()
        expected = f"−{abs((ours - kack) / kack * 100):.0f}% vs TCP kernel-ACK"
        assert expected in [t.get_text() for t in ax.texts]
        assert ax.get_yscale() == "log"
    assert all("hosts" in ax.get_xlabel() for ax in axes[2:])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:5] == ["AggBox (n=60, kernel)", "TCP kernel-ACK (n=60, kernel)",
                          "TCP (n=60, app)", "UDP (n=60, app)", "IP multicast (n=60, app)"]
    assert "95% CI of the p50" in legend and "hollow: overcommitted" in legend
    assert "p99 (points with n ≥ 100)" not in legend  # 60 samples a point: no p99


def test_an_old_run_without_a_same_promise_baseline_is_compared_with_tcp_labelled(reference):
    ((_, fig),) = plots.broadcast_latency_figures(load_run(reference))
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes and all(n.endswith("vs TCP (app)") for n in notes if "TCP" in n)


def test_p99_markers_appear_where_a_point_has_100_samples(run_of, strict_warnings):
    run = load_run(run_of("broadcast"))
    run.samples = pd.concat([run.samples, run.samples], ignore_index=True)  # 120 a point
    ((_, fig), _) = plots.broadcast_latency_figures(run)
    markers = [line.get_marker() for ax in fig.axes for line in ax.get_lines()]
    assert plots.P99_MARKER in markers
    assert "p99 (points with n ≥ 100)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_cdf_figure_is_drawn_at_the_largest_group(run_of):
    for _, fig in plots.broadcast_cdf_figures(load_run(run_of("broadcast"))):
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles and all(t.startswith("32 hosts") for t in titles)


def test_allreduce_sizes_are_bytes_with_readable_ticks(run_of):
    ((_, fig),) = plots.allreduce_time_figures(load_run(run_of("allreduce")))
    bottom = [ax for ax in fig.axes if ax.get_xlabel()]
    labels = [t.get_text() for t in bottom[0].get_xticklabels()]
    assert labels == ["64 KiB", "1 MiB"]  # 16384 and 262144 float32 values
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["2 workers", "8 workers"]


def test_cpu_figures_plot_cpu_per_operation(run_of):
    run = load_run(run_of("allreduce"))
    ((_, fig),) = plots.allreduce_cpu_figures(run)
    ys = sorted(y for ax in fig.axes for line in ax.get_lines() for y in line.get_ydata())
    expected = run.samples.groupby(["workers", "floats", "system"])["cpu_us_per_op"].median()
    assert np.allclose(sorted(expected / 1e3), sorted(set(ys)))


def test_cpu_figure_of_an_old_run_says_what_is_missing(run_of, strict_warnings):
    for workload in plots.DEFAULT_FIGURES:
        run = load_run(run_of(workload, old=True))
        ((_, fig),) = getattr(plots, f"{workload}_cpu_figures")(run)
        assert "Not in this run: cpu_us_per_op" in _all_text(fig)


def test_synthetic_data_is_labelled_in_the_figure(reference):
    ((_, fig),) = plots.broadcast_latency_figures(load_run(reference))
    assert "SYNTHETIC TEST DATA" in _all_text(fig)


def _all_text(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_several_sizes_become_rows_and_other_parameters_separate_figures(tmp_path, strict_warnings):
    with registered():
        text = experiment_text(hosts=(2, 4), receivers=("idle",), sizes=(64, 1024))
        text = text.replace("  receivers:", "  loss: [0, 1]\n  receivers:")
        (tmp_path / "x.yaml").write_text(text)
        run_dir = run_experiment(
            tmp_path / "x.yaml",
            results_dir=tmp_path / "results",
            testbed_factory=FakeTestbed,
            progress=False,
            draw_figures=False,
            console=quiet_console(),
        )
    run = load_run(run_dir)
    figures = plots.broadcast_latency_figures(run)
    assert [stem for stem, _ in figures] == ["broadcast_latency-loss=0", "broadcast_latency-loss=1"]
    titles = [ax.get_title() for ax in figures[0][1].axes if ax.get_title()]
    assert titles == [
        "completion latency · 64 B payload · idle receivers",
        "completion latency · 1 KiB payload · idle receivers",
        "delivery latency · 64 B payload · idle receivers",
        "delivery latency · 1 KiB payload · idle receivers",
    ]
    paths = plots.draw(run, ["broadcast_latency", "broadcast_cdf"])
    assert len(paths) == 8


def test_plot_command_redraws_the_figures_named_in_meta(reference, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    plots.register(sub)
    args = parser.parse_args(["plot", str(reference)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    names = json.loads((reference / "meta.json").read_text())["figures"]
    assert sorted(Path(p).name for p in printed) == sorted(
        f"{n}.{ext}" for n in names for ext in ("png", "pdf")
    )

    out = reference / "only-cdf"
    args = parser.parse_args(
        ["plot", str(reference), "--figure", "broadcast_cdf", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["broadcast_cdf.pdf", "broadcast_cdf.png"]


def test_unknown_figures_are_named(reference):
    with pytest.raises(AggBoxError, match="unknown figure"):
        plots.draw(load_run(reference), ["pie_chart"])
