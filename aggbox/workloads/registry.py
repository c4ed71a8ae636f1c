"""Which workloads exist, what they measure, which parameters they take, and what a cell costs.

The experiment runner, ``aggbox bench`` and the plots look workloads up here by name. A
workload is a function::

    run_cell(testbed: Testbed, params: dict, systems: list[str],
             iters: int, warmup: int, seed: int) -> list[dict]

that runs every system in ``systems`` once on ``testbed`` with ``params`` and returns one
dict per measured sample, each with at least ``"system"`` and ``"iter"`` plus the metric
columns named in :data:`METRICS` (a metric that could not be measured is ``None``/NaN).

Adding a workload adds one entry to each table below; nothing else changes. Entries in
:data:`WORKLOADS` are ``"module:function"`` strings so that listing or validating
experiments never imports a workload's heavy dependencies; a callable is accepted too
(tests register fakes that way, through :func:`add_workload`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from aggbox.errors import AggBoxError

WorkloadFn = Callable[..., list[dict]]

#: workload name -> "module:function" (imported lazily) or the function itself.
WORKLOADS: dict[str, str | WorkloadFn] = {
    "broadcast": "aggbox.workloads.broadcast:run_cell",
    "allreduce": "aggbox.workloads.allreduce:run_cell",
    "mapreduce": "aggbox.workloads.mapreduce:run_cell",
    "training": "aggbox.workloads.training:run_cell",
}

#: workload name -> metric columns every sample carries (all in the units their suffix says).
METRICS: dict[str, list[str]] = {
    # cpu_us_per_op: whole machine per broadcast (background and drain subtracted);
    # the role columns: the root's and all members' own process CPU per broadcast.
    "broadcast": ["completion_us", "delivery_us", "sender_cpu_us", "cpu_us_per_op",
                  "root_cpu_us_per_op", "members_cpu_us_per_op"],
    # cpu_us_per_op: whole machine per call (background and barrier subtracted); the
    # roles: all workers' own process CPU, and the aggregator process's (tcp_ps's
    # server; AggBox's aggregator works in softirq, in the machine figure only).
    "allreduce": ["time_ms", "algbw_gbps", "max_abs_err", "err_bound", "cpu_us_per_op",
                  "workers_cpu_us_per_op", "aggregator_cpu_us_per_op"],
    # after_last_send_s: last mapper's last send -> counts final (AggBox's reduction has
    # mostly run inside the mappers' sends by then); cpu_us_per_op: whole machine per JOB.
    "mapreduce": ["job_s", "after_last_send_s", "reducer_cpu_s", "pairs_per_s",
                  "cpu_us_per_op", "mappers_cpu_us_per_op", "reducers_cpu_us_per_op"],
    # iter_ms: rank 0's forward + backward + step; comm_ms: its time between each bucket's
    # hook call and the bucket's completion, summed; cpu_us_per_op: whole machine per
    # iteration; test_accuracy / test_loss (digits): the seed's final figures, on each
    # of its samples; loss: rank 0's training loss at that step.
    "training": ["iter_ms", "comm_ms", "cpu_us_per_op", "test_accuracy", "test_loss",
                 "loss"],
}

#: workload name -> the metric that figures and reports lead with.
PRIMARY_METRIC: dict[str, str] = {
    "broadcast": "completion_us",
    "allreduce": "time_ms",
    "mapreduce": "job_s",
    "training": "iter_ms",
}

#: workload name -> systems it can compare (AggBox and its baselines).
SYSTEMS: dict[str, list[str]] = {
    "broadcast": ["aggbox", "tcp_kack", "tcp", "udp", "mcast", "gloo"],
    "allreduce": ["aggbox", "aggbox_auth", "gloo", "tcp_ps"],
    "mapreduce": ["aggbox", "aggbox_nocombiner", "tcp", "tcp_combiner"],
    "training": ["aggbox", "gloo", "gloo_fp16"],
}

#: system -> the Python module it cannot run without (optional extras of the package).
SYSTEM_NEEDS: dict[str, str] = {"gloo": "torch", "gloo_fp16": "torch"}
#: workload -> the module every one of its systems needs.
WORKLOAD_NEEDS: dict[str, str] = {"training": "torch"}
_INSTALL_HINT = {"torch": "install it with 'AGGBOX_TORCH=pypi make setup' (see README.md)"}


def unavailable(workload: str, systems: list[str]) -> dict[str, str]:
    """The systems of ``systems`` this Python cannot run, each with why and what to do:
    the modules optional extras bring (torch for gloo) are looked up, never imported."""
    import importlib.util

    out: dict[str, str] = {}
    for system in systems:
        module = WORKLOAD_NEEDS.get(workload) or SYSTEM_NEEDS.get(system)
        if module and importlib.util.find_spec(module) is None:
            out[system] = (f"{module} is not installed; "
                           + _INSTALL_HINT.get(module, f"install {module}"))
    return out


_REQUIRED = object()
_KIND_WORDS = {int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Param:
    """One workload parameter: its type, allowed values and default (none: it must be given)."""

    kind: type  # int, float or str
    default: object = _REQUIRED
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def check(self, value: object) -> str | None:
        """None if ``value`` is acceptable, else what is expected (for an error message)."""
        ok_type = (
            isinstance(value, self.kind) and not isinstance(value, bool)
            if self.kind is not float
            else isinstance(value, int | float) and not isinstance(value, bool)
        )
        kind = _KIND_WORDS.get(self.kind, self.kind.__name__)
        if not ok_type:
            return kind
        if self.choices is not None and value not in self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.minimum is not None and value < self.minimum:
            return f"{kind} >= {self.minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"{kind} <= {self.maximum}"
        return None

    def describe(self) -> str:
        text = self.kind.__name__
        if self.choices is not None:
            text = " | ".join(map(str, self.choices))
        return text + ("" if self.required else f" (default {self.default!r})")


#: workload name -> parameter name -> Param. The experiment schema checks grids against it.
PARAMS: dict[str, dict[str, Param]] = {
    "broadcast": {
        "hosts": Param(int, minimum=2, help="group size, sender included"),
        "size": Param(int, default=64, minimum=1, help="payload bytes per broadcast"),
        "receivers": Param(
            str, default="idle", choices=("idle", "busy", "spin"),
            help="members blocked in recv; available once per 1 ms (busy, no CPU); or "
            "spinning the CPU in 1 ms units (spin, overcommits)",
        ),
        "gap_us": Param(int, default=2000, minimum=0, help="least pause between broadcasts"),
        "gap_jitter_us": Param(int, default=1000, minimum=0,
                               help="pause uniform in [gap_us, gap_us + this], seeded"),
        "placement": Param(
            str, default="root-alone", choices=("root-alone", "shared"),
            help="netns CPUs: the root alone on CPU 0, or every host on every CPU",
        ),
        # Link impairments, applied by the testbed (aggbox.testbed.make_testbed).
        "loss": Param(float, default=0.0, minimum=0, maximum=100, help="loss, percent"),
        "delay": Param(float, default=0.0, minimum=0, help="one-way delay, ms"),
        "duplicate": Param(float, default=0.0, minimum=0, maximum=100, help="percent"),
        "reorder": Param(float, default=0.0, minimum=0, maximum=100, help="percent"),
    },
    "allreduce": {
        "workers": Param(int, minimum=1, help="workers; the testbed adds the aggregator host"),
        "floats": Param(int, minimum=1, help="float32 values per tensor"),
        "block": Param(int, default=0, minimum=0, help="int32 values per packet (0: the MTU's)"),
        "mtu": Param(int, default=65000, minimum=1500, maximum=65535,
                     help="testbed MTU, for every system"),
        "distribution": Param(str, default="gaussian",
                              choices=("gaussian", "uniform", "heavy", "zeros")),
        "loss": Param(float, default=0.0, minimum=0, maximum=100, help="loss, percent"),
        "duplicate": Param(float, default=0.0, minimum=0, maximum=100, help="percent"),
        "reorder": Param(float, default=0.0, minimum=0, maximum=100, help="percent"),
    },
    "mapreduce": {
        "mappers": Param(int, default=4, minimum=1, help="mapper hosts"),
        "reducers": Param(int, default=1, minimum=1, help="reducer hosts"),
        "words": Param(int, default=2_000_000, minimum=1, help="Zipf corpus: total words"),
        "vocab": Param(int, default=50_000, minimum=1, help="Zipf corpus: distinct words"),
        "skew": Param(float, default=1.0, minimum=0, help="Zipf exponent (0: uniform)"),
        "files": Param(int, default=4, minimum=1, help="Zipf corpus: files written"),
        "corpus": Param(str, default="", help="a text file or folder instead of Zipf"),
        "map_entries": Param(int, default=131072, minimum=128,
                             help="distinct keys the reducer's kernel holds (x128)"),
        "window": Param(int, default=64, minimum=1, maximum=128,
                        help="AggBox packets in flight per mapper and reducer"),
        "placement": Param(str, default="shared", choices=("shared", "reducers-alone"),
                           help="netns CPUs: all on all, or reducers alone on CPU 0"),
        "loss": Param(float, default=0.0, minimum=0, maximum=100, help="loss, percent"),
        "delay": Param(float, default=0.0, minimum=0, help="one-way delay, ms"),
        "duplicate": Param(float, default=0.0, minimum=0, maximum=100, help="percent"),
        "reorder": Param(float, default=0.0, minimum=0, maximum=100, help="percent"),
    },
    "training": {
        "workers": Param(int, minimum=1, help="DDP ranks; the testbed adds the aggregator host"),
        "task": Param(str, default="digits", choices=("digits", "comm-heavy"),
                      help="digits: accuracy (scikit-learn's digits); comm-heavy: ~3.2 M "
                      "parameters, time per iteration"),
        "seeds": Param(int, default=1, minimum=1, help="seeds per cell (seed, seed+1, ...)"),
        "digits_steps": Param(int, default=0, minimum=0,
                              help="digits: training steps per model (0: iters)"),
        "mtu": Param(int, default=65000, minimum=1500, maximum=65535,
                     help="testbed MTU, for every system"),
        "timeout_s": Param(float, default=30.0, minimum=1, help="AggBox call timeout"),
    },
}


@dataclass(frozen=True)
class CostModel:
    """A rough guess of one cell's wall time, for ``--dry-run`` and the first ETA.

    ``seconds = fixed_s + per_host_s * hosts + len(systems) * per_system``, with
    ``per_system = per_system_s + (warmup + iters) * (per_iter_s + per_iter_host_s * hosts)``.
    The progress bar corrects it with the measured speed as cells finish.
    """

    fixed_s: float = 2.0  # testbed up + down
    per_host_s: float = 0.05
    per_system_s: float = 3.0  # start the host processes of one system
    per_iter_s: float = 0.005
    per_iter_host_s: float = 0.0

    def seconds(self, params: dict, systems: list[str], iters: int, warmup: int) -> float:
        hosts = float(params.get("hosts", 1))
        per_iter = self.per_iter_s + self.per_iter_host_s * hosts
        per_system = self.per_system_s + (warmup + iters) * per_iter
        return self.fixed_s + self.per_host_s * hosts + len(systems) * per_system


#: workload name -> cost model (a workload without one gets the default CostModel()).
COST: dict[str, CostModel] = {
    # Measured (quick run, 2-8 workers, 16-256 Ki floats): 3-9 s a cell with 37 calls of
    # each of 3 systems: worker start-up (torch import, gloo rendezvous) runs in parallel,
    # then ms to tens of ms a call (plus a barrier per block of calls).
    "allreduce": CostModel(fixed_s=3.0, per_host_s=0.0, per_system_s=0.5, per_iter_s=0.02),
    # corpus, reference count, the reducers' BPF compile and 0.3 s of CPU-meter
    # calibration, then one job per iteration (~0.1-0.8 s; 2M words, 4 mappers on 2 CPUs:
    # 0.4-0.8 s, plus the end barrier and the digest).
    "mapreduce": CostModel(fixed_s=4.5, per_host_s=0.1, per_system_s=0.2, per_iter_s=0.45),
    # Process start-up and the members' BPF compiles (~0.5 s a host on 2 CPUs), 0.5 s of
    # CPU calibration and drain probes, then ~3 ms a message (the 2-3 ms gap, the send,
    # the drain after every block of 10) growing a little with the group.
    "broadcast": CostModel(
        fixed_s=2.5, per_host_s=0.5, per_system_s=2.5, per_iter_s=0.003, per_iter_host_s=0.0001
    ),
    # Measured (quick run, 2-4 ranks, a machine shared at load 6-27): 12-69 s a cell, most
    # of it start-up (torch import, gloo rendezvous, the aggregator's compile); the least
    # disturbed 4-rank cells took 21-23 s, the model says 15 s for a quiet machine (digits
    # 300 steps of 5-10 ms per system, comm-heavy 13 iterations of 0.04-0.4 s).
    "training": CostModel(fixed_s=8.0, per_host_s=0.5, per_system_s=1.0, per_iter_s=0.05),
}


def check_workload(name: str) -> None:
    """Raise :class:`AggBoxError` naming the known workloads if ``name`` is not one."""
    if name not in WORKLOADS:
        known = ", ".join(sorted(WORKLOADS)) or "(none)"
        raise AggBoxError(f"unknown workload {name!r}; known workloads: {known}")


def get_workload(name: str) -> WorkloadFn:
    """The workload function called ``name``, imported on first use."""
    check_workload(name)
    target = WORKLOADS[name]
    if callable(target):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AggBoxError(
            f"workload {name!r} could not be imported from {module_name} ({exc}); "
            "is the package installed with its dependencies?"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AggBoxError(f"workload {name!r}: {module_name} has no function {attr!r}") from None


def cost_model(name: str) -> CostModel:
    return COST.get(name, CostModel())


def add_workload(
    name: str,
    target: str | WorkloadFn,
    metrics: list[str],
    primary_metric: str | None = None,
    systems: list[str] | None = None,
    params: dict[str, Param] | None = None,
    cost: CostModel | None = None,
) -> None:
    """Register a workload in every table at once (plugins and tests)."""
    WORKLOADS[name] = target
    METRICS[name] = list(metrics)
    PRIMARY_METRIC[name] = primary_metric or metrics[0]
    SYSTEMS[name] = list(systems or [])
    PARAMS[name] = dict(params or {})
    if cost is not None:
        COST[name] = cost


def remove_workload(name: str) -> None:
    for table in (WORKLOADS, METRICS, PRIMARY_METRIC, SYSTEMS, PARAMS, COST):
        table.pop(name, None)
