"""The runner: result layout, dry run, atomic writes, interruption and resume."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from pipeline_fakes import (
    FakeBroadcast,
    FakeTestbed,
    experiment_text,
    quiet_console,
    registered,
)

from aggbox import experiment as experiment_module
from aggbox import plots, results
from aggbox.errors import AggBoxError
from aggbox.experiment import (
    ExperimentError,
    RunInterrupted,
    load_experiment,
    prepare,
    run_experiment,
)

RUN_ID_PATTERN = r"^\d{8}-\d{6}-[0-9a-f]{4}$"


@pytest.fixture
def fake():
    with registered() as workload:
        yield workload


def write_experiment(tmp_path: Path, **kwargs) -> Path:
    path = tmp_path / "fakecast.yaml"
    path.write_text(experiment_text(**kwargs))
    return path


def run(path: Path, results: Path, **kwargs) -> Path:
    kwargs.setdefault("testbed_factory", FakeTestbed)
    return run_experiment(
        path, results_dir=results, progress=False, console=quiet_console(), **kwargs
    )


def tmp_dirs(results: Path) -> list[Path]:
    return sorted((results / "fakecast").glob(".tmp-*"))


def final_dirs(results: Path) -> list[Path]:
    return sorted(p for p in (results / "fakecast").glob("*") if p.name[0].isdigit())


def test_a_run_writes_samples_summary_meta_figures_and_latest(tmp_path, fake):
    exp = write_experiment(tmp_path, figures=("broadcast_latency", "broadcast_cdf"))
    run_dir = run(exp, tmp_path / "results")

    assert run_dir.parent == tmp_path / "results" / "fakecast"
    assert pd.Series([run_dir.name]).str.match(RUN_ID_PATTERN).all()
    assert tmp_dirs(tmp_path / "results") == []
    latest = run_dir.parent / "latest"
    assert latest.is_symlink() and latest.resolve() == run_dir.resolve()
    assert not (run_dir / "cells").exists() and not (run_dir / "run.json").exists()

    samples = pd.read_parquet(run_dir / "samples.parquet")
    head = ["experiment", "cell", "repetition", "hosts", "size", "receivers", "loss", "system"]
    assert list(samples.columns[: len(head) + 1]) == [*head, "iter"]
    assert {"completion_us", "delivery_us", "sender_cpu_us", "delivered"} <= set(samples.columns)
    assert len(samples) == 4 * 3 * 20  # cells x systems x iters
    assert (samples["experiment"] == "fakecast").all()

    summary = pd.read_csv(run_dir / "summary.csv")
    assert len(summary) == 4 * 3  # configurations x systems
    for stat in (*results.STATS, *results.REP_STATS):
        assert f"completion_us_{stat}" in summary.columns
    assert (summary["completion_us_n"] == 20).all()
    assert summary["completion_us_p99"].isna().all()  # 20 samples: no p99

    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["complete"] is True and meta["format_version"] == results.FORMAT_VERSION
    assert meta["mode"] == "quick" and meta["experiment"] == "fakecast"
    assert meta["experiment_text"] == exp.read_text()
    assert meta["testbed"]["backend"] == "netns"
    assert meta["testbed"]["describe"]["backend"] == "fake"
    assert {"kernel", "cpu_model", "cpu_count"} <= set(meta["machine"])
    assert {"revision", "dirty"} <= set(meta["git"])
    assert {"python", "bcc", "clang", "torch"} <= set(meta["versions"])
    assert len(meta["cell_seeds"]) == 4 and meta["started"] <= meta["finished"]

    for name in ("broadcast_latency", "broadcast_cdf"):
        assert (run_dir / f"{name}.png").stat().st_size > 10_000
        assert (run_dir / f"{name}.pdf").stat().st_size > 5_000


def test_every_cell_gets_a_fresh_testbed_that_is_brought_down(tmp_path, fake):
    FakeTestbed.instances.clear()
    run(write_experiment(tmp_path), tmp_path / "results")
    assert len(FakeTestbed.instances) == 4 == len(fake.calls)
    assert all(tb.was_down and not tb.is_up for tb in FakeTestbed.instances)
    assert sorted(tb.params["hosts"] for tb in FakeTestbed.instances) == [2, 2, 8, 8]


def test_dry_run_prints_the_plan_with_an_estimate_and_touches_nothing(tmp_path, fake, capsys):
    exp = write_experiment(tmp_path)
    args = _parse(["run", str(exp), "--dry-run", "--out", str(tmp_path / "results")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "estimated time" in out and "hosts=8,size=64,receivers=busy,rep=0" in out
    assert not (tmp_path / "results").exists()
    assert fake.calls == []


def test_an_interrupt_keeps_finished_cells_and_resume_completes_the_run(tmp_path):
    exp = write_experiment(tmp_path, repetitions=2)  # 8 cells
    results = tmp_path / "results"
    with registered(FakeBroadcast(interrupt_on=3)):
        with pytest.raises(RunInterrupted) as info:
            run(exp, results)
    (tmp,) = tmp_dirs(results)
    assert info.value.tmp_dir == tmp and info.value.run_id == tmp.name[5:]
    assert f"--resume {info.value.run_id}" in info.value.resume_command
    assert len(list((tmp / "cells").glob("*.parquet"))) == 2
    assert not list(tmp.rglob("*.part")), "no half-written file may stay behind"
    assert final_dirs(results) == [] and not (results / "fakecast" / "latest").exists()

    with registered() as again:
        run_dir = run(exp, results, resume=info.value.run_id)
    assert len(again.calls) == 6  # only the cells that had not finished
    assert run_dir.name == info.value.run_id and tmp_dirs(results) == []
    samples = pd.read_parquet(run_dir / "samples.parquet")
    assert samples["cell"].nunique() == 8 and len(samples) == 8 * 3 * 20
    meta = json.loads((run_dir / "meta.json").read_text())
    assert len(meta["resumed"]) == 1


def test_resume_skips_finished_cells_by_their_parameter_key(tmp_path):
    exp = write_experiment(tmp_path)
    results = tmp_path / "results"
    with registered(FakeBroadcast(interrupt_on=4)) as first, pytest.raises(RunInterrupted) as info:
        run(exp, results)
    done_params = first.calls[:3]
    with registered() as second:
        plan = prepare(load_experiment(exp), results_dir=results, resume=info.value.run_id)
        assert len(plan.done) == 3 and len(plan.remaining) == 1
        run(exp, results, resume=info.value.run_id)
    assert len(second.calls) == 1
    assert second.calls[0] not in done_params


def test_sigterm_stops_the_run_like_ctrl_c(tmp_path):
    exp = write_experiment(tmp_path)
    with registered(FakeBroadcast(sigterm_on=2)), pytest.raises(RunInterrupted):
        run(exp, tmp_path / "results")
    (tmp,) = tmp_dirs(tmp_path / "results")
    assert len(list((tmp / "cells").glob("*.parquet"))) == 1


def test_the_command_exits_130_and_prints_how_to_resume(tmp_path, monkeypatch, capsys):
    exp = write_experiment(tmp_path)
    monkeypatch.setattr(experiment_module, "default_testbed_factory", FakeTestbed)
    args = _parse(["run", str(exp), "--out", str(tmp_path / "results"), "--no-progress"])
    with registered(FakeBroadcast(interrupt_on=2)):
        assert args.func(args) == 130
    err = capsys.readouterr().err
    (tmp,) = tmp_dirs(tmp_path / "results")
    assert f"aggbox run {exp} --resume {tmp.name[5:]} --out {tmp_path / 'results'}" in err


def test_a_complete_run_is_never_overwritten(tmp_path, fake):
    exp = write_experiment(tmp_path)
    results = tmp_path / "results"
    with registered(FakeBroadcast(interrupt_on=2)), pytest.raises(RunInterrupted) as info:
        run(exp, results)
    final = results / "fakecast" / info.value.run_id
    final.mkdir()
    (final / "precious.txt").write_text("keep me")
    with pytest.raises(ExperimentError, match="complete"):
        run(exp, results, resume=info.value.run_id)
    assert (final / "precious.txt").read_text() == "keep me"


def test_resuming_an_unknown_run_lists_the_resumable_ones(tmp_path, fake):
    exp = write_experiment(tmp_path)
    with registered(FakeBroadcast(interrupt_on=2)), pytest.raises(RunInterrupted) as info:
        run(exp, tmp_path / "results")
    with pytest.raises(ExperimentError, match=f"resumable runs: {info.value.run_id}"):
        run(exp, tmp_path / "results", resume="20000101-000000-dead")


def test_resume_refuses_a_different_mode(tmp_path):
    exp = write_experiment(tmp_path)
    with registered(FakeBroadcast(interrupt_on=2)), pytest.raises(RunInterrupted) as info:
        run(exp, tmp_path / "results")
    with registered(), pytest.raises(ExperimentError, match="without --full"):
        run(exp, tmp_path / "results", resume=info.value.run_id, full=True)


def test_a_failing_workload_leaves_a_resumable_run(tmp_path):
    calls = {"n": 0}

    def flaky(testbed, params, systems, iters, warmup, seed):
        calls["n"] += 1
        if calls["n"] == 2:
            raise AggBoxError("receiver h3 did not answer")
        return FakeBroadcast()(testbed, params, systems, iters, warmup, seed)

    exp = write_experiment(tmp_path)
    with registered(flaky), pytest.raises(AggBoxError, match="did not answer"):
        run(exp, tmp_path / "results")
    (tmp,) = tmp_dirs(tmp_path / "results")
    assert len(list((tmp / "cells").glob("*.parquet"))) == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "non-empty list"),
        ([{"system": "aggbox", "completion_us": 1.0}], "lack column(s) iter"),
        ([{"system": "gloo", "iter": 0, "completion_us": 1, "delivery_us": 1, "sender_cpu_us": 1}],
         "not asked for: gloo"),
    ],
)  # fmt: skip
def test_samples_that_break_the_contract_are_refused(tmp_path, bad, message):
    exp = write_experiment(tmp_path)
    with registered(lambda *args: bad), pytest.raises(AggBoxError) as info:
        run(exp, tmp_path / "results")
    assert message in str(info.value)


def test_without_testbed_backends_the_default_factory_says_so(monkeypatch):
    import types

    from aggbox.errors import SetupError

    monkeypatch.setitem(sys.modules, "aggbox.testbed", types.ModuleType("aggbox.testbed"))
    with pytest.raises(SetupError, match="testbed backends are not available"):
        experiment_module.default_testbed_factory("netns", {"hosts": 2}, "x")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aggbox")
    sub = parser.add_subparsers(dest="command", required=True)
    experiment_module.register(sub)
    plots.register(sub)
    return parser.parse_args(argv)


def test_run_ids_are_timestamped_and_unique():
    ids = {experiment_module.new_run_id() for _ in range(50)}
    assert len(ids) > 40
    assert all(pd.Series(sorted(ids)).str.match(RUN_ID_PATTERN))


def test_atomic_json_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    from aggbox import results

    target = tmp_path / "meta.json"
    results.atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_summary_carries_the_per_system_constants(tmp_path, fake):
    run_dir = run(write_experiment(tmp_path, hosts=(2, 8)), tmp_path / "results")
    summary = pd.read_csv(run_dir / "summary.csv").set_index(["hosts", "receivers", "system"])
    assert summary.loc[(8, "idle", "aggbox"), "promise"] == "kernel"
    assert summary.loc[(8, "idle", "tcp"), "promise"] == "app"
    assert bool(summary.loc[(8, "idle", "tcp"), "overcommitted"]) is True
    assert summary.loc[(8, "idle", "tcp"), "procs_per_cpu"] == 7.0
    assert bool(summary.loc[(2, "idle", "tcp"), "overcommitted"]) is False
    assert (summary["cpu_source"] == "cpuidle").all()
    assert (summary["repetitions"] == 1).all()


def test_meta_records_every_cell_its_testbed_load_and_cpus(tmp_path, fake):
    run_dir = run(write_experiment(tmp_path, repetitions=2), tmp_path / "results")
    meta = json.loads((run_dir / "meta.json").read_text())
    cells = meta["cells"]
    assert list(cells) == list(meta["cell_seeds"])  # every cell, in grid order
    assert len(cells) == 8
    for key, cell in cells.items():
        hosts = int(key.split(",")[0].removeprefix("hosts="))
        assert cell["testbed"] == {"backend": "fake", "hosts": hosts, "run_id": run_dir.name}
        assert cell["repetition"] == int(key.rsplit("rep=", 1)[1])
        assert cell["seed"] == meta["cell_seeds"][key]
        for when in ("load_before", "load_after"):
            assert len(cell[when]["loadavg"]) == 3 and cell[when]["steal_s"] >= 0
        assert cell["steal_s"] >= 0 and cell["seconds"] == meta["cell_seconds"][key]
        assert cell["affinity"]["source"] == "samples"
        assert cell["affinity"]["by_system"]["tcp"] == {"root_cpus": "0", "member_cpus": "1"}
    # The run-level copy of the first cell's testbed stays for older readers.
    assert meta["testbed"]["describe"] in [c["testbed"] for c in cells.values()]
    machine = meta["machine"]
    assert machine["user_hz"] > 0 and machine["cpu_count"] >= 1
    assert machine["cpu_meter"] in ("cpuidle", "proc_stat")
    assert machine["config_hz"] is None or machine["config_hz"] in (100, 250, 300, 1000)
    assert meta["smoke"] is True and {"start", "end"} <= set(meta["load"])


def test_without_cpu_columns_the_planned_placement_is_recorded():
    frame = pd.DataFrame({"system": ["tcp"], "iter": [0]})
    planned = experiment_module.cell_affinity(frame, {"placement": "root-alone"}, "netns")
    assert planned["source"] == "planned" and planned["placement"] == "root-alone"
    assert experiment_module.cell_affinity(frame, {}, "netns") == {"source": "none"}
    mixed = pd.DataFrame({"system": ["a", "a"], "iter": [0, 1], "worker_cpus": ["1", "0-1"]})
    by_system = experiment_module.cell_affinity(mixed, {}, "netns")["by_system"]
    assert by_system == {"a": {"worker_cpus": ["0-1", "1"]}}


def test_a_resumed_run_keeps_the_records_of_the_cells_run_before(tmp_path):
    exp = write_experiment(tmp_path)
    results_dir = tmp_path / "results"
    with registered(FakeBroadcast(interrupt_on=3)), pytest.raises(RunInterrupted) as info:
        run(exp, results_dir)
    with registered():
        run_dir = run(exp, results_dir, resume=info.value.run_id)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert len(meta["cells"]) == 4 and all("testbed" in c for c in meta["cells"].values())
