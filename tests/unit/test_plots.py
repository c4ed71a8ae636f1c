"""Figures: every registered figure renders from the reference result, warnings as errors."""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import pytest
from pipeline_fakes import REFERENCE_DIR, FakeTestbed, experiment_text, quiet_console, registered

from aggbox import plots
from aggbox.errors import AggBoxError
from aggbox.experiment import run_experiment
from aggbox.results import load_run

# Reference results per workload: the figures of each workload render from its own.
REFERENCES = {
    "broadcast": REFERENCE_DIR,  # synthetic, labelled so on the figures
    "allreduce": REFERENCE_DIR.parent / "allreduce-reference",  # a real quick run
    "mapreduce": REFERENCE_DIR.parent / "mapreduce-reference",  # a real quick run
}


def reference_for(figure: str) -> Path:
    for workload, names in plots.DEFAULT_FIGURES.items():
        if figure in names:
            return REFERENCES[workload]
    raise AssertionError(f"figure {figure} belongs to no workload's DEFAULT_FIGURES")


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "broadcast-synthetic"
    shutil.copytree(REFERENCE_DIR, path)
    return path


@pytest.fixture
def reference_of(tmp_path):
    def copy(figure: str) -> Path:
        source = reference_for(figure)
        path = tmp_path / source.name
        if not path.exists():
            shutil.copytree(source, path)
        return path

    return copy


@pytest.fixture
def strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_every_figure_renders_from_the_reference_without_warnings(name, reference_of,
                                                                  strict_warnings):
    reference = reference_of(name)
    paths = plots.FIGURES[name](load_run(reference))
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for path in paths:
        assert path.parent == reference and path.stat().st_size > 5_000
    png = next(p for p in paths if p.suffix == ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_pdfs_embed_truetype_fonts(name, reference_of, strict_warnings):
    pdf = next(p for p in plots.FIGURES[name](load_run(reference_of(name)))
               if p.suffix == ".pdf")
    data = pdf.read_bytes()
    assert b"/FontFile2" in data  # an embedded TrueType font program
    assert b"/Type3" not in data


def test_latency_figure_marks_the_reduction_against_tcp_at_the_largest_group(reference):
    run = load_run(reference)
    ((stem, fig),) = plots.broadcast_latency_figures(run)
    assert stem == "broadcast_latency"
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == [
        "64 B payload · idle receivers",
        "64 B payload · busy receivers",
    ]
    summary = run.summary.set_index(["hosts", "receivers", "system"])["completion_us_p50"]
    for ax, receivers in zip(axes, ("idle", "busy"), strict=True):
        ours, tcp = summary[(32, receivers, "aggbox")], summary[(32, receivers, "tcp")]
        expected = f"−{abs((ours - tcp) / tcp * 100):.0f}% vs TCP"
        assert expected in [t.get_text() for t in ax.texts]
        assert ax.get_yscale() == "log"
        assert "(µs)" in axes[0].get_ylabel() and "hosts" in ax.get_xlabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["AggBox (n=60)", "TCP (n=60)", "UDP (n=60)"]


def test_cdf_figure_is_drawn_at_the_largest_group(reference):
    ((_, fig),) = plots.broadcast_cdf_figures(load_run(reference))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles and all(t.startswith("32 hosts") for t in titles)


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
        "loss=0 · 64 B payload · idle receivers",
        "loss=0 · 1 KiB payload · idle receivers",
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
