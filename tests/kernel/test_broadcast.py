"""In-kernel broadcast (bpf/broadcast.c + aggbox/collectives/broadcast.py) on the real kernel.

Every host of a testbed runs tests/kernel/broadcast_node.py: a process inside the host's
namespace that loads the programs once and then runs Broadcaster / Receiver commands for
the test. Each test installs its own job (job id, token, port), so the tests share the
processes (compiling BPF is the expensive part) without sharing state.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from broadcast_node import NodeProcess, digest, payload

from aggbox.collectives.group import Group, Member
from aggbox.protocol import Flags, Header, MsgType
from aggbox.testbed import Netem, NetnsTestbed
from aggbox.testbed.netns import NetnsHost
from aggbox.workloads.broadcast import build_spec
from aggbox.workloads.launcher import NodeGroup

pytestmark = pytest.mark.kernel

MEMBERS = 16
SIZES = (1, 100, 1400, 1441, 4096, 65536)  # 1400: one packet; 1441: one byte more
IDLE = 18  # hosts h0..h16 run a node; h17 runs nothing (never answers, forges packets)
NAMESPACES: list[str] = []  # every namespace this module created, checked at the end


@dataclass
class Cluster:
    tb: NetnsTestbed
    nodes: dict[int, NodeProcess]
    closed: bool = False
    quit_answers: dict[int, dict] = field(default_factory=dict)

    def host(self, index: int) -> NetnsHost:
        return self.tb.hosts[index]

    def shutdown(self) -> None:
        """Ask every node to close its endpoints and programs, and wait for it to exit."""
        if self.closed:
            return
        self.closed = True
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.post("quit")
        for index, node in self.nodes.items():
            try:
                self.quit_answers[index] = node.reply(wait=30, check=False)
            except AssertionError as exc:
                self.quit_answers[index] = {"ok": False, "error": str(exc)}
            node.quit()


def start_nodes(tb: NetnsTestbed, hosts: list[NetnsHost], workdir: Path) -> dict[int, NodeProcess]:
    """Start a node on each host (they compile in parallel) and wait until all are ready."""
    nodes: dict[int, NodeProcess] = {}
    try:
        for h in hosts:
            nodes[h.index] = NodeProcess(h, workdir)
        for node in nodes.values():
            assert node.reply(wait=240)["event"] == "ready"
    except BaseException:
        for node in nodes.values():
            node.quit()
        raise
    return nodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """18 hosts: h0 is every job's root, h1..h16 are members, h17 runs nothing."""
    with NetnsTestbed(IDLE) as tb:
        NAMESPACES.extend(tb.namespaces)
        nodes = start_nodes(tb, tb.hosts[:IDLE - 1], tmp_path_factory.mktemp("nodes"))
        c = Cluster(tb, nodes)
        try:
            yield c
        finally:
            c.shutdown()


def make_group(hosts: list[NetnsHost], job_id: int, token: int, port: int,
               group_ip: str) -> Group:
    """hosts[0] is the root (rank 0); rank i is hosts[i]."""
    members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(hosts))
    return Group(job_id=job_id, token=token, members=members, rank=0, port=port,
                 group_ip=group_ip)


def as_dict(group: Group, rank: int) -> dict:
    return json.loads(group.with_rank(rank).to_json())


class Job:
    """One job installed on the cluster: a Broadcaster on the root, Receivers elsewhere."""

    def __init__(self, cluster: Cluster, hosts: list[NetnsHost], job_id: int, token: int,
                 port: int, group_ip: str | None = None, receivers: list[int] | None = None,
                 name: str = "job"):
        self.cluster, self.name = cluster, name
        self.group = make_group(hosts, job_id, token, port, group_ip or cluster.tb.group_ips[0])
        self.hosts = hosts
        ranks = range(1, len(hosts)) if receivers is None else receivers
        self.receivers = {r: cluster.nodes[hosts[r].index] for r in ranks}
        self.root = cluster.nodes[hosts[0].index]
        self._open: list[NodeProcess] = []
        for r, node in self.receivers.items():
            node.call("receiver", name=name, group=as_dict(self.group, r))
            self._open.append(node)
        self.root.call("broadcaster", name=name, group=as_dict(self.group, 0))
        self._open.append(self.root)

    def send(self, messages: list[tuple[int, int]], timeout: float = 30.0,
             wait: float = 300.0) -> list[dict]:
        return self.root.call("send", name=self.name, messages=messages, timeout=timeout,
                              wait=wait)["results"]

    def post_recv(self, count: int, timeout: float = 60.0) -> None:
        for node in self.receivers.values():
            node.post("recv", name=self.name, count=count, timeout=timeout)

    def received(self, wait: float = 300.0) -> dict[int, list]:
        return {r: node.reply(wait=wait)["messages"] for r, node in self.receivers.items()}

    def close(self) -> None:
        for node in self._open:
            if node.proc.poll() is None:
                node.call("close", name=self.name, check=False)
        self._open.clear()


def expected(messages: list[tuple[int, int]]) -> list:
    return [digest(payload(size, seed)) for size, seed in messages]


def counters(node: NodeProcess) -> dict[str, int]:
    return node.call("counters")["counters"]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# ------------------------------------------------------------ 1. exact bytes, 16 members


def test_every_member_gets_exact_bytes_for_sizes_up_to_64k(cluster):
    job = Job(cluster, cluster.tb.hosts[:MEMBERS + 1], job_id=1001, token=0xA11CE, port=47000)
    messages = [(size, 100 + i) for i, size in enumerate(SIZES)]
    try:
        job.post_recv(len(messages))
        results = job.send(messages)  # each send returned: the group-ACK came back
        got = job.received()
    finally:
        job.close()
    assert len(results) == len(SIZES)
    last = results[-1]["seq"]
    assert last == sum(-(-s // 1440) for s in SIZES)  # 1440 payload bytes per packet
    for r in range(1, MEMBERS + 1):
        assert got[r] == expected(messages), f"member rank {r} got other bytes"
        assert results[-1]["acked"][r] == last


# ------------------------------------------------------------ 3. forged packets


def send_raw(host: NetnsHost, dst_ip: str, port: int, data: bytes) -> None:
    """One UDP datagram from ``host`` (a socket made inside its namespace)."""
    def go() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(data, (dst_ip, port))

    host.call(go)


def wait_for_count(node: NodeProcess, name: str, target: int, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while counters(node)[name] < target and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # let anything else the packet caused happen before comparing


ROOT_NEXT_SEQ = 3  # the forgery job's root sent two one-packet messages
BODY = b"forged payload"


def header(group: Group, **changes) -> Header:
    """A DATA header from rank 2 that the member would accept but for ``changes``."""
    fields = dict(type=MsgType.DATA, job_id=group.job_id, token=group.token, seq=1, rank=2,
                  count=len(BODY), flags=int(Flags.LAST_FRAG), aux=1)
    fields.update(changes)
    return Header(**fields)


# case: (who sends, the datagram, the counter that must count it). "peer" is rank 2 (a
# member, h10), "outsider" is h17 (in no group), the target is rank 1 (h9).
FORGED_DATA = {
    "from-a-host-outside-the-group": (
        "outsider", lambda g: header(g, rank=0, seq=ROOT_NEXT_SEQ).pack() + BODY,
        "drop_non_member"),
    "wrong-token": ("peer", lambda g: header(g, token=g.token ^ 0x5A5A).pack() + BODY,
                    "drop_bad_token"),
    "rank-that-is-not-the-senders": (
        "peer", lambda g: header(g, rank=0, seq=ROOT_NEXT_SEQ).pack() + BODY,
        "drop_non_member"),
    "rank-outside-the-group": ("peer", lambda g: header(g, rank=3).pack() + BODY,
                               "drop_non_member"),
    "receivers-own-rank": ("peer", lambda g: header(g, rank=1).pack() + BODY,
                           "drop_non_member"),
    "shorter-than-the-header": ("peer", lambda g: header(g).pack()[:20], "drop_truncated"),
    "count-beyond-the-payload": ("peer", lambda g: header(g, count=len(BODY) + 1).pack() + BODY,
                                 "drop_truncated"),
    # Not AggBox's (no magic): passed untouched (and counted) for whoever owns the port;
    # the Receiver ignores it (test_forged_traffic.py: such datagrams reach their socket).
    "bad-magic": ("peer", lambda g: header(g, magic=0x12345678).pack() + BODY,
                  "passed_not_ours"),
    "version-2": ("peer", lambda g: header(g, version=2).pack() + BODY, "drop_bad_version"),
    "unknown-job": ("peer", lambda g: header(g, job_id=g.job_id + 1).pack() + BODY,
                    "drop_unknown_job"),
    "unknown-type": ("peer", lambda g: header(g, type=0xEE).pack() + BODY, "drop_bad_type"),
}


def ack(group: Group, **changes) -> Header:
    """An ACK from rank 1 claiming far more than was sent, unless ``changes`` say else."""
    fields = dict(type=MsgType.ACK, job_id=group.job_id, token=group.token, rank=1, aux=1000)
    fields.update(changes)
    return Header(**fields)


# To the root's XDP: "member" is rank 1 (h9), "peer" rank 2 (h10), "outsider" h17.
FORGED_TO_ROOT = {
    "ack-with-wrong-token": ("member", lambda g: ack(g, token=g.token + 1).pack(),
                             "drop_bad_token"),
    "ack-from-a-host-outside-the-group": ("outsider", lambda g: ack(g).pack(),
                                          "drop_non_member"),
    "ack-whose-rank-is-not-the-senders": ("peer", lambda g: ack(g).pack(), "drop_non_member"),
    "ack-with-the-roots-own-rank": ("member", lambda g: ack(g, rank=0).pack(),
                                    "drop_non_member"),
    "ack-for-an-unknown-job": ("member", lambda g: ack(g, job_id=g.job_id + 1).pack(),
                               "drop_unknown_job"),
    "ack-version-2": ("member", lambda g: ack(g, version=2).pack(), "drop_bad_version"),
    "ack-shorter-than-the-header": ("member", lambda g: ack(g).pack()[:31], "drop_truncated"),
    "group-ack-made-by-a-member": ("member", lambda g: ack(g, type=MsgType.GROUP_ACK).pack(),
                                   "drop_bad_type"),
    "nack-with-wrong-token": (
        "member", lambda g: Header(type=MsgType.NACK, job_id=g.job_id, token=g.token ^ 1,
                                   rank=1, count=2, aux=1).pack(),
        "drop_bad_token"),
}


@pytest.fixture(scope="class")
def forgery(cluster):
    """Job 3003: root h0, members h9 (rank 1) and h10 (rank 2); h17 is outside."""
    hosts = [cluster.host(0), cluster.host(9), cluster.host(10)]
    job = Job(cluster, hosts, job_id=3003, token=0x3003ABCD, port=47010)
    try:
        messages = [(10, 1), (20, 2)]
        job.post_recv(2)
        assert job.send(messages)[-1]["seq"] == ROOT_NEXT_SEQ - 1
        assert all(m == expected(messages) for m in job.received().values())
        yield job
    finally:
        job.close()


class TestForgedPackets:
    """Forged packets are counted once, in the right counter, and change nothing."""

    def sender(self, forgery: Job, who: str) -> NetnsHost:
        tb = forgery.cluster.tb
        return {"member": forgery.hosts[1], "peer": forgery.hosts[2],
                "outsider": tb.hosts[IDLE - 1]}[who]

    @pytest.mark.parametrize("case", list(FORGED_DATA))
    def test_member_counts_and_drops_forged_data_without_changing_state(self, forgery, case):
        who, make, counter = FORGED_DATA[case]
        target, root, job_id = forgery.receivers[1], forgery.root, forgery.group.job_id
        before = counters(target)
        rx_before = target.call("state", job_id=job_id)
        fold_before = root.call("state", job_id=job_id)
        send_raw(self.sender(forgery, who), forgery.hosts[1].ip, forgery.group.port,
                 make(forgery.group))
        wait_for_count(target, counter, before[counter] + 1)
        after = counters(target)
        assert delta(after, before) == {counter: 1}  # accepted, ack_sent: unchanged
        assert target.call("state", job_id=job_id)["rx"] == rx_before["rx"]
        assert root.call("state", job_id=job_id) == fold_before
        assert target.call("recv", name=forgery.name, count=1, timeout=0.3)["messages"] == [None]

    @pytest.mark.parametrize("case", list(FORGED_TO_ROOT))
    def test_root_counts_and_drops_forged_acks_without_changing_the_fold(self, forgery, case):
        who, make, counter = FORGED_TO_ROOT[case]
        root, job_id = forgery.root, forgery.group.job_id
        before = counters(root)
        fold_before = root.call("state", job_id=job_id)
        send_raw(self.sender(forgery, who), forgery.hosts[0].ip, forgery.group.port,
                 make(forgery.group))
        wait_for_count(root, counter, before[counter] + 1)
        assert delta(counters(root), before) == {counter: 1}
        assert root.call("state", job_id=job_id) == fold_before
        # Nothing reached the root application: no GROUP_ACK, no NACK to act on.
        assert root.call("inbox", name=forgery.name, timeout=0.3)["packets"] == []

    def test_the_job_still_delivers_after_the_forged_packets(self, forgery):
        messages = [(3000, 31), (5, 32)]
        forgery.post_recv(len(messages))
        results = forgery.send(messages)
        assert results[-1]["seq"] == ROOT_NEXT_SEQ + 3  # 3000 B is 3 packets, 5 B one
        assert all(m == expected(messages) for m in forgery.received().values())
        for node in forgery.receivers.values():
            rx = node.call("state", job_id=forgery.group.job_id)["rx"]
            assert rx[0] == [results[-1]["seq"], 0]  # from the root: all, nothing beyond
            assert rx[2] == [0, 0]  # nothing was ever accepted from rank 2


# ------------------------------------------------------------ 2. loss, duplication, reorder


def test_group_ack_is_exact_under_loss_duplication_and_reordering(cluster):
    hosts = cluster.tb.hosts[:9]  # root h0, members h1..h8
    job = Job(cluster, hosts, job_id=2002, token=0x2002BEEF, port=47020)
    rng = random.Random(2002)
    messages = [(rng.choice([1, 100, 1400, 1441, 4096, 9000, 30000]), 2000 + i)
                for i in range(50)]
    nodes = [job.root, *job.receivers.values()]
    before = [counters(n) for n in nodes]
    try:
        cluster.tb.set_netem(Netem(loss_pct=5, duplicate_pct=5, reorder_pct=5, seed=2002))
        try:
            job.post_recv(len(messages))
            results = job.send(messages)  # raises (NodeError) on a CollectiveTimeout
            got = job.received()
        finally:
            cluster.tb.set_netem(None)
        stats = job.root.call("stats", name=job.name)["stats"]
        rx = {r: n.call("state", job_id=2002)["rx"][0] for r, n in job.receivers.items()}
        after = [counters(n) for n in nodes]
    finally:
        job.close()
    # A group-ACK never claims more than the members' kernels acknowledged:
    for res in results:
        assert all(res["acked"][r] >= res["seq"] for r in range(1, len(hosts))), res
    last = results[-1]["seq"]
    for r in range(1, len(hosts)):
        assert got[r] == expected(messages), f"member rank {r} got other bytes"
        assert rx[r] == [last, 0]  # the member's window holds exactly what was sent
    # ... and the impairment really bit:
    root_delta = delta(after[0], before[0])
    assert root_delta.get("group_ack", 0) > 0
    assert stats["retransmits"] + stats["nacks"] > 0, stats
    assert any(delta(a, b).get("data_duplicate", 0) > 0
               for a, b in zip(after[1:], before[1:], strict=True))


# ------------------------------------------------------------ 6. a member that never answers


def test_a_member_that_never_answers_makes_send_time_out_naming_it(cluster):
    silent = cluster.host(IDLE - 1)  # in the group, but runs no programs and no receiver
    job = Job(cluster, [cluster.host(0), cluster.host(1), silent], job_id=6006,
              token=0x6006, port=47030, receivers=[1])
    try:
        job.post_recv(1, timeout=10)
        answer = job.root.call("send", name=job.name, messages=[(100, 60)], timeout=1.0,
                               check=False)
        got = job.received()
    finally:
        job.close()
    assert answer["ok"] is False and answer["error"] == "CollectiveTimeout", answer
    assert answer["missing"] == [2]
    assert "rank 2" in answer["message"] and f"({silent.ip}," in answer["message"]
    assert "rank 1 " not in answer["message"]
    assert 1.0 <= answer["elapsed"] < 5.0  # gives up at its deadline, not much later
    assert got[1] == expected([(100, 60)])  # the member that runs still got it


# ------------------------------------------------------------ 7. two jobs, same hosts


def test_two_jobs_on_the_same_hosts_do_not_interfere(cluster):
    hosts = [cluster.host(i) for i in (0, 11, 12, 13, 14)]
    gip = cluster.tb.group_ips[1]  # the same group address: only job id and port differ
    a = Job(cluster, hosts, job_id=7001, token=0x7001, port=47040, group_ip=gip, name="a")
    b = Job(cluster, hosts, job_id=7002, token=0x7002, port=47041, group_ip=gip, name="b")
    msgs_a = [(100, 71), (3000, 72), (65536, 73), (1, 74)]
    msgs_b = [(5000, 81), (1, 82), (1441, 83), (20000, 84)]
    try:
        last = {}
        for ma, mb in zip(msgs_a, msgs_b, strict=True):  # interleaved, one at a time
            last["a"] = a.send([ma])[-1]
            last["b"] = b.send([mb])[-1]
        got, extra, windows = {}, {}, {}
        for job, msgs in ((a, msgs_a), (b, msgs_b)):
            job.post_recv(len(msgs))
            got[job.name] = job.received()
            job.post_recv(1, timeout=0.3)
            extra[job.name] = job.received()
            windows[job.name] = {r: n.call("state", job_id=job.group.job_id)["rx"][0]
                                 for r, n in job.receivers.items()}
        folds = {j.name: j.root.call("state", job_id=j.group.job_id) for j in (a, b)}
    finally:
        a.close()
        b.close()
    for name, msgs in (("a", msgs_a), ("b", msgs_b)):
        seq = last[name]["seq"]
        assert seq == sum(-(-s // 1440) for s, _ in msgs)  # each job counts its own seqs
        for r in range(1, len(hosts)):
            assert got[name][r] == expected(msgs), f"job {name}, rank {r}"
            assert extra[name][r] == [None], f"job {name}, rank {r} got a foreign message"
            assert windows[name][r] == [seq, 0]
        assert folds[name]["group_acked"] == seq
        assert folds[name]["acked"][1:len(hosts)] == [seq] * (len(hosts) - 1)



def test_jobs_installed_from_several_threads_get_a_slot_each():
    """Receivers and Broadcasters of concurrent jobs install from their own threads. A
    slot chosen before another thread claimed it gave two jobs one ACK fold: the second
    install zeroed the first job's sent_max, every ACK was then 'beyond sent', and the
    root timed out (the chaos cell broadcast/4-concurrent-jobs, 1 run in 4). Each reset
    is slowed here so the window between choosing and claiming is wide every time."""
    import threading

    from aggbox.collectives import allreduce, broadcast

    def install_four(make, reset_name: str, host: NetnsHost) -> list[int]:
        programs = make(host.ifname)
        reset = getattr(programs, reset_name)

        def slow_reset(*args):
            time.sleep(0.05)
            return reset(*args)

        setattr(programs, reset_name, slow_reset)
        me = Member(0, host.ip, host.mac)
        groups = [Group(job_id=9100 + j, token=j + 1, port=47050 + j, rank=0, aggregator=me,
                        members=(me, Member(1, "10.0.0.9", "02:00:00:00:00:09")))
                  for j in range(4)]
        slots: list[int] = []
        threads = [threading.Thread(target=lambda g=g: slots.append(programs.install_job(g)))
                   for g in groups]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            programs.close()
        return slots

    with NetnsTestbed(1) as tb:
        host = tb.hosts[0]
        got_bc = host.call(install_four, broadcast.BroadcastPrograms, "_reset_slot", host)
        got_ar = host.call(install_four, allreduce.AggregatorPrograms, "_reset_slots", host)
    assert sorted(got_bc) == [0, 1, 2, 3]
    assert sorted(got_ar) == [0, 1, 2, 3]

# ------------------------------------------------------------ 4. checksums, offload off


def snmp_udp(host: NetnsHost) -> dict[str, int]:
    """The host namespace's ``Udp:`` line of /proc/net/snmp (read by a process in it)."""
    lines = [ln.split() for ln in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Udp:")]
    names, values = lines[0][1:], lines[1][1:]
    return dict(zip(names, map(int, values), strict=True))


def attachments(host: NetnsHost) -> dict[str, str]:
    """What is attached to the host's eth0: TC filters, qdiscs, XDP."""
    return {
        "tc ingress": host.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout.strip(),
        "tc egress": host.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout.strip(),
        "clsact": "clsact" * ("clsact" in host.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout),
        "xdp": " ".join(w for w in host.run(["ip", "-d", "link", "show", "eth0"]).stdout.split()
                        if w.startswith(("xdp", "prog/xdp"))),
    }


NOTHING_ATTACHED = {"tc ingress": "", "tc egress": "", "clsact": "", "xdp": ""}


def test_checksums_are_correct_with_tx_checksum_offload_off(tmp_path):
    messages = [(size, 400 + i) for i, size in enumerate((1, 1400, 1441, 4096, 65536))]
    with NetnsTestbed(5, tx_offload=False) as tb:
        NAMESPACES.extend(tb.namespaces)
        assert "tx-checksumming: off" in tb.hosts[1].run(["ethtool", "-k", "eth0"]).stdout
        before = [snmp_udp(h) for h in tb.hosts]
        nodes = start_nodes(tb, tb.hosts, tmp_path)
        c = Cluster(tb, nodes)
        try:
            job = Job(c, tb.hosts, job_id=4004, token=0x4004, port=47050)
            job.post_recv(len(messages))
            job.send(messages)
            got = job.received()
            job.close()
        finally:
            c.shutdown()
        after = [snmp_udp(h) for h in tb.hosts]
        left = [attachments(h) for h in tb.hosts]
    for r in range(1, 5):
        assert got[r] == expected(messages), f"member rank {r} got other bytes"
    for h, b, a in zip(tb.hosts, before, after, strict=True):
        assert a["InCsumErrors"] == b["InCsumErrors"] == 0, h.name
        assert a["InErrors"] == b["InErrors"], h.name
    # The counters were this namespace's: every member's socket took the 53 packets.
    assert all(a["InDatagrams"] - b["InDatagrams"] >= 53
               for a, b in zip(after[1:], before[1:], strict=True))
    assert all(c.quit_answers[i]["ok"] for i in range(5))
    assert left == [NOTHING_ATTACHED] * 5


# ------------------------------------------------------------ 5. nothing left behind


@pytest.mark.parametrize("role", ["broadcast-member", "broadcast-root"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_node_detaches_its_programs_when_interrupted(role, sig):
    """A node waiting for traffic (a member with no root, a root whose member runs
    nothing) is interrupted: it exits and leaves nothing attached or pinned."""
    with NetnsTestbed(2) as tb:
        NAMESPACES.extend(tb.namespaces)
        spec = build_spec(tb, {"size": 64, "gap_us": 0, "timeout_s": 120,
                               "recv_timeout_s": 120}, ["aggbox"], iters=5, warmup=0, seed=5)
        host = tb.hosts[0] if role == "broadcast-root" else tb.hosts[1]
        pins = Path("/sys/fs/bpf/aggbox") / f"{tb.run_id}-h{host.index}"
        with NodeGroup(spec) as nodes:
            node = nodes.start(host, role, host.index)
            nodes.wait_ready([node], timeout=60)
            loaded = attachments(host)
            pinned = pins.exists()
            node.proc.send_signal(sig)
            code = node.proc.wait(timeout=30)
            left = attachments(host)
            still_pinned = pins.exists()
    assert loaded["tc ingress"] and loaded["tc egress"] and loaded["clsact"]
    assert bool(loaded["xdp"]) == (role == "broadcast-root")
    assert pinned
    assert code == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM)
    assert left == NOTHING_ATTACHED
    assert not still_pinned


def test_no_program_or_namespace_outlives_the_tests(cluster):
    """Runs last: every node exits cleanly, nothing stays attached, and once the testbeds
    are down none of this module's namespaces is listed."""
    progs = {i: n.call("progs")["progs"] for i, n in cluster.nodes.items()}
    assert set(progs[0]) == {"tc_ingress", "tc_egress", "xdp_ingress"}  # h0 was a root
    assert all(set(p) == {"tc_ingress", "tc_egress"} for i, p in progs.items() if i)
    cluster.shutdown()
    assert {i: a["ok"] for i, a in cluster.quit_answers.items()} == dict.fromkeys(
        cluster.nodes, True)
    assert all(n.proc.returncode == 0 for n in cluster.nodes.values())
    left = {h.name: attachments(h) for h in cluster.tb.hosts}
    assert left == {h.name: NOTHING_ATTACHED for h in cluster.tb.hosts}
    still_loaded = [i for p in progs.values() for i in p.values()
                    if subprocess.run(["bpftool", "prog", "show", "id", str(i)],
                                      capture_output=True).returncode == 0]
    assert still_loaded == []
    cluster.tb.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert NAMESPACES and not set(NAMESPACES) & set(listed)
