"""results/analysis.ipynb runs top to bottom on the committed reference results.

The notebook is committed with its outputs (a reader sees the figures without running
it). The test clears them and executes it in a fresh ipykernel (this venv's Python) with
``AGGBOX_RESULTS`` pointing at a temporary copy of the reference runs: any cell error fails
the test, every figure must come out as an inline image, each cell draws as many figures
as its committed outputs show, and neither the copy nor results/ may change.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from aggbox import ROOT
from aggbox.results import META_FILE, list_runs

RESULTS = ROOT / "results"
NOTEBOOK = RESULTS / "analysis.ipynb"
# The figures the notebook draws for the reference runs (one image each).
EXPECTED_FIGURES = 5  # broadcast_latency, broadcast_cdf, allreduce_time, mapreduce_speedup/times
EXPERIMENTS = {"broadcast", "allreduce", "mapreduce"}
# PNG outputs of a handful of figures; more means an image format or size gone wrong.
MAX_NOTEBOOK_BYTES = 1_500_000


def reference_runs() -> list[Path]:
    """The run folders committed under results/ (git-tracked ``meta.json``); outside a
    git checkout, every complete run there (which on a fresh copy is the same)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    tracked = sorted(
        (ROOT / name).parent for name in out.split("\0") if name.endswith(f"/{META_FILE}")
    )
    return [p for p in tracked if p.is_dir()] or list_runs(results_dir=RESULTS)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def results_copy(tmp_path, monkeypatch) -> Path:
    """The reference runs, copied; the kernel sees only them and a private Jupyter home."""
    runs = reference_runs()
    assert {p.parent.name for p in runs} >= EXPERIMENTS, (
        f"no reference run of every experiment under {RESULTS}: {[str(p) for p in runs]}"
    )
    copy = tmp_path / "results"
    for run in runs:
        shutil.copytree(run, copy / run.parent.name / run.name)
    monkeypatch.setenv("AGGBOX_RESULTS", str(copy))
    # A kernelspec or config in the user's Jupyter/IPython folders must not change which
    # Python runs the notebook: the native "python3" kernel is then this venv's Python.
    for var, sub in (
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
    ):
        (tmp_path / "jupyter" / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "jupyter" / sub))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    return copy


def outputs(nb, kind: str) -> list[dict]:
    return [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == kind
    ]


def images_per_cell(nb) -> list[int]:
    return [sum(o.output_type == "display_data" and "image/png" in o.data for o in cell.outputs)
            for cell in nb.cells if cell.cell_type == "code"]


def test_the_notebook_is_committed_with_its_figures_and_a_mapreduce_section():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    images = [o for o in outputs(nb, "display_data") if "image/png" in o.data]
    assert len(images) >= EXPECTED_FIGURES, "commit it executed (make notebook)"
    assert not [o for o in outputs(nb, "display_data") if "image/svg+xml" in o.data]
    assert NOTEBOOK.stat().st_size <= MAX_NOTEBOOK_BYTES, NOTEBOOK.stat().st_size
    assert not outputs(nb, "error")
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    assert any(h.startswith("## MapReduce") for h in headings), headings


def test_the_notebook_runs_on_the_reference_results_and_writes_nothing(results_copy, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    committed = images_per_cell(nb)
    for cell in nb.cells:  # what the test sees must come from this run, not the commit
        if cell.cell_type == "code":
            cell.outputs = []
    before_copy = snapshot(results_copy)
    watched = [NOTEBOOK, *reference_runs()]
    before_results = {str(p): snapshot(p) if p.is_dir() else p.stat().st_mtime_ns for p in watched}
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # Which Python the kernel is: it must be this venv's (where aggbox is installed).
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel:', sys.executable)"))

    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    images = [o for o in outputs(nb, "display_data") if "image/png" in o.data]
    assert len(images) >= EXPECTED_FIGURES, f"{len(images)} inline figures"
    # The appended kernel cell drew nothing; the others as many figures as committed.
    assert images_per_cell(nb)[:-1] == committed, "make notebook, then commit it"
    tables = [o for o in outputs(nb, "execute_result") if "text/html" in o.data]
    assert len(tables) >= len(EXPERIMENTS), "a summary table per experiment"
    for table in tables:
        assert "p50" in table.data["text/html"] and "p99" in table.data["text/html"]
    printed = "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")
    assert str(results_copy) in printed, "the notebook read another results folder"
    kernel = printed.rsplit("kernel: ", 1)[-1].strip()
    assert Path(kernel).parent == Path(sys.executable).parent, (kernel, sys.executable)
    errors = "".join(o.text for o in outputs(nb, "stream") if o.name == "stderr")
    assert "Warning" not in errors, errors

    assert snapshot(results_copy) == before_copy, "the notebook wrote into its results folder"
    assert not any(workdir.iterdir()), "the notebook wrote into its working folder"
    after_results = {str(p): snapshot(p) if p.is_dir() else p.stat().st_mtime_ns for p in watched}
    assert after_results == before_results, "results/ changed"
