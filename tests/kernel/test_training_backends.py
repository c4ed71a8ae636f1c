"""The training workload (aggbox/workloads/training.py) on the docker and ansible testbeds:
the same small cell (digits, 2 DDP ranks and the aggregator, a few steps, AggBox's hook and
gloo) as on netns, through ``aggbox run --testbed docker|ansible``; the results have the
schema of a netns run and both systems train the same model to the same accuracy.

Markers as in test_docker_testbed.py (docker: builds the image, starts the engine if it
is not running and stops it again) and test_ansible_ssh.py (ansible: local SSH stand-in
hosts)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
from backend_helpers import assert_same_schema, run_experiment
from test_ansible_ssh import standins  # noqa: F401 - fixture
from test_docker_testbed import engine, image  # noqa: F401 - fixtures

pytestmark = pytest.mark.kernel

CELL = "training-small"  # tests/data/experiments/training-small.yaml
STEPS, RANKS = 20, 2


@pytest.fixture(scope="module")
def netns_run(tmp_path_factory):
    run, _ = run_experiment(CELL, tmp_path_factory.mktemp("netns"), "--testbed", "netns")
    return run


def assert_trained(run) -> pd.DataFrame:
    """Both systems ran every step on every rank count and reached the same accuracy."""
    samples = pd.read_parquet(run / "samples.parquet")
    assert set(samples["system"]) == {"aggbox", "gloo"}
    for system, rows in samples.groupby("system"):
        assert sorted(rows["iter"]) == list(range(STEPS)), system
        assert (rows["workers"] == RANKS).all()
        assert rows["iter_ms"].gt(0).all() and np.isfinite(rows["loss"]).all()
        # the loss went down: the model trained (20 steps of SGD on the digits)
        loss = rows.sort_values("iter")["loss"]
        assert loss.iloc[-5:].mean() < loss.iloc[0]
    acc = samples.groupby("system")["test_accuracy"].first()
    assert acc["gloo"] > 0.5, acc  # ten classes: far above chance
    # same weights, same data order, the mean within ~1e-8 relative: the same model
    assert abs(acc["aggbox"] - acc["gloo"]) <= 0.02, acc
    bound = samples.loc[samples.system == "aggbox", "err_bound"]
    assert np.isfinite(bound).all() and (bound > 0).all() and (bound < 1e-6).all()
    return samples


def test_a_training_cell_on_netns_trains_both_systems_alike(netns_run):
    """The reference the other backends are held to, itself checked (in make test)."""
    assert json.loads((netns_run / "meta.json").read_text())["testbed"]["backend"] == "netns"
    assert_trained(netns_run)


# ~4-6 min here (four 2.1 GB container copies on vfs, torch imported in each): run by
# make test-long and make test-docker, not by make test (its budget is 20 minutes).
@pytest.mark.docker
@pytest.mark.long
def test_a_training_cell_on_docker_containers(image, netns_run, tmp_path):  # noqa: F811
    run, seconds = run_experiment(CELL, tmp_path / "docker", "--testbed", "docker")
    print(f"\n[timing] training cell, 2 ranks + aggregator, docker: {seconds:.1f} s")
    assert json.loads((run / "meta.json").read_text())["testbed"]["backend"] == "docker"
    assert_same_schema(run, netns_run)
    assert_trained(run)
    from aggbox.testbed.docker import list_docker_resources

    assert list_docker_resources(os.environ["AGGBOX_PREFIX"]) == ([], [])


# ~1.5 min (the playbooks, then torch imported on every stand-in): run by make test-long
# and make test-ansible; make test keeps the ansible allreduce and broadcast cells, and
# training on netns, within its 20-minute budget.
@pytest.mark.ansible
@pytest.mark.long
def test_a_training_cell_over_ssh(standins, netns_run, tmp_path):  # noqa: F811
    # The stand-ins share this machine, whose Debian Python has no torch: the nodes use
    # the Python running the tests (its venv has torch and scikit-learn, and BCC through
    # the system site packages), as a cloud inventory names one that has them.
    inventory = tmp_path / "training.ini"
    inventory.write_text(standins.inventory.read_text().replace(
        "aggbox_iface=eth0", f"aggbox_iface=eth0\naggbox_python={sys.executable}"))
    run, seconds = run_experiment(CELL, tmp_path / "ansible", "--testbed", "ansible",
                                  "--inventory", str(inventory))
    print(f"\n[timing] ansible training run (provision, deploy, 1 cell, teardown): "
          f"{seconds:.1f} s")
    assert json.loads((run / "meta.json").read_text())["testbed"]["backend"] == "ansible"
    assert_same_schema(run, netns_run)
    assert_trained(run)
    fetched = sorted((run / "hosts").rglob("rc"))
    assert len(fetched) == RANKS + 1 and all(p.read_text() == "0" for p in fetched)
