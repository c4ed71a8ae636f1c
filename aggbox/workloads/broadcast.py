"""The broadcast micro-benchmark: one root sends, every other host receives.

For each system (AggBox or a baseline, all behind the same Broadcaster/Receiver
interface) the root broadcasts ``warmup + iters`` messages, one at a time, interleaved
with the other systems in blocks of :data:`BLOCK`. Per message it records:

- completion: from the start of ``send`` until the root knows every member has it;
- delivery: from the start of ``send`` until the LAST member's application has it
  (namespaces share one monotonic clock, so this is exact);
- the root thread's CPU time inside ``send``.

Receivers are ``idle`` (blocked in recv) or ``busy`` (computing in 1 ms units of
CPU-bound work, polling their socket without blocking between units).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace

from aggbox.collectives.group import Group, Member
from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.testbed.base import Testbed

BLOCK = 10  # messages per system before the schedule moves on to the next system
WORK_UNIT_NS = 1_000_000  # a busy receiver's unit of CPU-bound work
PORTS = {"aggbox": 47000, "udp": 46000, "tcp": 45000}
SYSTEMS = tuple(PORTS)


def make_schedule(systems: list[str], per_system: int, seed: int) -> list[tuple[str, int]]:
    """Blocks of (system, count): every system gets ``per_system`` messages, interleaved
    in a seeded order that changes every round, so drift hits all systems alike."""
    rng = random.Random(seed)
    left = dict.fromkeys(systems, per_system)
    blocks: list[tuple[str, int]] = []
    while any(left.values()):
        order = list(systems)
        rng.shuffle(order)
        for system in order:
            n = min(BLOCK, left[system])
            if n:
                blocks.append((system, n))
                left[system] -= n
    return blocks


def payload(system: str, index: int, size: int) -> bytes:
    """The exact bytes of message ``index`` of ``system``, which receivers check."""
    start = (index * 31 + SYSTEMS.index(system) * 7) % 256
    pattern = bytes((start + j) % 256 for j in range(256))
    return (pattern * (size // 256 + 1))[:size]


def group_for(spec: dict, system: str, rank: int) -> Group:
    base = Group.from_dict(spec["group"])
    return replace(base, rank=rank, port=PORTS[system])


# ----------------------------------------------------------------- node roles ---------


def _programs(spec: dict, rank: int):
    if "aggbox" not in spec["systems"]:
        return None
    from aggbox.collectives.broadcast import BroadcastPrograms

    tag = f"{spec['pin_tag']}-h{rank}" if spec.get("pin_tag") else ""
    return BroadcastPrograms(spec["group"]["ifname"], pin_tag=tag)


def _sender(system: str, group: Group, programs):
    if system == "aggbox":
        from aggbox.collectives.broadcast import Broadcaster

        return Broadcaster(group, programs)
    if system == "tcp":
        from aggbox.baselines.tcp import TcpBroadcaster

        return TcpBroadcaster(group)
    if system == "udp":
        from aggbox.baselines.udp import UdpBroadcaster

        return UdpBroadcaster(group)
    raise AggBoxError(f"unknown broadcast system {system!r}; known: {', '.join(SYSTEMS)}")


def _receiver(system: str, group: Group, programs):
    if system == "aggbox":
        from aggbox.collectives.broadcast import Receiver

        return Receiver(group, programs)
    if system == "tcp":
        from aggbox.baselines.tcp import TcpReceiver

        return TcpReceiver(group)
    if system == "udp":
        from aggbox.baselines.udp import UdpReceiver

        return UdpReceiver(group)
    raise AggBoxError(f"unknown broadcast system {system!r}; known: {', '.join(SYSTEMS)}")


def _close_all(endpoints: dict, programs) -> None:
    for endpoint in endpoints.values():
        endpoint.close()
    if programs is not None:
        programs.close()


def root_node(spec: dict, rank: int) -> int:
    from aggbox.node import emit, emit_many

    programs = _programs(spec, rank)
    senders: dict = {}
    try:
        for system in spec["systems"]:
            senders[system] = _sender(system, group_for(spec, system, rank), programs)
        emit({"event": "ready"})
        records, error = _send_schedule(spec, senders)
        emit_many(records)
        done = {"event": "done", "role": "root", "error": error,
                "stats": {s: getattr(b, "stats", {}) for s, b in senders.items()}}
        if programs is not None:
            done["counters"] = programs.counters()
        emit(done)
    finally:
        _close_all(senders, programs)
    return 0


def _send_schedule(spec: dict, senders: dict) -> tuple[list[dict], str | None]:
    size, gap_s, timeout = spec["size"], spec["gap_us"] / 1e6, spec["timeout_s"]
    counts: dict[str, int] = defaultdict(int)
    records: list[dict] = []
    for system, n in spec["schedule"]:
        sender = senders[system]
        for _ in range(n):
            index = counts[system]
            counts[system] += 1
            data = payload(system, index, size)
            t0, c0 = time.monotonic_ns(), time.thread_time_ns()
            try:
                sender.send(data, timeout=timeout)
            except CollectiveTimeout as exc:
                return records, f"{system}: {exc}"
            c1, t1 = time.thread_time_ns(), time.monotonic_ns()
            records.append({"kind": "send", "system": system, "iter": index, "t_send_ns": t0,
                            "t_done_ns": t1, "cpu_ns": c1 - c0})
            time.sleep(gap_s)
    return records, None


def _busy_recv(receiver, give_up_at: float) -> bytes | None:
    """Compute in 1 ms units; between units, poll the socket without blocking."""
    while time.monotonic() < give_up_at:
        end = time.perf_counter_ns() + WORK_UNIT_NS
        while time.perf_counter_ns() < end:
            pass
        msg = receiver.recv(timeout=0)
        if msg is not None:
            return msg
    return None


def member_node(spec: dict, rank: int) -> int:
    from aggbox.node import emit, emit_many

    programs = _programs(spec, rank)
    receivers: dict = {}
    try:
        for system in spec["systems"]:
            receivers[system] = _receiver(system, group_for(spec, system, rank), programs)
        emit({"event": "ready"})
        records, error = _receive_schedule(spec, receivers, rank)
        emit_many(records)
        done = {"event": "done", "role": "member", "rank": rank, "error": error,
                "stats": {s: getattr(r, "stats", {}) for s, r in receivers.items()}}
        if programs is not None:
            done["counters"] = programs.counters()
        emit(done)
    finally:
        _close_all(receivers, programs)
    return 0


def _receive_schedule(spec: dict, receivers: dict, rank: int) -> tuple[list[dict], str | None]:
    busy = spec["receivers"] == "busy"
    size, timeout = spec["size"], spec["recv_timeout_s"]
    counts: dict[str, int] = defaultdict(int)
    records: list[dict] = []
    for system, n in spec["schedule"]:
        receiver = receivers[system]
        for _ in range(n):
            index = counts[system]
            counts[system] += 1
            if busy:
                msg = _busy_recv(receiver, time.monotonic() + timeout)
            else:
                msg = receiver.recv(timeout=timeout)
            t = time.monotonic_ns()
            if msg is None:
                return records, f"{system}: message {index} not received in {timeout} s"
            records.append({"kind": "recv", "system": system, "iter": index, "rank": rank,
                            "t_recv_ns": t, "ok": msg == payload(system, index, size)})
    return records, None


# ----------------------------------------------------------------- the runner ---------


@dataclass
class BroadcastRun:
    samples: list[dict]
    events: list[dict]  # the nodes' "done" records: stats, kernel counters, errors


def build_spec(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
               seed: int) -> dict:
    rng = random.Random(seed)
    members = tuple(Member(rank=h.index, ip=h.ip, mac=h.mac) for h in testbed.hosts)
    group = Group(job_id=rng.randrange(1, 2**31), token=rng.randrange(1, 2**32),
                  members=members, rank=0, group_ip=testbed.group_ips[0],
                  ifname=testbed.hosts[0].ifname)
    return {
        "group": json_group(group),
        "systems": list(systems),
        "schedule": make_schedule(list(systems), warmup + iters, seed),
        "size": int(params.get("size", 64)),
        "receivers": params.get("receivers", "idle"),
        "gap_us": int(params.get("gap_us", 2000)),
        "timeout_s": float(params.get("timeout_s", 10.0)),
        "recv_timeout_s": float(params.get("recv_timeout_s", 60.0)),
        "warmup": warmup,
        "placement": params.get("placement", "root-alone"),
        "pin_tag": getattr(testbed, "run_id", ""),
    }


def json_group(group: Group) -> dict:
    import json

    return json.loads(group.to_json())


def run_broadcast(testbed: Testbed, params: dict, systems: list[str], iters: int,
                  warmup: int, seed: int) -> BroadcastRun:
    """Run every system on ``testbed``; return per-message samples and node summaries."""
    from aggbox.workloads.launcher import NodeGroup, cpu_placement

    if len(testbed.hosts) < 2:
        raise AggBoxError("a broadcast needs at least 2 hosts (a root and a member)")
    spec = build_spec(testbed, params, systems, iters, warmup, seed)
    root, members = testbed.hosts[0], testbed.hosts[1:]
    budget = 120 + (warmup + iters) * len(systems) * (0.05 + spec["gap_us"] / 1e6)
    with NodeGroup(spec) as nodes:
        root_cpus, member_cpus = cpu_placement(testbed.backend, spec["placement"])
        member_nodes = [nodes.start(h, "broadcast-member", h.index, member_cpus)
                        for h in members]
        nodes.wait_ready(member_nodes, timeout=120)
        root_node_ = nodes.start(root, "broadcast-root", root.index, root_cpus)
        nodes.wait_ready([root_node_], timeout=60)
        nodes.wait_exit([root_node_, *member_nodes], timeout=budget)
        records = [r for n in nodes.nodes for r in n.records]
    events = [r for r in records if r.get("event") == "done"]
    errors = [e["error"] for e in events if e.get("error")]
    if errors:
        raise AggBoxError("broadcast run failed: " + "; ".join(errors))
    return BroadcastRun(join_records(records, len(members), warmup), events)


def run_cell(testbed: Testbed, params: dict, systems: list[str], iters: int, warmup: int,
             seed: int) -> list[dict]:
    """The experiment runner's entry point (see aggbox/workloads/registry.py)."""
    return run_broadcast(testbed, params, systems, iters, warmup, seed).samples


def join_records(records: list[dict], n_members: int, warmup: int) -> list[dict]:
    """One sample per measured (system, iter): the root's send joined with every
    member's receive."""
    received: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "recv":
            received[(r["system"], r["iter"])].append(r)
    samples = []
    for r in records:
        if r.get("kind") != "send" or r["iter"] < warmup:
            continue
        got = received.get((r["system"], r["iter"]), [])
        delivered = len(got) == n_members and all(g["ok"] for g in got)
        last = max((g["t_recv_ns"] for g in got), default=None)
        samples.append({
            "system": r["system"],
            "iter": r["iter"] - warmup,
            "completion_us": (r["t_done_ns"] - r["t_send_ns"]) / 1e3,
            "delivery_us": (last - r["t_send_ns"]) / 1e3 if delivered and last else None,
            "sender_cpu_us": r["cpu_ns"] / 1e3,
            "delivered": delivered,
        })
    return samples
