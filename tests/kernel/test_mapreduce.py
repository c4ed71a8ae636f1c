"""In-kernel reduce-by-key (bpf/reduce.c + aggbox/collectives/reduce.py) on the real kernel.

Two kinds of tests:
- whole word-count jobs through the workload runner (node processes on testbed hosts,
  exactly what ``aggbox bench mapreduce`` runs), checked against collections.Counter;
- one reducer's kernel driven packet by packet: the programs are loaded by this process
  from a thread inside the reducer's namespace, packets are sent from sockets made inside
  the other hosts' namespaces, and the counters, the kernel's entries and the reducer's
  socket show what happened to each packet.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import pytest
from raw_frames import frame as raw_frame
from raw_frames import send_frame

from aggbox.collectives import reduce as kv
from aggbox.collectives.group import Group, Member
from aggbox.protocol import HEADER, HEADER_SIZE, KV_PAIR_SIZE, Flags, Header, MsgType
from aggbox.testbed import Netem, NetnsTestbed
from aggbox.testbed.netns import NetnsHost
from aggbox.workloads.mapreduce import SYSTEMS, run_mapreduce

pytestmark = pytest.mark.kernel

NAMESPACES: list[str] = []  # every namespace this module created, checked at the end


def run(n_hosts: int, params: dict, systems=SYSTEMS, netem: Netem | None = None):
    with NetnsTestbed(n_hosts, netem=netem) as tb:
        NAMESPACES.extend(tb.namespaces)
        return run_mapreduce(tb, params, list(systems), iters=1, warmup=0, seed=4)


def kernel_counters(result) -> Counter:
    total: Counter = Counter()
    for event in result.events:
        total.update(event.get("counters", {}))
    return total


def assert_exact(result, systems) -> None:
    assert sorted(s["system"] for s in result.samples) == sorted(systems)
    for s in result.samples:
        assert s["exact"], f"{s['system']}: counts differ from collections.Counter"
        assert s["keys"] == result.corpus["distinct"]


# ------------------------------------------------------------ whole jobs ----------------


def test_zipf_word_count_is_exact_for_every_system():
    """3 mappers -> 2 reducers: every system's counts equal Counter's, and AggBox's
    pairs were summed by the reducers' kernels, through the tail-call chain."""
    result = run(5, {"mappers": 3, "reducers": 2, "words": 150_000, "vocab": 20_000,
                     "skew": 1.1})
    assert_exact(result, SYSTEMS)
    c = kernel_counters(result)
    assert c["kv_pairs"] > 150_000  # both AggBox systems: combined and raw pairs
    assert c["kv_tail_calls"] > 0 and c["kv_chain_broken"] == 0
    assert c["kv_duplicate"] == 0 and c["kv_update_failed"] == 0


def test_vocabulary_larger_than_the_kernel_map_spills_and_stays_exact():
    """The reducer's kernel holds 1024 keys per job; the corpus has ~15 000: the rest go
    to the reducer's application through the fallback and are merged there."""
    result = run(3, {"mappers": 2, "reducers": 1, "words": 80_000, "vocab": 30_000,
                     "skew": 0.8, "map_entries": 1024}, systems=["aggbox", "aggbox_nocombiner"])
    assert_exact(result, ["aggbox", "aggbox_nocombiner"])
    assert result.corpus["distinct"] > 10_000
    c = kernel_counters(result)
    assert c["kv_update_failed"] > 0 and c["kv_spilled"] > 0
    assert all(s["spilled_pairs"] > 10_000 for s in result.samples)


def test_keys_longer_than_the_fixed_width_are_exact(tmp_path):
    """Keys of 16 bytes (the width), 17 and up to 1000, keys holding a zero byte, and keys
    that differ only in their last byte: all counted exactly, apart."""
    words = [b"a" * 15 + b"x", b"a" * 15 + b"y", b"a" * 16 + b"x", b"a" * 16 + b"y",
             b"b" * 40, b"c" * 1000, b"zero\0byte", b"ab", b"abc", b"short"]
    rng = np.random.default_rng(3)
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 30_000))
    (tmp_path / "long.txt").write_bytes(text)
    result = run(3, {"mappers": 2, "reducers": 1, "corpus": str(tmp_path)})
    assert_exact(result, SYSTEMS)
    assert result.corpus["distinct"] == len(words)
    c = kernel_counters(result)
    assert c["kv_spilled"] > 0 and c["kv_pairs"] > 0  # both paths were taken


def test_exact_under_5pct_loss_and_duplication_on_every_link():
    """Every link drops 5% and duplicates 5% of packets (both directions): lost pairs
    packets and ACKs are resent, and no resent or duplicated packet is counted twice,
    neither by the kernel nor by the spill path (a small map makes both busy)."""
    netem = Netem(loss_pct=5, duplicate_pct=5, seed=11)
    result = run(4, {"mappers": 3, "reducers": 1, "words": 60_000, "vocab": 5_000,
                     "map_entries": 2048}, netem=netem)
    assert_exact(result, SYSTEMS)
    c = kernel_counters(result)
    assert c["kv_duplicate"] > 0  # resent or duplicated packets: ACKed again, not re-added
    aggbox = [s for s in result.samples if s["system"].startswith("aggbox")]
    assert all(s["retransmits"] > 0 for s in aggbox)
    assert any(s["spilled_pairs"] > 0 for s in aggbox)


def test_reduce_by_key_sums_any_int64_values_when_every_member_maps_and_reduces():
    """The API beyond word count: negative and large int64 values, keys of every length,
    three members that each map and reduce (their own keys never leave the host), one
    of them without a combiner."""
    rng = np.random.default_rng(5)
    keys = [b"k%d" % i for i in range(300)] + [b"long-key-%030d" % i for i in range(20)]
    inputs = {r: [(keys[i], int(v)) for i, v in zip(rng.integers(0, len(keys), 4000),
                                                     rng.integers(-2**40, 2**40, 4000),
                                                     strict=True)]
              for r in range(3)}
    expected = [Counter() for _ in range(3)]
    for pairs in inputs.values():
        for k, v in pairs:
            expected[kv.reducer_of(k, 3)][k] += v
    results: dict[int, dict] = {}
    with NetnsTestbed(3) as tb:
        NAMESPACES.extend(tb.namespaces)
        members = tuple(Member(h.index, h.ip, h.mac) for h in tb.hosts)
        group = Group(job_id=7007, token=0x7007, members=members, rank=0, port=49200)

        # One compile at a time: BCC (LLVM) cannot compile in two threads at once.
        programs = {h.index: h.call(kv.ReduceByKeyPrograms, "eth0", map_entries=1024)
                    for h in tb.hosts}

        def member(rank: int) -> None:
            out = kv.reduce_by_key(inputs[rank], group.with_rank(rank), programs[rank],
                                   combine=rank != 1, timeout=30)
            results[rank] = out.to_dict()

        try:
            threads = [threading.Thread(target=tb.hosts[r].call, args=(member, r))
                       for r in range(3)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
        finally:
            kv.wait_lingering()
            for h in tb.hosts:
                h.call(programs[h.index].close)
    assert [results.get(r) for r in range(3)] == [dict(e) for e in expected]


# ------------------------------------------------------------ one reducer, by packet ----

JOB, TOKEN, PORT = 4242, 0x4242BEEF, 49100


class Reducer:
    """h0's kernel with a job whose members are h0 (rank 0, the reducer), h1 and h2;
    h3 belongs to no job. ``app`` is the reducer application's socket."""

    def __init__(self, tb: NetnsTestbed):
        self.tb = tb
        h0 = tb.hosts[0]
        self.programs = h0.call(lambda: kv.ReduceByKeyPrograms("eth0", map_entries=128))
        members = tuple(Member(i, h.ip, h.mac) for i, h in enumerate(tb.hosts[:3]))
        self.group = Group(job_id=JOB, token=TOKEN, members=members, rank=0, port=PORT)
        self.programs.install_job(self.group)
        self.sums = kv.KernelSums(self.programs, JOB)
        self.app = h0.call(kv.udp_socket, PORT)
        self.socks = {h.index: h.call(kv.udp_socket, PORT) for h in tb.hosts[1:]}
        for s in [self.app, *self.socks.values()]:
            s.setblocking(False)

    def close(self) -> None:
        """Close sockets and programs, then the testbed. Idempotent."""
        if not self.tb.is_up:
            return
        for s in [self.app, *self.socks.values()]:
            s.close()
        self.tb.hosts[0].call(self.programs.close)  # detaching goes by this netns's ifindex
        self.tb.down()

    def host(self, i: int) -> NetnsHost:
        return self.tb.hosts[i]

    def send(self, frm: int, data: bytes) -> None:
        self.socks[frm].sendto(data, (self.host(0).ip, PORT))

    def counters(self) -> Counter:
        return Counter({k: v for k, v in self.programs.counters().items() if v})

    def sums_now(self) -> dict[bytes, int]:
        self.sums.learn()
        values = self.sums.region["value"]
        return {k: int(values[i]) for k, i in self.sums.directory.items()}


def drain(sock: socket.socket, wait: float = 0.3) -> list[bytes]:
    got, end = [], time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        while True:
            try:
                got.append(sock.recv(4096, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
    return got


def pairs_packet(seq: int, keys: list[bytes], rank: int = 1, **changes) -> bytes:
    fields = dict(type=MsgType.KV, job_id=JOB, token=TOKEN, seq=seq, rank=rank,
                  count=len(keys))
    fields.update(changes)
    body = kv.encode_fixed(keys, np.arange(1, len(keys) + 1, dtype=np.int64))
    return Header(**fields).pack() + body


@pytest.fixture(scope="module")
def reducer():
    tb = NetnsTestbed(4).up()
    NAMESPACES.extend(tb.namespaces)
    try:
        r = Reducer(tb)
    except BaseException:
        tb.down()
        raise
    try:
        yield r
    finally:
        r.close()


def test_retransmitted_packet_is_acknowledged_again_but_counted_once(reducer):
    before = reducer.counters()
    packet = pairs_packet(1, [b"one", b"two", b"three"])  # values 1, 2, 3
    for _ in range(3):
        reducer.send(1, packet)
    acks = [HEADER.unpack_from(a) for a in drain(reducer.socks[1])]
    delta = reducer.counters() - before
    assert [(a[2], a[6], a[8]) for a in acks] == [(MsgType.KV_ACK, 1, 0)] * 3
    assert delta == Counter(accepted=1, kv_pairs=3, kv_duplicate=2, ack_sent=3)
    assert reducer.sums_now() == {b"one": 1, b"two": 2, b"three": 3}
    assert drain(reducer.app, 0.05) == []  # nothing for the application to do


def test_a_full_packet_walks_the_tail_call_chain(reducer):
    keys = [b"chain%02d" % i for i in range(60)]
    before = reducer.counters()
    reducer.send(1, pairs_packet(2, keys))
    assert len(drain(reducer.socks[1])) == 1
    delta = reducer.counters() - before
    # 60 pairs, 16 per program: the entry program's call, then 3 more links.
    assert delta == Counter(accepted=1, kv_pairs=60, kv_tail_calls=3, ack_sent=1)
    got = reducer.sums_now()
    assert all(got[k] == i + 1 for i, k in enumerate(keys))


def test_a_broken_chain_loses_nothing_its_pairs_go_up(reducer):
    chain = reducer.programs.family["kv_chain"]
    del chain[chain.Key(0)]
    try:
        before = reducer.counters()
        keys = [b"broken%02d" % i for i in range(20)]
        reducer.send(2, pairs_packet(1, keys, rank=2))
        up = drain(reducer.app)
    finally:
        walk = reducer.programs.family.load("kv_walk", reducer.programs.family._BPF.SCHED_CLS)
        chain[chain.Key(0)] = chain.Leaf(walk.fd)
    delta = reducer.counters() - before
    assert delta == Counter(accepted=1, kv_chain_broken=1, kv_spilled=20, kv_spill_packets=1)
    assert len(up) == 1 and HEADER.unpack_from(up[0])[2] == MsgType.KV_SPILL
    assert reducer.programs.spill_bits(JOB, 2, 1) == (1 << 20) - 1
    assert kv.decode_fixed(memoryview(up[0])[HEADER_SIZE:], 20)[0] == keys
    assert drain(reducer.socks[2], 0.05) == []  # the application acknowledges, not the kernel


def test_when_the_map_is_full_exactly_the_new_keys_go_up(reducer):
    """The job holds 128 keys: fill it, then send two known and two new keys."""
    reducer.sums.learn()
    room = 128 - reducer.programs.allocated(reducer.sums.slot)
    filler = [b"fill%03d" % i for i in range(room)]
    for n, start in enumerate(range(0, room, 60)):
        reducer.send(2, pairs_packet(10 + n, filler[start:start + 60], rank=2))
    drain(reducer.socks[2])
    before = reducer.counters()
    mixed = [b"one", b"new-a", b"two", b"new-b"]
    reducer.send(2, pairs_packet(20, mixed, rank=2))
    up = drain(reducer.app)
    delta = reducer.counters() - before
    assert delta == Counter(accepted=1, kv_pairs=2, kv_spilled=2, kv_update_failed=2,
                            kv_spill_packets=1)
    assert len(up) == 1 and reducer.programs.spill_bits(JOB, 2, 20) == 0b1010
    got = reducer.sums_now()
    assert got[b"one"] == 1 + 1 and got[b"two"] == 2 + 3 and b"new-a" not in got
    # A resent spilled packet goes up again (the application merges each seq once).
    reducer.send(2, pairs_packet(20, mixed, rank=2))
    assert len(drain(reducer.app)) == 1 and reducer.sums_now() == got


def _hdr(**changes) -> Header:
    fields = dict(type=MsgType.KV, job_id=JOB, token=TOKEN, seq=500, rank=1, count=1)
    fields.update(changes)
    return Header(**fields)


PAIR = kv.encode_fixed([b"forged"], np.array([1000], dtype=np.int64))

# case: (who sends: 1 = member h1, 3 = outsider h3, the datagram, the counter)
FORGED = {
    "from-a-host-outside-the-job": (3, _hdr().pack() + PAIR, "drop_non_member"),
    "wrong-token": (1, _hdr(token=TOKEN ^ 1).pack() + PAIR, "drop_bad_token"),
    "rank-that-is-not-the-senders": (1, _hdr(rank=2).pack() + PAIR, "drop_non_member"),
    "rank-outside-the-group": (1, _hdr(rank=3).pack() + PAIR, "drop_non_member"),
    "the-reducers-own-rank": (1, _hdr(rank=0).pack() + PAIR, "drop_non_member"),
    "unknown-job": (1, _hdr(job_id=JOB + 1).pack() + PAIR, "drop_unknown_job"),
    "version-2": (1, _hdr(version=2).pack() + PAIR, "drop_bad_version"),
    "spill-from-the-wire": (1, _hdr(type=MsgType.KV_SPILL).pack() + PAIR, "drop_bad_type"),
    "broadcast-data-on-a-reduce-port": (1, _hdr(type=MsgType.DATA).pack() + PAIR,
                                        "drop_bad_type"),
    "unknown-type": (1, _hdr(type=0xEE).pack() + PAIR, "drop_bad_type"),
    "shorter-than-the-header": (1, _hdr().pack()[:20], "drop_truncated"),
    "count-beyond-the-payload": (1, _hdr(count=2).pack() + PAIR, "drop_truncated"),
    "half-a-pair": (1, _hdr().pack() + PAIR[:KV_PAIR_SIZE - 1], "drop_truncated"),
    "zero-pairs": (1, _hdr(count=0).pack(), "drop_truncated"),
    "more-pairs-than-the-spill-bitmap": (1, _hdr(count=65).pack() + PAIR * 10,
                                         "drop_truncated"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_malformed_and_non_member_packets_are_dropped_and_counted(reducer, case):
    who, data, counter = FORGED[case]
    before = reducer.counters()
    allocated = reducer.programs.allocated(reducer.sums.slot)
    reducer.send(who, data)
    time.sleep(0.05)
    assert reducer.counters() - before == Counter({counter: 1})
    assert reducer.programs.allocated(reducer.sums.slot) == allocated  # no key taken
    assert b"forged" not in reducer.sums_now()
    assert drain(reducer.app, 0.05) == [] and drain(reducer.socks[who], 0.05) == []


def test_traffic_that_is_not_reduce_by_key_is_left_alone(reducer):
    """Other ports pass untouched (TC_ACT_UNSPEC): the program neither drops nor counts."""
    other = reducer.host(0).call(kv.udp_socket, 40_000)
    try:
        before = reducer.counters()
        reducer.socks[1].sendto(_hdr().pack() + PAIR, (reducer.host(0).ip, 40_000))
        assert len(drain(other)) == 1
        assert reducer.counters() == before
    finally:
        other.close()


# ------------------------------------------------------------ issue 11: forged traffic --


@pytest.mark.parametrize("data", [b"\x12\x34 a plain datagram, not AggBox, longer than 32 B",
                                  b"tiny"], ids=["long", "short"])
def test_non_aggbox_udp_to_a_reduce_port_reaches_its_socket(reducer, data):
    """Bad magic is somebody else's datagram (the ports lie in the ephemeral range)."""
    before = reducer.counters()
    reducer.send(1, data)  # to the job's own port: the application's socket
    got = drain(reducer.app)
    for port in (49000, 49999):  # both ends of kv.DEFAULT_PORTS
        other = reducer.host(0).call(kv.udp_socket, port)
        try:
            reducer.socks[1].sendto(data, (reducer.host(0).ip, port))
            got += drain(other)
        finally:
            other.close()
    assert got == [data] * 3
    assert reducer.counters() - before == Counter(passed_not_ours=3)


def next_seq(reducer, rank: int) -> int:
    taken, spilled = reducer.programs.stream_counts(reducer.sums.slot, rank)
    return taken + spilled + 1


def test_a_members_ip_from_another_mac_is_refused(reducer):
    h0, h1, h3 = reducer.host(0), reducer.host(1), reducer.host(3)
    seq = next_seq(reducer, 1)
    before = reducer.counters()
    send_frame(h3, raw_frame(h3.mac, h0.mac, h1.ip, h0.ip, PORT,
                             pairs_packet(seq, [b"spoofed"], rank=1)))
    time.sleep(0.05)
    assert reducer.counters() - before == Counter(drop_wrong_mac=1)
    assert b"spoofed" not in reducer.sums_now() and drain(reducer.app, 0.05) == []


def test_kv_to_the_broadcast_mac_is_checked_and_dropped(reducer):
    h0, h1 = reducer.host(0), reducer.host(1)
    before = reducer.counters()
    send_frame(h1, raw_frame(h1.mac, "ff:ff:ff:ff:ff:ff", h1.ip, h0.ip, PORT,
                             pairs_packet(next_seq(reducer, 1), [b"bcast"], rank=1,
                                          flags=int(Flags.KV_LONG))))
    time.sleep(0.05)
    assert reducer.counters() - before == Counter(drop_not_mine=1)
    assert drain(reducer.app, 0.05) == []  # the application never merges it


def test_a_far_ahead_seq_cannot_poison_the_dedup_ring(reducer):
    """A seq RING x 100 ahead maps to the ring slot of the sender's next real seq: taken,
    it would make that real seq look stale for ever (its sender's job times out)."""
    real = next_seq(reducer, 1)
    before = reducer.counters()
    reducer.send(1, pairs_packet(real + 100 * kv.RING, [b"poison"]))
    # (b"poison" would spill, the map is full by now: what matters is the ring slot.)
    assert drain(reducer.socks[1], 0.1) == []  # no ACK for it
    assert reducer.counters() - before == Counter(kv_out_of_window=1)
    sums = reducer.sums_now()
    reducer.send(1, pairs_packet(real, [b"one"]))  # a key the (full) map holds: no spill
    acks = [HEADER.unpack_from(a) for a in drain(reducer.socks[1])]
    assert [(a[2], a[6]) for a in acks] == [(MsgType.KV_ACK, real)]
    got = reducer.sums_now()
    assert got[b"one"] == sums.get(b"one", 0) + 1 and b"poison" not in got


def test_a_chain_that_dies_does_not_leave_its_seq_busy_for_ever(reducer):
    """A wrong program in the chain (here the entry program itself, which finds the seq
    BUSY and drops it) ends the packet without finishing it: a resend must get through."""
    chain = reducer.programs.family["kv_chain"]
    walk_fd = chain[chain.Key(0)].value
    ingress = reducer.programs.family.load("kv_ingress", reducer.programs.family._BPF.SCHED_CLS)
    seq = next_seq(reducer, 1)
    sums = reducer.sums_now()
    packet = pairs_packet(seq, [b"one", b"two"])  # keys the (full) map holds: no spill
    chain[chain.Key(0)] = chain.Leaf(ingress.fd)
    try:
        reducer.send(1, packet)
        assert drain(reducer.socks[1], 0.1) == []  # died in the chain
    finally:
        walk = reducer.programs.family.load("kv_walk", reducer.programs.family._BPF.SCHED_CLS)
        chain[chain.Key(0)] = chain.Leaf(walk.fd)
    assert walk_fd  # the chain was installed before
    time.sleep(0.4)  # a chain runs in microseconds: a BUSY this old is dead
    before = reducer.counters()
    reducer.send(1, packet)
    acks = [HEADER.unpack_from(a) for a in drain(reducer.socks[1])]
    assert [(a[2], a[6]) for a in acks] == [(MsgType.KV_ACK, seq)]
    assert reducer.counters() - before == Counter(accepted=1, kv_busy_reclaimed=1, kv_pairs=2,
                                                  ack_sent=1)
    got = reducer.sums_now()
    assert got[b"one"] == sums.get(b"one", 0) + 1 and got[b"two"] == sums.get(b"two", 0) + 2


@pytest.mark.parametrize("broken", ["ip", "udp"])
def test_pairs_with_a_broken_checksum_are_not_added(reducer, broken):
    """The reducer's kernel adds pairs at TC ingress, before the stack verifies anything:
    a corrupted packet must not change a sum (nor be acknowledged)."""
    h0, h1 = reducer.host(0), reducer.host(1)
    seq = next_seq(reducer, 1)
    sums = reducer.sums_now()
    before = reducer.counters()
    send_frame(h1, raw_frame(h1.mac, h0.mac, h1.ip, h0.ip, PORT,
                             pairs_packet(seq, [b"one"], rank=1),
                             break_ip=broken == "ip", break_udp=broken == "udp"))
    time.sleep(0.05)
    assert reducer.counters() - before == Counter(drop_bad_csum=1)
    assert reducer.sums_now() == sums and drain(reducer.socks[1], 0.05) == []
    # The same frame with correct checksums is taken.
    send_frame(h1, raw_frame(h1.mac, h0.mac, h1.ip, h0.ip, PORT,
                             pairs_packet(seq, [b"one"], rank=1)))
    acks = [HEADER.unpack_from(a) for a in drain(reducer.socks[1])]
    assert [(a[2], a[6]) for a in acks] == [(MsgType.KV_ACK, seq)]
    assert reducer.sums_now()[b"one"] == sums.get(b"one", 0) + 1


# ------------------------------------------------------------ nothing left behind -------


def test_closing_the_programs_leaves_nothing_attached():
    with NetnsTestbed(1) as tb:
        NAMESPACES.extend(tb.namespaces)
        h0 = tb.hosts[0]
        programs = h0.call(lambda: kv.ReduceByKeyPrograms("eth0", map_entries=128))
        attached = h0.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
        h0.call(programs.close)
        left = h0.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
        qdisc = h0.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "kv_ingress" in attached and "pref 3" in attached
    assert left.strip() == "" and "clsact" not in qdisc


def test_no_namespace_outlives_the_tests(reducer):
    """Runs last: once the shared reducer is closed, none of this module's namespaces
    is listed."""
    reducer.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert NAMESPACES and not set(NAMESPACES) & set(listed)


def test_group_json_round_trip_keeps_the_roles():
    g = Group(job_id=1, token=2, members=(Member(0, "10.0.0.1"),), rank=0,
              options={"mappers": [0], "reducers": [0]})
    assert Group.from_dict(json.loads(g.to_json())).options == g.options
