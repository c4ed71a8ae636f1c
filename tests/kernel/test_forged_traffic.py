"""Broadcast holes of issue 11, tried as an attacker on the same bridge and as a pessimist.

A small testbed: h0 is the root (rank 0), h1 and h2 are members (ranks 1, 2), h3 runs
nothing and belongs to no job (the attacker: its own MAC, an unused IP, raw frames).
Every test installs its own job (id, token, port) on the shared node processes.
"""

from __future__ import annotations

import socket
import time

import families
import pytest
from broadcast_node import NodeProcess, digest, payload, running_nodes
from raw_frames import frame, send_frame

from aggbox.collectives.group import Group, Member
from aggbox.protocol import Flags, Header, MsgType
from aggbox.testbed import NetnsTestbed
from aggbox.testbed.netns import NetnsHost

pytestmark = pytest.mark.kernel

WINDOW = 32  # the Broadcaster's default window: what one NACK may cost at most


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with NetnsTestbed(4) as tb, \
            running_nodes(tb.hosts[:3], tmp_path_factory.mktemp("nodes")) as nodes:
        yield tb, nodes


class Job:
    def __init__(self, bed, job_id: int, token: int, port: int, name: str):
        tb, nodes = bed
        self.tb, self.name = tb, name
        members = tuple(Member(rank=i, ip=h.ip, mac=h.mac) for i, h in enumerate(tb.hosts[:3]))
        self.group = Group(job_id=job_id, token=token, members=members, rank=0, port=port,
                           group_ip=tb.group_ips[0])
        self.root, self.members = nodes[0], {1: nodes[1], 2: nodes[2]}
        for r, node in self.members.items():
            node.call("receiver", name=name, group=_as_dict(self.group, r))
        self.root.call("broadcaster", name=name, group=_as_dict(self.group, 0))

    def send(self, messages: list[tuple[int, int]], timeout: float = 20.0) -> list[dict]:
        return self.root.call("send", name=self.name, messages=messages,
                              timeout=timeout)["results"]

    def close(self) -> None:
        for node in (self.root, *self.members.values()):
            if node.proc.poll() is None:
                node.call("close", name=self.name, check=False)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_dict(group: Group, rank: int) -> dict:
    import json

    return json.loads(group.with_rank(rank).to_json())


def counters(node: NodeProcess) -> dict[str, int]:
    return node.call("counters")["counters"]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def settle(node: NodeProcess, name: str, target: int, wait: float = 5.0) -> None:
    end = time.monotonic() + wait
    while counters(node)[name] < target and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.05)


def send_udp(host: NetnsHost, dst_ip: str, port: int, data: bytes) -> None:
    def go() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(data, (dst_ip, port))

    host.call(go)


def data_hdr(group: Group, **changes) -> bytes:
    fields = dict(type=MsgType.DATA, job_id=group.job_id, token=group.token, seq=2, rank=0,
                  count=5, flags=int(Flags.LAST_FRAG), aux=2)
    fields.update(changes)
    return Header(**fields).pack() + b"forge"


# ------------------------------------------------ 1. the socket dropped the last packet


def test_a_message_whose_tail_the_members_socket_dropped_still_arrives(bed):
    """The member's kernel ACKs at TC ingress; a tiny receive buffer then drops most of a
    burst, its last packet included. The root's send completed; nothing later shows a gap.
    The member must notice (its kernel's ACKed seq against what its socket delivered) and
    NACK; the root serves NACKs while idle."""
    with Job(bed, 11001, 0x11001, 47101, "tail") as job:
        job.members[1].call("rcvbuf", name="tail", size=1)  # the kernel's minimum
        message = (20 * 1440, 1101)  # 20 packets in one burst
        job.send([message])  # every member's KERNEL has all 20
        job.root.post("serve", name="tail", duration=6.0)
        got = job.members[1].call("recv", name="tail", count=1, timeout=5.0, wait=30)
        job.root.reply(wait=30)
        other = job.members[2].call("recv", name="tail", count=1, timeout=5.0, wait=30)
    assert other["messages"] == [digest(payload(*message))]
    assert got["messages"] == [digest(payload(*message))]


# ------------------------------------------------ 2. ACKs beyond what was sent


def test_an_ack_beyond_the_highest_seq_sent_is_refused_and_cannot_pin_the_fold(bed):
    tb, _ = bed
    with Job(bed, 11002, 0x11002, 47102, "pin") as job:
        job.send([(10, 1)])  # seq 1
        before = counters(job.root)
        fold_before = job.root.call("state", job_id=11002)
        forged = Header(type=MsgType.ACK, job_id=11002, token=0x11002, rank=1,
                        aux=0xFFFFFFFF).pack()
        for _ in range(5):
            send_udp(tb.hosts[1], tb.hosts[0].ip, 47102, forged)
        forged2 = Header(type=MsgType.ACK, job_id=11002, token=0x11002, rank=2,
                         aux=0xFFFFFFFF).pack()
        send_udp(tb.hosts[2], tb.hosts[0].ip, 47102, forged2)
        settle(job.root, "ack_beyond_sent", before["ack_beyond_sent"] + 6)
        d = delta(counters(job.root), before)
        fold_after = job.root.call("state", job_id=11002)
        inbox = job.root.call("inbox", name="pin", timeout=0.3)["packets"]
        # Reliability is still on: the next message is delivered and acknowledged exactly.
        results = job.send([(3000, 2)])
        got = job.members[1].call("recv", name="pin", count=2, timeout=5.0)["messages"]
    assert d == {"ack_beyond_sent": 6}
    assert fold_after == fold_before
    assert inbox == []  # no GROUP_ACK for seqs never sent
    assert results[-1]["seq"] == 4 and results[-1]["acked"][1:3] == [4, 4]
    assert got == [digest(payload(10, 1)), digest(payload(3000, 2))]


# ------------------------------------------------ 2. DATA to the broadcast MAC


def test_data_to_the_broadcast_mac_is_checked_like_any_other(bed):
    tb, _ = bed
    h0, h1, h3 = tb.hosts[0], tb.hosts[1], tb.hosts[3]
    with Job(bed, 11003, 0x11003, 47103, "bmac") as job:
        job.send([(10, 1)])
        assert job.members[1].call("recv", name="bmac", count=1, timeout=5.0)["messages"]
        before = counters(job.members[1])
        rx_before = job.members[1].call("state", job_id=11003)["rx"]
        bad = data_hdr(job.group, token=0x11003 ^ 0x5A5A)
        send_frame(h3, frame(h3.mac, "ff:ff:ff:ff:ff:ff", h0.ip, h1.ip, 47103, bad))
        settle(job.members[1], "drop_bad_token", before["drop_bad_token"] + 1)
        d = delta(counters(job.members[1]), before)
        rx_after = job.members[1].call("state", job_id=11003)["rx"]
        got = job.members[1].call("recv", name="bmac", count=1, timeout=0.3)["messages"]
    assert d == {"drop_bad_token": 1}
    assert rx_after == rx_before
    assert got == [None]  # the application never saw it


# ------------------------------------------------ 2. NACK amplification


def test_one_nack_costs_at_most_a_window_of_resends(bed):
    tb, _ = bed
    with Job(bed, 11004, 0x11004, 47104, "amp") as job:
        job.send([(300 * 1440, 7)])  # 300 packets retained
        for r in (1, 2):
            job.members[r].call("recv", name="amp", count=1, timeout=5.0)
        before = job.root.call("stats", name="amp")["stats"]
        nack = Header(type=MsgType.NACK, job_id=11004, token=0x11004, rank=1, seq=0xFFFF,
                      count=0xFFFF, aux=1).pack()
        for _ in range(3):
            send_udp(tb.hosts[1], tb.hosts[0].ip, 47104, nack)
        time.sleep(0.1)
        job.send([(1, 8)])  # the root reads its socket (and the NACKs) while it sends
        after = job.root.call("stats", name="amp")["stats"]
    resent = after["retransmits"] - before["retransmits"]
    assert after["nacks"] - before["nacks"] == 3
    assert resent <= 3 * WINDOW, resent  # not 3 x 300
    assert after["nacks_limited"] - before.get("nacks_limited", 0) >= 1


# ------------------------------------------------ 3. non-AggBox UDP passes through


PASS_PORTS = (47000, 47500, 47999)  # aggbox.collectives.broadcast.DEFAULT_PORTS


@pytest.mark.parametrize("where", [0, 1], ids=["root-with-xdp", "member"])
@pytest.mark.parametrize("data", [b"\x12\x34 plain datagram, not AggBox, longer than 32 B",
                                  b"tiny"], ids=["long", "short"])
def test_non_aggbox_udp_to_an_aggbox_port_reaches_its_socket(bed, where, data):
    tb, nodes = bed
    with Job(bed, 11005, 0x11005, 47105, "pass"):  # XDP on h0, TC on every node
        host = tb.hosts[where]
        got = {}
        before = counters(nodes[where])
        for port in PASS_PORTS:  # both ends of the range and one inside
            sock = host.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                sock.bind(("0.0.0.0", port))
                sock.settimeout(2.0)
                send_udp(tb.hosts[2], host.ip, port, data)
                got[port] = sock.recv(2048)
            finally:
                sock.close()
        d = delta(counters(nodes[where]), before)
    assert got == dict.fromkeys(PASS_PORTS, data)
    programs = 2 if where == 0 else 1  # on the root both XDP and TC ingress pass it
    assert d == {"passed_not_ours": programs * len(PASS_PORTS)}


# ------------------------------------------------ 3b. every port of every family


@pytest.fixture(scope="module")
def families_bed():
    with NetnsTestbed(2) as tb, families.attached(tb.hosts[0]) as attached:
        yield tb, attached


def _bound_sockets(ports: list[int]) -> dict[int, socket.socket]:
    socks = {}
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        socks[port] = s
    return socks


def _deliver(tb, ports: list[int], data: bytes) -> dict[int, bytes]:
    """Send ``data`` from h1 to each port of h0 (in batches, resending what a burst may
    have lost on the way); what each of h0's sockets received."""
    h0, h1 = tb.hosts
    socks = h0.call(_bound_sockets, ports)
    got: dict[int, bytes] = {}
    try:
        for _attempt in range(3):
            missing = [p for p in ports if p not in got]
            for i in range(0, len(missing), 100):
                batch = missing[i:i + 100]

                def send(batch=batch) -> None:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        for port in batch:
                            s.sendto(data, (h0.ip, port))

                h1.call(send)
                end = time.monotonic() + 2.0
                while time.monotonic() < end and any(p not in got for p in batch):
                    for port in batch:
                        if port not in got:
                            try:
                                got[port] = socks[port].recv(2048)
                            except BlockingIOError:
                                pass
                    time.sleep(0.01)
    finally:
        for s in socks.values():
            s.close()
    return got


def test_non_aggbox_udp_to_every_port_of_broadcast_and_reduce_reaches_its_socket(families_bed):
    from aggbox.collectives import broadcast, reduce_kernel

    tb, attached = families_bed
    ranges = {"broadcast": broadcast.DEFAULT_PORTS, "reduce": reduce_kernel.DEFAULT_PORTS}
    ports = [p for lo, hi in ranges.values() for p in range(lo, hi + 1)]
    data = b"\x12\x34 not AggBox: a DNS or NTP reply, say"
    before = [tb.hosts[0].call(p.counters) for p in attached.all()]
    got = _deliver(tb, ports, data)
    after = [tb.hosts[0].call(p.counters) for p in attached.all()]
    assert sorted(p for p, d in got.items() if d == data) == ports
    moved = [delta(a, b) for a, b in zip(after, before, strict=True)]
    # Each family saw its own range's datagrams, passed them and dropped nothing.
    per_range = {name: hi - lo + 1 for name, (lo, hi) in ranges.items()}
    assert moved[0] and set(moved[0]) == {"passed_not_ours"}, moved[0]
    assert moved[0]["passed_not_ours"] >= per_range["broadcast"]
    assert set(moved[2]) == {"passed_not_ours"}, moved[2]
    assert moved[2]["passed_not_ours"] >= per_range["reduce"]
    assert moved[1] == {}, moved[1]  # the aggregator's ports got nothing: nothing counted


def _reserved(text: str) -> set[int]:
    ports: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def test_every_aggbox_port_is_kept_from_ephemeral_use_where_programs_run(families_bed):
    """The ports lie in Linux's ephemeral range (32768-60999): an ephemeral socket there
    (a DNS client's, say) would see its replies inspected by AggBox's programs, and the
    aggregator's drop every datagram without AggBox's magic. Attaching a family reserves
    its ports (net.ipv4.ip_local_reserved_ports); the testbed reserves the baselines' too."""
    from aggbox.collectives import allreduce, broadcast, reduce_kernel
    from aggbox.collectives.group import RESERVED_PORTS

    tb, _ = families_bed
    h0, h1 = tb.hosts
    sysctl = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    lo, hi = RESERVED_PORTS
    for first, last in (broadcast.DEFAULT_PORTS, allreduce.DEFAULT_PORTS,
                        reduce_kernel.DEFAULT_PORTS):
        assert lo <= first <= last <= hi
    # The testbed reserves every port in each namespace.
    assert set(range(lo, hi + 1)) <= _reserved(h1.run(["cat", sysctl]).stdout)

    def attach_on_a_host_with_nothing_reserved() -> set[int]:
        with open(sysctl, "w") as f:
            f.write("\n")  # nothing reserved
        programs = broadcast.BroadcastPrograms(h1.ifname)
        try:
            with open(sysctl) as f:
                return _reserved(f.read())
        finally:
            programs.close()
            with open(sysctl, "w") as f:
                f.write(f"{lo}-{hi}")

    # Attaching a family reserves its own ports, wherever it runs.
    first, last = broadcast.DEFAULT_PORTS
    assert h1.call(attach_on_a_host_with_nothing_reserved) == set(range(first, last + 1))

    def ephemeral_bind_in(first: int) -> str:
        """An ephemeral bind while the ephemeral range is only [first, first + 7]."""
        path = "/proc/sys/net/ipv4/ip_local_port_range"
        with open(path) as f:
            saved = f.read()
        try:
            with open(path, "w") as f:
                f.write(f"{first} {first + 7}")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("0.0.0.0", 0))
                except OSError as exc:
                    return f"refused: {exc.strerror}"
                return f"got {s.getsockname()[1]}"
        finally:
            with open(path, "w") as f:
                f.write(saved)

    for first in (broadcast.DEFAULT_PORTS[0], allreduce.DEFAULT_PORTS[0],
                  reduce_kernel.DEFAULT_PORTS[0]):
        assert h0.call(ephemeral_bind_in, first).startswith("refused"), first


# ------------------------------------------------ 5. a member's IP from another MAC


def test_a_members_ip_spoofed_from_another_mac_is_refused(bed):
    tb, _ = bed
    h0, h1, h3 = tb.hosts[0], tb.hosts[1], tb.hosts[3]
    with Job(bed, 11006, 0x11006, 47106, "spoof") as job:
        job.send([(10, 1)])
        assert job.members[1].call("recv", name="spoof", count=1, timeout=5.0)["messages"]
        # DATA claiming to be the root (its IP, the right token: sniffed) from h3's MAC.
        before = counters(job.members[1])
        rx_before = job.members[1].call("state", job_id=11006)["rx"]
        send_frame(h3, frame(h3.mac, h1.mac, h0.ip, h1.ip, 47106, data_hdr(job.group)))
        settle(job.members[1], "drop_wrong_mac", before["drop_wrong_mac"] + 1)
        d = delta(counters(job.members[1]), before)
        rx_after = job.members[1].call("state", job_id=11006)["rx"]
        got = job.members[1].call("recv", name="spoof", count=1, timeout=0.3)["messages"]
        # A NACK claiming to be rank 1 (its IP) from h3's MAC, to the root.
        root_before = counters(job.root)
        nack = Header(type=MsgType.NACK, job_id=11006, token=0x11006, rank=1, count=1,
                      aux=1).pack()
        send_frame(h3, frame(h3.mac, h0.mac, h1.ip, h0.ip, 47106, nack))
        settle(job.root, "drop_wrong_mac", root_before["drop_wrong_mac"] + 1)
        d_root = delta(counters(job.root), root_before)
        inbox = job.root.call("inbox", name="spoof", timeout=0.3)["packets"]
    assert d == {"drop_wrong_mac": 1}
    assert rx_after == rx_before and got == [None]
    assert d_root == {"drop_wrong_mac": 1} and inbox == []


# ------------------------------------------------ 7. checksums where the kernel acts


@pytest.mark.parametrize("broken", ["ip", "udp"])
def test_data_with_a_broken_checksum_is_neither_recorded_nor_acknowledged(bed, broken):
    """The member's kernel ACKs at TC ingress, before the stack verifies anything: a
    corrupted copy must not move its window (nor the root's fold)."""
    tb, _ = bed
    h0, h1 = tb.hosts[0], tb.hosts[1]
    with Job(bed, 11007, 0x11007, 47107, "csum") as job:
        job.send([(10, 1)])
        assert job.members[1].call("recv", name="csum", count=1, timeout=5.0)["messages"]
        before = counters(job.members[1])
        rx_before = job.members[1].call("state", job_id=11007)["rx"]
        raw = frame(h0.mac, h1.mac, h0.ip, h1.ip, 47107, data_hdr(job.group),
                    break_ip=broken == "ip", break_udp=broken == "udp")
        send_frame(h0, raw)  # from the root's own host: IP, MAC and token all right
        settle(job.members[1], "drop_bad_csum", before["drop_bad_csum"] + 1)
        d = delta(counters(job.members[1]), before)
        rx_after = job.members[1].call("state", job_id=11007)["rx"]
        # The same frame with correct checksums is taken: the check is not over-eager.
        send_frame(h0, frame(h0.mac, h1.mac, h0.ip, h1.ip, 47107, data_hdr(job.group)))
        got = job.members[1].call("recv", name="csum", count=1, timeout=5.0)["messages"]
    assert d == {"drop_bad_csum": 1}
    assert rx_after == rx_before
    assert got == [digest(b"forge")]
