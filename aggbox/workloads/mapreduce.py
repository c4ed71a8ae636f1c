"""MapReduce word count: M mappers shuffle (word, count) pairs to R reducers.

Each system (:data:`SYSTEMS`) runs the same job on the same testbed, interleaved: for
every repetition the systems run one after another in a seeded shuffled order. A job:

1. every node meets at a barrier (a TCP control connection to the first reducer);
2. each mapper reads its byte-range split of the corpus and tokenizes it
   (aggbox/workloads/corpus.py), then hands its (word, 1) pairs to the system's
   reduce-by-key: AggBox (aggbox/collectives/reduce.py; ``aggbox`` combines on the
   mapper first, ``aggbox_nocombiner`` does not) or the TCP shuffle baseline
   (aggbox/baselines/tcp_shuffle.py; ``tcp`` without, ``tcp_combiner`` with combiner);
3. each reducer ends with its keys' counts and writes them (``key<TAB>count``);
4. every node meets at the barrier again (the end of the job's CPU window); then each
   reducer reports a digest, which the runner checks against ``collections.Counter``
   over the corpus.

Per job (one sample per system and repetition), on the shared monotonic clock of the
netns testbed:

- ``job_s`` (the headline): the first mapper starts reading -> the last reducer has
  written its counts;
- ``after_last_send_s``: the last mapper's last new data byte handed to the kernel (its
  last ``sendto`` / ``sendall``) -> the last reducer's counts are final (in a dict). Not
  a "reduce phase": AggBox's reduction has mostly run by then, in softirq inside the
  mappers' ``sendto``; read it beside the CPU per job, which includes that work;
- ``reducer_cpu_s``: CPU time of the reducer processes during the job (softirq work done
  in another process's context, e.g. the in-kernel reduce, is billed to that process);
- ``pairs_per_s``: input pairs (words) / job_s; ``exact``: every reducer's counts equal.

Per system (the same on each of its samples, over all its measured jobs):

- ``cpu_us_per_op``: the whole machine's busy CPU per job in µs (every CPU, user +
  system + softirq, from cpuidle; the idle background subtracted), read by the first
  reducer from just before the start signal to the end barrier: mappers, reducers and
  the kernel's work for them, in-kernel reduce included;
- ``mappers_cpu_us_per_op`` / ``reducers_cpu_us_per_op``: the sum of the mapper (reducer)
  processes' own CPU time per job;
- ``promise`` ("app": every reducer's application holds its counts), ``procs_per_cpu``
  and ``overcommitted`` (mappers and reducers must run at once: do they outnumber the
  CPUs they may use?), ``cpu_source``.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import struct
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from aggbox.collectives.group import Group, Member, new_job_id, new_token
from aggbox.collectives.reduce import reducer_of
from aggbox.cpu import concurrency, cpu_count_of, per_op_from_dict, role_us_per_op
from aggbox.errors import AggBoxError
from aggbox.testbed.base import Testbed
from aggbox.workloads import corpus as corpus_mod

SYSTEMS = ("aggbox", "aggbox_nocombiner", "tcp", "tcp_combiner")
DEFAULT_SYSTEMS = SYSTEMS
PROMISE = "app"  # a job is complete when every reducer's application holds its counts
COMBINE = {"aggbox": True, "aggbox_nocombiner": False, "tcp": False, "tcp_combiner": True}
UDP_PORT_BASE = 49000  # AggBox job j listens on UDP 49000 + j % PORT_SPAN
TCP_PORT_BASE = 49500  # the TCP shuffle on TCP 49500 + j % PORT_SPAN
PORT_SPAN = 400
CONTROL_PORT = 49999  # TCP: the barrier
_GO = struct.Struct("<I")
END_TAG = 1 << 31  # the barrier after job j carries j | END_TAG


def job_port(system: str, job_index: int) -> int:
    base = UDP_PORT_BASE if system.startswith("aggbox") else TCP_PORT_BASE
    return base + job_index % PORT_SPAN


def make_schedule(systems: list[str], reps: int, seed: int) -> list[tuple[str, int]]:
    """(system, repetition) in run order: every repetition runs each system once, in an
    order shuffled per repetition, so drift hits every system alike."""
    rng = random.Random(seed)
    schedule = []
    for rep in range(reps):
        order = list(systems)
        rng.shuffle(order)
        schedule += [(s, rep) for s in order]
    return schedule


# ----------------------------------------------------------------- the barrier ---------


class Barrier:
    """All nodes of a cell meet before and after each job. The coordinator (the first
    reducer) listens on CONTROL_PORT; every other node connects once at start-up. A
    meeting is two halves: :meth:`arrive` (a node sends its tag; the coordinator returns
    once every node's tag is in) and :meth:`leave` (the coordinator sends the tag back;
    a node returns when it has it). Between them, on the coordinator, every other node
    is blocked and idle: that is where the CPU meter calibrates and opens a job's window
    (TCP: loss on the links is fine)."""

    def __init__(self, coordinator_ip: str, n_nodes: int, is_coordinator: bool,
                 timeout: float = 120.0):
        self.n_others = n_nodes - 1
        self.timeout = timeout
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        if is_coordinator:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("0.0.0.0", CONTROL_PORT))
            self.listener.listen(max(16, n_nodes))
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    conn = socket.create_connection((coordinator_ip, CONTROL_PORT), timeout=2)
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise AggBoxError(f"cannot reach the barrier at {coordinator_ip}:"
                                          f"{CONTROL_PORT}: {exc}") from exc
                    time.sleep(0.05)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(timeout)
            self.conns.append(conn)

    @property
    def is_coordinator(self) -> bool:
        return self.listener is not None

    def arrive(self, tag: int) -> None:
        """A node: announce ``tag``. The coordinator: return once every node announced it."""
        if self.listener is None:
            self.conns[0].sendall(_GO.pack(tag))
            return
        self.listener.settimeout(self.timeout)
        while len(self.conns) < self.n_others:
            conn, _ = self.listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.timeout)
            self.conns.append(conn)
        for conn in self.conns:
            if _recv_exact(conn, _GO.size) != _GO.pack(tag):
                raise AggBoxError(f"barrier: a node is not at {_tag_name(tag)}")

    def leave(self, tag: int) -> None:
        """The coordinator: let every node go on. A node: wait until it may."""
        if self.listener is None:
            if _recv_exact(self.conns[0], _GO.size) != _GO.pack(tag):
                raise AggBoxError(f"barrier: the coordinator is not at {_tag_name(tag)}")
            return
        for conn in self.conns:
            conn.sendall(_GO.pack(tag))

    def wait(self, tag: int) -> None:
        """Return when every node reached ``tag``."""
        self.arrive(tag)
        self.leave(tag)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        if self.listener is not None:
            self.listener.close()


def _tag_name(tag: int) -> str:
    return f"the end of job {tag & ~END_TAG}" if tag & END_TAG else f"job {tag}"


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = conn.recv(n - len(data))
        except TimeoutError:
            raise AggBoxError("barrier: timed out waiting for the other nodes") from None
        except OSError as exc:  # reset: the other side failed and closed
            raise AggBoxError(f"barrier: a node left ({exc}; see its stderr)") from None
        if not chunk:
            raise AggBoxError("barrier: a node left (did it fail? see its stderr)")
        data += chunk
    return data


# ----------------------------------------------------------------- node roles ---------


def job_group(spec: dict, job_index: int, system: str, rank: int) -> Group:
    base = Group.from_dict(spec["group"])
    return replace(base, rank=rank, job_id=spec["job_base"] + job_index,
                   port=job_port(system, job_index))


def _endpoint(system: str, group: Group, programs, spec: dict):
    if system in ("aggbox", "aggbox_nocombiner"):
        from aggbox.collectives.reduce import ReduceByKey

        return ReduceByKey(group, programs, combine=COMBINE[system],
                           window=int(spec.get("window", 64)), timeout=spec["timeout_s"])
    if system in ("tcp", "tcp_combiner"):
        from aggbox.baselines.tcp_shuffle import TcpShuffle

        return TcpShuffle(group, combine=COMBINE[system], timeout=spec["timeout_s"])
    raise AggBoxError(f"unknown mapreduce system {system!r}; known: {', '.join(SYSTEMS)}")


def node(spec: dict, rank: int) -> int:
    """Every mapreduce node (mapper or reducer: the group's options say which).

    CPU: every node bills its own CPU time (all its threads) of each measured job to the
    job's system (:class:`~aggbox.cpu.ProcessCpu`); the coordinator (the first reducer),
    the one process that sees every job start and end at the barrier, also reads the
    whole machine's busy CPU over each measured job (:class:`~aggbox.cpu.MachineCpu`:
    every host's processes, the kernel's softirq work, the in-kernel reduce-by-key that
    runs inside the mappers' ``sendto``). Both go out in the ``done`` record."""
    from aggbox.cpu import CpuAccount, MachineCpu, ProcessCpu
    from aggbox.node import emit

    group = Group.from_dict(spec["group"])
    reducers = group.options["reducers"]
    is_reducer = rank in reducers
    is_coordinator = rank == reducers[0]
    programs = None
    if is_reducer and any(s.startswith("aggbox") for s in spec["systems"]):
        from aggbox.collectives.reduce import ReduceByKeyPrograms

        tag = f"{spec['pin_tag']}-h{rank}" if spec.get("pin_tag") else ""
        programs = ReduceByKeyPrograms(group.ifname, map_entries=int(spec["map_entries"]),
                                       pin_tag=tag)
    barrier = None
    error = None
    proc = ProcessCpu()
    account = CpuAccount(MachineCpu()) if is_coordinator else None
    try:
        coordinator = group.members[reducers[0]]
        barrier = Barrier(coordinator.ip, group.size, is_coordinator,
                          timeout=spec["timeout_s"])
        emit({"event": "ready"})
        for j, (system, rep) in enumerate(spec["schedule"]):
            try:
                emit(_run_job(spec, j, system, rep, rank, programs, barrier, proc, account))
            except AggBoxError as exc:
                error = f"{system} (job {j}): {exc}"
                break
        done = {"event": "done", "rank": rank, "error": error,
                "mapper": rank in group.options["mappers"], "reducer": is_reducer,
                "proc_cpu": proc.as_dict()}
        if account is not None:
            done["machine_cpu"] = account.as_dict()
        if programs is not None:
            done["counters"] = programs.counters()
        emit(done)
    finally:
        if account is not None:
            account.meter.close()
        if barrier is not None:
            barrier.close()
        if programs is not None:
            from aggbox.collectives.reduce import wait_lingering

            wait_lingering()
            programs.close()
    return 0


def _run_job(spec: dict, j: int, system: str, rep: int, rank: int, programs,
             barrier: Barrier, proc, account) -> dict:
    """One job on this node. The CPU windows: this process's own from the start signal
    to the end of its part (mapper: everything sent and acknowledged; reducer: counts
    written); the machine's (coordinator only) from just before the start signal to
    the moment every node has reported the end of its part. Warm-up jobs are not
    billed. The digest, the record and its output come after the windows."""
    group = job_group(spec, j, system, rank)
    is_mapper = rank in group.options["mappers"]
    is_reducer = rank in group.options["reducers"]
    measured = rep >= int(spec.get("warmup", 0))
    endpoint = _endpoint(system, group, programs, spec)  # a reducer listens from here on
    try:
        barrier.arrive(j)
        if account is not None and j == 0:
            # Every node is up, connected and blocked in the barrier: the idle machine.
            account.calibrate()
        machine = (account.window(system, 1) if account is not None and measured
                   else contextlib.nullcontext())
        with machine:
            barrier.leave(j)
            with proc.window(system, 1) if measured else contextlib.nullcontext():
                t_start, cpu0 = time.monotonic(), time.process_time()
                pairs = None
                if is_mapper:
                    from aggbox.collectives.reduce import Pairs

                    pairs = Pairs(corpus_mod.read_split(spec["splits"][str(rank)]))
                t_read = time.monotonic()
                result = endpoint.run(pairs)
                t_final, cpu1 = time.monotonic(), time.process_time()
                # Now, not after the end barrier: an AggBox reducer's close starts its
                # linger, which answers the DONEs a mapper resends when an ACK was lost
                # (the mapper reaches the end barrier only once it has them).
                endpoint.close()
                out = None
                if is_reducer:
                    assert result is not None
                    if spec.get("output_dir"):
                        out = (Path(spec["output_dir"])
                               / f"part-r-{rank:05d}-job{j}-{system}.tsv")
                        corpus_mod.write_counts(result, out)
                t_written = time.monotonic()
            barrier.arrive(j | END_TAG)
        barrier.leave(j | END_TAG)
        record = {"kind": "job", "system": system, "rep": rep, "job": j, "rank": rank,
                  "mapper": is_mapper, "reducer": is_reducer, "t_start": t_start,
                  "t_read": t_read, "t_final": t_final, "cpu_s": cpu1 - cpu0,
                  "stats": dict(endpoint.stats)}
        if is_reducer:
            if out is not None:
                record["output"] = str(out)
            record["t_written"] = t_written
            record["n_keys"] = len(result)
            record["total"] = sum(result.values())
            record["digest"] = corpus_mod.digest(result)
        return record
    finally:
        endpoint.close()


# ----------------------------------------------------------------- the runner ---------


@dataclass
class MapReduceRun:
    samples: list[dict]
    events: list[dict]  # the nodes' "done" records (errors, kernel counters)
    corpus: dict


def _reference(files: list[Path], reducers: int) -> tuple[dict[int, str], int, int]:
    """Per reducer index: the digest of its keys' true counts; and the words, keys."""
    counts = corpus_mod.count_words(files)
    parts: list[dict[bytes, int]] = [{} for _ in range(reducers)]
    for k, v in counts.items():
        parts[reducer_of(k, reducers)][k] = v
    return ({i: corpus_mod.digest(p) for i, p in enumerate(parts)}, sum(counts.values()),
            len(counts))


def build_spec(testbed: Testbed, params: dict, systems: list[str], reps: int, seed: int,
               splits: list, workdir: Path, warmup: int = 0) -> dict:
    n_map, n_red = int(params.get("mappers", 4)), int(params.get("reducers", 1))
    if n_map < 1 or n_red < 1:
        raise AggBoxError("mapreduce needs at least one mapper and one reducer")
    if n_map + n_red > len(testbed.hosts):
        raise AggBoxError(f"{n_map} mappers + {n_red} reducers need {n_map + n_red} hosts; "
                          f"the testbed has {len(testbed.hosts)}")
    hosts = testbed.hosts[:n_red + n_map]
    members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(hosts))
    # The token and the jobs' ids from `secrets`, whatever the seed (issue 11).
    group = Group(job_id=0, token=new_token(), members=members, rank=0,
                  ifname=hosts[0].ifname,
                  options={"reducers": list(range(n_red)),
                           "mappers": list(range(n_red, n_red + n_map))})
    import json

    return {
        "group": json.loads(group.to_json()),
        "job_base": new_job_id(30),
        "systems": list(systems),
        "schedule": make_schedule(list(systems), reps, seed),
        "warmup": int(warmup),  # repetitions below this are not billed CPU
        "splits": {str(n_red + i): s for i, s in enumerate(splits)},
        "output_dir": str(workdir),
        "map_entries": int(params.get("map_entries", 131072)),
        "window": int(params.get("window", 64)),
        "timeout_s": float(params.get("timeout_s", 60.0)),
        "pin_tag": getattr(testbed, "run_id", ""),
    }


def run_mapreduce(testbed: Testbed, params: dict, systems: list[str], iters: int,
                  warmup: int, seed: int) -> MapReduceRun:
    """Run every system ``warmup + iters`` times on ``testbed``; one sample per system and
    measured repetition."""
    from aggbox.workloads.launcher import NodeGroup, cpu_placement

    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise AggBoxError(f"unknown mapreduce system(s) {', '.join(unknown)}; "
                          f"known: {', '.join(SYSTEMS)}")
    n_map, n_red = int(params.get("mappers", 4)), int(params.get("reducers", 1))
    workdir = Path(tempfile.mkdtemp(prefix="aggbox-mapreduce-"))
    try:
        spec_corpus = None
        if params.get("corpus"):
            files = corpus_mod.input_files(params["corpus"])
        else:
            spec_corpus = corpus_mod.ZipfCorpus(
                words=int(params.get("words", 2_000_000)), vocab=int(params.get("vocab", 50_000)),
                skew=float(params.get("skew", 1.0)), seed=int(params.get("corpus_seed", seed)),
                files=int(params.get("files", 4)))
            files = corpus_mod.generate(spec_corpus, workdir / "corpus")
        reference, words, keys = _reference(files, n_red)
        corpus_info = {**corpus_mod.describe(spec_corpus, files), "tokens": words,
                       "distinct": keys}
        out_dir = workdir / "out"
        out_dir.mkdir()
        spec = build_spec(testbed, params, systems, warmup + iters, seed,
                          corpus_mod.make_splits(files, n_map), out_dir, warmup=warmup)
        hosts = testbed.hosts[:n_red + n_map]
        budget = 180 + (warmup + iters) * len(systems) * (5 + words / 2e5)
        with NodeGroup(spec) as nodes:
            red_cpus, map_cpus = cpu_placement(testbed.backend,
                                               "root-alone" if params.get("placement") ==
                                               "reducers-alone" else "shared")
            load = placement_concurrency(testbed.backend, red_cpus, map_cpus, n_red, n_map)
            reducer_nodes = [nodes.start(h, "mapreduce-reducer", i, red_cpus)
                             for i, h in enumerate(hosts[:n_red])]
            nodes.wait_ready(reducer_nodes, timeout=240)
            mapper_nodes = [nodes.start(h, "mapreduce-mapper", n_red + i, map_cpus)
                            for i, h in enumerate(hosts[n_red:])]
            nodes.wait_ready(mapper_nodes, timeout=120)
            nodes.wait_exit([*reducer_nodes, *mapper_nodes], timeout=budget)
            # Several nodes may report errors: the first one the runner saw is the cause.
            nodes.raise_root_cause("mapreduce run failed: ")
            records = [r for n in nodes.nodes for r in n.records]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    events = [r for r in records if r.get("event") == "done"]
    errors = [f"rank {e['rank']}: {e['error']}" for e in events if e.get("error")]
    if errors:
        raise AggBoxError("mapreduce run failed: " + "; ".join(errors))
    cpu = cpu_columns(events, list(systems), *load)
    samples = join_records(records, reference, words, warmup, cpu)
    return MapReduceRun(samples, events, corpus_info)


def placement_concurrency(backend: str, red_cpus: str, map_cpus: str, n_red: int,
                          n_map: int) -> tuple[float, bool]:
    """``(procs_per_cpu, overcommitted)`` of a job: every mapper and every reducer must
    run at the same time (the reducers merge while the mappers send). On one machine
    (netns, docker) they share its CPUs as placed (``cpu_placement``: one group when
    unpinned, else the reducers' CPUs and the mappers'); real hosts run one node each."""
    if backend not in ("netns", "docker"):
        return concurrency([(1, cpu_count_of(""))])
    if red_cpus == map_cpus:
        return concurrency([(n_red + n_map, cpu_count_of(red_cpus))])
    return concurrency([(n_red, cpu_count_of(red_cpus)), (n_map, cpu_count_of(map_cpus))])


def cpu_columns(events: list[dict], systems: list[str], procs_per_cpu: float,
                overcommitted: bool) -> dict[str, dict]:
    """Per system: the CPU columns every one of its samples carries (per job, over all its
    measured jobs): the whole machine's busy CPU less the idle background
    (``cpu_us_per_op``), the sum of the mapper processes' and of the reducer processes'
    own CPU, and the placement's concurrency."""
    machine = next((e["machine_cpu"] for e in events if e.get("machine_cpu")), None)
    mappers = [e.get("proc_cpu", {}) for e in events if e.get("mapper")]
    reducers = [e.get("proc_cpu", {}) for e in events if e.get("reducer")]
    nan = float("nan")
    return {system: {
        "cpu_us_per_op": per_op_from_dict(machine, system) if machine else nan,
        "mappers_cpu_us_per_op": role_us_per_op(mappers, system),
        "reducers_cpu_us_per_op": role_us_per_op(reducers, system),
        "promise": PROMISE,
        "procs_per_cpu": procs_per_cpu,
        "overcommitted": overcommitted,
        "cpu_source": machine["source"] if machine else "",
    } for system in systems}


def run_cell(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
             seed: int) -> list[dict]:
    """The experiment runner's entry point (see aggbox/workloads/registry.py)."""
    return run_mapreduce(testbed, params, systems, iters, warmup, seed).samples


def join_records(records: list[dict], reference: dict[int, str], words: int,
                 warmup: int, cpu: dict[str, dict] | None = None) -> list[dict]:
    """One sample per measured (system, repetition), from every node's job record, with
    its system's columns of ``cpu`` (:func:`cpu_columns`)."""
    jobs: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "job":
            jobs[(r["system"], r["rep"])].append(r)
    samples = []
    for (system, rep), recs in sorted(jobs.items(), key=lambda kv: kv[1][0]["job"]):
        if rep < warmup:
            continue
        mappers = [r for r in recs if r["mapper"]]
        reducers = sorted((r for r in recs if r["reducer"]), key=lambda r: r["rank"])
        t0 = min(r["t_start"] for r in mappers)
        last_send = max(r["stats"].get("t_last_send") or r["t_read"] for r in mappers)
        t_final = max(r["t_final"] for r in reducers)
        t_written = max(r["t_written"] for r in reducers)
        exact = len(reducers) == len(reference) and all(
            r["digest"] == reference[i] for i, r in enumerate(reducers))
        job_s = t_written - t0
        stats = [r["stats"] for r in recs]
        samples.append({
            "system": system,
            "iter": rep - warmup,
            "job_s": job_s,
            "after_last_send_s": t_final - last_send,
            "reducer_cpu_s": sum(r["cpu_s"] for r in reducers),
            "pairs_per_s": words / job_s if job_s > 0 else None,
            "exact": exact,
            "map_s": last_send - t0,
            "read_input_s": max(r["t_read"] - r["t_start"] for r in mappers),
            "reducer_read_s": max(r["stats"].get("read_s", 0.0) for r in reducers),
            "done_wait_s": max((r["stats"].get("t_all_done") or t_final) for r in reducers)
            - last_send,
            "shuffled_pairs": int(sum(r["stats"].get("pairs_sent", 0) for r in mappers)),
            "packets": int(sum(s.get("packets", s.get("frames", 0)) for s in stats)),
            "retransmits": int(sum(s.get("retransmits", 0) for s in stats)),
            "spilled_pairs": int(sum(s.get("spilled_pairs", 0) for s in stats)),
            "keys": int(sum(r["n_keys"] for r in reducers)),
            **(cpu or {}).get(system, {}),
        })
    return samples
