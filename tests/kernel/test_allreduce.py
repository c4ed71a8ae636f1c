"""In-kernel allreduce (bpf/aggregate.c + aggbox/collectives/allreduce.py) on the real kernel.

One testbed for the module: h0 is the aggregator, whose :class:`AggregatorPrograms` the
test process holds (compiled once, attached from a thread inside h0's namespace); h1..h8
each run tests/kernel/allreduce_node.py, a long-lived worker process holding one
:class:`Allreducer` per job; h9 is in no group (it forges packets, or is a member that
never runs or gets killed). Each test installs its own jobs on the one aggregator and
removes them after, so the tests share the programs without sharing state. The MTU is
65000 so that blocks of several tail-call stages fit in one packet; the other tests use
blocks of K = 256 values.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from allreduce_node import WorkerProcess, decode, float_input, int32_input, negative_input
from bcc import BPF

from aggbox import auth, quant
from aggbox.collectives.allreduce import (
    CHUNK,
    F_ALIGN,
    F_AUTH,
    AggregatorPrograms,
    Allreducer,
    chain_length,
    make_group,
    max_block,
    result_delivery,
)
from aggbox.collectives.group import Group, Member
from aggbox.protocol import HEADER_SIZE, MAGIC, VERSION, Header, MsgType
from aggbox.testbed import Netem, NetnsTestbed
from aggbox.testbed.netns import NetnsHost

pytestmark = pytest.mark.kernel

HOSTS = 10  # h0 the aggregator, h1..h8 workers, h9 in no group
WORKERS = tuple(range(1, 9))
OUTSIDER = 9
MTU = 65000
K = 256
PORT = 48000
SIZES = (1, 255, 257, 1000, 4097, 40000)  # 40000: 157 blocks, each of 32 slots reused


@dataclass
class Box:
    tb: NetnsTestbed
    programs: AggregatorPrograms
    workers: dict[int, WorkerProcess]
    workdir: Path

    def host(self, index: int) -> NetnsHost:
        return self.tb.hosts[index]

    def counters(self) -> dict[str, int]:
        return self.programs.counters()


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("allreduce")
    with NetnsTestbed(HOSTS, mtu=MTU) as tb:
        agg = tb.hosts[0]
        workers: dict[int, WorkerProcess] = {}
        programs = None
        try:
            for i in WORKERS:  # they start while the aggregator's programs compile
                workers[i] = WorkerProcess(tb.hosts[i], workdir)
            programs = agg.call(lambda: AggregatorPrograms(agg.ifname))
            for node in workers.values():
                assert node.reply(wait=120)["event"] == "ready"
            yield Box(tb, programs, workers, workdir)
        finally:
            for node in workers.values():
                node.quit()
            if programs is not None:
                agg.call(programs.close)


def as_dict(group: Group, rank: int) -> dict:
    return json.loads(group.with_rank(rank).to_json())


class Job:
    """One job installed on the aggregator, with an Allreducer per member that runs one.

    ``hosts`` are the members' host indices in rank order; ``nodes`` overrides which
    process plays a host (a member with no process never calls)."""

    def __init__(self, box: Box, hosts: list[int], job_id: int, token: int, port: int = PORT,
                 block: int = K, scale: str = "align", timeout: float = 10.0,
                 name: str = "job", nodes: dict[int, WorkerProcess | None] | None = None,
                 results: str | None = None, key: bytes | None = None, first_seq: int = 0,
                 io: str = "c"):
        """``io="python"``: the workers' socket loops in Python, as on a machine without
        aggbox/edge.c (the default takes edge.c's wherever it builds)."""
        self.box, self.name, self.hosts = box, name, hosts
        agg = box.host(0)
        members = [Member(rank=r, ip=box.host(h).ip, mac=box.host(h).mac)
                   for r, h in enumerate(hosts)]
        self.group = make_group(job_id, token, members, Member(0, agg.ip, agg.mac), rank=0,
                                port=port, ifname=agg.ifname)
        if results is not None:  # else the default delivery (DEFAULT_RESULTS)
            self.group = replace(self.group, options={"results": results})
        if key is not None:  # an authenticated job (aggbox/auth.py)
            self.group = replace(self.group, auth_key=key.hex())
        self.results = result_delivery(self.group)
        self.index = box.programs.install_job(self.group)
        chosen = {**box.workers, **(nodes or {})}
        self.nodes = {r: chosen[h] for r, h in enumerate(hosts) if chosen.get(h) is not None}
        self._open: list[WorkerProcess] = []
        try:
            for r, node in self.nodes.items():
                node.call("reducer", name=name, group=as_dict(self.group, r), block=block,
                          timeout=timeout, scale=scale, first_seq=first_seq, io=io)
                self._open.append(node)
        except BaseException:
            self.close()
            raise

    @property
    def n(self) -> int:
        return len(self.hosts)

    def copies_per_block(self) -> int:
        """The copies of a result the aggregator's kernel sends: one to the group, or
        one per worker."""
        return 1 if self.results == "multicast" else self.n

    def post(self, calls: list[dict], ranks=None) -> None:
        for r in self.nodes if ranks is None else ranks:
            self.nodes[r].post("run", name=self.name, calls=calls)

    def collect(self, ranks=None, check: bool = True, wait: float = 120.0) -> dict[int, dict]:
        # Every answer is read before any failure is raised: a worker's unread answer
        # would otherwise be taken as the answer to the next test's command.
        answers = {r: self.nodes[r].reply(wait=wait, check=False)
                   for r in (self.nodes if ranks is None else ranks)}
        failed = {r: f"{a['error']}: {a['message']}" for r, a in answers.items() if not a["ok"]}
        if check and failed:
            raise AssertionError(f"job {self.group.job_id} failed at ranks {failed}")
        return answers

    def run(self, calls: list[dict]) -> dict[int, list[dict]]:
        """Every member runs ``calls``; per rank, the calls' answers."""
        self.post(calls)
        return {r: a["results"] for r, a in self.collect().items()}

    def close(self) -> None:
        for node in self._open:
            if node.proc.poll() is None:
                node.call("close", name=self.name, check=False)
        self._open.clear()
        self.box.programs.remove_job(self.group.job_id)


def int32_call(size: int, seed: int, kind: str = "int32") -> dict:
    return {"kind": kind, "size": size, "seed": seed}


def float_call(size: int, seed: int, dist: str) -> dict:
    return {"kind": "float", "size": size, "seed": seed, "dist": dist}


def int32_reference(n: int, size: int, seed: int) -> np.ndarray:
    """The numpy int64 sum of the members' inputs, cast (wrapped) to int32."""
    total = np.sum([int32_input(r, size, seed).astype(np.int64) for r in range(n)], axis=0)
    return total.astype(np.int32)


def float_reference(n: int, size: int, dist: str, seed: int) -> np.ndarray:
    return np.sum([float_input(r, size, dist, seed).astype(np.float64) for r in range(n)],
                  axis=0)


def results_of(answers: dict[int, list[dict]], k: int) -> list[np.ndarray]:
    """Call ``k``'s result at every rank."""
    return [decode(a[k]["result"], a[k]["dtype"]) for a in answers.values()]


def assert_exact_int32(answers: dict[int, list[dict]], calls: list[dict], n: int) -> None:
    for k, call in enumerate(calls):
        want = int32_reference(n, call["size"], call["seed"])
        for rank, got in zip(answers, results_of(answers, k), strict=True):
            assert got.dtype == np.int32 and got.shape == want.shape
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, (f"call {k} (size {call['size']}), rank {rank}: "
                                   f"{bad.size} wrong sums, first at index {bad[:5]}")


def assert_within_bound(answers: dict[int, list[dict]], k: int, call: dict, n: int) -> None:
    want = float_reference(n, call["size"], call["dist"], call["seed"])
    first = None
    for rank, a in answers.items():
        got = decode(a[k]["result"], a[k]["dtype"])
        bound = decode(a[k]["bound"], "float64")
        assert got.dtype == np.float32 and got.shape == want.shape
        err = np.abs(got.astype(np.float64) - want)
        over = np.flatnonzero(err > bound)
        assert over.size == 0, (f"rank {rank}: {over.size} elements beyond the bound, e.g. "
                                f"index {over[0]}: error {err[over[0]]:.3g} > "
                                f"bound {bound[over[0]]:.3g}")
        if first is None:
            first = got
        assert np.array_equal(got, first), f"rank {rank} got another result than rank 0"


def blocks(sizes, block: int = K) -> int:
    return sum(-(-s // block) for s in sizes)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


DROPS = ("drop_truncated", "drop_bad_magic", "drop_bad_version", "drop_bad_type",
         "drop_unknown_job", "drop_bad_token", "drop_non_member", "drop_ip_options",
         "drop_gso", "agg_stale_round")


# ------------------------------------------------------------ 1. exact int32 sums


@pytest.mark.parametrize(("n", "io"), [(2, "c"), (3, "c"), (3, "python"), (5, "c"), (8, "c")])
def test_int32_sums_are_exact_for_2_to_8_workers_and_sizes_off_the_block(box, n, io):
    hosts = random.Random(n).sample(WORKERS, n)  # a different subset and rank order each
    job = Job(box, hosts, job_id=1000 + n, token=0x1000ABC + n, io=io)
    calls = [int32_call(s, 10 * n + i) for i, s in enumerate(SIZES)]
    calls.append(int32_call(777, 99, kind="reduce_int32"))  # the lower-level entry point
    before = box.counters()
    try:
        answers = job.run(calls)
    finally:
        job.close()
    after = box.counters()
    assert_exact_int32(answers, calls, n)
    d = delta(after, before)
    total = blocks(c["size"] for c in calls)
    # Each block completed once and every worker's block was added exactly once, however
    # many retransmissions a busy machine provoked.
    assert d["agg_completed"] == total
    assert d["agg_added"] == n * total
    assert d["fanout_copies"] == job.copies_per_block() * total
    assert not {k: d[k] for k in DROPS if k in d}, d


def test_sums_stay_exact_across_the_32_bit_seq_wrap(box):
    """A long job's block seqs pass 2**32 (a few days of 25 MiB buckets): the rounds in the
    kernel wrap with them and the workers' seq arithmetic too. Calls before, across and
    after the wrap (the job is installed fresh there, as after an aggregator restart)."""
    job = Job(box, [1, 2, 3], job_id=1090, token=0x1090ABC, first_seq=2**32 - 200)
    calls = [int32_call(40000, 1091), int32_call(40000, 1092), int32_call(4097, 1093),
             float_call(20000, 1094, "gaussian")]  # 157, 157, 17 and 79 blocks
    before = box.counters()
    try:
        answers = job.run(calls)
    finally:
        job.close()
    assert_exact_int32(answers, calls[:3], 3)
    assert_within_bound(answers, 3, calls[3], 3)
    d = delta(box.counters(), before)
    assert d["agg_completed"] == blocks(c["size"] for c in calls)
    assert not d.get("agg_stale_round"), d


# ------------------------------------------------------------ 2. float error bound


DISTS = ["uniform", "gaussian", "heavy", "zeros", "sparse", "scales"]


# sparse and scales: contributions of one block at exponents 10 to 200 bits apart, in
# any order: every alignment mode of bpf/aggregate.c's chunk_mode (shift either side,
# shifted out entirely either side) on biased values
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("scale", ["align", "agree"])
def test_float_error_is_within_the_documented_bound(box, scale, dist):
    n = 5
    job_id = 2000 + 10 * ["align", "agree"].index(scale) + DISTS.index(dist)
    job = Job(box, [3, 8, 1, 6, 4], job_id=job_id, token=job_id * 7919, scale=scale)
    calls = [float_call(3001, 5, dist), float_call(257, 6, dist)]
    try:
        answers = job.run(calls)
    finally:
        job.close()
    for k, call in enumerate(calls):
        assert_within_bound(answers, k, call, n)
        got = results_of(answers, k)[0]
        bound = decode(answers[0][k]["bound"], "float64")
        want = float_reference(n, call["size"], dist, call["seed"])
        if dist == "zeros":
            assert not got.any()  # zeros give exact zeros
        else:
            # The bound is a real one (a few float32 ulps of the block's peak), not a
            # vacuous one, and the result is not trivially exact.
            peak = np.abs(want).max()
            assert bound.max() <= 1e-6 * peak, (bound.max(), peak)


# ------------------------------------------------------------ 3. loss, duplication, reorder


@pytest.mark.parametrize("io", ["c", "python"])
def test_sums_are_exact_under_loss_duplication_and_reordering(box, io):
    n = 8
    job = Job(box, list(WORKERS), job_id=3003, token=0x3003BEEF, io=io)
    calls = [int32_call(40000, 31), int32_call(4097, 32), int32_call(1, 33),
             int32_call(20000, 34)]
    fcall = float_call(5000, 35, "gaussian")
    before = box.counters()
    try:
        box.tb.set_netem(Netem(loss_pct=5, duplicate_pct=5, reorder_pct=5, seed=3003))
        try:
            answers = job.run([*calls, fcall])
            stats = {r: node.call("stats", name=job.name)["stats"]
                     for r, node in job.nodes.items()}
        finally:
            box.tb.set_netem(None)
    finally:
        job.close()
    after = box.counters()
    assert_exact_int32({r: a[:len(calls)] for r, a in answers.items()}, calls, n)
    assert_within_bound(answers, len(calls), fcall, n)
    d = delta(after, before)
    total = blocks([c["size"] for c in calls] + [fcall["size"]])
    assert d["agg_completed"] == total
    assert d["agg_added"] == n * total  # duplicates and retransmissions never added twice
    # ... and the impairment really bit: workers resent, the kernel saw copies of blocks
    # it had counted and answered them (from the finished copy, or with a status).
    assert any(s["retransmits"] > 0 for s in stats.values()), stats
    assert d.get("agg_duplicate", 0) > 0, d
    assert d.get("agg_late_reply", 0) + d.get("agg_status", 0) > 0, d


@pytest.mark.parametrize("io", ["c", "python"])
def test_a_call_longer_than_the_timeout_completes_while_results_keep_coming(box, io):
    # The timeout bounds a stall, not a call: under loss a call resends after idle RTOs
    # for longer than `timeout` in all, and every result that came counts as progress.
    # The longest stall seen at this loss was 0.22 s (of ~3700, six runs); a call of
    # 100 000 values took 0.6-1.2 s.
    timeout = 1.5
    job = Job(box, list(WORKERS)[:4], job_id=3013, token=0x3013BEEF, timeout=timeout, io=io)
    calls = [int32_call(400000, 41)]
    try:
        box.tb.set_netem(Netem(loss_pct=20, seed=3013))
        try:
            t0 = time.monotonic()
            answers = job.run(calls)
            elapsed = time.monotonic() - t0
        finally:
            box.tb.set_netem(None)
    finally:
        job.close()
    assert_exact_int32(answers, calls, 4)
    print(f"\n[timing] {elapsed:.2f} s against a {timeout} s timeout")
    assert elapsed > timeout, elapsed  # else this test could not fail


# ------------------------------------------------------------ 4. two concurrent jobs


def test_two_concurrent_jobs_on_one_aggregator_are_both_correct(box):
    hosts = [1, 2, 3, 4, 5, 6]
    a = Job(box, hosts, job_id=4001, token=0x4001, port=48000, name="a")
    b = Job(box, hosts[::-1], job_id=4002, token=0x4002, port=48001, name="b")
    calls_a = [int32_call(40000, 41), int32_call(257, 42), int32_call(9000, 43)]
    calls_b = [int32_call(30000, 51), int32_call(4097, 52), float_call(3000, 53, "heavy")]
    before = box.counters()
    try:
        assert a.index != b.index
        # Each worker runs its calls of both jobs at the same time, in two threads.
        host_rank = {job.name: {h: r for r, h in enumerate(job.hosts)} for job in (a, b)}
        for h in hosts:
            box.workers[h].post("parallel", runs=[{"name": "a", "calls": calls_a},
                                                  {"name": "b", "calls": calls_b}])
        replies = {h: box.workers[h].reply(wait=120)["runs"] for h in hosts}
    finally:
        a.close()
        b.close()
    after = box.counters()
    for h, (ra, rb) in replies.items():
        assert ra["ok"] and rb["ok"], (h, ra.get("message"), rb.get("message"))
    ans_a = {host_rank["a"][h]: replies[h][0]["results"] for h in hosts}
    ans_b = {host_rank["b"][h]: replies[h][1]["results"] for h in hosts}
    ans_a = dict(sorted(ans_a.items()))
    ans_b = dict(sorted(ans_b.items()))
    assert_exact_int32(ans_a, calls_a, len(hosts))
    assert_exact_int32({r: v[:2] for r, v in ans_b.items()}, calls_b[:2], len(hosts))
    assert_within_bound(ans_b, 2, calls_b[2], len(hosts))
    d = delta(after, before)
    total = blocks([c["size"] for c in calls_a] + [c["size"] for c in calls_b])
    assert d["agg_completed"] == total
    assert d["agg_added"] == len(hosts) * total
    assert not {k: d[k] for k in DROPS if k in d}, d


# ------------------------------------------------------------ 5. NaN and Inf refused


def test_nan_or_inf_input_is_refused_before_anything_is_sent(box):
    n = 3
    job = Job(box, [2, 5, 7], job_id=5005, token=0x5005)
    try:
        for what, index in (("nan", 17), ("inf", 3000)):
            before = box.counters()
            poisoned = {**float_call(3001, 55, "gaussian"), "poison": [index, what]}
            job.post([poisoned])
            answers = job.collect(check=False)
            time.sleep(0.2)  # anything sent would have reached the aggregator by now
            assert box.counters() == before, delta(box.counters(), before)
            for rank, a in answers.items():
                assert not a["ok"] and a["error"] == "QuantizationError", (rank, a)
                assert "NaN or Inf" in a["message"] and "nothing was sent" in a["message"]
                assert a["stats"]["blocks"] == 0, (rank, a["stats"])
        # The job is unharmed: its next call starts at block 0 and is exact.
        calls = [int32_call(1000, 56)]
        answers = job.run(calls)
        assert_exact_int32(answers, calls, n)
        fcall = float_call(3001, 57, "gaussian")
        assert_within_bound(job.run([fcall]), 0, fcall, n)
    finally:
        job.close()


# ------------------------------------------------------------ 6. forged packets


FORGED_SEQ = 3  # a block the job really uses: accepted, the forgery would corrupt it
FORGED_VALUES = np.full(4, 0x01010101, dtype=np.int32).tobytes()


def forged(group: Group, **changes) -> Header:
    """An AGG header from rank 0 (h1) that the aggregator would accept but for ``changes``."""
    fields = dict(type=MsgType.AGG, job_id=group.job_id, token=group.token, seq=FORGED_SEQ,
                  rank=0, count=4)
    fields.update(changes)
    return Header(**fields)


# case: (who sends: "member" is rank 0 = h1, "outsider" h9; the datagram; the counter;
# IP options to set on the socket).
IP_NOP_OPTIONS = bytes([1, 1, 1, 0])  # NOP NOP NOP END: a 24-byte IPv4 header
FORGED = {
    "from-a-host-outside-the-group": ("outsider", lambda g: forged(g).pack() + FORGED_VALUES,
                                      "drop_non_member", None),
    "rank-of-another-member": ("member", lambda g: forged(g, rank=1).pack() + FORGED_VALUES,
                               "drop_non_member", None),
    "rank-outside-the-group": ("member", lambda g: forged(g, rank=3).pack() + FORGED_VALUES,
                               "drop_non_member", None),
    "wrong-token": ("member", lambda g: forged(g, token=g.token ^ 0x5A5A).pack()
                    + FORGED_VALUES, "drop_bad_token", None),
    "wrong-job": ("member", lambda g: forged(g, job_id=g.job_id + 1).pack() + FORGED_VALUES,
                  "drop_unknown_job", None),
    "outsider-with-wrong-job": ("outsider", lambda g: forged(g, job_id=77).pack()
                                + FORGED_VALUES, "drop_unknown_job", None),
    # Not AggBox's: passed through untouched to whatever socket holds the port (issue 11).
    "bad-magic": ("member", lambda g: forged(g, magic=0x12345678).pack() + FORGED_VALUES,
                  "passed_not_ours", None),
    "bad-version": ("member", lambda g: forged(g, version=2).pack() + FORGED_VALUES,
                    "drop_bad_version", None),
    "unknown-type": ("member", lambda g: forged(g, type=0xEE).pack() + FORGED_VALUES,
                     "drop_bad_type", None),
    "result-sent-by-a-worker": ("member", lambda g: forged(g, type=MsgType.AGG_RESULT).pack()
                                + FORGED_VALUES, "drop_bad_type", None),
    "shorter-than-the-header": ("member", lambda g: forged(g).pack()[:HEADER_SIZE - 12],
                                "drop_truncated", None),
    "outsider-truncated": ("outsider", lambda g: forged(g).pack()[:5], "drop_truncated",
                           None),
    "count-beyond-the-payload": ("member", lambda g: forged(g, count=5).pack()
                                 + FORGED_VALUES, "drop_truncated", None),
    "count-zero": ("member", lambda g: forged(g, count=0).pack() + FORGED_VALUES,
                   "drop_truncated", None),
    "count-above-the-largest-block": ("member", lambda g: forged(g, count=40000).pack()
                                      + FORGED_VALUES, "drop_truncated", None),
    "ip-options": ("member", lambda g: forged(g).pack() + FORGED_VALUES, "drop_ip_options",
                   IP_NOP_OPTIONS),
}


def send_raw(host: NetnsHost, dst: str, datagrams: list[tuple[bytes, bytes | None]],
             gap: float = 0.0, stop: threading.Event | None = None) -> int:
    """Send each (datagram, IP options) from ``host``, in a loop until ``stop`` is set if
    given; returns how many rounds were sent."""
    def go() -> int:
        socks = {}
        try:
            rounds = 0
            while True:
                for data, opts in datagrams:
                    if opts not in socks:
                        socks[opts] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        if opts:
                            socks[opts].setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, opts)
                    socks[opts].sendto(data, (dst, PORT))
                    if gap:
                        time.sleep(gap)
                rounds += 1
                if stop is None or stop.is_set():
                    return rounds
        finally:
            for s in socks.values():
                s.close()

    return host.call(go)


def wait_for(box: Box, want: dict[str, int], wait: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        now = box.counters()
        if all(now[k] >= v for k, v in want.items()):
            break
        time.sleep(0.02)
    time.sleep(0.05)  # let anything else the packet caused happen before comparing
    return box.counters()


@pytest.fixture(scope="class")
def forgery(box):
    """Job 6006: ranks 0, 1, 2 on h1, h2, h3; h9 is outside. One call already ran."""
    job = Job(box, [1, 2, 3], job_id=6006, token=0x6006ABCD)
    try:
        calls = [int32_call(2000, 60)]  # blocks 0..7: FORGED_SEQ's slot is in use
        assert_exact_int32(job.run(calls), calls, job.n)
        yield job
    finally:
        job.close()


class TestForgedPackets:
    """Forged packets are counted once, in the right counter, and change nothing."""

    def sender(self, job: Job, who: str) -> NetnsHost:
        return job.box.host(job.hosts[0] if who == "member" else OUTSIDER)

    @pytest.mark.parametrize("case", list(FORGED))
    def test_a_forged_packet_is_counted_in_its_counter_and_dropped(self, forgery, case):
        who, make, counter, opts = FORGED[case]
        box = forgery.box
        before = box.counters()
        send_raw(self.sender(forgery, who), box.host(0).ip, [(make(forgery.group), opts)])
        after = wait_for(box, {counter: before[counter] + 1})
        assert delta(after, before) == {counter: 1}  # nothing accepted, added or answered

    def test_forged_packets_during_and_between_calls_do_not_corrupt_the_job(self, forgery):
        box, job = forgery.box, forgery
        by_sender: dict[str, list] = {"member": [], "outsider": []}
        want: dict[str, int] = {}
        for who, make, _counter, opts in FORGED.values():
            by_sender[who].append((make(job.group), opts))
        # Between two calls: every forgery once (the job's next block is FORGED_SEQ + 5).
        before = box.counters()
        for who, datagrams in by_sender.items():
            send_raw(self.sender(job, who), box.host(0).ip, datagrams)
        # During calls: both senders forge in a loop until every worker has its results.
        stop = threading.Event()
        rounds: dict[str, int] = {}

        def forge(who: str) -> None:
            rounds[who] = send_raw(self.sender(job, who), box.host(0).ip, by_sender[who],
                                   gap=0.0005, stop=stop)

        threads = [threading.Thread(target=forge, args=(who,)) for who in by_sender]
        calls = [int32_call(40000, 61), int32_call(3, 62), int32_call(20000, 63)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.05)
            answers = job.run(calls)
        finally:
            stop.set()
            for t in threads:
                t.join()
        for who, _make, counter, _opts in FORGED.values():
            want[counter] = want.get(counter, 0) + 1 + rounds[who]
        after = wait_for(box, {k: before[k] + v for k, v in want.items()})
        assert_exact_int32(answers, calls, job.n)
        d = delta(after, before)
        assert {k: d.get(k, 0) for k in want} == want
        assert d["agg_added"] == job.n * blocks(c["size"] for c in calls)
        # ... and after them, the job still sums exactly.
        calls = [int32_call(1000, 64)]
        assert_exact_int32(job.run(calls), calls, job.n)


# ------------------------------------------------------------ 7. a worker that dies


def test_a_killed_worker_gives_the_others_a_timeout_naming_it_and_the_next_job_runs(box):
    victim = WorkerProcess(box.host(OUTSIDER), box.workdir, tag="-victim")
    try:
        assert victim.reply(wait=60)["event"] == "ready"
        job = Job(box, [1, 2, OUTSIDER], job_id=7007, token=0x7007,
                  timeout=2.0, nodes={OUTSIDER: victim})
        try:
            first, second = int32_call(5000, 71), int32_call(40000, 72)
            job.post([first, second], ranks=[0, 1])
            job.post([first], ranks=[2])
            ok = job.collect(ranks=[2])[2]["results"]  # the victim took part in call 1 ...
            victim.kill()  # ... and dies: SIGKILL, before its first block of call 2
            answers = job.collect(ranks=[0, 1], check=False, wait=60)
        finally:
            job.close()
        dead_index = job.index
    finally:
        victim.kill()
    assert_exact_int32({2: ok}, [first], 3)
    for rank, a in answers.items():
        assert not a["ok"] and a["error"] == "CollectiveTimeout", (rank, a)
        assert a["done"] == 1  # the first call had succeeded
        assert a["missing"] == [2], a
        assert f"rank 2 ({box.host(OUTSIDER).ip})" in a["message"], a["message"]
        assert "rank 0" not in a["message"] and "rank 1" not in a["message"]
        # It gives up after its 2 s without progress, in a bounded time (generous: the
        # machine is shared, and the back-off adds up to 0.5 s).
        assert 2.0 <= a["elapsed"] < 15.0, a["elapsed"]
    # The next job on the same aggregator, no restart: it gets the dead job's slots back.
    nxt = Job(box, [1, 2, 3], job_id=7008, token=0x7008)
    try:
        assert nxt.index == dead_index
        calls = [int32_call(40000, 73), int32_call(300, 74)]
        assert_exact_int32(nxt.run(calls), calls, 3)
    finally:
        nxt.close()


def test_a_member_that_never_calls_makes_the_others_time_out_naming_it(box):
    job = Job(box, [4, OUTSIDER, 5], job_id=7009, token=0x7009, timeout=2.0,
              nodes={OUTSIDER: None})  # rank 1 (h9) runs nothing
    try:
        job.post([int32_call(1000, 75)])
        answers = job.collect(check=False, wait=60)
    finally:
        job.close()
    assert set(answers) == {0, 2}
    for rank, a in answers.items():
        assert not a["ok"] and a["error"] == "CollectiveTimeout", (rank, a)
        assert a["missing"] == [1], a
        assert f"rank 1 ({box.host(OUTSIDER).ip})" in a["message"], a["message"]
        assert 2.0 <= a["elapsed"] < 15.0, a["elapsed"]



def test_a_restarted_aggregator_is_named_as_the_cause_of_a_stuck_call(box):
    """A restarted aggregator has lost its partial sums: a worker whose block the old one
    had answered never sends it again, and the others wait for it. Every reply carries
    the job's installation epoch, so the waiting worker's error names the restart, not
    the worker that did nothing wrong (the chaos cell allreduce/aggregator-killed-
    restarted named that worker whenever the restart fell between two sends)."""
    job = Job(box, [4, 5], job_id=7010, token=0x7010, timeout=1.5)
    try:
        calls = [int32_call(1000, 76)]
        assert_exact_int32(job.run(calls), calls, job.n)
        box.programs.install_job(job.group)  # what a restarted aggregator does: new epoch
        job.post([int32_call(600, 77)], ranks=[1])  # rank 0 "already had" the result
        answer = job.collect(ranks=[1], check=False, wait=60)[1]
    finally:
        job.close()
    assert not answer["ok"] and answer["error"] == "CollectiveTimeout", answer
    assert f"the aggregator ({box.host(0).ip}) restarted during this call" in answer["message"]


# ------------------------------------------------------------ 8. the tail-call chain


@pytest.mark.parametrize("block", [4 * CHUNK, max_block(MTU)])
def test_large_blocks_run_a_tail_call_chain_of_at_least_4_adders(box, block):
    assert max_block(MTU) == (MTU - 28 - HEADER_SIZE) // 4 > 4 * CHUNK
    assert chain_length(block) >= 6  # entry + >= 4 adders + finish
    assert chain_length(4 * CHUNK) == 6 and chain_length(4 * CHUNK + 1) == 7
    n = 4
    job = Job(box, [8, 7, 6, 5], job_id=8000 + block % 1000, token=0x8000 + block,
              block=block)
    calls = [int32_call(block, 81), int32_call(3 * block + 5, 82)]
    fcall = float_call(2 * block + 1, 83, "heavy")
    before = box.counters()
    try:
        answers = job.run([*calls, fcall])
    finally:
        job.close()
    d = delta(box.counters(), before)
    assert_exact_int32({r: a[:2] for r, a in answers.items()}, calls, n)
    # Values in the last chunk of a block are added by the 4th (or later) program of the
    # chain: exact there means the chain ran that far.
    got = results_of(answers, 0)[0]
    want = int32_reference(n, block, 81)
    assert np.array_equal(got[3 * CHUNK:], want[3 * CHUNK:]) and got[3 * CHUNK:].any()
    assert_within_bound(answers, 2, fcall, n)
    total = blocks([c["size"] for c in calls] + [fcall["size"]], block)
    assert d["agg_completed"] == total
    assert d["agg_added"] == n * total
    assert not {k: d[k] for k in DROPS if k in d}, d


# ------------------------------------------------------------ 9. issue 10's holes


def negative_max_reference(n: int, size: int, seed: int) -> np.ndarray:
    return np.max([negative_input(r, size, seed) for r in range(n)], axis=0)


def test_in_kernel_max_of_all_negative_int32_inputs_is_exact(box):
    # The MAX used to start from the zeroed copy: every all-negative element came back 0.
    n = 3
    job = Job(box, [2, 4, 6], job_id=9101, token=0x9101)
    sizes = (1, 257, 5000)
    try:
        answers = job.run([{"kind": "max_int32", "size": s, "seed": 90 + s} for s in sizes])
    finally:
        job.close()
    for k, size in enumerate(sizes):
        want = negative_max_reference(n, size, 90 + size)
        for rank, got in zip(answers, results_of(answers, k), strict=True):
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, (size, rank, bad.size, got[bad[:3]], want[bad[:3]])


def test_agree_mode_keeps_the_bits_of_small_gradients(box):
    # |x| ~ 1e-3: every block's exponent is negative (about -8). The kernel's MAX of the
    # exponents used to clamp them at 0 (the zeroed copy), losing ~8 bits, and the bound
    # the reducer reported was computed from the clamped exponents. The true bound comes
    # from the real exponents, computed here from the inputs.
    n = 5
    job = Job(box, [1, 3, 5, 7, 8], job_id=9102, token=0x9102, scale="agree")
    call = float_call(3001, 91, "small")
    try:
        answers = job.run([call])
    finally:
        job.close()
    inputs = [float_input(r, call["size"], "small", call["seed"]) for r in range(n)]
    true_exp = np.max([quant.block_exponents(x, K) for x in inputs], axis=0)
    assert (true_exp < 0).all()
    want = float_reference(n, call["size"], "small", call["seed"])
    for rank, a in answers.items():
        got = decode(a[0]["result"], a[0]["dtype"])
        bound = quant.error_bound(got, true_exp, K, n, np.dtype(np.float32))
        err = np.abs(got.astype(np.float64) - want)
        over = np.flatnonzero(err > bound)
        assert over.size == 0, (rank, over.size, err[over[:3]], bound[over[:3]])
        reported = decode(a[0]["bound"], "float64")
        assert np.allclose(reported, bound, rtol=1e-9, atol=0), rank


REPLAYER = """
import socket, sys
data = open(sys.argv[1], "rb").read()
dgrams, k = [], 0
while k < len(data):
    n = int.from_bytes(data[k:k + 4], "little")
    dgrams.append(data[k + 4:k + 4 + n])
    k += 4 + n
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[2], int(sys.argv[3]))
print("go", flush=True)
while True:
    for d in dgrams:
        s.sendto(d, dst)
"""


def start_replayer(box: Box, host: int, datagrams: list[bytes], path: Path):
    """A process in ``host``'s namespace sending ``datagrams`` to the aggregator in a
    tight loop until it is killed (its own process: no GIL shared with the test)."""
    path.write_bytes(b"".join(len(d).to_bytes(4, "little") + d for d in datagrams))
    proc = subprocess.Popen(box.host(host).command(
        [sys.executable, "-c", REPLAYER, str(path), box.host(0).ip, str(PORT)]),
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    return proc


def test_late_replays_of_a_first_round_never_enter_a_later_round(box):
    # Round r + 1 of a slot completing resets the slot's other copy for round r + 2; the
    # reset used to write round = 0 before the new round, so a late copy of a round-0
    # block arriving in between was added into round r + 2. Both members' hosts replay
    # their round-0 blocks (seq 0..63, forged values) as fast as they can during many
    # rounds. (A race, but on the old code this failed in 6 of 6 runs.)
    n = 2
    job = Job(box, [1, 2], job_id=9103, token=0x9103)
    procs = []
    try:
        first = [int32_call(64 * K, 92)]  # seq 0..63: round 0 of every slot
        assert_exact_int32(job.run(first), first, n)
        before = box.counters()
        for rank, host in enumerate(job.hosts):
            replays = [forged(job.group, seq=seq, rank=rank, count=K).pack()
                       + np.full(K, 0x00FF00FF, np.int32).tobytes() for seq in range(64)]
            procs.append(start_replayer(box, host, replays,
                                        box.workdir / f"replays-{rank}.bin"))
        calls = [int32_call(40000, 93 + i) for i in range(100)]
        try:
            answers = job.run(calls)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        after = box.counters()
        assert_exact_int32(answers, calls, n)
        d = delta(after, before)
        assert d["agg_added"] == n * blocks(c["size"] for c in calls), d
        assert d.get("agg_stale_round", 0) > 0, d  # the replays did arrive
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        job.close()


# A result datagram the worker must refuse: (sender host, source address it claims,
# header changes). "agg" as the claimed source: forged with a raw socket.
FORGED_RESULTS = {
    "from-an-outsider": (OUTSIDER, None, {}),
    "wrong-token-from-the-aggregators-address": (OUTSIDER, "agg", {"token_xor": 0x5A5A}),
    "bad-magic-from-the-aggregators-address": (OUTSIDER, "agg", {"magic": 0x12345678}),
    "wrong-version-from-the-aggregators-address": (OUTSIDER, "agg", {"version": 9}),
}


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes,
                 udp_len: int | None = None) -> bytes:
    """An IPv4/UDP datagram (no UDP checksum) for a raw IP_HDRINCL socket."""
    ulen = 8 + len(payload) if udp_len is None else udp_len
    total = 20 + 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + struct.pack("!HHHH", sport, dport, ulen, 0) + payload


def send_ip(host: NetnsHost, dst: str, datagrams: list[bytes]) -> None:
    def go() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            for d in datagrams:
                s.sendto(d, (dst, 0))

    host.call(go)


def test_workers_refuse_forged_results_and_still_sum_right(box):
    n = 3
    hosts = [1, 2, 3]
    job = Job(box, hosts, job_id=9104, token=0x9104)
    call = int32_call(3 * K, 94)  # seq 0..2; forged results for all three arrive first
    garbage = np.full(K, 7, np.int32).tobytes()
    try:
        for host, claimed, changes in FORGED_RESULTS.values():
            src = box.host(0).ip if claimed == "agg" else box.host(host).ip
            fields = dict(type=MsgType.AGG_RESULT, job_id=job.group.job_id,
                          token=job.group.token ^ changes.get("token_xor", 0), rank=0,
                          count=K, magic=changes.get("magic", MAGIC),
                          version=changes.get("version", VERSION))
            for victim in hosts[:2]:  # ranks 0 and 1 get forgeries, rank 2 none
                send_ip(box.host(host), box.host(victim).ip, [
                    udp_datagram(src, box.host(victim).ip, PORT, PORT,
                                 Header(seq=seq, **fields).pack() + garbage)
                    for seq in range(3)])
        time.sleep(0.1)  # they wait in the workers' sockets
        answers = job.run([call])
        stats = {r: node.call("stats", name=job.name)["stats"] for r, node in job.nodes.items()}
    finally:
        job.close()
    assert_exact_int32(answers, [call], n)
    forged_each = 3 * len(FORGED_RESULTS)
    assert stats[0]["refused"] >= forged_each and stats[1]["refused"] >= forged_each, stats
    assert stats[2]["refused"] == 0, stats



def insider_blocks(group: Group, seqs: range, count: int) -> list[tuple[bytes, None]]:
    """What a host that sniffed the job's token sends from a member's own IP and MAC
    (rank 0's host): blocks of the right shape for the job's next seqs, unflagged and
    untagged, with a zero tag, and with a tag under another key."""
    garbage = np.full(count, 1 << 20, np.int32).tobytes()
    other = auth.new_key()
    out = []
    for seq in seqs:
        h = Header(type=MsgType.AGG, flags=F_AUTH, job_id=group.job_id, token=group.token,
                   seq=seq, rank=0, count=count)
        out += [(replace(h, flags=0).pack() + garbage, None),
                (h.pack() + garbage + bytes(8), None),
                (h.pack() + garbage + auth.tag_bytes(other, h.pack()), None)]
    return out


@pytest.mark.parametrize("keyed", [False, True])
def test_an_insider_with_the_token_is_kept_out_only_by_a_keyed_job(box, keyed):
    """Issue 11's insider: the token alone does not keep out a host that sniffed it and
    sends with a member's IP and MAC; its blocks, sent before the member's, are summed
    in place of the member's. A job with a key (Group.auth_key) takes only blocks whose
    header carries the key's tag: the same blocks are counted in drop_bad_mac and the
    sums stay exact, and the workers take only tagged results (forged ones with the
    token, from the aggregator's address, are refused)."""
    job = Job(box, [1, 2, 3], job_id=9105 + keyed, token=0x9105, key=auth.new_key() if keyed
              else None)
    calls = [int32_call(3 * K, 95), float_call(5 * K + 7, 96, "gaussian")]
    n_blocks = blocks(c["size"] for c in calls)
    try:
        before = box.counters()
        send_raw(box.host(1), box.host(0).ip, insider_blocks(job.group, range(3), K))
        garbage = np.full(K, 7, np.int32).tobytes()
        result = Header(type=MsgType.AGG_RESULT, flags=F_AUTH, job_id=job.group.job_id,
                        token=job.group.token, rank=0, count=K)
        for victim in (1, 2):
            send_ip(box.host(OUTSIDER), box.host(victim).ip, [
                udp_datagram(box.host(0).ip, box.host(victim).ip, PORT, PORT,
                             replace(result, seq=seq).pack() + garbage + bytes(8))
                for seq in range(3)])
        time.sleep(0.1)  # they wait in the aggregator's ingress and the workers' sockets
        job.post(calls)
        answers = job.collect(check=False)
        after = wait_for(box, {"drop_bad_mac": before["drop_bad_mac"] + (9 if keyed else 6)})
        stats = {r: node.call("stats", name=job.name)["stats"] for r, node in job.nodes.items()}
    finally:
        job.close()
    d = delta(after, before)
    if not keyed:
        # The hole the key closes: the insider's untagged blocks were summed in place of
        # rank 0's (its own came second, as duplicates). Tagged ones: for a keyed job.
        assert d["drop_bad_mac"] == 6
        want = int32_reference(job.n, calls[0]["size"], calls[0]["seed"])
        got = [decode(a["results"][0]["result"], "int32") for a in answers.values() if a["ok"]]
        assert got and not any(np.array_equal(g, want) for g in got)
        return
    assert all(a["ok"] for a in answers.values()), answers
    results = {r: a["results"] for r, a in answers.items()}
    assert_exact_int32({r: a[:1] for r, a in results.items()}, calls[:1], job.n)
    assert_within_bound(results, 1, calls[1], job.n)
    assert d["drop_bad_mac"] == 9 and "drop_truncated" not in d
    assert d["agg_added"] == job.n * n_blocks
    assert stats[0]["refused"] >= 3 and stats[1]["refused"] >= 3, stats


def test_a_timeout_in_a_group_of_40_names_exactly_the_missing_rank(box):
    # The status reply's bitmap used to cover ranks 0-31: ranks 32-39 were all named.
    size, dead = 40, 35
    hosts = [1] + [2 + (r - 1) % 7 for r in range(1, size)]  # ranks 1.. on h2..h8
    hosts[dead] = OUTSIDER
    job = Job(box, hosts, job_id=9105, token=0x9105, timeout=2.0,
              nodes={h: None for h in range(2, HOSTS)})  # only rank 0 runs an Allreducer
    try:
        assert list(job.nodes) == [0]
        # Every other rank's block of seq 0, forged from its host, but the dead one's.
        by_host: dict[int, list] = {}
        for r in range(1, size):
            if r != dead:
                by_host.setdefault(hosts[r], []).append(
                    (forged(job.group, seq=0, rank=r, count=K).pack()
                     + np.zeros(K, np.int32).tobytes(), None))
        before = box.counters()
        for h, datagrams in by_host.items():
            send_raw(box.host(h), box.host(0).ip, datagrams)
        wait_for(box, {"agg_added": before["agg_added"] + size - 2})
        job.post([int32_call(K, 95)])
        a = job.collect(check=False, wait=60)[0]
    finally:
        job.close()
    assert not a["ok"] and a["error"] == "CollectiveTimeout", a
    assert a["missing"] == [dead], a
    assert f"rank {dead} ({box.host(OUTSIDER).ip})" in a["message"], a["message"]


@pytest.fixture
def job_e(box):
    job = Job(box, [1, 2, 3], job_id=9106, token=0x9106)
    try:
        yield job
    finally:
        job.close()


@pytest.mark.parametrize("exp", [30000, -30000, 1025, -1075])
def test_a_scale_exponent_no_quantization_produces_is_refused(box, job_e, exp):
    before = box.counters()
    pkt = forged(job_e.group, seq=9, flags=F_ALIGN, scale_exp=exp).pack() + FORGED_VALUES
    send_raw(box.host(1), box.host(0).ip, [(pkt, None)])
    after = wait_for(box, {"agg_bad_scale": before["agg_bad_scale"] + 1})
    assert delta(after, before) == {"agg_bad_scale": 1}


def test_a_shape_mismatch_has_its_own_counter(box, job_e):
    g = job_e.group
    before = box.counters()
    send_raw(box.host(2), box.host(0).ip, [(forged(g, seq=9, rank=1).pack() + FORGED_VALUES,
                                            None)])
    five = np.zeros(5, np.int32).tobytes()
    send_raw(box.host(1), box.host(0).ip, [(forged(g, seq=9, count=5).pack() + five, None)])
    after = wait_for(box, {"agg_shape_mismatch": before["agg_shape_mismatch"] + 1})
    assert delta(after, before) == {"accepted": 1, "agg_added": 1, "agg_shape_mismatch": 1}


def test_a_udp_length_shorter_than_the_block_is_refused(box, job_e):
    # The skb is long enough (16 bytes of values after the header), but UDP says the
    # datagram ends after 2 of the 4 values that count claims.
    g = job_e.group
    payload = forged(g, seq=9).pack() + FORGED_VALUES
    before = box.counters()
    send_ip(box.host(1), box.host(0).ip, [
        udp_datagram(box.host(1).ip, box.host(0).ip, PORT, PORT, payload,
                     udp_len=8 + HEADER_SIZE + 8)])
    after = wait_for(box, {"drop_truncated": before["drop_truncated"] + 1})
    assert delta(after, before) == {"drop_truncated": 1}


def test_allreducer_has_no_gso_option():
    # The aggregator drops GSO super-packets (one skb, several blocks): the option that
    # sent them could only make every call time out.
    assert "gso" not in inspect.signature(Allreducer).parameters


@pytest.mark.parametrize("broken", ["agg_add", "agg_finish"])
def test_a_chain_broken_after_the_claim_is_completed_by_the_retransmission(box, broken):
    # A tail call that fails inside the chain drops the packet after agg_ingress took it.
    # The contributor bit used to be set there already: the retransmission was then a
    # "duplicate" and the slot never completed.
    n = 2
    job = Job(box, [1, 2], job_id=9107, token=0x9107, block=4 * CHUNK, timeout=10.0)
    call = int32_call(4 * CHUNK, 96)
    chain = box.programs.family["chain"]
    index = ["agg_add", "agg_finish"].index(broken)
    fd = box.programs.family.load(broken, BPF.SCHED_CLS).fd
    try:
        before = box.counters()
        del chain[ctypes.c_int(index)]
        try:
            job.post([call], ranks=[0])
            wait_for(box, {"accepted": before["accepted"] + 1})
            time.sleep(0.1)  # a few retransmissions hit the broken chain too
        finally:
            chain[ctypes.c_int(index)] = ctypes.c_int(fd)
        job.post([call], ranks=[1])
        answers = {r: a["results"] for r, a in job.collect().items()}
    finally:
        job.close()
    assert_exact_int32(answers, [call], n)
    d = delta(box.counters(), before)
    assert d["agg_added"] == n and d["agg_completed"] == 1, d


# ------------------------------------------------------------ results to a multicast group


def rx_packets(host: NetnsHost) -> int:
    # netlink, not /sys (which shows the namespace it was mounted in)
    link = json.loads(host.run(["ip", "-j", "-s", "link", "show", "dev", host.ifname]).stdout)
    return int(link[0]["stats64"]["rx"]["packets"])


def listen(host: NetnsHost, port: int) -> socket.socket:
    """A socket on ``port`` in ``host``'s namespace that joined no group."""
    def go() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        return s

    return host.call(go)


def drain(sock: socket.socket) -> int:
    got = 0
    while True:
        try:
            sock.recv(1 << 17)
        except BlockingIOError:
            return got
        got += 1


def test_multicast_results_reach_every_worker_once_and_no_other_host(box):
    # One send per finished block (fanout_copies), to the job's group: the bridge gives
    # every worker one copy. A long RTO: a result that did not come by multicast would
    # show as a retransmission and a late reply. h9 is on the bridge with a socket on
    # the job's port but did not join: its interface sees the results, its application
    # nothing.
    n = 8
    job = Job(box, list(WORKERS), job_id=9201, token=0x9201, results="multicast",
              name="mc")
    for r, node in job.nodes.items():  # the same reducers, with a 5 s RTO
        node.call("reducer", name=job.name, group=as_dict(job.group, r), block=K,
                  timeout=30.0, rto=5.0)
    outsider = box.host(OUTSIDER)
    sock = listen(outsider, PORT)
    calls = [int32_call(40000, 97), int32_call(1000, 98), float_call(3000, 99, "gaussian")]
    try:
        rx_before, before = rx_packets(outsider), box.counters()
        answers = job.run(calls)
        after, rx_after = box.counters(), rx_packets(outsider)
        stats = {r: node.call("stats", name=job.name)["stats"] for r, node in job.nodes.items()}
        time.sleep(0.05)
        leaked = drain(sock)
    finally:
        sock.close()
        job.close()
    assert_exact_int32({r: a[:2] for r, a in answers.items()}, calls[:2], n)
    assert_within_bound(answers, 2, calls[2], n)
    total = blocks(c["size"] for c in calls)
    d = delta(after, before)
    assert d["agg_completed"] == total and d["fanout_copies"] == total, d
    assert d.get("agg_late_reply", 0) == 0 and d.get("agg_duplicate", 0) == 0, d
    for r, st in stats.items():
        assert (st["results"], st["duplicates"], st["retransmits"]) == (total, 0, 0), (r, st)
    assert rx_after - rx_before >= total  # the results did reach h9's interface ...
    assert leaked == 0  # ... and its kernel kept them from its application


def test_a_worker_that_loses_every_multicast_result_gets_them_by_unicast(box):
    # Rank 1's reducer believes the job's results are unicast: it never joins the group,
    # so its kernel drops every multicast result (a loss at that worker only). Its
    # retransmission is a duplicate of a finished block: agg_reply answers it, to rank 1
    # alone. The other workers (5 s RTO) get each result once, by multicast.
    n = 3
    job = Job(box, [4, 5, 6], job_id=9202, token=0x9202, results="multicast", name="deaf")
    deaf = as_dict(job.group, 1)
    deaf["options"] = {"results": "unicast"}
    job.nodes[1].call("reducer", name=job.name, group=deaf, block=K, timeout=30.0, rto=0.02)
    for r in (0, 2):
        job.nodes[r].call("reducer", name=job.name, group=as_dict(job.group, r), block=K,
                          timeout=30.0, rto=5.0)
    calls = [int32_call(20 * K, 100), int32_call(300, 101)]
    try:
        before = box.counters()
        answers = job.run(calls)
        after = box.counters()
        stats = {r: node.call("stats", name=job.name)["stats"] for r, node in job.nodes.items()}
    finally:
        job.close()
    assert_exact_int32(answers, calls, n)
    total = blocks(c["size"] for c in calls)
    d = delta(after, before)
    assert d["agg_completed"] == total and d["fanout_copies"] == total, d
    assert d["agg_late_reply"] >= total, d  # every block of rank 1 came by unicast
    assert stats[1]["results"] == total and stats[1]["retransmits"] >= total, stats
    for r in (0, 2):  # the unicast answers went to rank 1 only
        assert (stats[r]["results"], stats[r]["duplicates"], stats[r]["retransmits"]) == (
            total, 0, 0), (r, stats[r])


def test_unicast_results_clone_one_copy_per_worker(box):
    # The fallback for networks without multicast: one clone per worker, exact sums.
    n = 8
    job = Job(box, list(WORKERS), job_id=9203, token=0x9203, results="unicast")
    calls = [int32_call(40000, 102), int32_call(257, 103)]
    before = box.counters()
    try:
        answers = job.run(calls)
    finally:
        job.close()
    assert_exact_int32(answers, calls, n)
    total = blocks(c["size"] for c in calls)
    d = delta(box.counters(), before)
    assert d["agg_completed"] == total and d["fanout_copies"] == n * total, d


# ------------------------------------------------------------ nothing left behind


def test_closing_the_aggregator_detaches_its_programs(box):
    agg = box.host(0)
    assert "agg_ingress" in agg.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    agg.call(box.programs.close)
    assert agg.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout.strip() == ""
    assert "clsact" not in agg.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
