"""The allreduce benchmark: N workers sum float32 tensors, AggBox against its baselines.

Hosts: h0 is the aggregator (AggBox's box, and the TCP parameter server's host), h1..hN
the workers. Each worker process builds every system once (gloo's rendezvous and torch
import take seconds), then runs the schedule: blocks of calls per system, interleaved in
a seeded order, after a warm-up. A sample is one call: its time on rank 0 (the calls
synchronize the ranks), its error the largest over EVERY rank's result against a float64
reference of the same inputs (``within_bound`` only if every rank is).

Every system runs inside the same worker processes, so every system's ranks run on the
same CPU set (the node's ``--cpus``, or all CPUs); gloo's threads (torch intra-op set to
one, gloo's work and transport threads) are threads of those processes and inherit it.
The sets actually applied are recorded (``worker_cpus``, ``aggregator_cpus``).

CPU per call, every system (promise ``app``: each worker's application holds the sum):

- ``cpu_us_per_op``: the whole machine's busy CPU (aggbox.cpu.MachineCpu), read by rank 0
  around each measured segment of calls. A segment starts and ends at a barrier over
  one TCP control connection per rank to rank 0: rank 0 opens the window, releases the
  ranks ("go"), and closes it once every rank has reported its last call done; the ranks
  then wait (blocked, idle) for rank 0's "release" before checking their results, which
  therefore never falls inside a window. The background is calibrated once every rank
  is up and blocked at the first barrier; the barrier's own cost (and the meter's) is
  measured by empty segments of the same protocol and subtracted per window.
- ``workers_cpu_us_per_op``: every worker's own CPU (ProcessCpu, all threads) around its
  calls of the segment, summed over the workers, per call.
- ``aggregator_cpu_us_per_op``: tcp_ps: the parameter server's CPU per measured call.
  AggBox's aggregator has no user-space work per call: its kernel sums in softirq, which
  only the whole-machine figure holds; reported is the aggregator process's CPU while it
  served no tcp_ps call, per AggBox call (it sleeps: about 0). gloo has no aggregator: NaN.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from aggbox.auth import new_key
from aggbox.collectives.group import Group, Member
from aggbox.errors import AggBoxError
from aggbox.testbed.base import Testbed
from aggbox.workloads.broadcast import json_group, make_schedule

# aggbox_auth: AggBox with authenticated packets (aggbox/auth.py: the kernel checks each
# block's SipHash tag and tags each result), its own job beside aggbox's: the tag's cost.
SYSTEMS = ("aggbox", "aggbox_auth", "gloo", "tcp_ps")
PORTS = {"aggbox": 48000, "aggbox_auth": 48001, "gloo": 29500, "tcp_ps": 45500}
IN_KERNEL = ("aggbox", "aggbox_auth")
CONTROL_PORT = 46500  # the workers' barrier connections to rank 0
DISTRIBUTIONS = ("gaussian", "uniform", "heavy", "zeros")
PROMISE = "app"  # every system: each worker's application holds the sum
SYNC = "_sync"  # the key of the empty segments that measure the barrier's own CPU
SYNC_WINDOWS = 10
KEEP_BYTES = 256 << 20  # results a rank keeps for checking after a measured segment


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
    # One input at a time: every rank holds a reference, N stacked copies would not fit.
    total = np.zeros(floats)
    for r in range(n_workers):
        total += make_input(r, floats, distribution, seed)
    return total


def _group(spec: dict, system: str, rank: int) -> Group:
    group = replace(Group.from_dict(spec["group"]), rank=rank, port=PORTS[system])
    if system == "aggbox_auth":  # a job of its own on the same aggregator
        group = replace(group, job_id=group.job_id ^ 1, auth_key=spec["auth_key"])
    return group


def segments(schedule: list[tuple[str, int]] | list[list], warmup: int,
             floats: int) -> list[tuple[str, int, bool]]:
    """``(system, calls, measured)`` in the order every rank runs them.

    First :data:`SYNC_WINDOWS` empty measured segments (the barrier's own cost), then
    the schedule's blocks, each split into its warm-up calls (not measured) and measured
    segments small enough that a rank can keep their results until the window closed.
    """
    keep = max(1, KEEP_BYTES // max(1, floats * 4))
    done: dict[str, int] = defaultdict(int)
    out: list[tuple[str, int, bool]] = [(SYNC, 0, True)] * SYNC_WINDOWS
    for system, n in schedule:
        warm = min(n, max(0, warmup - done[system]))
        if warm:
            out.append((system, warm, False))
        left = n - warm
        while left > 0:
            k = min(left, keep)
            out.append((system, k, True))
            left -= k
        done[system] += n
    return out


# ----------------------------------------------------------------- placement ----------


def cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5' (the format of --cpus and /proc's lists)."""
    out: list[str] = []
    for c in sorted(set(cpus)):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def placement() -> dict:
    """Where this process runs: its CPU set and its machine (the kernel's boot id: netns
    hosts and containers on one machine share it, and so share its CPUs)."""
    try:
        machine = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        machine = socket.gethostname()
    return {"cpus": cpu_list(os.sched_getaffinity(0)), "machine": machine}


def concurrency_groups(placements: list[dict]) -> list[tuple[int, int]]:
    """``(processes, cpus)`` groups for :func:`aggbox.cpu.concurrency`, from the
    placements of the processes that must run at the same time.

    Processes on one machine compete for its CPUs: for every CPU set one of them is
    confined to, and for their union, the processes confined within it against its size.
    """
    from aggbox.node import parse_cpus

    by_machine: dict[str, list[frozenset[int]]] = defaultdict(list)
    for p in placements:
        by_machine[p["machine"]].append(frozenset(parse_cpus(p["cpus"])))
    groups = []
    for sets in by_machine.values():
        for candidate in set(sets) | {frozenset().union(*sets)}:
            groups.append((sum(1 for s in sets if s <= candidate), len(candidate)))
    return groups


# ----------------------------------------------------------------- the barrier --------


def _recv_code(sock: socket.socket, code: bytes) -> None:
    got = sock.recv(1)
    if got != code:
        raise AggBoxError(f"allreduce control connection: expected {code!r}, got {got!r} "
                          "(a rank exited?)")


class Barrier:
    """Rank 0's control connections to every other rank: one byte per message.

    Rank 0 listens from construction (before it builds its systems); the others connect
    in :meth:`connect`, after building theirs, so rank 0's accepts mean every rank is up.
    """

    def __init__(self, group: Group, port: int = CONTROL_PORT):
        self.group, self.port = group, port
        self.peers: list[socket.socket] = []
        self.listener: socket.socket | None = None
        if group.rank == 0 and group.size > 1:
            self.listener = socket.create_server(("0.0.0.0", port), backlog=group.size)

    def connect(self, timeout_s: float = 300.0) -> None:
        if self.group.size == 1:
            return
        if self.listener is not None:
            self.listener.settimeout(timeout_s)
            for _ in range(self.group.size - 1):
                conn, _ = self.listener.accept()
                conn.settimeout(None)
                self.peers.append(conn)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    conn = socket.create_connection((self.group.members[0].ip, self.port), 1.0)
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise AggBoxError(f"cannot reach rank 0's control port: {exc}") from exc
                    time.sleep(0.05)
            conn.settimeout(None)
            self.peers.append(conn)
        for conn in self.peers:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # rank 0
    def gather(self, code: bytes) -> None:
        for conn in self.peers:
            _recv_code(conn, code)

    def tell(self, code: bytes) -> None:
        for conn in self.peers:
            conn.sendall(code)

    # the other ranks
    def send(self, code: bytes) -> None:
        self.peers[0].sendall(code)

    def expect(self, code: bytes) -> None:
        _recv_code(self.peers[0], code)

    def segment(self, window: contextlib.AbstractContextManager, run: Callable[[], None]
                ) -> None:
        """One segment: everyone arrived -> (rank 0: ``window`` opens) go -> ``run`` ->
        everyone done -> (window closes) release. The ranks wait for the release blocked,
        so nothing they do after their last call lands in rank 0's window."""
        if self.group.rank == 0:
            self.gather(b"a")
            with window:
                self.tell(b"g")
                run()
                self.gather(b"d")
            self.tell(b"r")
        else:
            self.send(b"a")
            self.expect(b"g")
            run()
            self.send(b"d")
            self.expect(b"r")

    def close(self) -> None:
        for conn in self.peers:
            conn.close()
        if self.listener is not None:
            self.listener.close()


# ----------------------------------------------------------------- node roles ---------


def aggregator_node(spec: dict, rank: int) -> int:
    """Installs AggBox's job (then only the kernel works) and serves the TCP baseline."""
    from aggbox.cpu import ProcessCpu
    from aggbox.node import emit

    programs = None
    server = None
    proc = ProcessCpu()
    try:
        ours = [s for s in IN_KERNEL if s in spec["systems"]]
        if ours:
            from aggbox.collectives.allreduce import AggregatorPrograms

            tag = f"{spec['pin_tag']}-agg" if spec.get("pin_tag") else ""
            programs = AggregatorPrograms(spec["group"]["ifname"], pin_tag=tag)
            for system in ours:
                programs.install_job(_group(spec, system, 0))
        if "tcp_ps" in spec["systems"]:
            from aggbox.baselines.tcp_ps import ParameterServer

            server = ParameterServer(_group(spec, "tcp_ps", 0), PORTS["tcp_ps"])
        emit({"event": "ready"})
        c0, t0 = time.process_time_ns(), time.monotonic_ns()
        try:
            if server is not None:
                # returns when every worker has disconnected
                server.serve(cpu=proc, warmup=int(spec.get("warmup", 0)))
            while programs is not None:
                signal.pause()  # the kernel does the work; the runner ends us (SIGTERM)
        except SystemExit:
            pass
        busy, wall = time.process_time_ns() - c0, time.monotonic_ns() - t0
        process_cpu = {k: v for k, v in proc.as_dict().items() if k == "tcp_ps"}
        if programs is not None:
            # AggBox's per-call work here is the kernel's (softirq); what this process
            # spent outside tcp_ps calls and their accepts is an upper bound of its own share.
            served = sum(t.busy_ns for t in proc.tallies.values())
            calls = {system: sum(n for s, n in spec["schedule"] if s == system)
                     for system in ours}
            for system, n in calls.items():  # shared by call count
                share = n / max(1, sum(calls.values()))
                process_cpu[system] = {"busy_ns": int(max(0, busy - served) * share),
                                       "wall_ns": wall, "ops": n, "windows": 1}
        done = {"event": "done", "role": "aggregator", "process_cpu": process_cpu,
                "placement": placement()}
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
    if system in IN_KERNEL:
        from aggbox.collectives.allreduce import Allreducer

        block = spec["block"] if system == "aggbox" else spec["auth_block"]
        return Allreducer(group, block=block, timeout=spec["timeout_s"])
    if system == "gloo":
        from aggbox.baselines.gloo import GlooAllreducer

        return GlooAllreducer(group, PORTS["gloo"])
    if system == "tcp_ps":
        from aggbox.baselines.tcp_ps import TcpPsAllreducer

        return TcpPsAllreducer(group, PORTS["tcp_ps"])
    raise AggBoxError(f"unknown allreduce system {system!r}; known: {', '.join(SYSTEMS)}")


def _check(system: str, reducer, rank: int, ref: np.ndarray,
           kept: list[tuple[int, int, np.ndarray, object]]) -> list[dict]:
    """One record per kept call: this rank's error (and rank 0's time)."""
    records = []
    for index, ns, y, exponents in kept:
        err = np.abs(y.astype(np.float64) - ref)
        rec = {"kind": "call", "system": system, "iter": index, "rank": rank,
               "max_abs_err": float(err.max())}
        if rank == 0:
            rec["time_ns"] = ns
        if system in IN_KERNEL:
            reducer.last_exponents = exponents  # the bound of THAT call, not of the last
            bound = reducer.error_bound(y)
            rec["err_bound"] = float(bound.max())
            rec["within_bound"] = bool((err <= bound).all())
        records.append(rec)
    return records


def result_store(x: np.ndarray, calls: int) -> np.ndarray:
    """Where a segment's results go (``calls`` rows of ``x``'s size and dtype), given to
    every system as ``out=``: a result in memory never touched before costs a page fault
    per 4 KiB inside the timed call (~0.45 ms per 1 MiB here, a quarter of a 256 Ki call),
    which a training loop reusing its buffers never pays. The rows are kept until the
    segment's check; warm-up calls (not kept) cycle through them. Zero-filled here, so
    every page is present (np.zeros alone maps them lazily)."""
    store = np.empty((max(1, calls), x.size), dtype=x.dtype)
    store.fill(0)
    return store


def worker_node(spec: dict, rank: int) -> int:
    from aggbox.cpu import CpuAccount, MachineCpu, ProcessCpu
    from aggbox.node import emit, emit_many

    floats, dist, seed = spec["floats"], spec["distribution"], spec["seed"]
    x = make_input(rank, floats, dist, seed)
    ref = reference(len(spec["group"]["members"]), floats, dist, seed)
    barrier = Barrier(replace(Group.from_dict(spec["group"]), rank=rank))
    # Rank 0 sees every segment start and end: it alone reads the whole machine.
    meter = MachineCpu() if rank == 0 else None
    account = CpuAccount(meter) if meter is not None else None
    proc = ProcessCpu()
    reducers: dict = {}
    try:
        for system in spec["systems"]:
            reducers[system] = _reducer(system, spec, rank)
        # Faulted in before anything is measured (rank 0's background calibration below
        # included: 256 MiB of zeros at 4 Mi floats read as a busy CPU of background).
        plan = segments(spec["schedule"], spec["warmup"], floats)
        store = result_store(x, max((n for _, n, m in plan if m), default=0))
        emit({"event": "ready"})
        barrier.connect()
        if account is not None:
            # Every other rank now waits, blocked, at the first barrier.
            account.calibrate(seconds=0.3)
        records: list[dict] = []
        counts: dict[str, int] = defaultdict(int)
        for system, n, measured in plan:
            reducer = reducers.get(system)
            kept: list[tuple[int, int, np.ndarray, object]] = []

            def run(system=system, n=n, measured=measured, reducer=reducer, kept=kept):
                own = proc.window(system, n) if measured and n else contextlib.nullcontext()
                with own:
                    for k in range(n):
                        t0 = time.perf_counter_ns()
                        y = reducer.allreduce(x, out=store[k % len(store)])
                        t1 = time.perf_counter_ns()
                        if measured:
                            kept.append((counts[system], t1 - t0, y,
                                         getattr(reducer, "last_exponents", None)))
                        counts[system] += 1

            window = (account.window(system, n) if account is not None and measured
                      else contextlib.nullcontext())
            barrier.segment(window, run)
            records += _check(system, reducer, rank, ref, kept)
        emit_many(records)
        done = {"event": "done", "role": "worker", "rank": rank,
                "stats": {s: getattr(r, "stats", {}) for s, r in reducers.items()},
                "process_cpu": proc.as_dict(), "placement": placement()}
        if account is not None:
            done["machine_cpu"] = account.as_dict()
        emit(done)
    finally:
        for r in reducers.values():
            r.close()
        barrier.close()
        if meter is not None:
            meter.close()
    return 0


# ----------------------------------------------------------------- the runner ---------


@dataclass
class AllreduceRun:
    samples: list[dict]
    events: list[dict]


def build_spec(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
               seed: int) -> dict:
    from aggbox.collectives.allreduce import max_block

    agg, workers = testbed.hosts[0], testbed.hosts[1:]
    members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(workers))
    # Job id and token are secrets, fresh per job whatever the seed (the seed fixes the
    # data, not who may speak for the job). Results go out once, to a multicast group,
    # where the testbed's bridge is known to replicate it (netns: mcast_flood on every
    # port); elsewhere the kernel's unicast clones are the safe choice.
    results = "multicast" if testbed.backend == "netns" else "unicast"
    group = Group(job_id=secrets.randbelow(2**31 - 1) + 1, token=secrets.randbelow(2**32 - 1) + 1,
                  members=members, rank=0, ifname=agg.ifname,
                  aggregator=Member(rank=0, ip=agg.ip, mac=agg.mac),
                  options={"results": results})
    mtu = getattr(testbed, "mtu", 1500)
    block = int(params.get("block", 0)) or max_block(mtu)
    return {"group": json_group(group), "systems": list(systems), "auth_key": new_key().hex(),
            "schedule": make_schedule(list(systems), warmup + iters, seed),
            "floats": int(params["floats"]), "distribution": params.get("distribution",
                                                                         "gaussian"),
            "block": min(block, max_block(mtu)), "timeout_s": float(params.get("timeout_s", 20)),
            # the tag takes 8 bytes of each authenticated packet
            "auth_block": min(block, max_block(mtu, authenticated=True)),
            "seed": seed, "warmup": warmup, "pin_tag": getattr(testbed, "run_id", "")}


def merge_calls(records: list[dict], warmup: int, floats: int) -> list[dict]:
    """One sample per (system, call): rank 0's time; the worst error over every rank."""
    calls: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "call" and r["iter"] >= warmup:
            calls[(r["system"], r["iter"])].append(r)
    samples = []
    for (system, index), recs in sorted(calls.items()):
        time_ns = next((r["time_ns"] for r in recs if "time_ns" in r), None)
        bounds = [r["err_bound"] for r in recs if r.get("err_bound") is not None]
        samples.append({
            "system": system, "iter": index - warmup,
            "time_ms": time_ns / 1e6 if time_ns else float("nan"),
            "algbw_gbps": floats * 4 / time_ns if time_ns else float("nan"),
            "max_abs_err": max(r["max_abs_err"] for r in recs),
            "err_bound": max(bounds) if bounds else None,
            "within_bound": all(r.get("within_bound", True) for r in recs),
            "ranks_checked": len({r["rank"] for r in recs})})
    return samples


def cpu_columns(events: list[dict], systems: list[str]) -> dict[str, dict]:
    """Per system, the CPU and placement columns every one of its samples carries."""
    from aggbox.cpu import concurrency, cpu_us_per_op, role_us_per_op

    workers = [e for e in events if e.get("role") == "worker"]
    aggregators = [e for e in events if e.get("role") == "aggregator"]
    machine = next((e["machine_cpu"] for e in workers if "machine_cpu" in e), None)
    per_window = 0.0  # barrier + meter, per window: the empty segments' busy CPU
    if machine is not None:
        t = machine["tallies"].get(SYNC)
        if t and t["windows"]:
            per_window = max(0.0, (t["busy_ns"] - machine["background_rate"] * t["wall_ns"])
                             / t["windows"])
    nan = float("nan")
    worker_places = [e["placement"] for e in workers if "placement" in e]
    agg_places = [e["placement"] for e in aggregators if "placement" in e]
    out = {}
    for system in systems:
        t = machine["tallies"].get(system) if machine is not None else None
        total = (cpu_us_per_op(t["busy_ns"], t["wall_ns"], t["ops"],
                               machine["background_rate"], per_window * t["windows"])
                 if t else nan)
        # What must run at once for a call: every worker, and the PS server for tcp_ps
        # (AggBox's aggregator is its kernel; gloo has none).
        places = worker_places + (agg_places if system == "tcp_ps" else [])
        procs_per_cpu, over = concurrency(concurrency_groups(places)) if places else (nan,
                                                                                    False)
        out[system] = {
            "promise": PROMISE,
            "cpu_us_per_op": total,
            "workers_cpu_us_per_op": role_us_per_op([e.get("process_cpu", {})
                                                     for e in workers], system),
            "aggregator_cpu_us_per_op": role_us_per_op([e.get("process_cpu", {})
                                                        for e in aggregators], system),
            "procs_per_cpu": procs_per_cpu, "overcommitted": bool(over),
            "cpu_source": machine["source"] if machine is not None else "",
            # busy CPUs while idle (subtracted); near the CPU count the figure is noise
            "cpu_background": (round(machine["background_rate"], 3) if machine is not None
                               else nan),
            "worker_cpus": " ".join(sorted({p["cpus"] for p in worker_places})),
            "aggregator_cpus": " ".join(sorted({p["cpus"] for p in agg_places})),
        }
    return out


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
    events = [r for r in records if r.get("event") == "done"]
    columns = cpu_columns(events, list(systems))
    samples = [dict(s, **columns[s["system"]])
               for s in merge_calls(records, warmup, spec["floats"])]
    return AllreduceRun(samples, events)


def run_cell(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
             seed: int) -> list[dict]:
    return run_allreduce(testbed, params, systems, iters, warmup, seed).samples
