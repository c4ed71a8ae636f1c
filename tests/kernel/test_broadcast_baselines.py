"""The broadcast baselines tcp_kack (kernel promise) and mcast (app promise) on the real
kernel: exact bytes to 16 members, also with 5% loss on every link, and what each one's
completion promises.

No BPF is loaded here, so no node processes: every endpoint is made inside its host's
namespace (``host.call``; a socket stays in the namespace it was made in) and used from
threads of this process. Each test has its own ports and job id.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from broadcast_node import digest, payload
from test_broadcast import make_group

from aggbox.baselines import mcast, tcp, tcp_kack
from aggbox.baselines.mcast import McastBroadcaster, McastReceiver, group_address
from aggbox.baselines.tcp import TcpBroadcaster, TcpReceiver
from aggbox.baselines.tcp_kack import TcpKackBroadcaster, TcpKackReceiver
from aggbox.errors import CollectiveTimeout
from aggbox.protocol import max_payload
from aggbox.testbed import Netem, NetnsTestbed
from aggbox.testbed.netns import KERNEL_ACK_PORTS, NetnsHost

pytestmark = pytest.mark.kernel

MEMBERS = 16
KACK_PORT = KERNEL_ACK_PORTS[0] + 1  # inside the quickack range, apart from the workload's
MCAST_PORT = 46201
DATAGRAM = max_payload(1500)  # payload bytes per mcast datagram
TCP_SIZES = (1, 64, 65536, 300_000)
MCAST_SIZES = (1, 64, DATAGRAM + 1, 65536)  # DATAGRAM + 1: two datagrams
SEND_TIMEOUT = 60.0
ETH_P_IP, ETH_P_ALL = 0x0800, 0x0003


@pytest.fixture(scope="module")
def tb():
    """h0 is every job's root, h1..h16 its members, h17 a host outside every group."""
    with NetnsTestbed(MEMBERS + 2) as testbed:
        yield testbed


@pytest.fixture
def lossy(tb):
    """5% loss on every link, both directions (bpf/impair.c, seeded), for one test."""
    tb.set_netem(Netem(loss_pct=5, seed=20250))
    try:
        yield tb
    finally:
        tb.set_netem(None)


class Job:
    """One baseline job on the testbed: a broadcaster on h0, a receiver on each member."""

    def __init__(self, tb: NetnsTestbed, broadcaster, receiver, port: int, job_id: int,
                 before_root=None):
        self.group = make_group(tb.hosts[:MEMBERS + 1], job_id, token=0xBA5E + job_id,
                                port=port, group_ip=tb.group_ips[0])
        self.hosts = tb.hosts
        self.receivers = {r: tb.hosts[r].call(receiver, self.group.with_rank(r))
                          for r in range(1, MEMBERS + 1)}
        if before_root is not None:
            before_root(self)
        self.root = tb.hosts[0].call(broadcaster, self.group)

    def read(self, count: int, ranks=None, timeout: float = 60.0,
             until: threading.Event | None = None) -> dict[int, list]:
        """Every member (of ``ranks``) reads ``count`` messages, each in its own thread;
        returns their digests. With ``until``, each goes on reading until it is set: a
        member whose last ACK was lost must still see the root's repair to ack again (and
        a message too many would show)."""
        ranks = list(self.receivers) if ranks is None else list(ranks)

        def one(rank: int) -> list:
            got = []
            for _ in range(count):
                msg = self.receivers[rank].recv(timeout=timeout)
                got.append(None if msg is None else digest(msg))
            while until is not None and not until.is_set():
                msg = self.receivers[rank].recv(timeout=0.01)
                if msg is not None:
                    got.append(digest(msg))
            return got

        with ThreadPoolExecutor(len(ranks)) as pool:
            return dict(zip(ranks, pool.map(one, ranks), strict=True))

    def broadcast(self, messages: list[tuple[int, int]]) -> dict[int, list]:
        """Send ``messages`` while every member reads them; what each member read."""
        reading: dict[int, list] = {}
        sent = threading.Event()
        reader = threading.Thread(
            target=lambda: reading.update(self.read(len(messages), until=sent)))
        reader.start()
        try:
            for size, seed in messages:
                self.root.send(payload(size, seed), timeout=SEND_TIMEOUT)
        finally:
            sent.set()
            reader.join()
        return reading

    def close(self) -> None:
        self.root.close()
        for r in self.receivers.values():
            r.close()


@contextmanager
def job(tb: NetnsTestbed, broadcaster, receiver, port: int, job_id: int,
        before_root=None) -> Iterator[Job]:
    j = Job(tb, broadcaster, receiver, port, job_id, before_root)
    try:
        yield j
    finally:
        j.close()


def expected(messages: list[tuple[int, int]]) -> list:
    return [digest(payload(size, seed)) for size, seed in messages]


def proc_net(host: NetnsHost, path: str) -> str:
    return host.run(["cat", path]).stdout  # a process in the namespace: its own view


def snmp(host: NetnsHost, proto: str) -> dict[str, int]:
    lines = [ln.split() for ln in proc_net(host, "/proc/net/snmp").splitlines()
             if ln.startswith(f"{proto}:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def test_each_baseline_names_its_promise():
    assert (tcp_kack.PROMISE, mcast.PROMISE, tcp.PROMISE) == ("kernel", "app", "app")


# ------------------------------------------------------------ tcp_kack


def test_tcp_kack_members_ack_at_once_other_tcp_keeps_delayed_acks(tb):
    """The testbed's quickack rule covers the kernel-ACK ports only."""
    member, root = tb.hosts[1], tb.hosts[0]

    def route(sport: int) -> str:
        return member.run(["ip", "route", "get", root.ip, "ipproto", "tcp",
                           "sport", str(sport)]).stdout

    assert "quickack 1" in route(KACK_PORT)
    assert "quickack" not in route(45000)  # the tcp baseline's port


def test_tcp_kack_delivers_exact_bytes_to_16_members(tb):
    messages = [(size, 10 + i) for i, size in enumerate(TCP_SIZES)]
    with job(tb, TcpKackBroadcaster, TcpKackReceiver, KACK_PORT, job_id=1) as j:
        got = j.broadcast(messages)
        stats = dict(j.root.stats)
    assert got == {r: expected(messages) for r in range(1, MEMBERS + 1)}
    assert stats["sends"] == len(messages)
    assert stats["backstop_found"] == 0  # every wait ended on the ACK timestamp, not the timer


def test_tcp_kack_members_send_no_application_ack(tb):
    """The root's connections never carry a byte back: the kernel ACK is the answer."""
    messages = [(64, 30 + i) for i in range(5)]
    with job(tb, TcpKackBroadcaster, TcpKackReceiver, KACK_PORT + 1, job_id=2) as j:
        got = j.broadcast(messages)
        sent_back = {r: _peek(s) for r, s in j.root.conns.items()}
    assert got == {r: expected(messages) for r in range(1, MEMBERS + 1)}
    assert sent_back == dict.fromkeys(range(1, MEMBERS + 1), b"")


def _peek(sock: socket.socket) -> bytes:
    """What the member sent on the connection (not select: the root's ACK timestamps
    make it report POLLERR, which select counts as readable)."""
    try:
        return sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def test_tcp_kack_completes_while_a_member_application_does_not_read_but_tcp_does_not(tb):
    """The promise, as a specification: rank 5's application never reads while the
    messages are sent. tcp_kack (kernel promise) still completes each send, and rank 5
    finds the exact bytes later (its kernel had them); tcp (app promise) cannot complete
    and names rank 5."""
    messages = [(size, 50 + i) for i, size in enumerate((64, 1, 4096, 64))]
    stopped = 5
    others = [r for r in range(1, MEMBERS + 1) if r != stopped]
    with job(tb, TcpKackBroadcaster, TcpKackReceiver, KACK_PORT + 2, job_id=3) as j:
        reading: dict[int, list] = {}
        reader = threading.Thread(
            target=lambda: reading.update(j.read(len(messages), ranks=others)))
        reader.start()
        try:
            for size, seed in messages:
                j.root.send(payload(size, seed), timeout=SEND_TIMEOUT)
        finally:
            reader.join()
        late = j.read(len(messages), ranks=[stopped], timeout=5)
    assert reading == {r: expected(messages) for r in others}
    assert late == {stopped: expected(messages)}

    with job(tb, TcpBroadcaster, TcpReceiver, 45301, job_id=4) as j:
        reader = threading.Thread(target=lambda: j.read(1, ranks=others))
        reader.start()
        try:
            with pytest.raises(CollectiveTimeout) as info:
                j.root.send(payload(64, 60), timeout=2.0)
        finally:
            reader.join()
    assert info.value.missing == [stopped]


def test_tcp_kack_send_waits_until_the_member_kernel_acked_every_byte(tb):
    """Rank 7's kernel cannot take the whole frame (a minimal receive buffer, nobody
    reading): the bytes left the root, but send must not complete, and it names rank 7.
    Once rank 7 reads, its kernel ACKs the rest and the next send completes."""
    slow = 7

    def small_window(j: Job) -> None:  # before the root connects: the accepted socket inherits it
        j.receivers[slow].listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)

    big, small = (8000, 70), (64, 71)  # 8000 B fit the root's send buffer, not rank 7's window
    others = [r for r in range(1, MEMBERS + 1) if r != slow]
    with job(tb, TcpKackBroadcaster, TcpKackReceiver, KACK_PORT + 3, job_id=5,
             before_root=small_window) as j:
        with pytest.raises(CollectiveTimeout) as info:
            j.root.send(payload(*big), timeout=2.0)
        assert info.value.missing == [slow]
        assert tcp_kack.unacked_bytes(j.root.conns[slow]) > 0
        assert all(tcp_kack.unacked_bytes(j.root.conns[r]) == 0 for r in others)
        got: dict[int, list] = {}
        reader = threading.Thread(target=lambda: got.update(j.read(2)))
        reader.start()
        try:
            j.root.send(payload(*small), timeout=SEND_TIMEOUT)
        finally:
            reader.join()
        assert all(tcp_kack.unacked_bytes(s) == 0 for s in j.root.conns.values())
    assert got == {r: expected([big, small]) for r in range(1, MEMBERS + 1)}


def test_tcp_kack_delivers_exact_bytes_under_5pct_loss(lossy):
    messages = [(size, 80 + i) for i, size in enumerate(TCP_SIZES)]
    root = lossy.hosts[0]
    before = snmp(root, "Tcp")["RetransSegs"]
    with job(lossy, TcpKackBroadcaster, TcpKackReceiver, KACK_PORT + 4, job_id=6) as j:
        got = j.broadcast(messages)
    assert got == {r: expected(messages) for r in range(1, MEMBERS + 1)}
    assert snmp(root, "Tcp")["RetransSegs"] > before  # the loss did hit the connections


# ------------------------------------------------------------ mcast


def test_mcast_group_is_administratively_scoped_and_per_job(tb):
    a = make_group(tb.hosts[:3], 1, 2, MCAST_PORT, tb.group_ips[0])
    b = make_group(tb.hosts[:3], 2, 2, MCAST_PORT, tb.group_ips[0])
    assert group_address(a).startswith("239.213.")
    assert group_address(a) != group_address(b)


def test_mcast_delivers_exact_bytes_to_16_members(tb):
    messages = [(size, 100 + i) for i, size in enumerate(MCAST_SIZES)]
    with job(tb, McastBroadcaster, McastReceiver, MCAST_PORT, job_id=11) as j:
        got = j.broadcast(messages)
        retransmits = j.root.stats["retransmits"]
    assert got == {r: expected(messages) for r in range(1, MEMBERS + 1)}
    assert retransmits == 0  # no loss: the group copy reached everyone


class Capture:
    """Every IPv4 packet on a host's eth0 (both directions), from a packet socket."""

    def __init__(self, host: NetnsHost):
        def open_() -> socket.socket:
            # ETH_P_ALL: a tap for one protocol sees received packets only.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            s.bind(("eth0", 0))
            return s

        self.sock = host.call(open_)

    def udp(self, port: int) -> tuple[list[str], list[str]]:
        """(destinations of the UDP packets received, of those sent) to or from ``port``."""
        inbound: list[str] = []
        outbound: list[str] = []
        while True:
            try:
                buf, addr = self.sock.recvfrom(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.sock.close()
                return inbound, outbound
            if addr[1] != ETH_P_IP:
                continue
            ihl = (buf[0] & 0x0F) * 4
            if buf[9] != socket.IPPROTO_UDP:
                continue  # e.g. IGMP reports of members joining
            sport, dport = struct.unpack_from("!HH", buf, ihl)
            if port in (sport, dport):
                dst = socket.inet_ntoa(buf[16:20])
                (outbound if addr[2] == socket.PACKET_OUTGOING else inbound).append(dst)


def test_mcast_root_sends_one_copy_and_members_see_only_the_data(tb):
    """Counted on the links (no loss): the root's interface sends each datagram once, to
    the group, not once per member; each member's receives exactly those datagrams (no
    other member's ACK) and sends one ACK per message; the root's receives the 16 ACKs
    per message and none of its own datagrams (a looped-back copy would show here as
    inbound to the group); a host outside the group gets the flooded
    frames and its IP layer drops them (no UDP delivery)."""
    messages = [(64, 120), (3 * DATAGRAM, 121)]  # 1 + 3 datagrams
    datagrams, port = 4, MCAST_PORT + 1
    outsider = tb.hosts[MEMBERS + 1]
    with job(tb, McastBroadcaster, McastReceiver, port, job_id=12) as j:
        hosts = tb.hosts[:MEMBERS + 2]
        captures = [Capture(h) for h in hosts]
        udp_before = snmp(outsider, "Udp")
        got = j.broadcast(messages)
        seen = [c.udp(port) for c in captures]
        udp_after = snmp(outsider, "Udp")
        group_ip, root_ip = j.root.mcast_ip, j.group.members[0].ip
    assert got == {r: expected(messages) for r in range(1, MEMBERS + 1)}
    assert seen[0] == ([root_ip] * (MEMBERS * len(messages)), [group_ip] * datagrams)
    for rank in range(1, MEMBERS + 1):
        assert seen[rank] == ([group_ip] * datagrams, [root_ip] * len(messages)), f"rank {rank}"
    assert seen[MEMBERS + 1] == ([group_ip] * datagrams, [])
    assert udp_after == udp_before


def test_mcast_delivers_exact_bytes_under_5pct_loss_with_retransmissions(lossy):
    messages = [(size, 140 + i) for i, size in enumerate(MCAST_SIZES)]
    messages += [(64, 150 + i) for i in range(10)]  # enough packets that some are lost
    with job(lossy, McastBroadcaster, McastReceiver, MCAST_PORT + 2, job_id=13) as j:
        got = j.broadcast(messages)
        retransmits = j.root.stats["retransmits"]
    assert got == {r: expected(messages) for r in range(1, MEMBERS + 1)}
    assert retransmits > 0


def test_stats_are_json(tb):
    """The workload puts ``stats`` into the root's done record."""
    with job(tb, McastBroadcaster, McastReceiver, MCAST_PORT + 3, job_id=14) as a:
        json.dumps(a.root.stats)
    with job(tb, TcpKackBroadcaster, TcpKackReceiver, KACK_PORT + 5, job_id=15) as b:
        json.dumps(b.root.stats)
