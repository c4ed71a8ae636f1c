"""In-kernel allreduce: float tensors summed by the aggregator's kernel, integers only.

    reducer = Allreducer(group)                # one per worker process
    total = reducer.allreduce(grads)           # sum over the group (op="mean" divides)

``group.members`` are the workers (ranks 0..N-1); ``group.aggregator`` is the host whose
kernel runs bpf/aggregate.c, installed there with :class:`AggregatorPrograms`. Two ways to
agree on the scale of each block (aggbox/quant.py):

- ``scale="align"`` (default, one round): each worker quantizes with its own block
  exponent and sends it in the header; the kernel aligns contributions to the largest.
  Aligned blocks are biased: each value travels as q + 2**B (non-negative), so that the
  kernel adds two int32 lanes with one 64-bit add (bpf/aggregate.c, align_bias).
- ``scale="agree"`` (two rounds): an in-kernel element-wise MAX of the per-block
  exponents first, then the SUM of blocks quantized with the agreed exponents.

int32 tensors are summed exactly in one round (wrapping like numpy's int32).

Reliability is the worker's: it keeps at most ``pool`` blocks in flight (a slot is reused
only after its result came back: self-clocked), resends what has not come back after a
timeout (doubling; the timeout from the measured time of a block to its result, SRTT +
4 RTTVAR clamped, aggbox/collectives/rtt.py), and the aggregator's kernel answers a
duplicate from the finished copy,
or with a status naming the workers it still waits for. A call that makes no progress for
``timeout`` seconds raises :class:`CollectiveTimeout` naming those workers.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from aggbox import auth, native, quant
from aggbox.collectives.group import Group, Member, multicast_address
from aggbox.collectives.rtt import RetransmitTimer
from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.protocol import (
    HEADER,
    HEADER_DTYPE,
    HEADER_SIZE,
    MAGIC,
    MAX_MEMBERS,
    VERSION,
    Flags,
    MsgType,
    ip_to_u32,
    mac_bytes,
    max_payload,
)
from aggbox.quant import n_blocks
from aggbox.sockets import udp_socket

DEFAULT_PORTS = (48000, 48999)
MAX_VALUES = 16384  # AGG_MAX_VALUES: the largest block the programs are compiled for
CHUNK = 1024  # AGG_CHUNK: values one program of the tail-call chain adds
SEQ_MASK = 0xFFFFFFFF  # block seqs wrap with the header's 32-bit field (rounds with them)
POOL_SHIFT = 5  # AGG_POOL_SHIFT: 32 slots per job, the workers' window (docs/allreduce.md)
MAX_JOBS = 4
TC_PRIORITY = 2  # broadcast uses 1, reduce-by-key 3

F_OP_MAX = int(Flags.OP_MAX)  # bpf/aggbox.h AGGBOX_F_OP_MAX
F_STATUS = int(Flags.STATUS)  # bpf/aggbox.h AGGBOX_F_STATUS
F_ALIGN = int(Flags.ALIGN)  # bpf/aggbox.h AGGBOX_F_ALIGN
F_AUTH = int(Flags.AUTH)  # bpf/aggbox.h AGGBOX_F_AUTH: tagged under the job's key


#: later blocks with their result before a block without one is taken for lost
FAST_RESEND_GAP = 3
#: the tail-loss probe's floor (Allreducer._wait_s)
MIN_PROBE_S = 0.002
#: a worker's spin before select() when results are due (Allreducer.spin_s)
SPIN_S = 100e-6
# the header of the queued datagram, and (MSG_TRUNC) its whole length, without taking it
_PEEK = socket.MSG_PEEK | socket.MSG_TRUNC | socket.MSG_DONTWAIT


def chain_length(block: int, chunk: int = CHUNK) -> int:
    """Programs of the tail-call chain one block of ``block`` values goes through: the
    entry, ceil(block / chunk) adders, and the finisher."""
    return 1 + -(-block // chunk) + 1


def max_block(mtu: int, authenticated: bool = False) -> int:
    """The largest block (int32 values) one packet carries at this MTU (an authenticated
    job's packets also carry the 8-byte tag)."""
    room = max_payload(mtu) - (auth.TAG_SIZE if authenticated else 0)
    return min(MAX_VALUES, room // 4)


# How a finished block reaches the workers (bpf/aggregate.c AGG_RESULTS_*), per job:
# ``group.options["results"]``. "multicast": the kernel sends the result once, to the
# job's IP multicast group, and the bridge replicates it (clones sharing one skb's data);
# "unicast": one clone per worker with its own addresses (each a copy of the whole
# result), for networks that do not carry multicast.
RESULTS = {"unicast": 0, "multicast": 1}
DEFAULT_RESULTS = "multicast"
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux; Python may lack it


def result_delivery(group: Group) -> str:
    """The job's result delivery: ``group.options["results"]`` or the default."""
    results = group.options.get("results", DEFAULT_RESULTS)
    if results not in RESULTS:
        raise AggBoxError(f"results must be one of {sorted(RESULTS)}, got {results!r}")
    return results


def result_group(group: Group) -> str:
    """The job's multicast group for results: ``group.options["result_ip"]`` or
    239.213.x.y derived from the job (another hash than the broadcast baseline's)."""
    return multicast_address(group, "result_ip", purpose="allreduce:")


def multicast_mac(ip: str) -> bytes:
    """The Ethernet address of an IPv4 multicast group: 01:00:5e + its low 23 bits."""
    low = int(ipaddress.IPv4Address(ip)) & 0x7FFFFF
    return bytes([0x01, 0x00, 0x5E]) + low.to_bytes(3, "big")


class AggregatorPrograms:
    """bpf/aggregate.c on the aggregator host: the entry program on TC ingress and the
    chain (add, finish, reply) in its program array. Create it inside the aggregator's
    network namespace; install one job per concurrent allreduce group."""

    def __init__(self, ifname: str = "eth0", ports: tuple[int, int] = DEFAULT_PORTS,
                 pin_tag: str = ""):
        from bcc import BPF

        from aggbox.bpf import ProgramFamily

        self.family = ProgramFamily("aggregate", pin_tag=pin_tag, defines={
            "AGG_MAX_VALUES": MAX_VALUES, "AGG_CHUNK": CHUNK, "AGG_POOL_SHIFT": POOL_SHIFT,
            "AGG_MAX_JOBS": MAX_JOBS})
        try:
            cfg = self.family["config"]
            leaf = cfg.Leaf()
            leaf.port_lo, leaf.port_hi = ports
            cfg[cfg.Key(0)] = leaf
            chain = self.family["chain"]
            for index, fn in enumerate(("agg_add", "agg_finish", "agg_reply")):
                chain[ctypes.c_int(index)] = ctypes.c_int(self.family.load(fn, BPF.SCHED_CLS).fd)
            self.family.attach_tc(ifname, "agg_ingress", "ingress", prio=TC_PRIORITY)
        except BaseException:
            self.family.close()
            raise
        self._index: dict[int, int] = {}
        self._lock = threading.Lock()  # jobs installed from several threads claim apart

    def install_job(self, group: Group) -> int:
        """Install ``group`` (workers = members; the aggregator = group.aggregator) with
        every slot of the job reset: also what makes slots reusable after a failed job."""
        if group.aggregator is None:
            raise AggBoxError("the group names no aggregator host")
        if not 1 <= group.size <= min(MAX_MEMBERS, 64):
            raise AggBoxError(f"an aggregation group has 1..64 workers, got {group.size}")
        with self._lock:  # chosen and claimed at once
            index = self._index.get(group.job_id)
            if index is None:
                free = sorted(set(range(MAX_JOBS)) - set(self._index.values()))
                if not free:
                    raise AggBoxError(f"at most {MAX_JOBS} concurrent aggregation jobs")
                index = free[0]
                self._index[group.job_id] = index
        self._reset_slots(index)
        workers = self.family["members"]
        for m in group.members:
            leaf = workers.Leaf()
            leaf.ip = ip_to_u32(m.ip)
            ctypes.memmove(leaf.mac, mac_bytes(m.mac), 6)
            workers[workers.Key(index * MAX_MEMBERS + m.rank)] = leaf
        jobs = self.family["jobs"]
        job = jobs.Leaf()
        job.token, job.slot, job.n_members = group.token, index, group.size
        job.my_ip = ip_to_u32(group.aggregator.ip)
        ctypes.memmove(job.my_mac, mac_bytes(group.aggregator.mac), 6)
        # A fresh epoch per installation: the workers tell a restarted aggregator (whose
        # partial sums are gone) from the one they started with.
        job.epoch = secrets.randbelow(0xFFFF) + 1
        key = group.key
        job.auth = key is not None
        if key is not None:
            job.key.k0, job.key.k1 = auth.key_words(key)
        job.results = RESULTS[result_delivery(group)]
        if job.results == RESULTS["multicast"]:
            grp = result_group(group)
            job.result_ip = ip_to_u32(grp)
            ctypes.memmove(job.result_mac, multicast_mac(grp), 6)
        jobs[jobs.Key(group.job_id)] = job
        return index

    def _reset_slots(self, index: int) -> None:
        """Every slot copy of job ``index`` at its first round (r uses copy r & 1: rounds 0
        and 1) with nobody in, and every chunk at round 0 with nobody in: blank for both
        (the kernel initialises a chunk lazily, its first writer of a round stores). Each
        copy is fresh: the first block sent to it sets its round, so that a job installed
        again while its workers are mid-call (a restarted aggregator) goes on."""
        pool = 1 << POOL_SHIFT
        slots = self.family["slots"]
        keys = (slots.Key * (pool * 2))()
        leaves = (slots.Leaf * (pool * 2))()
        for k in range(pool * 2):
            keys[k] = slots.Key(index * pool * 2 + k)
            leaves[k].round = k & 1
            leaves[k].fresh = 1  # may adopt its workers' round (a restarted aggregator)
        slots.items_update_batch(keys, leaves)
        chunks = self.family["chunks"]
        per_job = pool * 2 * (MAX_VALUES // CHUNK)
        ckeys = (chunks.Key * per_job)()
        for k in range(per_job):
            ckeys[k] = chunks.Key(index * per_job + k)
        chunks.items_update_batch(ckeys, (chunks.Leaf * per_job)())

    def remove_job(self, job_id: int) -> None:
        with self._lock:
            index = self._index.pop(job_id, None)
        self.family.discard("jobs", job_id)
        if index is not None:
            self._reset_slots(index)

    def counters(self) -> dict[str, int]:
        return self.family.counters()

    def close(self) -> None:
        self.family.close()

    def __enter__(self) -> AggregatorPrograms:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Call:
    """The blocks of one in-kernel aggregation call and what has come back."""

    base: int  # the global seq of block 0
    values: np.ndarray  # int32, flat
    block: int
    exponents: np.ndarray | None = None  # F_ALIGN: each block's own exponent, sent along
    # int32, values.size: where the results land, received straight into their slice
    # (given: a buffer reused across calls; None: a new one)
    out: np.ndarray | None = None
    done: np.ndarray = field(init=False)
    low: int = 0  # every block below is done
    next_send: int = 0
    # The last status reply showed this worker's contribution in: the wait is on other
    # workers, so a stall resends one block (a probe), not the whole window.
    waiting_on_others: bool = False

    def __post_init__(self) -> None:
        self.n_blocks = max(1, -(-self.values.size // self.block))
        if self.out is None:
            self.out = np.zeros(self.values.size, dtype=np.int32)
        self.out_exp = np.zeros(self.n_blocks, dtype=np.int32)
        self.done = np.zeros(self.n_blocks, dtype=bool)
        # RTT samples: when each block was first sent; resent blocks give none (Karn),
        # nor do blocks that waited across a timeout (_resend_outstanding).
        self.sent_at = np.zeros(self.n_blocks, dtype=np.float64)
        self.resent = np.zeros(self.n_blocks, dtype=bool)
        # each block's header as it is sent (uint8 rows of 32) and, for an authenticated
        # job, its tag (rows of 8): set by Allreducer._headers
        self.headers: np.ndarray | None = None
        self.tags: np.ndarray | None = None
        self.fast_resent = np.zeros(self.n_blocks, dtype=bool)
        # the call as edge.c's socket loops see it (Allreducer._native_blocks), or None
        self.io: native.Blocks | None = None
        self.progress: native.Progress | None = None
        self.rtts: np.ndarray | None = None  # the round trips one run of edge.c measured

    def restart(self, base: int, epoch: int) -> None:
        """The same blocks again as a new call from seq ``base`` (a fused call reused)."""
        self.base, self.low, self.next_send, self.waiting_on_others = base, 0, 0, False
        self.done[:] = self.resent[:] = self.fast_resent[:] = False
        self.io.base, self.io.epoch = base, epoch

    def span(self, i: int) -> tuple[int, int]:
        start = i * self.block
        return start, min(start + self.block, self.values.size)


class Allreducer:
    """A worker's side of in-kernel allreduce (one per worker process)."""

    # The RTO's clamps: a block's round trip includes waiting for the slowest worker and
    # the aggregator's softirq work, which a loaded machine defers to ksoftirqd for
    # several ms (reduce-by-key's 1 ms floor resent on loss-free runs), so the floor is
    # 5 ms; the ceiling keeps a lossy path retrying several times a second.
    MIN_RTO_S, MAX_RTO_S = 0.005, 0.2

    def __init__(self, group: Group, block: int = 256, timeout: float = 10.0,
                 rto: float = 0.02, scale: str = "align"):
        """``rto``: the retransmission timeout until the first round trip is measured; one
        above MAX_RTO_S pins it (no RTT adaptation and no tail-loss probe: a caller that
        wants no resends)."""
        if scale not in ("align", "agree"):
            raise AggBoxError(f"scale must be 'align' or 'agree', got {scale!r}")
        self.scale = scale
        if group.aggregator is None:
            raise AggBoxError("the group names no aggregator host")
        if not 1 <= block <= MAX_VALUES:
            raise AggBoxError(f"block must be 1..{MAX_VALUES} values, got {block}")
        self.group = group
        self.block = block
        self.pool = 1 << POOL_SHIFT
        self.timeout = timeout
        pinned = self._rto_pinned = rto > self.MAX_RTO_S
        self.timer = RetransmitTimer(initial_s=rto, min_s=rto if pinned else self.MIN_RTO_S,
                                     max_s=rto if pinned else self.MAX_RTO_S)
        self.sock = udp_socket(group.port)
        self.dest = (group.aggregator.ip, group.port)
        self.results = result_delivery(group)
        if self.results == "multicast":
            # Results come to the job's group (source: still the aggregator's address,
            # which _take checks): join it on this worker's own interface; MULTICAST_ALL
            # 0 keeps the socket to that group (another job's group on this port is not
            # delivered here).
            grp = result_group(group)
            try:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
                self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                     socket.inet_aton(grp) + socket.inet_aton(group.me.ip))
            except OSError as exc:
                self.sock.close()
                raise AggBoxError(f"cannot join the result group {grp} on {group.me.ip}: "
                                  f"{exc}") from exc
        self.next_seq = 0  # global block number, shared by every call of this group
        # An authenticated job (group.auth_key): every block tagged, every result's tag
        # checked (aggbox/auth.py); 8 bytes after each payload.
        self.key = group.key
        self.tag_len = auth.TAG_SIZE if self.key is not None else 0
        self._tag_rx = bytearray(auth.TAG_SIZE)
        # The aggregator's installation epoch (each reply's round field) in the first
        # reply, and whether another has answered since (it restarted: partial sums lost)
        self.epoch: int | None = None
        self.restart_seen_at: int | None = None  # the seq of the reply that showed it, if so
        self.rx = bytearray(HEADER_SIZE + 4 * MAX_VALUES + 64)
        # A call's steady state run by edge.c (aggbox/native.py): one sendmmsg per
        # window, the plain results taken into place, no Python step per block; the rest
        # (timeouts, statuses, refusals) here; an authenticated job's results have their
        # tags checked there too (status replies here). A machine without the C library
        # keeps the Python path.
        self._io = native.library()
        self._fd = self.sock.fileno()
        # refused: datagrams on the job's port that are not this job's results from the
        # aggregator (wrong source, magic, version, token or shape): never taken
        self.stats = {"blocks": 0, "retransmits": 0, "results": 0, "duplicates": 0,
                      "refused": 0}

    # -- the public API ----------------------------------------------------------------

    def allreduce(self, tensor: np.ndarray, op: str = "sum",
                  out: np.ndarray | None = None) -> np.ndarray:
        """The element-wise sum (``op="mean"``: average) of ``tensor`` over the group;
        float results go to ``out`` if given (C-contiguous, the tensor's shape and dtype;
        it may be ``tensor`` itself), else to a new array."""
        if op not in ("sum", "mean"):
            raise AggBoxError(f"op must be 'sum' or 'mean', got {op!r}")
        x = np.asarray(tensor)
        if x.dtype == np.int32:
            total = self.reduce_int32(x.reshape(-1)).reshape(x.shape)
            return total if op == "sum" else total / self.group.size
        n = self.group.size
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype
                                or not out.flags.c_contiguous):
            raise AggBoxError(f"out must be a C-contiguous {x.dtype} array of shape "
                              f"{x.shape}")
        # The edge in one pass each way (aggbox/quant.py): the tensor is quantized into a
        # send buffer (int32, reused across calls), the results are received into the
        # same buffer (block i's values are never needed again once its result came: only
        # blocks without a result are resent; an authenticated job's results get their
        # own, see _reduce) and dequantized straight into the result;
        # NaN/Inf are refused from the block peaks, before anything is sent.
        flat = np.ascontiguousarray(x).reshape(-1)
        total = np.empty(x.shape, dtype=x.dtype) if out is None else out
        if self._io is not None and self.scale == "align" and flat.dtype == quant.FLOAT32:
            exponents = self._fused(flat, total.reshape(-1), op == "mean")
            if exponents is not None:
                self.last_exponents = exponents
                return total
        work = quant.FLOAT32 if flat.dtype == np.float32 else quant.FLOAT64
        scratch = self._buffer("scratch", quant.scratch_size(flat.size, self.block), work)
        q = sums = self._buffer("send", flat.size, np.int32)
        if self.scale == "agree":
            peaks = quant.block_peaks(flat, self.block)
            exponents = self.reduce_int32(quant.exponents_of(peaks), op_max=True)
            quant.quantize_into(flat, exponents, self.block, n, q, peaks, scratch)
            sums = self._reduce(q, 0, out=sums)[0]
        else:
            own = quant.quantize_own_into(flat, self.block, n, q, scratch)
            bias = 1 << quant.headroom_bits(n)  # aligned blocks are biased (align_bias)
            q += bias
            sums, exponents = self._reduce(q, F_ALIGN, own, out=sums)
            sums -= n * bias  # int32, wrapping: a biased sum may sit at 2**31
        # the mean is divided before the cast: a float16 sum may overflow where its mean fits
        self.last_exponents = exponents
        quant.dequantize_into(sums, exponents, self.block, n, total.reshape(-1),
                              mean=op == "mean")
        return total

    #: tensor sizes whose fused calls are kept (a DDP model has a few bucket sizes)
    FUSED_SIZES = 8

    def _fused(self, flat: np.ndarray, y: np.ndarray, mean: bool) -> np.ndarray | None:
        """A float32 aligned-mode call with its edge in edge.c: quantized into the send
        buffer with the headers' seqs and exponents in one pass before anything is sent
        (None on NaN/Inf or a scale float32 cannot hold: then quant.py's path runs, which
        raises or scales in float64), each result dequantized into ``y`` as it is taken.
        The call's buffers and structs are kept per tensor size and reused. Returns the
        results' exponents."""
        call = self._fused_call(flat.size)
        call.restart(self.next_seq, self._known_epoch())
        io = call.io
        io.y, io.n_mean = y.ctypes.data, self.group.size if mean else 0
        io.dequantized = io.deq_failed = 0
        if self._io.aggbox_quantize_call(flat.ctypes.data, io) != 0:
            return None
        self.next_seq = (call.base + call.n_blocks) & SEQ_MASK
        self._drive(call)
        if io.dequantized != call.n_blocks or io.deq_failed:
            # results _take took (not edge.c), or a scale outside float32: all again
            call.out -= io.n_workers << io.bits  # the bias off (see allreduce)
            quant.dequantize_into(call.out, call.out_exp, self.block, self.group.size, y,
                                  mean=mean)
        return call.out_exp.copy()

    def _fused_call(self, size: int) -> _Call:
        calls = self.__dict__.setdefault("_fused_calls", {})
        call = calls.pop(size, None)
        if call is None:
            if len(calls) >= self.FUSED_SIZES:
                calls.pop(next(iter(calls)))  # the least recently used size
            values = np.zeros(size, dtype=np.int32)  # its own send buffer, results over it
            # (an authenticated job's results in a buffer of their own: see _reduce; its
            # headers' tags are made by aggbox_quantize_call, once seq and exponent are in)
            results = values if self.key is None else np.zeros(size, dtype=np.int32)
            call = _Call(0, values, self.block, np.zeros(n_blocks(size, self.block),
                                                         dtype=np.int32), results)
            self._headers(call, F_ALIGN | (F_AUTH if self.key is not None else 0))
            self._attach_native(call)
            call.io.bits = quant.headroom_bits(self.group.size)
            call.io.n_workers = self.group.size
        calls[size] = call  # most recently used last
        return call

    def _buffer(self, name: str, size: int, dtype: np.dtype) -> np.ndarray:
        """``size`` values of a buffer kept across calls (grown for a bigger tensor), so
        that a call allocates nothing on the edge but its result."""
        buffers = self.__dict__.setdefault("_buffers", {})
        buf = buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size]

    def error_bound(self, result: np.ndarray, exponents: np.ndarray | None = None,
                    block: int | None = None) -> np.ndarray:
        """Per element, the bound on the last float call's error (aggbox/quant.py); or on
        ``result``'s, had its blocks of ``block`` values (default: this reducer's) come
        back with ``exponents`` (default: the last call's)."""
        return quant.error_bound(result,
                                 self.last_exponents if exponents is None else exponents,
                                 self.block if block is None else block, self.group.size,
                                 np.dtype(result.dtype), aligned=self.scale == "align")

    def reduce_int32(self, values: np.ndarray, op_max: bool = False) -> np.ndarray:
        """Element-wise sum (or max) of an int32 vector over the group, in the kernel."""
        return self._reduce(values, F_OP_MAX if op_max else 0)[0]

    def _reduce(self, values: np.ndarray, flags: int, exponents: np.ndarray | None = None,
                out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One in-kernel aggregation; returns the values (in ``out`` if given: int32,
        values.size) and, with F_ALIGN, the exponent each result block came back with."""
        values = np.ascontiguousarray(values, dtype=np.int32).reshape(-1)
        if self.key is not None and out is not None and np.may_share_memory(out, values):
            # An authenticated result's values are received into their slice before its
            # tag is checked: over the block's own values, a forged one (wrong tag, from
            # a spoofed source) would become what a later resend carries (the tag covers
            # the header only), and the sum would be wrong. Results get a buffer of their own.
            out = self._buffer("auth_results", values.size, np.int32)
        call = _Call(self.next_seq, values, self.block, exponents, out)
        self.next_seq = (self.next_seq + call.n_blocks) & SEQ_MASK  # the header's 32 bits
        if self.key is not None:
            flags |= F_AUTH
        self._headers(call, flags)
        self._attach_native(call)
        self._drive(call)
        return call.out, call.out_exp

    def _attach_native(self, call: _Call) -> None:
        """The structs edge.c runs the call through (none without the C library)."""
        call.io = self._native_blocks(call)
        if call.io is not None:
            call.rtts = np.zeros(2 * self.pool, dtype=np.float64)
            call.progress = native.Progress(
                sent_at=call.sent_at.ctypes.data, resent=call.resent.ctypes.data,
                fast_resent=call.fast_resent.ctypes.data, pool=self.pool,
                fast_gap=FAST_RESEND_GAP, rtts=call.rtts.ctypes.data,
                rtts_cap=call.rtts.size)

    def _drive(self, call: _Call) -> None:
        """Every block of the call to its result: sends, resends, timeouts."""
        last_progress, missing = time.monotonic(), None
        self.timer.progress()
        while call.low < call.n_blocks:
            if call.io is not None:
                progressed, idle = self._run_native(call)
            else:
                self._send_window(call)
                progressed = self._receive(call, self._wait_s())
                idle = not progressed
            if progressed:
                self.timer.progress()
                last_progress = time.monotonic()
            if not idle:
                continue
            missing = self._missing or missing
            if time.monotonic() - last_progress > self.timeout:
                self._give_up(call, missing)
            self._resend_outstanding(call)
            self.timer.expired()

    # -- sending -----------------------------------------------------------------------

    def _headers(self, call: _Call, flags: int) -> None:
        """Every block's header of the call at once (and its tag, for an authenticated
        job: one vectorised SipHash for the whole call, not one per packet)."""
        h = np.zeros(call.n_blocks, dtype=HEADER_DTYPE)
        h["magic"], h["version"], h["type"], h["flags"] = MAGIC, VERSION, MsgType.AGG, flags
        h["job_id"], h["token"], h["rank"] = self.group.job_id, self.group.token, self.group.rank
        h["seq"] = call.base + np.arange(call.n_blocks, dtype=np.uint32)
        h["count"] = call.block
        h["count"][-1] = call.values.size - (call.n_blocks - 1) * call.block
        if call.exponents is not None:
            h["scale_exp"] = call.exponents
        call.headers = h.view(np.uint8).reshape(call.n_blocks, HEADER_SIZE)
        if self.key is not None:
            call.tags = auth.tags(self.key, call.headers).view(np.uint8).reshape(-1, 8)

    def _native_blocks(self, call: _Call) -> native.Blocks | None:
        if self._io is None:
            return None
        # values and out may be one buffer (allreduce): block i's result lands over its
        # values, which are not needed once it came
        return native.Blocks(
            headers=call.headers.ctypes.data, values=call.values.ctypes.data,
            out=call.out.ctypes.data, out_exp=call.out_exp.ctypes.data,
            done=call.done.ctypes.data, block=call.block, size=call.values.size,
            n_blocks=call.n_blocks, base=call.base,
            aggregator_ip=int.from_bytes(socket.inet_aton(self.dest[0]), "little"),
            aggregator_port=socket.htons(self.dest[1]), job_id=self.group.job_id,
            token=self.group.token, epoch=self._known_epoch(),
            **self._native_auth(call))

    def _native_auth(self, call: _Call) -> dict:
        """An authenticated call's tags and key for edge.c (none: no fields)."""
        if self.key is None:
            return {}
        k0, k1 = auth.key_words(self.key)
        return {"tags": call.tags.ctypes.data, "k0": k0, "k1": k1}

    def _known_epoch(self) -> int:
        """The aggregator's epoch as edge.c takes it: -1 until the first reply."""
        return -1 if self.epoch is None else self.epoch

    def _packet(self, call: _Call, i: int) -> list:
        """Block i's datagram as sendmsg's buffers: its header, a view of its values in
        the send buffer (the kernel gathers them: no copy in user space) and its tag."""
        start, end = call.span(i)
        bufs = [call.headers[i], memoryview(call.values[start:end])]
        if call.tags is not None:
            bufs.append(call.tags[i])
        return bufs

    def _send_window(self, call: _Call) -> None:
        """Send every block the window allows: block i reuses the slot of block i - pool,
        so it goes only once everything below i - pool + 1 came back."""
        first = call.next_send
        last = min(call.n_blocks, call.low + self.pool)
        if first >= last:
            return
        call.sent_at[first:last] = time.monotonic()
        self._send_blocks(call, range(first, last))
        call.next_send = last
        self.stats["blocks"] += last - first

    def _send_blocks(self, call: _Call, blocks: range | list[int]) -> None:
        # One datagram per block: the aggregator drops GSO super-packets (one skb holding
        # several blocks), so there is no GSO option.
        if call.io is not None:
            if isinstance(blocks, range):
                rc = self._io.aggbox_send_blocks(self._fd, call.io, None, blocks.start,
                                                 len(blocks))
            else:
                idx = np.asarray(blocks, dtype=np.int64)  # held: C gets its address
                rc = self._io.aggbox_send_blocks(self._fd, call.io, idx.ctypes.data, 0,
                                                 idx.size)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))
            return
        sendmsg, dest = self.sock.sendmsg, self.dest
        for i in blocks:
            sendmsg(self._packet(call, i), (), 0, dest)

    min_probe_s = MIN_PROBE_S

    def _wait_s(self, after_progress: bool = False) -> float:
        """How long to wait for a result before resending: after progress, a tail-loss
        probe's 2 SRTT (at least min_probe_s), else the RTO with its back-off. A block
        lost among the call's last FAST_RESEND_GAP has too few later results for a fast
        resend and waited the whole RTO (5 ms at least). With the probe, a 100 000-value
        call at 20 % loss with 4 workers went from 2.1-2.9 s to 0.7-0.9 s; at 5 % loss,
        where a 2 x 256 Ki call waits for a timeout about once, the gain is small
        (docs/allreduce.md). ``after_progress``: the wait once a result comes (the
        back-off is over)."""
        timer = self.timer
        if timer.backoffs and not after_progress:
            return timer.current_s
        if timer.srtt_s is None or self._rto_pinned:
            return timer.rto_s
        return min(timer.rto_s, max(self.min_probe_s, 2 * timer.srtt_s))

    def _resend_outstanding(self, call: _Call) -> None:
        outstanding = [i for i in range(call.low, call.next_send) if not call.done[i]]
        probe = not self.timer.backoffs and not self._rto_pinned  # the wait was _wait_s's
        if probe:
            self.stats["probes"] = self.stats.get("probes", 0) + 1
        # The lowest block alone probes when the wait is on others or is not a tail.
        # Others: a worker descheduled past the timeout (busy CPUs) made every waiting
        # worker resend its whole window (32 blocks of up to 64 KiB) each timeout, and
        # the aggregator answer each copy with a status; the probe's status (or result)
        # tells whether that still holds, and if this worker's block was lost, the probe
        # is that block. Not a tail (a first timeout with more than FAST_RESEND_GAP
        # outstanding): fast resends cover the losses below later results, so what waits
        # is a peer or a lost resend.
        if call.waiting_on_others or (probe and len(outstanding) > FAST_RESEND_GAP):
            outstanding = outstanding[:1]
        call.waiting_on_others = False
        # No RTT sample from any block that waited across a timeout, resent or not: it
        # waited for a recovery (its own, or a peer's whose packet was lost), and such
        # samples (100-250 ms at 20 % loss) drove the RTO to its 0.2 s ceiling, where it
        # stayed: each long wait gave a long sample.
        call.resent[call.low:call.next_send] = True
        self._send_blocks(call, outstanding)
        self.stats["retransmits"] += len(outstanding)

    # -- receiving ---------------------------------------------------------------------

    _missing: list[int] | None = None

    #: Spin this long on a non-blocking receive before sleeping when results are due
    #: (the whole window is sent). None: decided per reducer (_spin_budget): on only when
    #: every worker can have a CPU of its own (more would spin on the CPU of the very
    #: workers whose sends complete its result: on one machine the aggregator's kernel
    #: runs in the senders' softirqs, on the sender's CPU), and off for good once the
    #: spins mostly miss (the CPUs are busier than the count says: other load). Sleeping
    #: costs a wake-up per result burst (an IPI and, in a VM, a halt exit): 2 x 256 Ki
    #: went from 1.20 to 0.99 ms per call with the spin (docs/allreduce.md).
    spin_s: float | None = None

    def _spin_budget(self) -> float:
        if self.spin_s is None:
            cpus = len(os.sched_getaffinity(0))
            self.spin_s = SPIN_S if self.group.size <= cpus else 0.0
        elif self.spin_s > 0:
            hits, misses = self.stats.get("spin_hits", 0), self.stats.get("spin_misses", 0)
            if misses > 2 * hits + 16:
                self.spin_s = 0.0
        return self.spin_s

    def _peek_header(self) -> bytearray:
        hdr = self.__dict__.get("_peek")
        if hdr is None:
            hdr = self._peek = bytearray(HEADER_SIZE)
        return hdr

    def _spin(self, call: _Call, hdr: bytearray) -> bool:
        """True as soon as a datagram is queued, within the spin budget (results due)."""
        budget = self._spin_budget()
        if budget <= 0 or call.next_send <= call.low:
            return False
        deadline = time.perf_counter() + budget
        while True:
            try:
                self.sock.recvfrom_into(hdr, HEADER_SIZE, _PEEK)
                self.stats["spin_hits"] = self.stats.get("spin_hits", 0) + 1
                return True
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    self.stats["spin_misses"] = self.stats.get("spin_misses", 0) + 1
                    return False

    def _receive(self, call: _Call, wait: float) -> bool:
        """Take results until one completes a block (True), or ``wait`` passes (False).
        Datagrams that are no progress (status replies, duplicates, refusals) do not end
        the wait: ending it on them answered every resend's status replies with another
        resend, a storm of retransmissions that lasted as long as a slow worker did.
        Each datagram's header is peeked first (MSG_PEEK, 32 bytes; MSG_TRUNC gives the
        datagram's whole length): only a checked result is then received, header and
        values in one recvmsg_into, straight into its block's slice of ``call.out``.
        (The Python path: with edge.c, aggbox_run does this for the plain results and
        leaves every other datagram to _take, see _run_native.)"""
        self._missing = None
        hdr = self._peek_header()
        deadline = None
        spun = self._spin(call, hdr)
        while True:
            if not spun:
                now = time.monotonic()
                deadline = now + wait if deadline is None else deadline
                if now >= deadline:
                    return False
                self.stats["waits"] = self.stats.get("waits", 0) + 1
                ready, _, _ = select.select([self.sock], [], [], deadline - now)
                if not ready:
                    return False
            spun = False
            progressed = False
            while True:
                try:
                    n, src = self.sock.recvfrom_into(hdr, HEADER_SIZE, _PEEK)
                except BlockingIOError:
                    break
                progressed |= self._take(call, n, src[0], hdr)
            if progressed:
                return True

    def _run_native(self, call: _Call) -> tuple[bool, bool]:
        """edge.c runs the call's steady state (aggbox_run: the window's sends, the plain
        results into place, fast resends, the waits) until it is done, a datagram needs
        _take's checks (taken here, then on), or no result came for the RTO. Returns
        (progressed, idle): whether a result came, and whether the RTO passed without
        one (the caller resends, as after _receive's False). Like _receive, datagrams
        that are no progress do not extend the wait. The wait after a result is the one
        after progress (_wait_s), not the backed-off one this run began with: kept, a
        call that had waited out a stall (RTOs doubled up to 0.2 s) waited that long for
        each of its later losses too; at 20 % loss the C loop took 4x the Python loop's
        time (which starts a new wait after each result)."""
        p = call.progress
        deadline = time.monotonic() + self._wait_s()
        progressed = False
        while True:
            p.low, p.next_send = call.low, call.next_send
            p.spin_s, p.n_rtts = self._spin_budget(), 0
            wait = self._wait_s(after_progress=True)
            code = self._io.aggbox_run(self._fd, call.io, p, wait,
                                       max(0.0, deadline - time.monotonic()))
            call.low, call.next_send = p.low, p.next_send
            if self._fold(p):  # results came
                progressed, deadline = True, p.progress_at + wait
            for rtt in call.rtts[:p.n_rtts]:  # every block's sample, as _take gives them
                self.timer.sample(float(rtt))
            if code < 0:
                raise OSError(-code, os.strerror(-code))
            if code == native.RUN_OTHER:  # one datagram queued that edge.c left alone
                hdr = self._peek_header()
                n, src = self.sock.recvfrom_into(hdr, HEADER_SIZE, _PEEK)
                if self._take(call, n, src[0], hdr):
                    progressed, deadline = True, time.monotonic() + wait
                if call.low >= call.n_blocks:
                    return True, False
            elif code != native.RUN_INTR:  # a signal: its handler ran, go on
                return progressed, code == native.RUN_IDLE

    def _fold(self, p: native.Progress) -> int:
        """Add the run's counters to the stats and zero them in ``p``; returns how many
        results the run took."""
        results = p.results
        for name in native.Progress.COUNTERS:
            value = getattr(p, name)
            if value:
                key = "blocks" if name == "sent" else name
                self.stats[key] = self.stats.get(key, 0) + value
                setattr(p, name, 0)
        return results

    def _refuse(self) -> bool:
        self.stats["refused"] += 1
        return self._discard()

    def _discard(self) -> bool:
        """Drop the queued datagram (a short receive: the rest of it is discarded)."""
        self.sock.recv_into(self._peek_header(), HEADER_SIZE, socket.MSG_DONTWAIT)
        return False

    def _take(self, call: _Call, n: int, src: str, hdr: bytearray) -> bool:
        """Take the queued datagram whose header ``hdr`` was peeked (``n``: its whole
        length): only the job's results from the aggregator's address, with the job's
        magic, version and token (anything else on the port is refused); only then are
        its values received, into their block's slice."""
        if n < HEADER_SIZE or src != self.dest[0]:
            return self._refuse()
        (magic, version, mtype, flags, job, token, seq, epoch, _rank, count, exp,
         aux) = HEADER.unpack_from(hdr)
        if (magic != MAGIC or version != VERSION or mtype != MsgType.AGG_RESULT
                or job != self.group.job_id or token != self.group.token):
            return self._refuse()
        i = (seq - call.base) & SEQ_MASK  # a call may straddle the wrap
        if not 0 <= i < call.n_blocks:
            self.stats["duplicates"] += 1  # a late answer to an earlier call
            return self._discard()
        if flags & F_STATUS:
            # the payload holds the 64-bit bitmap of the workers whose block is in
            n = self.sock.recv_into(self.rx, len(self.rx), socket.MSG_DONTWAIT)
            if self.key is not None and not (
                    count == 2 and n == HEADER_SIZE + 8 + auth.TAG_SIZE
                    and self._authentic(self.rx, self.rx[HEADER_SIZE + 8:n])):
                self.stats["refused"] += 1
                return False
            self._note_epoch(epoch, call, seq)
            done = (int.from_bytes(self.rx[HEADER_SIZE:HEADER_SIZE + 8], "little")
                    if count >= 2 and n >= HEADER_SIZE + 8 else aux)
            self._missing = [r for r in range(self.group.size) if not done >> r & 1]
            call.waiting_on_others = bool(done >> self.group.rank & 1)
            return False
        if call.done[i]:
            self.stats["duplicates"] += 1
            return self._discard()
        start, end = call.span(i)
        if count != end - start or n < HEADER_SIZE + 4 * count + self.tag_len:
            return self._refuse()
        if self.key is None:
            self.sock.recvmsg_into([hdr, memoryview(call.out[start:end])], 0,
                                   socket.MSG_DONTWAIT)
        else:
            # Into place, tag last: a result whose tag is wrong was never the kernel's;
            # its values are overwritten when the real result (or its resend) comes.
            self.sock.recvmsg_into([hdr, memoryview(call.out[start:end]), self._tag_rx], 0,
                                   socket.MSG_DONTWAIT)
            if not self._authentic(hdr, self._tag_rx):
                self.stats["refused"] += 1
                return False
        self._note_epoch(epoch, call, seq)
        call.out_exp[i] = exp
        call.done[i] = True
        if not call.resent[i]:
            self.timer.sample(time.monotonic() - call.sent_at[i])
        self.stats["results"] += 1
        while call.low < call.n_blocks and call.done[call.low]:
            call.low += 1
        if i >= call.low + FAST_RESEND_GAP:
            self._fast_resend(call, i)
        return True

    def _fast_resend(self, call: _Call, i: int) -> None:
        """Results come back in block order: a block still without its result when
        FAST_RESEND_GAP later ones have theirs was lost (it or its result), and is resent
        now, once, instead of after the retransmission timeout (whose 5 ms floor made a
        call at 5 % loss 10x slower than without)."""
        span = slice(call.low, i - FAST_RESEND_GAP + 1)
        lost = np.flatnonzero(~call.done[span] & ~call.fast_resent[span]) + call.low
        if lost.size:
            call.fast_resent[lost] = call.resent[lost] = True
            self._send_blocks(call, lost.tolist())
            self.stats["fast_retransmits"] = self.stats.get("fast_retransmits", 0) + lost.size

    def _note_epoch(self, epoch: int, call: _Call, seq: int) -> None:
        """A reply (for block ``seq``) from another installation of the job than the
        first: the aggregator restarted, and the blocks it had partly summed are gone."""
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            self.epoch = epoch
            self.restart_seen_at = seq
            self.stats["aggregator_restarts"] = self.stats.get("aggregator_restarts", 0) + 1
        if call.io is not None:
            call.io.epoch = epoch  # edge.c takes this installation's results from now on

    def _authentic(self, header: bytearray | memoryview, tag: bytearray | memoryview) -> bool:
        """An authenticated job's reply: the kernel's tag of its header under the key."""
        return len(tag) == auth.TAG_SIZE and auth.tag_of(tag) == auth.tag(self.key, header)

    def _give_up(self, call: _Call, missing: list[int] | None) -> None:
        seq = (call.base + call.low) & SEQ_MASK
        if (self.restart_seen_at is not None
                and (self.restart_seen_at - call.base) & SEQ_MASK < call.n_blocks):
            # The likely root cause: a worker whose block the old aggregator had (and
            # answered) never sends it again, and the new one waits for it.
            raise CollectiveTimeout(
                f"allreduce block {seq} made no progress for {self.timeout:g} s: the "
                f"aggregator ({self.dest[0]}) restarted during this call and lost the "
                "blocks it had partly summed; run the call again", missing or [])
        if missing:
            who = ", ".join(f"rank {r} ({self.group.members[r].ip})" for r in missing)
            detail = f"the aggregator is still waiting for {who}; is that worker running?"
        else:
            detail = f"the aggregator ({self.dest[0]}) did not answer"
        if self._restarted_near(seq):
            # A restart in an earlier call can still be the cause: a peer a window
            # behind may be stuck on a block this worker took from the old aggregator,
            # and it never sends what this block waits for (calls of a few blocks each).
            detail += (f"; the aggregator ({self.dest[0]}) restarted "
                       f"{(seq - self.restart_seen_at) & SEQ_MASK} blocks before this "
                       "one, losing the blocks it had partly summed: if every worker is "
                       "running, run the call again")
        raise CollectiveTimeout(
            f"allreduce block {seq} made no progress for {self.timeout:g} s: {detail}",
            missing or [])

    def _restarted_near(self, seq: int) -> bool:
        """Whether the aggregator restarted within two windows before block ``seq``: as
        far as the lowest block of a peer stuck by the restart can be behind it."""
        if self.restart_seen_at is None:
            return False
        return (seq - self.restart_seen_at) & SEQ_MASK <= 2 * self.pool

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Allreducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_group(job_id: int, token: int, workers: list[Member], aggregator: Member,
               rank: int, port: int = DEFAULT_PORTS[0], ifname: str = "eth0",
               auth_key: str = "") -> Group:
    """The Group an allreduce needs: members are the workers, plus the aggregator;
    ``auth_key`` (32 hex digits) makes it an authenticated job (aggbox/auth.py)."""
    return Group(job_id=job_id, token=token, members=tuple(workers), rank=rank, port=port,
                 ifname=ifname, aggregator=aggregator, auth_key=auth_key)
