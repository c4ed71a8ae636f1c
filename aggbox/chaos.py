"""``aggbox chaos [--quick] [--json] [--out DIR]``: the fault campaign (issue 11).

A matrix of workloads (broadcast, allreduce, reduce-by-key) x faults (loss, burst loss,
duplication, reordering, processes killed with SIGKILL before / during / after their
data phase, the aggregator or reducer killed and restarted, a full key map, concurrent
jobs, a job id reused, a forger on the bridge). Every cell runs on a fresh netns testbed
with a bounded time; its verdict is ``ok`` only if

- every operation's result is exact (allreduce: within the quantization bound), or the
  cell's first error names the host that failed and every survivor ended (result or a
  one-line error, never a traceback) within its timeout;
- the kernel counters moved by the reason the fault should cause;
- ``dmesg`` shows no new kernel WARNING / BUG line;
- nothing of the cell is left: namespaces, state file, pins under /sys/fs/bpf/aggbox.

Each host of a cell runs ``python -m aggbox.chaos --node ROLE --spec FILE`` (this module):
it loads its host's programs, prints ``{"event": "ready"}``, waits for ``go`` on stdin,
runs its part of every job, prints one record per job, then waits for ``quit``. The
controller decides when to kill, restart or forge; see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aggbox.auth import new_key
from aggbox.errors import AggBoxError
from aggbox.protocol import raw_frame

WORKLOADS = ("broadcast", "allreduce", "reduce-by-key")
PORT_BASE = {"broadcast": 47100, "allreduce": 48100, "reduce-by-key": 49100}
# A port in each family's range that no job uses: non-AggBox UDP must reach its socket.
FREE_PORT = {"broadcast": 47990, "allreduce": 48990, "reduce-by-key": 49990}
WARN_RE = re.compile(r"WARNING:|BUG:|Oops|Call Trace|general protection|page_pool_release")
CELL_BOUND_S = 240.0  # a hang, not a slow machine: every wait inside is bounded too


# =======================================================================================
# The node side: runs inside one host's namespace


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def bc_payload(seed: int, job: int, index: int, size: int) -> bytes:
    """Message ``index`` of broadcast job ``job``: deterministic, so every member checks it."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{job}:{index}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def ar_input(seed: int, job: int, rank: int, floats: int):
    import numpy as np

    rng = np.random.default_rng([seed, job, rank])
    return rng.standard_normal(floats).astype(np.float32)


def kv_pairs(seed: int, job: int, rank: int, n_pairs: int, vocab: int) -> list[tuple[bytes, int]]:
    rng = random.Random(f"{seed}:{job}:{rank}")
    return [(b"k%06d" % rng.randrange(vocab), 1) for _ in range(n_pairs)]


def _group(job: dict, rank: int):
    from aggbox.collectives.group import Group

    return Group.from_dict({**job["group"], "rank": rank})


def _counters(programs) -> dict[str, int]:
    if programs is None:
        return {}
    fam = getattr(programs, "family", programs)
    with contextlib.suppress(Exception):
        return {k: v for k, v in fam.counters().items() if v}
    return {}


def _run_jobs(spec: dict, fn: Callable[[int, dict], dict]) -> None:
    """Run ``fn(j, job)`` for every job (concurrently, or one after the other), printing
    one result or error record per job."""
    def one(j: int, job: dict) -> None:
        t0 = time.monotonic()
        try:
            rec = {"event": "result", "job": j, **fn(j, job)}
        except AggBoxError as exc:
            rec = {"event": "error", "job": j, "message": str(exc), "t": time.monotonic()}
        rec["seconds"] = round(time.monotonic() - t0, 3)
        _emit(rec)

    if spec.get("sequential"):
        for j, job in enumerate(spec["jobs"]):
            if j and sys.stdin.readline().strip() != "next":
                return  # the controller gave up on the cell
            one(j, job)
        return
    threads = [threading.Thread(target=one, args=(j, job), daemon=True)
               for j, job in enumerate(spec["jobs"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _node_programs(role: str, spec: dict, ifname: str):
    tag = spec.get("node_tag", "")
    if role in ("bc-root", "bc-member"):
        from aggbox.collectives.broadcast import BroadcastPrograms

        return BroadcastPrograms(ifname, pin_tag=tag)
    if role == "ar-agg":
        from aggbox.collectives.allreduce import AggregatorPrograms

        return AggregatorPrograms(ifname, pin_tag=tag)
    if role == "kv-reducer":
        from aggbox.collectives import reduce as kv

        return kv.ReduceByKeyPrograms(ifname, map_entries=int(spec.get("map_entries", 4096)),
                                      pin_tag=tag)
    return None


def _bc_root(spec: dict, programs, stats: dict) -> Callable[[int, dict], dict]:
    from aggbox.collectives.broadcast import Broadcaster

    def fn(j: int, job: dict) -> dict:
        b = Broadcaster(_group(job, 0), programs)
        try:
            for i in range(spec["iters"]):
                b.send(bc_payload(spec["seed"], job["id"], i, spec["size"]),
                       timeout=spec["timeout_s"])
                if j == 0:
                    _emit({"event": "op", "i": i})
                time.sleep(spec.get("gap_s", 0))
            return {"ops": spec["iters"], "exact": True}
        finally:
            stats[j] = dict(b.stats)
            b.close()
    return fn


def _bc_member(spec: dict, programs, stats: dict, rank: int) -> Callable[[int, dict], dict]:
    from aggbox.collectives.broadcast import Receiver

    def fn(j: int, job: dict) -> dict:
        group = _group(job, rank)
        r = Receiver(group, programs)
        root = group.members[group.root]
        try:
            for i in range(spec["iters"]):
                # Longer than the root's own timeout: the root, which knows who is
                # missing, reports first (a member only knows the root went quiet).
                wait = spec["timeout_s"] * 1.6
                data = r.recv(timeout=wait)
                if data is None:
                    raise AggBoxError(f"no message {i} from the root, rank {root.rank} "
                                      f"({root.ip}), in {wait:g} s")
                if data != bc_payload(spec["seed"], job["id"], i, spec["size"]):
                    return {"ops": i, "exact": False, "detail": f"message {i} differs"}
                if j == 0:
                    _emit({"event": "op", "i": i})
            return {"ops": spec["iters"], "exact": True}
        finally:
            stats[j] = dict(r.stats)
            r.close()
    return fn


def _ar_worker(spec: dict, stats: dict, rank: int) -> Callable[[int, dict], dict]:
    import numpy as np

    from aggbox.collectives.allreduce import Allreducer

    def fn(j: int, job: dict) -> dict:
        group = _group(job, rank)
        n = group.size
        x = ar_input(spec["seed"], job["id"], rank, spec["floats"])
        ref = sum(ar_input(spec["seed"], job["id"], r, spec["floats"]).astype(np.float64)
                  for r in range(n))
        a = Allreducer(group, block=spec.get("block", 256), timeout=spec["timeout_s"])
        worst = 0.0
        try:
            for i in range(spec["iters"]):
                y = a.allreduce(x)
                err = np.abs(y.astype(np.float64) - ref)
                bound = a.error_bound(y)
                worst = max(worst, float(err.max()))
                if not (err <= bound).all():
                    return {"ops": i, "exact": False, "detail":
                            f"call {i}: max error {float(err.max()):.3g} beyond its bound"}
                # A bound computed from a forged exponent would excuse any error: sums of
                # a few N(0,1) values quantized to 32 bits are good to far better than this.
                if float(bound.max()) > 1e-3:
                    return {"ops": i, "exact": False, "detail":
                            f"call {i}: error bound {float(bound.max()):.3g} (max error "
                            f"{float(err.max()):.3g}): a forged exponent?"}
                if j == 0:
                    _emit({"event": "op", "i": i})
                time.sleep(spec.get("gap_s", 0))
            return {"ops": spec["iters"], "exact": True, "max_abs_err": worst}
        finally:
            stats[j] = dict(a.stats)
            a.close()
    return fn


def _kv_node(spec: dict, programs, stats: dict, rank: int) -> Callable[[int, dict], dict]:
    from aggbox.collectives import reduce as kv

    def fn(j: int, job: dict) -> dict:
        group = _group(job, rank)
        ep = kv.ReduceByKey(group, programs, combine=spec.get("combine", False),
                            window=spec.get("window", 64), timeout=spec["timeout_s"])
        try:
            mappers = group.options["mappers"]
            pairs = None
            if rank in mappers:
                pairs = kv_pairs(spec["seed"], job["id"], rank, spec["pairs"], spec["vocab"])
            if j == 0:
                _emit({"event": "op", "i": 0})
            result = ep.run(pairs)
            if result is None:
                return {"ops": 1, "exact": True}
            want: Counter = Counter()
            for m in mappers:
                want.update(k for k, _ in kv_pairs(spec["seed"], job["id"], m, spec["pairs"],
                                                   spec["vocab"]))
            got = dict(result.items())
            exact = got == dict(want)
            return {"ops": 1, "exact": exact, "keys": len(got),
                    **({} if exact else {"detail": f"{len(got)} keys, {sum(got.values())} "
                        f"counted; want {len(want)} keys, {sum(want.values())}"})}
        finally:
            stats[j] = dict(ep.stats)
            ep.close()
    return fn


def node_main(role: str, spec_path: str, rank: int, pin_host: str = "h0") -> int:
    """One host of a cell (see the module docstring)."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("pin_tag"):  # one folder per host, as the workloads pin: <run>-h<i>
        spec["node_tag"] = f"{spec['pin_tag']}-{pin_host}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    programs = None
    stats: dict[int, dict] = {}
    try:
        programs = _node_programs(role, spec, spec.get("ifname", "eth0"))
        if role == "ar-agg":
            # One after the other (a reused job id): each next job once told "next".
            jobs = spec["jobs"][:1] if spec.get("sequential") else spec["jobs"]
            for job in jobs:
                programs.install_job(_group(job, 0))
        fn = {
            "bc-root": lambda: _bc_root(spec, programs, stats),
            "bc-member": lambda: _bc_member(spec, programs, stats, rank),
            "ar-worker": lambda: _ar_worker(spec, stats, rank),
            "kv-reducer": lambda: _kv_node(spec, programs, stats, rank),
            "kv-mapper": lambda: _kv_node(spec, programs, stats, rank),
            "ar-agg": lambda: None,
        }[role]()
        _emit({"event": "ready"})
        line = sys.stdin.readline().strip()
        if line == "go" and fn is not None:
            _run_jobs(spec, fn)
            _emit({"event": "done", "counters": _counters(programs), "stats": stats})
            line = sys.stdin.readline().strip()
        if role == "ar-agg" and spec.get("sequential"):
            for job in spec["jobs"][1:]:
                if line != "next":
                    break
                programs.install_job(_group(job, 0))
                _emit({"event": "installed", "job": job["id"]})
                line = sys.stdin.readline().strip()
        # "quit" (or EOF) ends every node; its counters come last
        _emit({"event": "done", "counters": _counters(programs), "stats": stats,
               "final": True})
    finally:
        if role == "kv-reducer":
            from aggbox.collectives import reduce as kv

            with contextlib.suppress(Exception):
                kv.wait_lingering()
        if programs is not None:
            programs.close()
    return 0


# =======================================================================================
# The controller side


@dataclasses.dataclass
class CellSpec:
    workload: str
    fault: str
    netem: dict = dataclasses.field(default_factory=dict)  # Netem(**netem)
    jobs: int = 1
    sequential: bool = False
    reuse_job_id: bool = False
    kill: tuple[str, str] | None = None  # (victim role, before|during|after)
    restart: str = ""  # role killed during the data phase and started again
    fuzz: str = ""
    params: dict = dataclasses.field(default_factory=dict)
    expect: tuple[str, ...] = ()  # counters of which at least one must have moved

    @property
    def name(self) -> str:
        return f"{self.workload}/{self.fault}"


@dataclasses.dataclass
class NodeProc:
    role: str
    rank: int
    host: Any
    proc: subprocess.Popen
    stderr_path: Path
    records: list = dataclasses.field(default_factory=list)
    lines: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    killed: bool = False

    @property
    def label(self) -> str:
        return f"{self.role}[{self.rank}]@{self.host.name} ({self.host.ip})"

    def send(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()

    def wait_for(self, event: str, timeout: float, count: int = 1,
                 where: Callable[[dict], bool] = lambda r: True) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.count(event, where) >= count:
                return True
            if self.proc.poll() is not None:
                time.sleep(0.05)  # the reader may still hold the last lines
                return self.count(event, where) >= count
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def count(self, event: str, where: Callable[[dict], bool]) -> int:
        """Records of ``event`` (any, if empty) for which ``where`` holds."""
        return sum(1 for r in list(self.records)
                   if (not event or r.get("event") == event) and where(r))

    def stderr_tail(self, n: int = 6) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.stderr_path.read_text(errors="replace").strip()
                              .splitlines()[-n:])
        return ""

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


class Cell:
    """One cell on its own testbed: nodes, the fault, the verdict."""

    def __init__(self, spec: CellSpec, quick: bool, workdir: Path):
        self.spec, self.quick, self.workdir = spec, quick, workdir
        self.nodes: list[NodeProc] = []
        self.notes: list[str] = []
        self.fuzz_result: dict = {}
        self.phases: dict[str, float] = {}
        self.progs: set[int] = set()  # eBPF programs attached in the cell's namespaces
        self.impaired: dict[str, int] = {}  # bpf/impair.c's counters, network faults only

    # -- layout and specs

    def n_hosts(self) -> int:
        base = {"broadcast": 3, "allreduce": 3, "reduce-by-key": 3}[self.spec.workload]
        return base + (1 if self.spec.fuzz else 0)

    def node_spec(self, tb) -> dict:
        from aggbox.collectives.group import Group, Member

        s, w = self.spec, self.spec.workload
        hosts = tb.hosts[:3]
        ids = [secrets.randbelow(2**30) + 1 for _ in range(s.jobs)]
        if s.reuse_job_id:
            ids = [ids[0]] * s.jobs
        jobs = []
        for j in range(s.jobs):
            port = PORT_BASE[w] + (0 if s.reuse_job_id else j)
            token = secrets.randbelow(2**32 - 1) + 1
            if w == "broadcast":
                members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(hosts))
                g = Group(job_id=ids[j], token=token, members=members, rank=0, port=port,
                          group_ip=tb.group_ips[0])
            elif w == "allreduce":
                agg = hosts[0]
                members = tuple(Member(rank=i, ip=h.ip, mac=h.mac)
                                for i, h in enumerate(hosts[1:]))
                # Fuzzed jobs are authenticated (aggbox/auth.py): an insider that sniffed
                # the token and sends as a member is refused only by the header's tag.
                g = Group(job_id=ids[j], token=token, members=members, rank=0, port=port,
                          aggregator=Member(rank=0, ip=agg.ip, mac=agg.mac),
                          options={"results": "multicast"},
                          auth_key=new_key().hex() if s.fuzz else "")
            else:
                members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(hosts))
                g = Group(job_id=ids[j], token=token, members=members, rank=0, port=port,
                          options={"reducers": [0], "mappers": [1, 2]})
            jobs.append({"id": j, "group": json.loads(g.to_json())})
        quick = self.quick
        spec = {"jobs": jobs, "sequential": s.sequential, "seed": 7, "pin_tag": tb.run_id,
                "timeout_s": 5.0, "iters": 6 if quick else 20, "size": 3000 if quick else 20000,
                "floats": 2048 if quick else 65536, "pairs": 3000 if quick else 30000,
                "vocab": 400, "map_entries": 4096}
        spec.update(s.params)
        return spec

    def layout(self) -> list[tuple[str, int, int]]:
        """(role, rank, host index) of every node, the one(s) that must wait first first."""
        w = self.spec.workload
        if w == "broadcast":
            return [("bc-member", 1, 1), ("bc-member", 2, 2), ("bc-root", 0, 0)]
        if w == "allreduce":
            return [("ar-agg", 0, 0), ("ar-worker", 0, 1), ("ar-worker", 1, 2)]
        return [("kv-reducer", 0, 0), ("kv-mapper", 1, 1), ("kv-mapper", 2, 2)]

    # -- running

    def start(self, tb, role: str, rank: int, host_index: int, spec_path: Path) -> NodeProc:
        host = tb.hosts[host_index]
        err = self.workdir / f"{role}-{rank}-{len(self.nodes)}.stderr"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(err, "wb") as f:
            proc = host.popen([sys.executable, "-m", "aggbox.chaos", "--node", role,
                               "--spec", str(spec_path), "--rank", str(rank),
                               "--host", host.name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f,
                              text=True, env=env)
        node = NodeProc(role, rank, host, proc, err)

        def read() -> None:
            for line in proc.stdout:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    rec.setdefault("t", time.monotonic())
                    node.records.append(rec)
                    node.lines.put(rec)
        threading.Thread(target=read, daemon=True).start()
        self.nodes.append(node)
        return node

    def victim(self, role: str) -> NodeProc:
        """The victim of a kill: the last rank of ``role`` (a member, worker or mapper
        that is not the root; the aggregator or reducer for a restart)."""
        return [n for n in self.nodes if n.role == role and not n.killed][-1]

    def run(self) -> dict:
        from aggbox.testbed import Netem, NetnsTestbed

        s = self.spec
        t0 = self.t0 = time.monotonic()
        dmesg_before = dmesg_lines()
        detail: list[str] = []
        outcome: dict = {}
        run_id = ""
        try:
            netem = Netem(**s.netem) if s.netem else None
        except TypeError as exc:  # e.g. burst loss before aggbox/testbed/base.py has it
            return self.result("fail", t0, {}, f"impairment not available: {exc}")
        try:
            with NetnsTestbed(self.n_hosts(), netem=netem) as tb:
                self.phases["up"] = time.monotonic() - t0
                run_id = tb.run_id
                spec = self.node_spec(tb)
                spec_path = self.workdir / "spec.json"
                spec_path.write_text(json.dumps(spec))
                try:
                    outcome = self.drive(tb, spec, spec_path)
                finally:
                    self.phases["run"] = time.monotonic() - t0
                    self.stop_all()
                    self.phases["stop"] = time.monotonic() - t0
                    if netem is not None:  # what the impairment did: the fault happened
                        from aggbox.testbed.impair import read_counters

                        self.impaired = read_counters(tb.switch_ns, "h0")
        except AggBoxError as exc:
            outcome = {"setup_error": str(exc)}
        self.phases["down"] = time.monotonic() - t0
        counters = self.counters()
        verdict, why = self.verdict(outcome, counters)
        detail.append(why)
        left = leftovers(run_id) if run_id else []
        alive = programs_still_loaded(self.progs)
        if alive:
            left.append("eBPF programs " + " ".join(map(str, sorted(alive))))
        if not self.progs and not outcome.get("setup_error"):
            detail.append("no eBPF program seen attached")
        if left:
            verdict = "fail"
            detail.append("left behind: " + ", ".join(left))
        warn = [ln for ln in dmesg_lines()[len(dmesg_before):] if WARN_RE.search(ln)]
        if warn:
            verdict = "fail"
            detail.append("new kernel warnings: " + " | ".join(warn[:3]))
        if time.monotonic() - t0 > CELL_BOUND_S:
            verdict = "fail"
            detail.append(f"took more than {CELL_BOUND_S:g} s")
        detail += self.notes
        return self.result(verdict, t0, counters, "; ".join(d for d in detail if d))

    def result(self, verdict: str, t0: float, counters: dict, detail: str) -> dict:
        return {"workload": self.spec.workload, "fault": self.spec.fault, "verdict": verdict,
                "seconds": round(time.monotonic() - t0, 2), "counters": counters,
                "detail": detail,
                # when each phase ended, seconds from the cell's start
                "phases": {k: round(v, 2) for k, v in self.phases.items()}}

    def drive(self, tb, spec: dict, spec_path: Path) -> dict:
        s = self.spec
        layout = self.layout()
        # All at once (they compile in parallel); nothing moves before "go".
        for role, rank, hi in layout:
            self.start(tb, role, rank, hi, spec_path)
        for node in self.nodes:
            if not node.wait_for("ready", 120):
                return {"setup_error": f"{node.label} not ready: {node.stderr_tail()}"}
        self.phases["ready"] = time.monotonic() - self.t0
        self.progs = set().union(*(attached_prog_ids(ns) for ns in tb.namespaces))
        victim = None
        if s.kill:
            victim = self.victim(s.kill[0])
            if s.kill[1] == "before":
                victim.kill()
        fuzzer = None
        if s.fuzz:
            fuzzer = threading.Thread(target=self.fuzz, args=(tb, spec), daemon=True)
        workers = [n for n in self.nodes if n.role != "ar-agg" and not n.killed]
        for node in workers:
            node.send("go")
        if fuzzer is not None:
            fuzzer.start()
        if s.kill and s.kill[1] == "during":
            if victim.wait_for("op", 20, count=2 if s.workload != "reduce-by-key" else 1):
                if s.workload == "reduce-by-key":
                    time.sleep(0.02)
                victim.kill()
            else:
                self.notes.append("the victim made no progress before the kill")
                victim.kill()
        if s.kill and s.kill[1] == "after":
            victim.wait_for("done", 30)
            victim.kill()
        if s.restart:
            self.restart(tb, spec_path)
        if s.sequential:
            self.step_jobs(spec)
        deadline = time.monotonic() + 3 * spec["timeout_s"] + 10
        for node in self.nodes:
            if node.killed or node.role == "ar-agg":
                continue
            node.wait_for("done", max(0.1, deadline - time.monotonic()))
        if fuzzer is not None:
            fuzzer.join(20)
        return {}

    def step_jobs(self, spec: dict) -> None:
        """Sequential jobs (a reused job id): job j+1 starts once every node ended job j;
        the aggregator installs it first, then the listeners open it, then the senders."""
        listeners = ("bc-member", "kv-reducer")
        runners = [n for n in self.nodes if n.role != "ar-agg" and not n.killed]
        for j in range(1, len(spec["jobs"])):
            for node in runners:
                def ended(r: dict, j: int = j) -> bool:
                    return r.get("event") in ("result", "error") and r.get("job") == j - 1

                if not node.wait_for("", 3 * spec["timeout_s"], where=ended):
                    self.notes.append(f"{node.label} did not end job {j - 1}")
                    return
            for agg in (n for n in self.nodes if n.role == "ar-agg"):
                agg.send("next")
                agg.wait_for("installed", 10, count=j)
            for node in sorted(runners, key=lambda n: n.role not in listeners):
                node.send("next")
                if node.role in listeners:
                    time.sleep(0.05)  # its endpoint is open before a sender starts

    def restart(self, tb, spec_path: Path) -> None:
        role = self.spec.restart
        first = [n for n in self.nodes if n.role != role][0]
        first.wait_for("op", 20, count=2 if role == "ar-agg" else 1)
        if role == "kv-reducer":
            time.sleep(0.02)
        old = self.victim(role)
        old.kill()
        new = self.start(tb, role, old.rank, self.layout()[0][2], spec_path)
        if not new.wait_for("ready", 60):
            self.notes.append(f"restarted {new.label} not ready: {new.stderr_tail()}")
            return
        self.notes.append(f"{role} restarted")
        if role != "ar-agg":  # the aggregator's work is its kernel's: no data phase
            new.send("go")

    def stop_all(self) -> None:
        for node in self.nodes:
            node.send("quit")
        deadline = time.monotonic() + 15
        for node in self.nodes:
            if node.killed:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.notes.append(f"{node.label} did not quit: killed")
                node.proc.kill()
                node.proc.wait()
            with contextlib.suppress(Exception):
                node.proc.stdin.close()
        time.sleep(0.05)

    # -- verdict

    def counters(self) -> dict[str, int]:
        total: Counter = Counter()
        for node in self.nodes:
            done = [r for r in node.records if r.get("event") == "done"]
            if done:
                total.update(done[-1].get("counters", {}))
                for st in done[-1].get("stats", {}).values():
                    total.update({f"app_{k}": int(v) for k, v in st.items()
                                  if isinstance(v, int) and v and not k.startswith("t_")})
        total.update({f"fuzz_{k}": v for k, v in self.fuzz_result.items() if isinstance(v, int)})
        total.update({f"impair_{k}": v for k, v in self.impaired.items()})
        return dict(sorted(total.items()))

    def verdict(self, outcome: dict, counters: dict) -> tuple[str, str]:
        if outcome.get("setup_error"):
            return "fail", "setup: " + outcome["setup_error"]
        s = self.spec
        victim = None
        if s.kill:
            victim = [n for n in self.nodes if n.killed]
            victim = victim[0] if victim else None
        if s.restart:
            victim = [n for n in self.nodes if n.killed][0]
        problems, errors, results = [], [], 0
        for node in self.nodes:
            if node.killed:
                continue
            recs = node.records
            res = [r for r in recs if r.get("event") == "result"]
            errs = [r for r in recs if r.get("event") == "error"]
            expected = 0 if node.role == "ar-agg" else s.jobs
            if node.proc.returncode not in (0, None):
                problems.append(f"{node.label} exited {node.proc.returncode}: "
                                f"{node.stderr_tail()}")
            if len(res) + len(errs) < expected:
                problems.append(f"{node.label} ended neither with a result nor an error in "
                                f"time: {node.stderr_tail()}")
            for r in res:
                results += 1
                if not r.get("exact"):
                    problems.append(f"{node.label} job {r['job']}: wrong result "
                                    f"({r.get('detail', '')})")
            errors += [(r["t"], node, r["message"]) for r in errs]
        errors.sort(key=lambda e: e[0])
        if errors:
            first = errors[0]
            if victim is None:
                problems.append(f"{first[1].label}: {first[2]}")
            elif not (names_host(first[2], victim.host) or first[1].host is victim.host):
                # (a restarted aggregator or reducer reporting its own loss is the failed
                # host with its own message)
                problems.append(f"first error does not name the failed host {victim.label}: "
                                f"{first[1].label}: {first[2]}")
            for _, _node, msg in errors:
                if "Traceback" in msg:
                    problems.append(f"{_node.label} failed with a traceback")
        if victim is not None and s.workload == "broadcast" and s.kill and \
                s.kill[1] in ("before", "during"):
            problems += self.zombie_acks(victim)
        if s.fuzz and self.fuzz_result.get("error"):
            problems.append("fuzzer: " + self.fuzz_result["error"])
        if s.fuzz == "non-aggbox" and not self.fuzz_result.get("delivered"):
            problems.append("non-AggBox UDP to an AggBox port did not reach its socket "
                            f"({self.fuzz_result})")
        # (from 5 %: a quick cell's few hundred packets may see no loss at 1 %)
        made = [c for key, c in IMPAIRED_BY.items() if s.netem.get(key, 0) >= 5]
        if made and not any(counters.get(c, 0) for c in made):
            problems.append("the impairment did nothing (" + ", ".join(made) + " stayed 0)")
        if s.expect and not errors and not any(counters.get(c, 0) for c in s.expect):
            problems.append("no expected counter moved (" + ", ".join(s.expect) + ")")
        if problems:
            return "fail", "; ".join(problems)
        what = f"{results} results exact"
        if errors:
            what += f", first error: {errors[0][1].label}: {errors[0][2][:200]}"
        return "ok", what

    def zombie_acks(self, victim: NodeProc) -> list[str]:
        """A broadcast root whose send() returned for messages the killed member's
        application never read: its kernel programs, left attached, acknowledged them
        for a dead process. A few messages ahead is the kernel-ACK promise; the rest is
        a silent loss."""
        got = victim.count("op", lambda r: True)
        root = next(n for n in self.nodes if n.role == "bc-root")
        done = [r for r in root.records if r.get("event") == "result" and r.get("job") == 0]
        sent = done[0]["ops"] if done else root.count("op", lambda r: True)
        if sent > got + 5:
            return [f"the root's send() returned for {sent} messages, but {victim.label}'s "
                    f"application read {got} before it was killed: its kernel acknowledged "
                    "the rest for a dead process"]
        return []

    # -- the forger

    def fuzz(self, tb, spec: dict) -> None:
        from aggbox.testbed.netns import run_in_netns

        forger = tb.hosts[3]
        inside: dict = {}
        jobs = [(h.netns, lambda h=h, frames=frames: send_raw(h, frames))
                for h, frames in insider_frames(self.spec, tb, spec)]
        t = threading.Thread(target=lambda: inside.update(
            sent=sum(run_in_netns_all(jobs))), daemon=True)
        try:
            t.start()
            self.fuzz_result = run_in_netns(forger.netns, forge, self.spec, tb, spec)
            t.join(30)
            if inside.get("sent"):
                self.fuzz_result["insider_sent"] = inside["sent"]
        except Exception as exc:  # noqa: BLE001 - reported in the verdict
            self.fuzz_result = {"error": f"{type(exc).__name__}: {exc}"}


def names_host(message: str, host) -> bool:
    """Does an error message name ``host`` (its IP, or its rank as the message's rank)?"""
    return host.ip in message


# ---------------------------------------------------------------------------------------
# Raw frames from the forger's namespace


def _targets(workload: str, tb) -> list[tuple[Any, int]]:
    """(host, message type) the forger aims at: what that host's kernel parses."""
    from aggbox.protocol import MsgType

    h = tb.hosts
    if workload == "broadcast":
        return [(h[1], MsgType.DATA), (h[2], MsgType.DATA), (h[0], MsgType.ACK),
                (h[0], MsgType.NACK)]
    if workload == "allreduce":
        return [(h[0], MsgType.AGG), (h[1], MsgType.AGG_RESULT)]
    return [(h[0], MsgType.KV)]


def forge(cell: CellSpec, tb, spec: dict) -> dict:
    """Runs inside the forger's namespace while the job runs: send ``cell.fuzz`` frames."""
    from aggbox.protocol import HEADER_SIZE, Header

    me = tb.hosts[3]
    job = spec["jobs"][0]["group"]
    port = job["port"]
    rng = random.Random(11)
    sent = 0
    out: dict[str, Any] = {}
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((me.ifname, 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        def as_member(target) -> tuple[str, str]:
            """(MAC, IP) of a member other than ``target``: what a sniffer spoofs."""
            m = next(m for m in job["members"] if m["ip"] != target.ip)
            return m["mac"], m["ip"]

        def both(target, body: bytes) -> list[bytes]:
            """``body`` from the forger's own address, and from a member's IP (the
            forger's own MAC: a MAC spoofed on the bridge moves the member's forwarding
            entry to the forger's port, an L2 attack the testbed's bridge must stop)."""
            _mac_, ip = as_member(target)
            return [raw_frame(me.mac, target.mac, me.ip, target.ip, port, body),
                    raw_frame(me.mac, target.mac, ip, target.ip, port, body)]

        def hdr(mtype: int, **kw) -> bytes:
            f = dict(type=mtype, job_id=job["job_id"], token=job["token"], seq=1, rank=0,
                     count=8, aux=1)
            f.update(kw)
            return Header(**f).pack()

        end = time.monotonic() + float(spec.get("fuzz_s", 1.5))
        rounds = 0
        while time.monotonic() < end:
            rounds += 1
            for target, mtype in _targets(cell.workload, tb):
                frames: list[bytes] = []
                if cell.fuzz == "random-bytes":
                    for _ in range(8):
                        body = rng.randbytes(rng.randrange(0, 1400))
                        frames.append(raw_frame(me.mac, target.mac, me.ip, target.ip, port,
                                                body))
                        # and a header-sized random prefix starting with the magic
                        frames.append(raw_frame(me.mac, target.mac, me.ip, target.ip, port,
                                                hdr(mtype)[:4] + rng.randbytes(60)))
                elif cell.fuzz == "fields-out-of-range":
                    for kw in (dict(version=9), dict(type=99), dict(job_id=0xFFFFFFF0),
                               dict(rank=999), dict(seq=0xFFFFFFF0), dict(round=0xFFFF),
                               dict(count=0xFFFF), dict(scale_exp=32767),
                               dict(scale_exp=-32768), dict(aux=0xFFFFFFFF),
                               dict(flags=0xFFFF)):
                        # what a sniffer with the token could send
                        frames += both(target, hdr(mtype, **kw) + bytes(8))
                elif cell.fuzz == "count-beyond-payload":
                    for count in (9, 64, 1400, 0xFFFF):
                        frames += both(target, hdr(mtype, count=count) + bytes(8))
                elif cell.fuzz == "wrong-token":
                    for _ in range(4):
                        token = job["token"] ^ rng.randrange(1, 2**32)
                        frames += both(target, hdr(mtype, token=token) + bytes(8))
                elif cell.fuzz == "spoofed-member-ip":
                    # a member's IP (not the target's own) from the forger's MAC
                    victim = next(m for m in job["members"] if m["ip"] != target.ip)
                    for seq in (1, 2, 3, 1000):
                        frames.append(raw_frame(me.mac, target.mac, victim["ip"], target.ip,
                                                port, hdr(mtype, rank=victim["rank"], seq=seq)
                                                + bytes(8)))
                elif cell.fuzz == "64k-datagrams":
                    body = hdr(mtype, count=0xFFFF) + rng.randbytes(65000 - HEADER_SIZE)
                    with contextlib.suppress(OSError):
                        udp.sendto(body, (target.ip, port))
                        sent += 1
                elif cell.fuzz == "non-aggbox":
                    pass  # below, once
                for f in frames:
                    with contextlib.suppress(OSError):
                        raw.send(f)
                        sent += 1
            if cell.fuzz == "non-aggbox":
                break
            time.sleep(0.01)
        out["rounds"] = rounds
        if cell.fuzz == "non-aggbox":
            out.update(non_aggbox_delivery(cell.workload, tb))
            sent += out.pop("sent", 0)
    finally:
        raw.close()
        udp.close()
    out["sent"] = sent
    return out


def run_in_netns_all(jobs: list) -> list:
    from aggbox.testbed.netns import run_in_netns_parallel

    return run_in_netns_parallel(jobs) if jobs else []


# What a member's own host (its real MAC and IP, the job's token: a buggy or compromised
# member) sends that no sender may, per message type: values out of range for that type
# (fields a type does not use are left alone: from the real sender with the token they
# are that sender's data), and counts beyond the payload. Payload: 8 bytes.
FAR_SEQ = 0x7FFFFFF0
INSIDER_FIELDS = {
    "DATA": (dict(version=9), dict(type=99), dict(seq=FAR_SEQ), dict(count=0xFFFF)),
    "ACK": (dict(version=9), dict(rank=999), dict(aux=0xFFFFFFFF), dict(seq=FAR_SEQ)),
    # count=1: a block of the wrong shape (the slot poisoning); scale_exp at
    # both extremes: a block whose sum would be garbage
    "AGG": (dict(version=9), dict(type=99), dict(rank=999), dict(seq=FAR_SEQ),
            dict(count=0xFFFF), dict(round=0xFFFF), dict(count=1), dict(scale_exp=32767),
            dict(scale_exp=-32768)),
    "KV": (dict(version=9), dict(type=99), dict(rank=999), dict(seq=FAR_SEQ),
           dict(count=0xFFFF)),
}


AGG_EVERY_BLOCK = (dict(count=1), dict(scale_exp=32767), dict(scale_exp=-32768))


def insider_frames(cell: CellSpec, tb, spec: dict) -> list[tuple[Any, list[bytes]]]:
    """(host, frames) for the fields and counts fuzz cells: sent from the job's own hosts
    to the host whose kernel parses them (see :func:`_targets`)."""
    from aggbox.protocol import Header, MsgType

    if cell.fuzz not in ("fields-out-of-range", "count-beyond-payload"):
        return []
    job = spec["jobs"][0]["group"]
    h = tb.hosts
    # (sender host, its rank in the job, target host, message type)
    who = {"broadcast": [(h[0], 0, h[1], MsgType.DATA), (h[1], 1, h[0], MsgType.ACK)],
           "allreduce": [(h[1], 0, h[0], MsgType.AGG)],
           "reduce-by-key": [(h[1], 1, h[0], MsgType.KV)]}[cell.workload]
    out = []
    for sender, rank, target, mtype in who:
        base = dict(type=mtype, job_id=job["job_id"], token=job["token"], seq=1, rank=rank,
                    count=2, aux=1)
        if cell.fuzz == "fields-out-of-range":
            headers = [Header(**{**base, **kw}) for kw in INSIDER_FIELDS[mtype.name]]
        else:
            headers = [Header(**{**base, "count": c}) for c in (64, 1400, 0xFFFF)]
        frames = [raw_frame(sender.mac, target.mac, sender.ip, target.ip, job["port"],
                            hd.pack() + bytes(8)) for hd in headers]
        if mtype == MsgType.AGG and cell.fuzz == "fields-out-of-range":
            # For every block of the job, so that they land before the real ones (a fast
            # job is over after the first few): a block of the wrong shape, and blocks of
            # the right shape (the job's block size) with an extreme exponent.
            block = spec.get("block", 256)
            n_blocks = spec["iters"] * -(-spec["floats"] // block)
            for q in range(n_blocks):
                for kw in AGG_EVERY_BLOCK:
                    count = kw.get("count", block)
                    hd = Header(**{**base, "count": count, **kw, "seq": q})
                    frames.append(raw_frame(sender.mac, target.mac, sender.ip, target.ip,
                                            job["port"], hd.pack() + bytes(4 * count)))
        out.append((sender, frames))
    return out


def send_raw(host, frames: list[bytes], repeat: int = 3, gap_s: float = 0.05) -> int:
    """Send ``frames`` ``repeat`` times from ``host``'s interface (call inside its
    namespace)."""
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((host.ifname, 0))
        for _ in range(repeat):
            for f in frames:
                with contextlib.suppress(OSError):
                    s.send(f)
                    sent += 1
            time.sleep(gap_s)
    return sent


def non_aggbox_delivery(workload: str, tb) -> dict:
    """Plain UDP (no AggBox magic) from the forger to each job host. A listener on a free
    port of the family's range must get every datagram (the programs let it pass); the
    same datagrams also go to the job's own port, whose socket must ignore them (the
    cell's job must still end exact).

    The listener never binds the job's port: before the job has bound it (the fuzzer
    starts with the job), a listener there would take it from the job's own socket."""
    from aggbox.testbed.netns import run_in_netns

    port, job_port = FREE_PORT[workload], PORT_BASE[workload]
    got: dict[str, int] = {}
    for host in tb.hosts[:3]:
        ready = threading.Event()
        box: dict = {}

        def listen(ready=ready, box=box) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("0.0.0.0", port))
                finally:
                    ready.set()  # a failed bind shows as datagrams missing there
                s.settimeout(2.0)
                n = 0
                with contextlib.suppress(TimeoutError, socket.timeout):
                    while n < 5:
                        data, _ = s.recvfrom(2048)
                        n += data.startswith(b"not-aggbox")
                box["n"] = n

        t = threading.Thread(target=run_in_netns, args=(host.netns, listen), daemon=True)
        t.start()
        ready.wait(5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for k in range(5):
                for p in (port, job_port):
                    s.sendto(b"not-aggbox %d" % k, (host.ip, p))
        t.join(5)
        got[f"{host.name}:{port}"] = box.get("n", 0)
    wanted = 5 * len(got)
    delivered = sum(got.values())
    missing = [k for k, v in got.items() if v < 5]
    return {"delivered": delivered == wanted, "received": delivered,
            "expected": wanted, "sent": 2 * wanted,
            "missing_at": " ".join(missing) or "-"}


# ---------------------------------------------------------------------------------------
# Machine state: dmesg, leftovers


def dmesg_lines() -> list[str]:
    proc = subprocess.run(["dmesg"], capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def _bpftool(netns: str | None, *args: str) -> list:
    argv = ["bpftool", "-j", *args]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True)
    with contextlib.suppress(ValueError):
        return json.loads(proc.stdout) if proc.returncode == 0 else []
    return []


def attached_prog_ids(netns: str) -> set[int]:
    """Every eBPF program attached (TC, XDP) on the links of ``netns``."""
    ids: set[int] = set()
    for entry in _bpftool(netns, "net", "show"):
        for kind in ("xdp", "tc"):
            for att in entry.get(kind, []):
                if "id" in att:
                    ids.add(int(att["id"]))
    return ids


def programs_still_loaded(ids: set[int], wait_s: float = 30.0) -> set[int]:
    """Those of ``ids`` still loaded after up to ``wait_s`` (a deleted namespace frees
    its links, and with them their programs, asynchronously)."""
    deadline = time.monotonic() + wait_s
    alive = set(ids)
    while alive:
        alive &= {int(p["id"]) for p in _bpftool(None, "prog", "show")}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return alive


def leftovers(run_id: str) -> list[str]:
    """What a cell's run left on the machine (namespaces, state file, pins)."""
    from aggbox.bpf import PIN_ROOT
    from aggbox.testbed.netns import NETNS_DIR, state_dir

    left = []
    with contextlib.suppress(OSError):
        left += [p.name for p in NETNS_DIR.iterdir() if f"-{run_id}-" in p.name]
    if (state_dir() / f"{run_id}.json").exists():
        left.append(f"state file {run_id}.json")
    with contextlib.suppress(OSError):
        left += [str(p) for p in PIN_ROOT.glob(f"{run_id}*")]
    return left


# ---------------------------------------------------------------------------------------
# The matrix


NETWORK_FAULTS: list[tuple[str, dict]] = [
    ("loss-1%", {"loss_pct": 1.0}),
    ("loss-5%", {"loss_pct": 5.0}),
    ("loss-20%", {"loss_pct": 20.0}),
    ("burst-loss-1/10/70", {"burst_enter_pct": 1.0, "burst_leave_pct": 10.0,
                            "burst_loss_pct": 70.0}),
    ("duplicate-5%", {"duplicate_pct": 5.0}),
    ("reorder-5%", {"reorder_pct": 5.0}),
]
# A network fault's own counters (bpf/impair.c, read in the cell's switch namespace, as
# impair_*): at least one must have moved, or the cell tested nothing.
IMPAIRED_BY = {"loss_pct": "impair_lost", "burst_loss_pct": "impair_burst_lost",
               "duplicate_pct": "impair_duplicated", "reorder_pct": "impair_held"}
FUZZ = ("random-bytes", "fields-out-of-range", "count-beyond-payload", "wrong-token",
        "spoofed-member-ip", "64k-datagrams", "non-aggbox")
VICTIM = {"broadcast": "bc-member", "allreduce": "ar-worker", "reduce-by-key": "kv-mapper"}
RETRANSMIT = {"broadcast": ("app_retransmits", "nack", "app_nacks"),
              "allreduce": ("app_retransmits", "agg_duplicate", "agg_late_reply"),
              "reduce-by-key": ("app_retransmits", "kv_duplicate")}
DUPLICATE = {"broadcast": ("data_duplicate", "app_duplicates", "ack_stale"),
             "allreduce": ("agg_duplicate", "agg_late_reply", "app_duplicates"),
             "reduce-by-key": ("kv_duplicate", "app_spill_duplicates")}
FUZZ_EXPECT = {
    "random-bytes": ("passed_not_ours", "drop_truncated", "drop_bad_magic"),
    "fields-out-of-range": ("drop_bad_version", "drop_bad_type", "drop_non_member",
                            "data_out_of_window", "kv_out_of_window", "agg_bad_scale",
                            "agg_stale_round", "ack_beyond_sent", "agg_shape_mismatch",
                            "drop_bad_mac"),
    # from a member's own host (the forger's frames stop at the membership check)
    # (allreduce's fuzzed jobs are keyed: an untagged forgery stops at the tag, first)
    "count-beyond-payload": ("drop_truncated", "agg_shape_mismatch", "drop_bad_mac"),
    "wrong-token": ("drop_bad_token", "drop_non_member"),
    "spoofed-member-ip": ("drop_wrong_mac", "drop_non_member"),
    "64k-datagrams": ("drop_truncated", "drop_non_member", "passed_not_ours", "drop_bad_mac",
                      "drop_ip_options", "drop_gso", "app_refused"),
    "non-aggbox": ("passed_not_ours",),
}


def matrix(quick: bool = True) -> list[CellSpec]:
    cells: list[CellSpec] = []
    for w in WORKLOADS:
        for name, netem in NETWORK_FAULTS:
            expect = ("accepted",)
            if name in ("loss-5%", "loss-20%") or name.startswith("burst"):
                expect = RETRANSMIT[w]
            if name.startswith("duplicate"):
                expect = DUPLICATE[w]
            cells.append(CellSpec(w, name, netem=dict(netem, seed=5), expect=expect))
        for when in ("before", "during", "after"):
            # 3 s: the survivors' wait for the dead host is the cell's cost
            cells.append(CellSpec(w, f"kill-{VICTIM[w]}-{when}", kill=(VICTIM[w], when),
                                  params={"iters": 30, "timeout_s": 3.0, "gap_s": 0.05}
                                  if w == "broadcast"
                                  else {"iters": 40, "timeout_s": 3.0} if w == "allreduce"
                                  else {"pairs": 60000, "timeout_s": 3.0}))
        if w == "allreduce":
            cells.append(CellSpec(w, "aggregator-killed-restarted", restart="ar-agg",
                                  params={"iters": 40}))
        if w == "reduce-by-key":
            cells.append(CellSpec(w, "reducer-killed-restarted", restart="kv-reducer",
                                  params={"pairs": 60000}))
            cells.append(CellSpec(w, "key-map-full", params={"map_entries": 128, "vocab": 3000},
                                  expect=("kv_spilled", "kv_spill_packets")))
        for n in (2, 4):
            cells.append(CellSpec(w, f"{n}-concurrent-jobs", jobs=n, expect=("accepted",)))
        cells.append(CellSpec(w, "job-id-reused", jobs=2, sequential=True, reuse_job_id=True,
                              expect=("accepted",)))
        for kind in FUZZ:
            cells.append(CellSpec(w, f"fuzz-{kind}", fuzz=kind, expect=FUZZ_EXPECT[kind],
                                  params={"iters": 12, "gap_s": 0.1, "fuzz_s": 1.2}
                                  if w != "reduce-by-key" else
                                  {"pairs": 20000, "fuzz_s": 1.2}))
    if not quick:
        for c in list(cells):
            if c.netem:
                cells.append(dataclasses.replace(c, fault=c.fault + "-big",
                                                 params={**c.params, "size": 200000,
                                                         "floats": 262144, "pairs": 200000}))
    return cells


# ---------------------------------------------------------------------------------------
# Running the campaign, writing its table


#: Cells run at once by default. Half a cell's time is waiting (timeouts the faults set
#: off, lingering receivers), the other half compiling its nodes' programs: two at a
#: time on this project's 2-CPU machine took the quick campaign from 268 s to 162 s.
JOBS = 2


def run_campaign(quick: bool = True, only: str = "", progress: Callable[[dict], None] | None
                 = None, jobs: int = JOBS) -> dict:
    """Run every cell (``only``: cells whose name contains it), ``jobs`` at a time, each on
    its own testbed; return the campaign, its cells in the matrix's order."""
    from concurrent.futures import ThreadPoolExecutor

    from aggbox.testbed.netns import require_root

    require_root()
    if jobs < 1:
        raise AggBoxError(f"jobs must be 1 or more, got {jobs}")
    started = time.time()
    t0 = time.monotonic()
    specs = [c for c in matrix(quick) if only in c.name]
    with tempfile.TemporaryDirectory(prefix="aggbox-chaos-") as tmp:
        def one(k: int, spec: CellSpec) -> dict:
            workdir = Path(tmp) / f"cell{k}"
            workdir.mkdir()
            result = Cell(spec, quick, workdir).run()
            if progress is not None:
                progress(result)
            return result

        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cell") as pool:
            cells = list(pool.map(one, range(len(specs)), specs))
    return {"quick": quick, "started": started, "seconds": round(time.monotonic() - t0, 1),
            "cells": cells, "n_cells": len(cells),
            "n_ok": sum(c["verdict"] == "ok" for c in cells), "jobs": jobs,
            "git": _git_revision(), "kernel": os.uname().release}


def _git_revision() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    return proc.stdout.strip()


def markdown_table(campaign: dict) -> str:
    lines = [f"# Fault campaign ({'quick' if campaign['quick'] else 'full'}): "
             f"{campaign['n_ok']}/{campaign['n_cells']} cells ok in {campaign['seconds']} s",
             "", f"git {campaign.get('git', '')}, kernel {campaign.get('kernel', '')}", "",
             "| workload | fault | verdict | s | counters (moved) | detail |",
             "|---|---|---|---:|---|---|"]
    for c in campaign["cells"]:
        moved = ", ".join(f"{k} {v}" for k, v in c["counters"].items()
                          if not k.startswith(("app_", "fuzz_")) and k != "accepted")
        detail = c["detail"].replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {c['workload']} | {c['fault']} | {c['verdict']} | {c['seconds']} | "
                     f"{moved[:200]} | {detail} |")
    return "\n".join(lines) + "\n"


def write_results(campaign: dict, out: Path) -> Path:
    # "chaos-" first: results/<experiment>/2*/ are experiment runs (samples.parquet) to
    # every reader of results/; a campaign is not one.
    run_dir = out / time.strftime("chaos-%Y%m%d-%H%M%S", time.gmtime(campaign["started"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cells.json").write_text(json.dumps(campaign, indent=1))
    (run_dir / "table.md").write_text(markdown_table(campaign))
    latest = out / "latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    return run_dir


# ---------------------------------------------------------------------------------------
# The command line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chaos", help="the fault campaign: workloads x faults, verdicts",
        description="Run broadcast, allreduce and reduce-by-key under loss, burst loss, "
        "duplication, reordering, killed and restarted nodes, concurrent and reused jobs, "
        "a full key map and a fuzzer on the bridge, each cell on a fresh netns testbed "
        "(needs root). Exit code 0 only when every cell is ok (docs/reliability.md).",
        epilog="examples:\n  aggbox chaos --quick\n"
        "  aggbox chaos --quick --only broadcast/loss --json")
    p.add_argument("--quick", action="store_true", help="small cells (what make test runs)")
    p.add_argument("--json", action="store_true", help="print the campaign as one JSON line")
    p.add_argument("--out", default="results/chaos",
                   help="where the run's folder (cells.json, table.md) goes")
    p.add_argument("--only", default="",
                   help="run only the cells whose 'workload/fault' contains this text "
                   "(default: every cell)")
    p.add_argument("--jobs", type=int, default=JOBS,
                   help="cells run at once, each on its own testbed (1: one after another)")
    p.set_defaults(func=cmd_chaos)


def cmd_chaos(args: argparse.Namespace) -> int:
    def show(c: dict) -> None:
        if not args.json:
            print(f"{c['verdict']:4} {c['seconds']:6.1f} s  {c['workload']}/{c['fault']}"
                  + (f": {c['detail'][:300]}" if c["verdict"] != "ok" else ""), flush=True)

    campaign = run_campaign(quick=args.quick, only=args.only, progress=show, jobs=args.jobs)
    run_dir = write_results(campaign, Path(args.out))
    if args.json:
        print(json.dumps(campaign))
    else:
        print(f"{campaign['n_ok']}/{campaign['n_cells']} cells ok in {campaign['seconds']} s; "
              f"table: {run_dir / 'table.md'}")
    return 0 if campaign["n_ok"] == campaign["n_cells"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggbox.chaos")
    parser.add_argument("--node", required=True, help="a cell's node role (internal)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--host", default="h0", help="the testbed host (names its pins)")
    args = parser.parse_args(argv)
    return node_main(args.node, args.spec, args.rank, args.host)


if __name__ == "__main__":
    sys.exit(main())
