"""Fakes for the experiment pipeline's tests: a broadcast-like workload and a testbed.

The numbers the fake workload makes are SYNTHETIC: a made-up latency model with noise,
shaped like a broadcast measurement so that the runner, the statistics and the figures
can be tested without root, namespaces or eBPF. They are not measurements.

``python tests/unit/pipeline_fakes.py`` regenerates the committed reference result
``tests/data/broadcast-synthetic/`` that the plot tests render.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console

from aggbox.testbed.base import Host, Testbed
from aggbox.workloads import registry

FAKE = "fake_broadcast"
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "data" / "broadcast-synthetic"
METRICS = ["completion_us", "delivery_us", "sender_cpu_us"]
PARAMS = {  # fixed here, so the tests do not follow the real workload's parameter list
    "hosts": registry.Param(int, minimum=2),
    "size": registry.Param(int, default=64, minimum=1),
    "receivers": registry.Param(str, default="idle", choices=("idle", "busy")),
    "loss": registry.Param(float, default=0.0, minimum=0, maximum=100),
}


class FakeTestbed(Testbed):
    """Hosts that exist only on paper; records being brought up and down."""

    backend = "fake"
    instances: list[FakeTestbed] = []

    def __init__(self, backend: str, params: dict, run_id: str):
        self.requested_backend = backend
        self.params = dict(params)
        self.run_id = run_id
        n = int(params.get("hosts", 2))
        self.hosts = [
            Host(f"h{i}", i, f"10.0.0.{i + 1}", f"02:00:00:00:00:{i + 1:02x}", "eth0")
            for i in range(n)
        ]
        self.is_up = False
        self.was_down = False
        FakeTestbed.instances.append(self)

    def up(self) -> FakeTestbed:
        self.is_up = True
        return self

    def down(self) -> None:
        self.is_up = False
        self.was_down = True

    def describe(self) -> dict:
        return {"backend": self.backend, "hosts": len(self.hosts), "run_id": self.run_id}


def synthetic_samples(params: dict, systems: list[str], iters: int, seed: int) -> list[dict]:
    """Broadcast-shaped SYNTHETIC samples: TCP grows ~linearly with the group, AggBox barely."""
    rng = np.random.default_rng(seed)
    hosts, size = int(params["hosts"]), int(params.get("size", 64))
    busy = params.get("receivers", "idle") == "busy"
    copy_us = size / 125.0  # 1 Gbit/s: 8 ns per byte
    model = {  # system -> (base latency µs, busy factor, sender CPU µs)
        "aggbox": (18 + 0.9 * hosts + 0.3 * copy_us * (hosts - 1), 1.15, 6 + 0.1 * hosts),
        "tcp": (22 + (7.5 + copy_us) * (hosts - 1), 1.8, 4 + 3.0 * (hosts - 1)),
        "udp": (15 + (4.0 + copy_us) * (hosts - 1), 1.6, 3 + 1.5 * (hosts - 1)),
        "gloo": (40 + (6.0 + copy_us) * (hosts - 1), 1.7, 8 + 2.5 * (hosts - 1)),
    }
    samples = []
    for system in systems:
        # The per-system constants the real workloads put on every sample: the promise,
        # the overcommit of the processes that must run at once (a kernel promise needs
        # only the root, on CPU 0; an app promise every member too, sharing CPU 1), the CPU
        # meter and the CPUs applied.
        kernel = system == "aggbox"
        procs_per_cpu = 1.0 if kernel else float(hosts - 1)
        constants = {
            "promise": "kernel" if kernel else "app",
            "procs_per_cpu": procs_per_cpu,
            "overcommitted": procs_per_cpu > 1.0,
            "cpu_source": "cpuidle",
            "root_cpus": "0",
            "member_cpus": "1",
        }
        base, busy_factor, cpu = model[system]
        base *= busy_factor if busy else 1.0
        noise = rng.lognormal(0.0, 0.35 if busy else 0.15, iters)
        tail = np.where(rng.random(iters) < 0.02, rng.uniform(2, 5, iters), 1.0)
        completion = base * noise * tail
        for i in range(iters):
            samples.append(
                {
                    "system": system,
                    "iter": i,
                    "completion_us": round(float(completion[i]), 2),
                    "delivery_us": round(float(completion[i] * 0.7), 2),
                    "sender_cpu_us": round(float(cpu * rng.lognormal(0.0, 0.1)), 2),
                    "delivered": True,
                    **constants,
                }
            )
    return samples


class FakeBroadcast:
    """A workload that counts its calls and can be told to stop the run on its Nth call."""

    def __init__(self, interrupt_on: int | None = None, sigterm_on: int | None = None):
        self.calls: list[dict] = []
        self.interrupt_on = interrupt_on
        self.sigterm_on = sigterm_on

    def __call__(self, testbed, params, systems, iters, warmup, seed) -> list[dict]:
        assert testbed.is_up, "the runner must bring the testbed up before the workload runs"
        self.calls.append(dict(params))
        if len(self.calls) == self.interrupt_on:
            raise KeyboardInterrupt
        if len(self.calls) == self.sigterm_on:
            os.kill(os.getpid(), signal.SIGTERM)
        return synthetic_samples(params, systems, iters, seed)


@contextmanager
def registered(workload=None):
    """Register ``workload`` (default: a fresh FakeBroadcast) as ``fake_broadcast``.

    Nests: on exit, whatever was registered before comes back.
    """
    workload = workload or FakeBroadcast()
    tables = (
        registry.WORKLOADS,
        registry.METRICS,
        registry.PRIMARY_METRIC,
        registry.SYSTEMS,
        registry.PARAMS,
        registry.COST,
    )
    before = [dict(table) for table in tables]
    registry.add_workload(
        FAKE,
        workload,
        metrics=METRICS,
        primary_metric="completion_us",
        systems=["aggbox", "tcp", "udp", "gloo"],
        params=PARAMS,
        cost=registry.COST["broadcast"],
    )
    try:
        yield workload
    finally:
        for table, saved in zip(tables, before, strict=True):
            table.clear()
            table.update(saved)


def experiment_text(
    hosts=(2, 8),
    receivers=("idle", "busy"),
    sizes=(64,),
    iters=20,
    repetitions=1,
    figures=(),
    name="fakecast",
    smoke=True,
) -> str:
    """A small experiment file over the fake workload (quick mode = the same grid).

    ``smoke`` (default) lifts the repetition floor so that tests can run one repetition;
    ``smoke=False`` writes the file a measurement would have.
    """
    lines = [
        f"name: {name}",
        "description: synthetic test experiment",
        f"workload: {FAKE}",
        "systems: [aggbox, tcp, udp]",
        "testbed: netns",
        "params:",
        f"  hosts: {list(hosts)}",
        f"  size: {list(sizes)}",
        f"  receivers: [{', '.join(receivers)}]",
        f"iters: {iters}",
        "warmup: 0",
        f"repetitions: {repetitions}",
        "seed: 7",
        f"figures: [{', '.join(figures)}]",
        *(["smoke: true"] if smoke else []),
    ]
    return "\n".join(lines) + "\n"


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=120)


def write_reference(dest: Path = REFERENCE_DIR) -> Path:
    """Regenerate the committed SYNTHETIC reference run (no figures: tests draw them)."""
    from aggbox.experiment import parse_experiment, run_experiment

    with tempfile.TemporaryDirectory() as tmp, registered():
        exp_file = Path(tmp) / "broadcast-synthetic.yaml"
        exp_file.write_text(
            experiment_text(
                hosts=(2, 4, 8, 16, 32),
                iters=60,
                figures=("broadcast_latency", "broadcast_cdf"),
                name="broadcast-synthetic",
            )
        )
        experiment = parse_experiment(exp_file.read_text(), "tests/data/broadcast-synthetic.yaml")
        run_dir = run_experiment(
            experiment,
            results_dir=Path(tmp) / "results",
            testbed_factory=FakeTestbed,
            progress=False,
            draw_figures=False,
            console=quiet_console(),
        )
        meta = json.loads((run_dir / "meta.json").read_text())
        meta["synthetic"] = True
        meta["note"] = "SYNTHETIC TEST DATA made by tests/unit/pipeline_fakes.py, not a measurement"
        meta["command"] = "python tests/unit/pipeline_fakes.py"
        for volatile in ("machine", "git", "versions"):
            meta[volatile] = None
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run_dir, dest)
    (dest / "README.md").write_text(
        "# SYNTHETIC test data: not a measurement\n\n"
        "A small run of the experiment pipeline over the fake broadcast workload in\n"
        "`tests/unit/pipeline_fakes.py` (a made-up latency model with noise). The plot and\n"
        "loader tests render it. Regenerate with `python tests/unit/pipeline_fakes.py`.\n"
        "Real reference results live under `results/`.\n"
    )
    return dest


if __name__ == "__main__":
    print(write_reference())
