"""Reduce-by-key over a TCP shuffle to a Python reducer: the classic MapReduce baseline.

Same interface as :class:`aggbox.collectives.reduce.ReduceByKey` (``run(pairs)`` returns a
reducer's ``{key: sum}``, None on a member that only maps), same key -> reducer function
(:func:`~aggbox.collectives.reduce.reducer_of`). Written as well as we know how:

- one persistent connection per (mapper, reducer), large buffers, no per-pair syscall:
  pairs go in frames of ``batch`` pairs, each one ``sendall``;
- a frame is keys joined by newlines (one C-level ``bytes.join`` / ``bytes.split``),
  plus int64 values as one array; frames whose values are all 1 (no combiner: word
  count's ``(word, 1)``) carry no values, and the reducer counts their keys with
  ``Counter.update`` (C-level ``_count_elements``: measured faster than interning the
  keys to ids and ``np.add.at``); frames with values are merged by
  :class:`~aggbox.collectives.reduce.KeySums` (C-level passes and ``np.add.at``, no
  Python loop per pair); keys that hold a newline make the frame length-prefixed instead;
- the reducer reads every connection with one ``selectors`` loop into per-connection
  buffers (``recv_into`` 1 MiB) and merges frames as they arrive.

``combine=True`` is the same with the mapper-side combiner AggBox uses
(:meth:`~aggbox.collectives.reduce.Pairs.combine`: one pair per key per mapper), and the
same key partitioning (:func:`~aggbox.collectives.reduce.partition`).
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

from aggbox.collectives.group import Group
from aggbox.collectives.reduce import KeySums, Pairs, partition
from aggbox.errors import AggBoxError, CollectiveTimeout

FRAME = struct.Struct("<BII")  # kind, pairs, key bytes
K_UNIT = 1  # newline-joined keys, every value 1
K_VALUES = 2  # newline-joined keys, then int64 values
K_LONG_UNIT = 3  # (u32 length, key) * n, every value 1
K_LONG_VALUES = 4  # (u32 length, key) * n, then int64 values
K_END = 5
BUFFER_BYTES = 4 << 20
RECV_BYTES = 1 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)


def encode_frame(keys: list[bytes], values: np.ndarray | None) -> bytes:
    """One frame: ``values`` None means every value is 1."""
    blob = b"\n".join(keys)
    if blob.count(b"\n") == len(keys) - 1 and not (len(keys) == 1 and keys[0] == b""):
        kind = K_UNIT if values is None else K_VALUES
    else:  # a key holds a newline (or the one key is empty): length-prefixed keys
        blob = b"".join(struct.pack("<I", len(k)) + k for k in keys)
        kind = K_LONG_UNIT if values is None else K_LONG_VALUES
    head = FRAME.pack(kind, len(keys), len(blob))
    if values is None:
        return head + blob
    return head + blob + np.asarray(values, dtype="<i8").tobytes()


def _split_long(blob: bytes, n: int) -> list[bytes]:
    keys, off = [], 0
    for _ in range(n):
        (length,) = struct.unpack_from("<I", blob, off)
        keys.append(blob[off + 4:off + 4 + length])
        off += 4 + length
    return keys


class TcpShuffle:
    """One member's side of one reduce-by-key job over TCP."""

    def __init__(self, group: Group, combine: bool = False, batch: int = 16384,
                 timeout: float = 60.0, connect_timeout: float = 15.0):
        self.group = group
        self.mappers = list(group.options.get("mappers", range(group.size)))
        self.reducers = list(group.options.get("reducers", range(group.size)))
        self.is_mapper = group.rank in self.mappers
        self.is_reducer = group.rank in self.reducers
        self.combine, self.batch = combine, batch
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.listener: socket.socket | None = None
        if self.is_reducer:  # listening before anyone may connect
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
            self.listener.bind(("0.0.0.0", group.port))
            self.listener.listen(max(8, group.size))
        self._reset_counts()
        self.stats: dict[str, float] = {"pairs_in": 0, "pairs_sent": 0, "frames": 0,
                                        "bytes": 0, "t_first_send": 0.0, "t_last_send": 0.0,
                                        "t_all_done": 0.0}

    def _reset_counts(self) -> None:
        self.counts: Counter = Counter()  # frames of (key, 1) pairs
        self.sums = KeySums()  # frames with values, and this member's pairs for itself

    def run(self, pairs: Pairs | Mapping[bytes, int] | Iterable[tuple[bytes, int]] | None
            ) -> dict[bytes, int] | None:
        if self.is_mapper:
            self._map(Pairs.of(pairs if pairs is not None else []))
        if not self.is_reducer:
            return None
        self._reduce()
        return self.merged()

    def merged(self) -> dict[bytes, int]:
        """The reducer's counts: both accumulators (a job fills one of them, unless some
        mapper's combined values were all 1)."""
        if not len(self.sums):
            return dict(self.counts)
        self.sums.add_mapping(self.counts)
        self.counts = Counter()
        return self.sums.to_dict()

    # -- mapper -----------------------------------------------------------------------

    def _map(self, pairs: Pairs) -> None:
        self.stats["pairs_in"] = len(pairs)
        if self.combine:
            pairs = pairs.combine()
        keys, values = pairs.keys, pairs.values
        if values is not None and len(values) and (values == 1).all():
            values = None  # (word, 1) pairs: the values need not travel
        parts = partition(keys, values, self.reducers)
        conns: dict[int, socket.socket] = {}
        try:
            deadline = time.monotonic() + self.connect_timeout
            for rank in parts:
                if rank != self.group.rank:
                    conns[rank] = self._connect(self.group.members[rank].ip, deadline)
            self.stats["t_first_send"] = time.monotonic()
            for rank, (k, v) in parts.items():
                if rank == self.group.rank:
                    self.sums.add(k, v)
                    continue
                sock = conns[rank]
                for off in range(0, len(k), self.batch):
                    frame = encode_frame(k[off:off + self.batch],
                                         None if v is None else v[off:off + self.batch])
                    sock.sendall(frame)
                    self.stats["frames"] += 1
                    self.stats["bytes"] += len(frame)
                self.stats["pairs_sent"] += len(k)
            for sock in conns.values():
                sock.sendall(FRAME.pack(K_END, 0, 0))
            self.stats["t_last_send"] = time.monotonic()
            for sock in conns.values():
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(self.timeout)
                sock.recv(1)  # the reducer closes after END: our data has been read
        finally:
            for sock in conns.values():
                sock.close()

    def _connect(self, ip: str, deadline: float) -> socket.socket:
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            _tune(sock)
            sock.settimeout(1.0)
            try:
                sock.connect((ip, self.group.port))
                sock.settimeout(None)
                return sock
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise AggBoxError(f"cannot connect to reducer {ip}:{self.group.port}: "
                                      f"{exc}") from exc
                time.sleep(0.02)

    # -- reducer ----------------------------------------------------------------------

    def _reduce(self) -> None:
        expected = {r for r in self.mappers if r != self.group.rank}
        ip_rank = {m.ip: m.rank for m in self.group.members}
        sel = selectors.DefaultSelector()
        assert self.listener is not None
        sel.register(self.listener, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, bytearray] = {}
        ended: set[int] = set()
        last_progress = time.monotonic()
        chunk = bytearray(RECV_BYTES)
        view = memoryview(chunk)
        try:
            while ended != expected:
                events = sel.select(timeout=1.0)
                if not events and time.monotonic() - last_progress > self.timeout:
                    missing = sorted(expected - ended)
                    raise CollectiveTimeout(
                        f"TCP shuffle job {self.group.job_id}: no END from mapper ranks "
                        f"{missing} for {self.timeout:.0f} s", missing)
                for key, _ in events:
                    if key.data is None:
                        conn, addr = self.listener.accept()
                        _tune(conn)
                        conn.setblocking(False)
                        rank = ip_rank.get(addr[0])
                        if rank not in expected:
                            conn.close()
                            continue
                        buffers[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ, rank)
                        continue
                    conn, rank = key.fileobj, key.data
                    try:
                        n = conn.recv_into(chunk)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        sel.unregister(conn)
                        conn.close()
                        if rank not in ended:
                            raise AggBoxError(f"mapper rank {rank} closed its connection "
                                              "before END")
                        continue
                    last_progress = time.monotonic()
                    buf = buffers[conn]
                    buf += view[:n]
                    if self._take_frames(buf):
                        ended.add(rank)
                        sel.unregister(conn)
                        conn.close()  # tells the mapper all its data was read
            self.stats["t_all_done"] = time.monotonic()
        finally:
            for key in list(sel.get_map().values()):
                if key.data is not None:
                    key.fileobj.close()
            sel.close()

    def _take_frames(self, buf: bytearray) -> bool:
        """Merge every whole frame at the head of ``buf``; True once END was read."""
        off = 0
        end = False
        size = len(buf)
        while size - off >= FRAME.size:
            kind, n, klen = FRAME.unpack_from(buf, off)
            vlen = 8 * n if kind in (K_VALUES, K_LONG_VALUES) else 0
            total = FRAME.size + klen + vlen
            if size - off < total:
                break
            body = off + FRAME.size
            if kind == K_END:
                end = True
                off += total
                break
            blob = bytes(buf[body:body + klen])
            keys = blob.split(b"\n") if kind in (K_UNIT, K_VALUES) else _split_long(blob, n)
            if kind in (K_UNIT, K_LONG_UNIT):
                self.counts.update(keys)
            elif kind in (K_VALUES, K_LONG_VALUES):
                raw = bytes(buf[body + klen:body + klen + vlen])  # buf is resized below
                self.sums.add(keys, np.frombuffer(raw, dtype="<i8"))
            else:
                raise AggBoxError(f"TCP shuffle: unknown frame kind {kind}")
            off += total
        del buf[:off]
        return end

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def __enter__(self) -> TcpShuffle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
