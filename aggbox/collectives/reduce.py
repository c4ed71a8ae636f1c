"""In-kernel reduce-by-key: (key, int64 value) pairs summed per key in the reducer's kernel.

    result = reduce_by_key(pairs, group)   # every member calls it; reducers get a dict

Every member of ``group`` maps (sends its pairs; ``group.options["mappers"]`` narrows
that) and the ranks in ``group.options["reducers"]`` (default: every member) reduce: a key
goes to ``reducers[crc32(key) % len(reducers)]`` (:func:`reducer_of`). A reducer returns
the sum of every value sent for each of its keys, exactly; a member that only maps returns
None. Values are int64; the kernel sums them modulo 2**64.

The data path (bpf/reduce.c on each reducer host):
- pairs with keys of at most :data:`KEY_WIDTH` bytes (and no zero byte) are packed 60 to
  a packet; the reducer's kernel adds them into a BPF hash map keyed by the full key and
  turns the packet into an ACK, so the reducer's application never sees them;
- what the kernel cannot take (map full, a failed update, LONG packets carrying longer
  keys) comes up to the reducer's socket as a KV_SPILL; the application merges it, once
  per (mapper, seq), and acknowledges it itself;
- a mapper keeps at most ``window`` packets unacknowledged per reducer and resends after a
  timeout (from the measured packet-to-ACK time, SRTT + 4 RTTVAR clamped, doubling while
  nothing progresses: aggbox/collectives/rtt.py); the kernel's per-(mapper, seq) ring
  makes a resent packet count once;
- when everything of a mapper was acknowledged, it sends DONE; a reducer with every DONE
  reads its part of the map in batches, merges the spilled pairs and returns.

This module is the mapper/reducer API: pairs, their wire payloads, the endpoint
(:class:`ReduceByKey`) and :func:`reduce_by_key`. The kernel side (bpf/reduce.c loaded and
attached, its maps, counters and the mapped sums: :class:`ReduceByKeyPrograms`,
:class:`KernelSums`) is :mod:`aggbox.collectives.reduce_kernel`; its names are importable
from here as before.
"""

from __future__ import annotations

import select
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat

import numpy as np

from aggbox.collectives.group import Group
from aggbox.collectives.reduce_kernel import (  # noqa: F401 (re-exported: the kernel side's names)
    _DIR_KEY_DTYPE,
    _STATE_SPILLED,
    CHUNK,
    DEFAULT_PORTS,
    ENTRY_DTYPE,
    ENTRY_FREE,
    ENTRY_VALID,
    ENTRY_WASTED,
    MAP_ENTRIES,
    MAX_JOBS,
    RING,
    TC_PRIORITY,
    KernelSums,
    ReduceByKeyPrograms,
)
from aggbox.collectives.rtt import RetransmitTimer
from aggbox.errors import AggBoxError, CollectiveTimeout
from aggbox.protocol import (
    HEADER,
    HEADER_SIZE,
    KV_KEY_WIDTH,
    KV_MAX_PAIRS,
    KV_PAIR_SIZE,
    MAGIC,
    VERSION,
    Flags,
    MsgType,
    max_payload,
)
from aggbox.sockets import start_linger, udp_socket, udp_socket_taking_over  # noqa: F401 (udp_socket: tests use it from here)

KEY_WIDTH = KV_KEY_WIDTH
LINGER_S = 1.0  # a reducer keeps answering DONE retransmissions this long after it returns
LEARN_INTERVAL_S = 0.001  # a waiting reducer takes in new kernel keys this often
# The mapper's RTO ceiling (aggbox/collectives/rtt.py), the old fixed back-off's. Its
# floor is ReduceByKey's rto_s (10 ms): a packet's trip is the reducer's kernel turning it
# into an ACK in softirq, which a loaded machine defers to ksoftirqd for several ms; a 1 ms
# floor made loss-free jobs resend (kv_duplicate > 0 in tests/kernel/test_mapreduce.py).
# The measured RTT raises the timeout above it where the path is slower.
MAX_RTO_S = 0.2
_lingering: list[threading.Thread] = []

PAIR_DTYPE = np.dtype([("key", f"S{KEY_WIDTH}"), ("value", "<i8")])
_LONG_HEAD = struct.Struct("<H")
_VALUE = struct.Struct("<q")


def reducer_of(key: bytes, n_reducers: int) -> int:
    """Index (into the reducers' list) of the reducer that owns ``key``: the same in every
    process and in every system (AggBox and its baselines)."""
    return zlib.crc32(key) % n_reducers if n_reducers > 1 else 0


def fits_kernel(key: bytes) -> bool:
    """Can the kernel hold ``key``? At most KEY_WIDTH bytes and no zero byte (keys are
    zero-padded to the width, so a zero byte would make two keys look alike)."""
    return len(key) <= KEY_WIDTH and b"\0" not in key


@dataclass
class Pairs:
    """Pairs as two columns: ``keys`` and int64 ``values`` (None: every value is 1, the
    word-count case). Cheaper than a list of tuples for millions of pairs."""

    keys: list[bytes]
    values: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, pairs: Pairs | Mapping[bytes, int] | Iterable[tuple[bytes, int]]) -> Pairs:
        if isinstance(pairs, Pairs):
            return pairs
        if isinstance(pairs, Mapping):
            return cls(list(pairs.keys()), np.fromiter(pairs.values(), dtype=np.int64,
                                                       count=len(pairs)))
        columns = tuple(zip(*pairs, strict=True))  # one C-level pass, not a loop per pair
        if not columns:
            return cls([], np.zeros(0, dtype=np.int64))
        keys, values = columns
        return cls(list(keys), np.asarray(values, dtype=np.int64))

    def combine(self) -> Pairs:
        """The mapper-side combiner, the same for every system: one pair per key, values
        summed, keys in first-seen order. Word count's ``(word, 1)`` pairs are counted by
        ``collections.Counter`` (its C loop: measured faster than ``np.unique`` on the
        keys, ``pandas.value_counts`` or an interned-id ``bincount``); any other values
        through :class:`KeySums`."""
        if self.values is None:
            counts = Counter(self.keys)
            return Pairs(list(counts), np.fromiter(counts.values(), dtype=np.int64,
                                                   count=len(counts)))
        sums = KeySums()
        sums.add(self.keys, self.values)
        return sums.pairs()

    def combined(self) -> dict[bytes, int]:
        """:meth:`combine` as a dict."""
        c = self.combine()
        assert c.values is not None
        return dict(zip(c.keys, c.values.tolist(), strict=True))

    def values_list(self) -> list[int]:
        return [1] * len(self.keys) if self.values is None else self.values.tolist()


class KeySums:
    """``{key: int64 sum}`` merged a batch at a time, with no Python loop per pair.

    A batch costs one C-level pass over its keys (``map(dict.setdefault, keys, slots)``:
    a known key gives its slot, a new one takes the slot offered at its position) and one
    ``np.add.at`` of the values into an int64 array (sums modulo 2**64, as the kernel's).
    Offered slots a known key did not take stay unused: the array grows with the pairs
    added (8 bytes a pair, far less than the pairs themselves), which was measured
    cheaper than renumbering the keys to reclaim them. Keys iterate in first-seen order.
    Every user-space merge of every system goes through it: the TCP reducer's frames of
    combined pairs, AggBox's spilled pairs, a member's pairs for itself, the combiner on
    values other than 1.
    """

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}  # key -> its slot in _sums
        self._sums = np.zeros(1024, dtype=np.int64)
        self._next = 0  # slots below are taken or were offered

    def __len__(self) -> int:
        return len(self.index)

    def _make_room(self, n: int) -> None:
        grown = np.zeros(max(2 * len(self._sums), self._next + n), dtype=np.int64)
        grown[:self._next] = self._sums[:self._next]
        self._sums = grown

    def add(self, keys: Sequence[bytes], values: np.ndarray | Sequence[int] | None = None
            ) -> None:
        """Add ``values[i]`` to ``keys[i]``'s sum (None: 1 each)."""
        n = len(keys)
        if not n:
            return
        if self._next + n > len(self._sums):
            self._make_room(n)
        start = self._next
        slots = np.fromiter(map(self.index.setdefault, keys, range(start, start + n)),
                            dtype=np.int64, count=n)
        self._next = start + n
        np.add.at(self._sums, slots, 1 if values is None else np.asarray(values, np.int64))

    def add_mapping(self, counts: Mapping[bytes, int]) -> None:
        if counts:
            self.add(list(counts), np.fromiter(counts.values(), dtype=np.int64,
                                               count=len(counts)))

    def sums(self) -> np.ndarray:
        """The sums, in the order of the keys (``index``)."""
        slots = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        return self._sums[slots]

    def pairs(self) -> Pairs:
        return Pairs(list(self.index), self.sums())

    def to_dict(self) -> dict[bytes, int]:
        return dict(zip(self.index, self.sums().tolist(), strict=True))


def partition(keys: list[bytes], values: np.ndarray | None, reducers: list[int]
              ) -> dict[int, tuple[list[bytes], np.ndarray | None]]:
    """Pairs per reducer rank (:func:`reducer_of`), every system alike. The owner is
    computed once per distinct key; pairs are then split with array masks and
    ``itertools.compress`` (C-level passes, no Python loop per pair)."""
    n_red = len(reducers)
    if n_red == 1:
        return {reducers[0]: (keys, values)}
    distinct = list(dict.fromkeys(keys))
    owners = np.fromiter(map(zlib.crc32, distinct), dtype=np.int64, count=len(distinct))
    owner_of = dict(zip(distinct, (owners % n_red).tolist(), strict=True))
    idx = np.fromiter(map(owner_of.__getitem__, keys), dtype=np.int64, count=len(keys))
    parts: dict[int, tuple[list[bytes], np.ndarray | None]] = {}
    for i, rank in enumerate(reducers):
        mask = idx == i
        parts[rank] = (list(compress(keys, mask.tolist())),
                       None if values is None else values[mask])
    return parts


def bit_mask(bits: int, n: int) -> np.ndarray:
    """Bits 0..n-1 of a u64 (bit i -> element i) as a bool array."""
    raw = np.array([bits], dtype="<u8").view(np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


# ----------------------------------------------------------------- wire payloads -------


def encode_fixed(keys: list[bytes], values: np.ndarray) -> bytes:
    """Fixed-width pairs (keys that :func:`fits_kernel`), back to back."""
    arr = np.empty(len(keys), dtype=PAIR_DTYPE)
    arr["key"] = np.asarray(keys, dtype=f"S{KEY_WIDTH}")
    arr["value"] = values
    return arr.tobytes()


def decode_fixed(payload: bytes | memoryview, count: int) -> tuple[list[bytes], list[int]]:
    arr = np.frombuffer(payload, dtype=PAIR_DTYPE, count=count)
    # numpy's S dtype drops the zero padding: exact, since kernel keys hold no zero byte.
    return arr["key"].tolist(), arr["value"].tolist()


def long_pair_size(key: bytes) -> int:
    return _LONG_HEAD.size + len(key) + _VALUE.size


def encode_long(pairs: list[tuple[bytes, int]]) -> bytes:
    return b"".join(_LONG_HEAD.pack(len(k)) + k + _VALUE.pack(v) for k, v in pairs)


def decode_long(payload: bytes | memoryview, count: int) -> tuple[list[bytes], list[int]]:
    """LONG pairs: (u16 length, key, int64 value). Raises ValueError when malformed."""
    keys, values, off, buf = [], [], 0, bytes(payload)
    for _ in range(count):
        (n,) = _LONG_HEAD.unpack_from(buf, off)
        off += _LONG_HEAD.size
        if off + n + _VALUE.size > len(buf):
            raise ValueError("LONG pair runs past the packet")
        keys.append(buf[off:off + n])
        off += n
        values.append(_VALUE.unpack_from(buf, off)[0])
        off += _VALUE.size
    return keys, values


def _header(type_: int, group: Group, seq: int, count: int, flags: int = 0,
            aux: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type_, flags, group.job_id, group.token, seq, 0,
                       group.rank, count, 0, aux)


def build_packets(group: Group, keys: list[bytes], values: np.ndarray, mtu: int = 1500
                  ) -> list[bytes]:
    """One reducer's pairs as KV packets (seq 1, 2, ...): fixed-width pairs
    ``pairs_per_packet(mtu)`` to a packet, then the long keys in LONG packets."""
    per_packet = pairs_per_packet(mtu)
    # Which keys the kernel cannot hold: decided per distinct key (there are far fewer),
    # the zero-byte test on all of them at once (C speed), per key only when one has it.
    distinct = set(keys)
    long_keys = {k for k in distinct if len(k) > KEY_WIDTH}
    if b"\0" in b"".join(distinct):
        long_keys |= {k for k in distinct if b"\0" in k}
    long_pairs: list[tuple[bytes, int]] = []
    arr = np.empty(len(keys), dtype=PAIR_DTYPE)
    arr["key"] = np.asarray(keys, dtype=f"S{KEY_WIDTH}")  # long keys truncate: dropped below
    arr["value"] = values
    if long_keys:
        is_long = np.fromiter(map(long_keys.__contains__, keys), dtype=bool, count=len(keys))
        long_pairs = [(keys[i], int(values[i])) for i in np.flatnonzero(is_long).tolist()]
        arr = arr[~is_long]
    payload = arr.tobytes()
    packets: list[bytes] = []
    step = per_packet * KV_PAIR_SIZE
    for off in range(0, len(payload), step):
        chunk = payload[off:off + step]
        packets.append(_header(MsgType.KV, group, len(packets) + 1,
                               len(chunk) // KV_PAIR_SIZE) + chunk)
    room = max_payload(mtu)
    batch: list[tuple[bytes, int]] = []
    used = 0
    for k, v in long_pairs:
        size = long_pair_size(k)
        if size > room:
            raise AggBoxError(f"a key of {len(k)} bytes does not fit in one packet "
                              f"(at most {room - 10} bytes at MTU {mtu})")
        if batch and (used + size > room or len(batch) == KV_MAX_PAIRS):
            packets.append(_header(MsgType.KV, group, len(packets) + 1, len(batch),
                                   Flags.KV_LONG) + encode_long(batch))
            batch, used = [], 0
        batch.append((k, v))
        used += size
    if batch:
        packets.append(_header(MsgType.KV, group, len(packets) + 1, len(batch),
                               Flags.KV_LONG) + encode_long(batch))
    return packets


def pairs_per_packet(mtu: int = 1500) -> int:
    return min(KV_MAX_PAIRS, max_payload(mtu) // KV_PAIR_SIZE)

class KeyCounts(Mapping):
    """The reducer's result: a read-only ``{key: sum}`` over the kernel's sums (a
    snapshot array and the key directory) and the pairs merged in user space."""

    def __init__(self, directory: dict[bytes, int], values: np.ndarray,
                 extra: Mapping[bytes, int]):
        self._dir = directory
        self._values = values
        self._extra: dict[bytes, int] = {}
        if extra:  # pairs the kernel also holds go into its sums: array ops, no loop per key
            keys = list(extra)
            sums = np.fromiter(extra.values(), dtype=np.int64, count=len(keys))
            ids = np.fromiter(map(directory.get, keys, repeat(-1)), dtype=np.int64,
                              count=len(keys))
            known = ids >= 0
            np.add.at(values, ids[known], sums[known])
            self._extra = dict(zip(compress(keys, (~known).tolist()), sums[~known].tolist(),
                                   strict=True))
        self._dict: dict[bytes, int] | None = None

    def __getitem__(self, key: bytes) -> int:
        i = self._dir.get(key)
        if i is not None:
            return int(self._values[i])
        return self._extra[key]

    def __contains__(self, key: object) -> bool:
        return key in self._dir or key in self._extra

    def __iter__(self):
        yield from self._dir
        yield from self._extra

    def __len__(self) -> int:
        return len(self._dir) + len(self._extra)

    def to_dict(self) -> dict[bytes, int]:
        if self._dict is None:
            idx = np.fromiter(self._dir.values(), dtype=np.int64, count=len(self._dir))
            self._dict = dict(zip(self._dir, self._values[idx].tolist(), strict=True))
            self._dict.update(self._extra)
        return self._dict

    def items(self):
        return self.to_dict().items()

    def values(self):
        return self.to_dict().values()


# ----------------------------------------------------------------- the endpoint --------


@dataclass
class _Stream:
    """One mapper -> reducer stream: its packets, what is acknowledged, what is in flight."""

    reducer: int  # rank
    dest: tuple[str, int]
    packets: list[bytes]
    acked: bytearray = field(init=False)
    sent_at: list[float] = field(init=False)
    resent: bytearray = field(init=False)  # sent more than once: no RTT sample (Karn)
    next: int = 0  # index of the next packet never sent
    low: int = 0  # every index below is acknowledged
    done_sent_at: float = 0.0
    done_acked: bool = False

    def __post_init__(self) -> None:
        self.acked = bytearray(len(self.packets))
        self.sent_at = [0.0] * len(self.packets)
        self.resent = bytearray(len(self.packets))

    @property
    def data_acked(self) -> bool:
        return self.low >= len(self.packets)


class ReduceByKey:
    """One member's side of one reduce-by-key job (mapper, reducer, or both).

    ``run(pairs)`` sends this member's pairs, and on a reducer waits for every mapper and
    returns the counts of its keys. Use once; ``close()`` releases the socket and the job.
    """

    def __init__(self, group: Group, programs: ReduceByKeyPrograms | None = None,
                 combine: bool = True, window: int = 64, mtu: int = 1500,
                 rto_s: float = 0.01, timeout: float = 60.0):
        if not 1 <= window <= RING:
            raise AggBoxError(f"window must be 1..{RING} packets (the kernel's dedup ring)")
        self.group = group
        self.mappers = list(group.options.get("mappers", range(group.size)))
        self.reducers = list(group.options.get("reducers", range(group.size)))
        self.is_mapper = group.rank in self.mappers
        self.is_reducer = group.rank in self.reducers
        self.combine, self.window, self.mtu = combine, window, mtu
        self.rto_s, self.timeout = rto_s, timeout  # rto_s: the least timeout (see MAX_RTO_S)
        self.timer = RetransmitTimer(initial_s=rto_s, min_s=rto_s,
                                     max_s=max(rto_s, MAX_RTO_S))
        # The port first: an ended job's reducer lingering on it must let go of it, and of
        # its kernel job, before this job (perhaps with the same id) is installed.
        self.sock = udp_socket_taking_over(group.port, LINGER_S + 1.0)
        self.sock.setblocking(False)
        self._own_programs = False
        self.programs = programs
        if self.is_reducer and programs is None:
            self.programs = ReduceByKeyPrograms(group.ifname)
            self._own_programs = True
        self.kernel: KernelSums | None = None
        if self.is_reducer:
            self.programs.install_job(group)
            self.kernel = KernelSums(self.programs, group.job_id)
        self.streams: dict[int, _Stream] = {}
        self.by_ip = {m.ip: m.rank for m in group.members}
        # reducer state
        self.local = KeySums()  # pairs this member mapped to itself
        self.spilled = KeySums()
        self.merged: set[tuple[int, int]] = set()  # (mapper rank, seq) spills merged
        self.done_from: dict[int, int] = {}  # mapper rank -> packets it sent us
        self.merged_from: Counter = Counter()  # mapper rank -> spilled packets merged
        self._complete = False
        self.stats: dict[str, float] = {
            "pairs_in": 0, "pairs_sent": 0, "packets": 0, "retransmits": 0, "acks": 0,
            "spill_packets": 0, "spilled_pairs": 0, "spill_duplicates": 0, "map_keys": 0,
            "local_pairs": 0, "t_first_send": 0.0, "t_last_send": 0.0, "t_acked": 0.0,
            "t_done_sent": 0.0, "t_done_acked": 0.0, "t_done_in": 0.0, "t_all_done": 0.0,
            "read_s": 0.0,
        }
        self._closed = False

    # -- the public API -----------------------------------------------------------------

    def run(self, pairs: Pairs | Mapping[bytes, int] | Iterable[tuple[bytes, int]] | None
            ) -> KeyCounts | None:
        """Send ``pairs`` (a mapper's; None for a reducer that maps nothing), then on a
        reducer wait for every mapper and return its keys' sums."""
        if self.is_mapper:
            self._prepare(Pairs.of(pairs if pairs is not None else []))
        deadline_idle = self.timeout
        last_progress = last_learn = time.monotonic()
        timer = self.timer
        timer.progress()
        while not self._finished():
            progressed = self._send_new()
            wait = 0.0 if progressed else timer.current_s
            if self.kernel is not None:
                # Once every mapper announced its end, only resent packets are missing:
                # look at the kernel's counts often.
                wait = min(wait, 0.0002 if self._announced() else LEARN_INTERVAL_S)
            progressed |= self._receive(wait=wait)
            now = time.monotonic()
            if self.kernel is not None and now - last_learn >= LEARN_INTERVAL_S:
                self.kernel.learn()  # while waiting: the keys, so that only sums are left
                last_learn = now
            if progressed:
                last_progress = now
                timer.progress()
                continue
            if now - last_progress > deadline_idle:
                self._give_up()
            if self._resend(now, timer.current_s):
                timer.expired()
        if not self.is_reducer:
            return None
        return self._result()

    # -- mapper ---------------------------------------------------------------------------

    def _prepare(self, pairs: Pairs) -> None:
        self.stats["pairs_in"] = len(pairs)
        if self.combine:
            pairs = pairs.combine()
        keys = pairs.keys
        values = (np.ones(len(keys), dtype=np.int64) if pairs.values is None
                  else np.asarray(pairs.values, dtype=np.int64))
        for rank, (k, v) in partition(keys, values, self.reducers).items():
            if rank == self.group.rank:  # pairs for ourselves never cross a wire
                self.local.add(k, v)
                self.stats["local_pairs"] += len(k)
                continue
            m = self.group.members[rank]
            self.streams[rank] = _Stream(rank, (m.ip, self.group.port),
                                         build_packets(self.group, k, v, self.mtu))
            self.stats["pairs_sent"] += len(k)

    def _send_new(self) -> bool:
        """Send what the windows allow; DONE once a stream is wholly acknowledged."""
        sent = False
        now = time.monotonic()
        for st in self.streams.values():
            limit = min(len(st.packets), st.low + self.window)
            if st.next < limit:
                if not self.stats["t_first_send"]:
                    self.stats["t_first_send"] = now
                send = self.sock.sendto
                for i in range(st.next, limit):
                    send(st.packets[i], st.dest)
                    st.sent_at[i] = now
                self.stats["packets"] += limit - st.next
                st.next = limit
                self.stats["t_last_send"] = time.monotonic()
                sent = True
            elif st.next >= len(st.packets) and not st.done_sent_at:
                # Right behind the last packet: it tells the reducer how many to expect;
                # the reducer checks its kernel's counts, not our ACKs.
                self._send_done(st, now)
                sent = True
        return sent

    def _send_done(self, st: _Stream, now: float) -> None:
        self.sock.sendto(_header(MsgType.KV, self.group, 0, 0, Flags.KV_DONE,
                                 len(st.packets)), st.dest)
        if not st.done_sent_at:
            self.stats["t_done_sent"] = now
        st.done_sent_at = now

    def _resend(self, now: float, rto: float) -> bool:
        """Resend what has waited longer than ``rto``. True if anything was resent."""
        resent = False
        for st in self.streams.values():
            for i in range(st.low, st.next):
                if not st.acked[i] and now - st.sent_at[i] >= rto:
                    self.sock.sendto(st.packets[i], st.dest)
                    st.sent_at[i] = now
                    st.resent[i] = 1
                    self.stats["retransmits"] += 1
                    resent = True
            if st.done_sent_at and not st.done_acked and now - st.done_sent_at >= rto:
                self._send_done(st, now)
                self.stats["retransmits"] += 1
                resent = True
        return resent

    def _on_ack(self, rank: int, seq: int, flags: int) -> bool:
        st = self.streams.get(rank)
        if st is None:
            return False
        if flags & Flags.KV_DONE:
            if st.done_acked:
                return False
            st.done_acked = True
            self.stats["t_done_acked"] = time.monotonic()
            return True
        i = seq - 1
        if not 0 <= i < st.next or st.acked[i]:
            return False
        st.acked[i] = 1
        if not st.resent[i]:
            self.timer.sample(time.monotonic() - st.sent_at[i])
        self.stats["acks"] += 1
        while st.low < st.next and st.acked[st.low]:
            st.low += 1
        if st.data_acked:
            self.stats["t_acked"] = time.monotonic()
        return True

    # -- reducer --------------------------------------------------------------------------

    def _ack(self, rank: int, seq: int, flags: int = 0) -> None:
        m = self.group.members[rank]
        self.sock.sendto(_header(MsgType.KV_ACK, self.group, seq, 0, flags),
                         (m.ip, self.group.port))

    def _on_spill(self, rank: int, seq: int, flags: int, count: int, payload: memoryview
                  ) -> bool:
        if (rank, seq) in self.merged:
            self.stats["spill_duplicates"] += 1
            self._ack(rank, seq)
            return False
        bits = self.programs.spill_bits(self.group.job_id, rank, seq)
        if bits is None:
            return False  # not a spill the kernel recorded: ignore it
        try:
            if flags & Flags.KV_LONG:
                keys, values = decode_long(payload, count)
            else:
                keys, values = decode_fixed(payload, count)
        except (ValueError, struct.error):
            return False  # malformed: never acknowledged, never merged
        mask = bit_mask(bits, len(keys))  # the pairs the kernel did not take
        n = int(mask.sum())
        if n:
            self.spilled.add(list(compress(keys, mask.tolist())),
                             np.asarray(values, dtype=np.int64)[mask])
        self.merged.add((rank, seq))
        self.merged_from[rank] += 1
        self.stats["spill_packets"] += 1
        self.stats["spilled_pairs"] += n
        self._ack(rank, seq)
        return True

    def _on_done(self, rank: int, packets: int) -> bool:
        self._ack(rank, 0, Flags.KV_DONE)
        if rank in self.done_from or rank not in self.mappers:
            return False
        self.done_from[rank] = packets
        self.stats["t_done_in"] = time.monotonic()
        return True

    def _all_done(self) -> bool:
        """Has every mapper said DONE, and has this host's kernel finished every packet
        it announced (taken, or spilled and merged here)?"""
        if self._complete:
            return True
        assert self.kernel is not None
        for r in self.mappers:
            if r == self.group.rank:
                continue
            if r not in self.done_from:
                return False
            taken, spilled = self.programs.stream_counts(self.kernel.slot, r)
            if taken + spilled < self.done_from[r] or self.merged_from[r] < spilled:
                return False  # a packet still to be resent, or its spill still to come
        self._complete = True
        self.stats["t_all_done"] = time.monotonic()
        return True

    def _announced(self) -> bool:
        return all(r in self.done_from for r in self.mappers if r != self.group.rank)

    def _result(self) -> KeyCounts:
        t0 = time.monotonic()
        assert self.kernel is not None
        values = self.kernel.snapshot()
        extra = self.spilled
        if len(self.local):
            extra = KeySums()
            for part in (self.spilled, self.local):
                extra.add(list(part.index), part.sums())
        result = KeyCounts(self.kernel.directory, values, extra.to_dict())
        self.stats["map_keys"] = len(self.kernel.directory)
        self.stats["read_s"] = time.monotonic() - t0
        return result

    # -- the loop -------------------------------------------------------------------------

    def _finished(self) -> bool:
        mapped = all(st.data_acked and st.done_acked for st in self.streams.values())
        return mapped and (not self.is_reducer or self._all_done())

    def _receive(self, wait: float) -> bool:
        """Handle every packet that arrives within ``wait``. True if anything progressed."""
        if wait > 0:
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return False
        progressed = False
        recv = self.sock.recvfrom
        unpack = HEADER.unpack_from
        while True:
            try:
                buf, addr = recv(2048)
            except BlockingIOError:
                return progressed
            if len(buf) < HEADER_SIZE:
                continue
            (magic, version, type_, flags, job_id, token, seq, _round, rank, count, _scale,
             aux) = unpack(buf)
            if (magic != MAGIC or version != VERSION or job_id != self.group.job_id
                    or token != self.group.token or self.by_ip.get(addr[0]) != rank):
                continue
            if type_ == MsgType.KV_ACK:
                progressed |= self._on_ack(rank, seq, flags)
            elif not self.is_reducer:
                continue
            elif type_ == MsgType.KV_SPILL:
                progressed |= self._on_spill(rank, seq, flags, count,
                                             memoryview(buf)[HEADER_SIZE:])
            elif type_ == MsgType.KV and flags & Flags.KV_DONE:
                progressed |= self._on_done(rank, aux)

    def _give_up(self) -> None:
        lagging = sorted({st.reducer for st in self.streams.values()
                          if not (st.data_acked and st.done_acked)})
        silent = sorted(r for r in self.mappers
                        if self.is_reducer and r != self.group.rank and r not in self.done_from)
        short = sorted(r for r in self.done_from if self.is_reducer and not self._complete)
        parts = []
        if lagging:
            parts.append("reducers " + ", ".join(f"rank {r} ({self.group.members[r].ip})"
                                                 for r in lagging)
                         + " did not acknowledge everything")
        if silent:
            parts.append("mappers " + ", ".join(f"rank {r} ({self.group.members[r].ip})"
                                                for r in silent) + " never said DONE")
        if short and not silent:
            counts = {r: self.programs.stream_counts(self.kernel.slot, r) for r in short}
            parts.append("packets announced but not all in: " + ", ".join(
                f"rank {r}: {sum(counts[r])} of {self.done_from[r]}" for r in short))
        raise CollectiveTimeout(
            f"reduce-by-key job {self.group.job_id}: no progress for {self.timeout:.0f} s: "
            + "; ".join(parts) + ". Are they running and reachable?", lagging + silent)

    # -- closing --------------------------------------------------------------------------

    def close(self, linger: bool = True) -> None:
        """Release the socket and the kernel job. A reducer that returned keeps answering
        DONE retransmissions (its last DONE-ACK may have been lost) for LINGER_S, in a
        daemon thread, before it lets go."""
        if self._closed:
            return
        self._closed = True
        if self.is_reducer and self.programs is not None:
            self.programs.finish_job(self.group.job_id)
        if linger and self.is_reducer and self.done_from:
            _lingering.append(start_linger(self.group.port, self.sock, LINGER_S,
                                           lambda: self._receive(0.0), self._release))
            return
        self._release()

    def _release(self) -> None:
        self.sock.close()
        if self.is_reducer and self.programs is not None:
            if self._own_programs:
                self.programs.close()
            else:
                self.programs.remove_job(self.group.job_id)

    def __enter__(self) -> ReduceByKey:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_lingering(timeout: float = LINGER_S + 1.0) -> None:
    """Wait for closed reducers that still answer DONE retransmissions (call before
    closing the ReduceByKeyPrograms they use)."""
    end = time.monotonic() + timeout
    while _lingering:
        _lingering.pop().join(max(0.0, end - time.monotonic()))


def reduce_by_key(pairs: Pairs | Mapping[bytes, int] | Iterable[tuple[bytes, int]] | None,
                  group: Group, programs: ReduceByKeyPrograms | None = None,
                  **options) -> KeyCounts | None:
    """Sum int64 values per key across ``group``, in the reducers' kernels.

    Every member calls it with its own pairs. A reducer (``group.options["reducers"]``,
    default every member) returns ``{key: sum}`` (a read-only Mapping, :class:`KeyCounts`;
    ``to_dict()`` for a dict) for the keys it owns (:func:`reducer_of`);
    a member that only maps returns None. ``options``: ``combine`` (sum per key before
    sending, default True), ``window``, ``mtu``, ``rto_s``, ``timeout``.
    """
    endpoint = ReduceByKey(group, programs, **options)
    try:
        return endpoint.run(pairs)
    finally:
        endpoint.close()
