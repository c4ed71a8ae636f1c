"""The allreduce benchmark: N workers sum float32 tensors, AggBox against its baselines.

Hosts: h0 is the aggregator (AggBox's box, and the TCP parameter server's host), h1..hN
the workers. Each worker process builds every system once (gloo's rendezvous and torch
import take seconds), then runs the schedule: blocks of calls per system, interleaved in
a seeded order, after a warm-up. A sample is one call on rank 0 (the calls synchronize
the ranks); its error is against a float64 reference of the same inputs.
"""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from aggbox.collectives.group import Group, Member
from aggbox.errors import AggBoxError
from aggbox.testbed.base import Testbed
from aggbox.workloads.broadcast import json_group, make_schedule

SYSTEMS = ("aggbox", "gloo", "tcp_ps")
PORTS = {"aggbox": 48000, "gloo": 29500, "tcp_ps": 45500}
DISTRIBUTIONS = ("gaussian", "uniform", "heavy", "zeros")


def make_input(rank: int, floats: int, distribution: str, seed: int) -> np.ndarray:
    """Worker ``rank``'s tensor, reproducible from its arguments."""
    rng = np.random.default_rng([seed, rank])
    if distribution == "gaussian":
        x = rng.standard_normal(floats)
    elif distribution == "uniform":
        x = rng.uniform(-1.0, 1.0, floats)
    elif distribution == "heavy":  # Student's t with 1.5 degrees of freedom
        x = rng.standard_t(1.5, floats)
    elif distribution == "zeros":
        x = np.zeros(floats)
    else:
        raise AggBoxError(f"unknown distribution {distribution!r}; known: {DISTRIBUTIONS}")
    return x.astype(np.float32)


def reference(n_workers: int, floats: int, distribution: str, seed: int) -> np.ndarray:
    return np.sum([make_input(r, floats, distribution, seed).astype(np.float64)
                   for r in range(n_workers)], axis=0)


def _group(spec: dict, system: str, rank: int) -> Group:
    base = Group.from_dict(spec["group"])
    from dataclasses import replace

    return replace(base, rank=rank, port=PORTS[system])


# ----------------------------------------------------------------- node roles ---------


def aggregator_node(spec: dict, rank: int) -> int:
    """Installs AggBox's job (then only the kernel works) and serves the TCP baseline."""
    from aggbox.node import emit

    programs = None
    server = None
    try:
        if "aggbox" in spec["systems"]:
            from aggbox.collectives.allreduce import AggregatorPrograms

            tag = f"{spec['pin_tag']}-agg" if spec.get("pin_tag") else ""
            programs = AggregatorPrograms(spec["group"]["ifname"], pin_tag=tag)
            programs.install_job(_group(spec, "aggbox", 0))
        if "tcp_ps" in spec["systems"]:
            from aggbox.baselines.tcp_ps import ParameterServer

            server = ParameterServer(_group(spec, "tcp_ps", 0), PORTS["tcp_ps"])
        emit({"event": "ready"})
        try:
            if server is not None:
                server.serve()  # returns when every worker has disconnected
            while programs is not None:
                signal.pause()  # the kernel does the work; the runner ends us (SIGTERM)
        except SystemExit:
            pass
        done = {"event": "done", "role": "aggregator"}
        if programs is not None:
            done["counters"] = programs.counters()
        emit(done)
    finally:
        if server is not None:
            server.close()
        if programs is not None:
            programs.close()
    return 0


def _reducer(system: str, spec: dict, rank: int):
    group = _group(spec, system, rank)
    if system == "aggbox":
        from aggbox.collectives.allreduce import Allreducer

        return Allreducer(group, block=spec["block"], timeout=spec["timeout_s"])
    if system == "gloo":
        from aggbox.baselines.gloo import GlooAllreducer

        return GlooAllreducer(group, PORTS["gloo"])
    if system == "tcp_ps":
        from aggbox.baselines.tcp_ps import TcpPsAllreducer

        return TcpPsAllreducer(group, PORTS["tcp_ps"])
    raise AggBoxError(f"unknown allreduce system {system!r}; known: {', '.join(SYSTEMS)}")


def worker_node(spec: dict, rank: int) -> int:
    from aggbox.node import emit, emit_many

    floats, dist, seed = spec["floats"], spec["distribution"], spec["seed"]
    x = make_input(rank, floats, dist, seed)
    ref = reference(len(spec["group"]["members"]), floats, dist, seed) if rank == 0 else None
    reducers: dict = {}
    try:
        for system in spec["systems"]:
            reducers[system] = _reducer(system, spec, rank)
        emit({"event": "ready"})
        records = []
        counts: dict[str, int] = defaultdict(int)
        for system, n in spec["schedule"]:
            reducer = reducers[system]
            for _ in range(n):
                index = counts[system]
                counts[system] += 1
                t0 = time.perf_counter_ns()
                y = reducer.allreduce(x)
                t1 = time.perf_counter_ns()
                if rank != 0:
                    continue
                rec = {"kind": "call", "system": system, "iter": index, "time_ns": t1 - t0,
                       "max_abs_err": float(np.abs(y.astype(np.float64) - ref).max())}
                if system == "aggbox":
                    rec["err_bound"] = float(reducer.error_bound(y).max())
                    rec["within_bound"] = bool(
                        (np.abs(y.astype(np.float64) - ref) <= reducer.error_bound(y)).all())
                records.append(rec)
        emit_many(records)
        emit({"event": "done", "role": "worker", "rank": rank,
              "stats": {s: getattr(r, "stats", {}) for s, r in reducers.items()}})
    finally:
        for r in reducers.values():
            r.close()
    return 0


# ----------------------------------------------------------------- the runner ---------


@dataclass
class AllreduceRun:
    samples: list[dict]
    events: list[dict]


def build_spec(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
               seed: int) -> dict:
    from aggbox.collectives.allreduce import max_block

    rng = random.Random(seed)
    agg, workers = testbed.hosts[0], testbed.hosts[1:]
    members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(workers))
    group = Group(job_id=rng.randrange(1, 2**31), token=rng.randrange(1, 2**32),
                  members=members, rank=0, ifname=agg.ifname,
                  aggregator=Member(rank=0, ip=agg.ip, mac=agg.mac))
    mtu = getattr(testbed, "mtu", 1500)
    block = int(params.get("block", 0)) or max_block(mtu)
    return {"group": json_group(group), "systems": list(systems),
            "schedule": make_schedule(list(systems), warmup + iters, seed),
            "floats": int(params["floats"]), "distribution": params.get("distribution",
                                                                         "gaussian"),
            "block": min(block, max_block(mtu)), "timeout_s": float(params.get("timeout_s", 20)),
            "seed": seed, "warmup": warmup, "pin_tag": getattr(testbed, "run_id", "")}


def run_allreduce(testbed: Testbed, params: dict, systems: list[str], iters: int,
                  warmup: int, seed: int) -> AllreduceRun:
    from aggbox.workloads.launcher import NodeGroup

    if len(testbed.hosts) < 2:
        raise AggBoxError("an allreduce needs an aggregator host and at least one worker")
    spec = build_spec(testbed, params, systems, iters, warmup, seed)
    agg, workers = testbed.hosts[0], testbed.hosts[1:]
    budget = 300 + (warmup + iters) * len(systems) * (0.2 + spec["floats"] * 4e-8)
    with NodeGroup(spec) as nodes:
        box = nodes.start(agg, "allreduce-aggregator", 0)
        nodes.wait_ready([box], timeout=120)
        worker_nodes = [nodes.start(h, "allreduce-worker", i) for i, h in enumerate(workers)]
        nodes.wait_ready(worker_nodes, timeout=300)
        nodes.wait_exit(worker_nodes, timeout=budget)
        nodes.stop_all()  # the aggregator: SIGTERM, it reports its counters and detaches
        records = [r for n in nodes.nodes for r in n.records]
    samples = [{"system": r["system"], "iter": r["iter"] - warmup,
                "time_ms": r["time_ns"] / 1e6,
                "algbw_gbps": spec["floats"] * 4 / r["time_ns"],
                "max_abs_err": r["max_abs_err"], "err_bound": r.get("err_bound"),
                "within_bound": r.get("within_bound", True)}
               for r in records if r.get("kind") == "call" and r["iter"] >= warmup]
    events = [r for r in records if r.get("event") == "done"]
    return AllreduceRun(samples, events)


def run_cell(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
             seed: int) -> list[dict]:
    return run_allreduce(testbed, params, systems, iters, warmup, seed).samples
