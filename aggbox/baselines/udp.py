"""Broadcast over UDP unicast, as a good engineer would write it: the root sends each
packet to every member in a loop (no kernel help), each member's application
acknowledges whole messages, and the root resends to the members that did not ack."""

from __future__ import annotations

import select
import socket
import time

from aggbox.collectives.group import Group
from aggbox.errors import CollectiveTimeout
from aggbox.protocol import HEADER_SIZE, Flags, Header, MsgType, max_payload
from aggbox.sockets import udp_socket

PROMISE = "app"  # send returns once every member's application has the message


class UdpBroadcaster:
    """The root: ``send`` returns once every member's application acknowledged."""

    def __init__(self, group: Group, mtu: int = 1500, rto_s: float = 0.02):
        self.group = group
        self.sock = udp_socket(group.port)
        self.payload_max = max_payload(mtu)
        self.rto_s = rto_s
        self.msg_no = 0
        self.retransmits = 0

    def _packets(self, data: bytes) -> list[bytes]:
        step = self.payload_max
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        out = []
        for index, chunk in enumerate(chunks):
            flags = Flags.LAST_FRAG if index == len(chunks) - 1 else Flags.NONE
            hdr = Header(type=MsgType.DATA, job_id=self.group.job_id, token=self.group.token,
                         seq=index, rank=self.group.rank, count=len(chunk), aux=self.msg_no,
                         flags=int(flags))
            out.append(hdr.pack() + chunk)
        return out

    @property
    def stats(self) -> dict[str, int]:
        return {"retransmits": self.retransmits}

    def send(self, data: bytes, timeout: float = 5.0) -> int:
        self.msg_no += 1
        packets = self._packets(data)
        waiting = {m.ip: m.rank for m in self.group.receivers}
        self._first_copy(packets, waiting)
        deadline = time.monotonic() + timeout
        rto = self.rto_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(
                    f"UDP broadcast {self.msg_no}: no ack from ranks {sorted(waiting.values())}",
                    sorted(waiting.values()))
            ready, _, _ = select.select([self.sock], [], [], min(rto, left))
            if not ready:
                # Only the members that did not ack get the message again.
                self._unicast(packets, waiting)
                self.retransmits += len(packets) * len(waiting)
                rto = min(rto * 2, 0.5)
                continue
            self._drain(waiting)
        return self.msg_no

    def _first_copy(self, packets: list[bytes], waiting: dict[str, int]) -> None:
        """How a message first reaches the members: here one copy per member (mcast
        overrides it with one copy to the group)."""
        self._unicast(packets, waiting)

    def _unicast(self, packets: list[bytes], ips: dict[str, int]) -> None:
        for ip in ips:
            for pkt in packets:
                self.sock.sendto(pkt, (ip, self.group.port))

    def _drain(self, waiting: dict[str, int]) -> None:
        while True:
            try:
                buf, addr = self.sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if len(buf) < HEADER_SIZE:
                continue
            hdr = Header.unpack(buf)
            if hdr.type == MsgType.ACK and hdr.aux >= self.msg_no:
                waiting.pop(addr[0], None)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpBroadcaster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UdpReceiver:
    """A member: reassembles each message, acknowledges it, drops duplicates."""

    def __init__(self, group: Group):
        self.group = group
        self.sock = udp_socket(group.port)
        self.root_ip = group.members[group.root].ip
        self.delivered = 0  # highest message number returned
        self.frags: dict[int, dict[int, bytes]] = {}
        self.last_index: dict[int, int] = {}
        self.ready: dict[int, bytes] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, timeout: float | None = None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.delivered + 1 not in self.ready:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            self._drain()
        self.delivered += 1
        return self.ready.pop(self.delivered)

    def _drain(self) -> None:
        while True:
            try:
                buf, _ = self.sock.recvfrom(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if len(buf) >= HEADER_SIZE:
                self._take(Header.unpack(buf), buf[HEADER_SIZE:])

    def _take(self, hdr: Header, payload: bytes) -> None:
        if hdr.type != MsgType.DATA or hdr.job_id != self.group.job_id:
            return
        msg = hdr.aux
        if msg <= self.delivered or msg in self.ready:
            self._ack(msg)  # our earlier ack was lost
            return
        parts = self.frags.setdefault(msg, {})
        parts[hdr.seq] = payload[:hdr.count]
        if hdr.flags & Flags.LAST_FRAG:
            self.last_index[msg] = hdr.seq
        last = self.last_index.get(msg)
        if last is not None and len(parts) == last + 1:
            self.ready[msg] = b"".join(parts[i] for i in range(last + 1))
            del self.frags[msg], self.last_index[msg]
            self._ack(msg)

    def _ack(self, msg: int) -> None:
        hdr = Header(type=MsgType.ACK, job_id=self.group.job_id, token=self.group.token,
                     rank=self.group.rank, aux=msg)
        self.sock.sendto(hdr.pack(), (self.root_ip, self.group.port))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
