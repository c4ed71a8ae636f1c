"""Systems whose optional dependency is missing (gloo without torch) are left out of a run
with the reason, in the plan and in meta.json; a run none of whose systems can run is
refused with that reason, before anything starts."""

from __future__ import annotations

import json

import pytest
from pipeline_fakes import FAKE, FakeTestbed, experiment_text, quiet_console, registered

from aggbox.experiment import ExperimentError, load_experiment, prepare, run_experiment
from aggbox.workloads import registry

MISSING = "aggbox_test_module_that_is_not_installed"


@pytest.fixture
def udp_needs_a_missing_module(monkeypatch):
    monkeypatch.setitem(registry.SYSTEM_NEEDS, "udp", MISSING)
    with registered() as workload:
        yield workload


def test_unavailable_names_the_module_and_what_to_do(monkeypatch):
    monkeypatch.setitem(registry.SYSTEM_NEEDS, "udp", MISSING)
    out = registry.unavailable(FAKE, ["aggbox", "udp"])
    assert list(out) == ["udp"]
    assert out["udp"].startswith(f"{MISSING} is not installed")
    assert registry.unavailable(FAKE, ["aggbox", "tcp"]) == {}


def test_a_run_leaves_the_system_out_and_says_why(tmp_path, udp_needs_a_missing_module,
                                                  capsys):
    path = tmp_path / "fakecast.yaml"
    path.write_text(experiment_text(hosts=(2,), receivers=("idle",)))
    plan = prepare(load_experiment(path), results_dir=tmp_path / "results")
    assert plan.settings.systems == ("aggbox", "tcp")
    assert set(plan.skipped) == {"udp"}
    run = run_experiment(path, results_dir=tmp_path / "results", progress=False,
                         console=quiet_console(), testbed_factory=FakeTestbed)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["systems"] == ["aggbox", "tcp"]
    assert meta["skipped_systems"]["udp"].startswith(f"{MISSING} is not installed")


def test_a_workload_that_needs_the_module_for_every_system_is_refused(tmp_path, monkeypatch):
    with registered():
        monkeypatch.setitem(registry.WORKLOAD_NEEDS, FAKE, MISSING)
        path = tmp_path / "fakecast.yaml"
        path.write_text(experiment_text(hosts=(2,), receivers=("idle",)))
        with pytest.raises(ExperimentError, match=f"no system can run here: {MISSING}"):
            prepare(load_experiment(path), results_dir=tmp_path / "results")
