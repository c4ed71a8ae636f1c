"""Broadcast over TCP, as a good engineer would write it: one persistent connection per
member (TCP_NODELAY), the message framed once and written with one ``sendall`` per
member, and an application-level acknowledgment from each member's application."""

from __future__ import annotations

import select
import socket
import struct
import time

from aggbox.collectives.group import Group
from aggbox.errors import AggBoxError, CollectiveTimeout

FRAME = struct.Struct("<QI")  # message number, payload length
ACK = struct.Struct("<Q")  # message number acknowledged
PROMISE = "app"  # send returns once every member's application has the message


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpBroadcaster:
    """The root: connects to every member once, then ``send`` frames to all of them."""

    def __init__(self, group: Group, connect_timeout: float = 15.0):
        self.group = group
        self.msg_no = 0
        self.conns: dict[int, socket.socket] = {}
        deadline = time.monotonic() + connect_timeout
        for m in group.receivers:
            self.conns[m.rank] = self._connect(m.ip, group.port, deadline)
        self._pending = {r: b"" for r in self.conns}

    @staticmethod
    def _connect(ip: str, port: int, deadline: float) -> socket.socket:
        while True:
            try:
                sock = socket.create_connection((ip, port), timeout=1.0)
                _tune(sock)
                sock.settimeout(None)
                return sock
            except OSError as exc:  # the member may not be listening yet
                if time.monotonic() >= deadline:
                    raise AggBoxError(f"cannot connect to member {ip}:{port}: {exc}") from exc
                time.sleep(0.05)

    def send(self, data: bytes, timeout: float = 5.0) -> int:
        self.msg_no += 1
        frame = FRAME.pack(self.msg_no, len(data)) + data
        for rank, sock in self.conns.items():
            try:
                sock.sendall(frame)
            except OSError as exc:  # a clear error naming the member, not a traceback
                raise AggBoxError(f"member rank {rank} ({self.group.members[rank].ip}) "
                                  f"broke its TCP broadcast connection: {exc}") from exc
        self._wait_acks(self.msg_no, time.monotonic() + timeout)
        return self.msg_no

    def _wait_acks(self, msg_no: int, deadline: float) -> None:
        waiting = {sock: rank for rank, sock in self.conns.items()}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(
                    f"TCP broadcast {msg_no}: no ack from ranks {sorted(waiting.values())}",
                    sorted(waiting.values()))
            ready, _, _ = select.select(list(waiting), [], [], left)
            for sock in ready:
                rank = waiting[sock]
                try:
                    chunk = sock.recv(ACK.size - len(self._pending[rank]))
                except OSError as exc:
                    raise AggBoxError(f"member rank {rank} broke its connection: {exc}") from exc
                if not chunk:
                    raise AggBoxError(f"member rank {rank} closed its connection")
                self._pending[rank] += chunk
                if len(self._pending[rank]) == ACK.size:
                    (acked,) = ACK.unpack(self._pending[rank])
                    self._pending[rank] = b""
                    if acked >= msg_no:
                        del waiting[sock]

    def close(self) -> None:
        for sock in self.conns.values():
            sock.close()

    def __enter__(self) -> TcpBroadcaster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TcpReceiver:
    """A member: accepts the root's connection, returns each whole message, acks it."""

    def __init__(self, group: Group):
        self.group = group
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", group.port))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.buf = bytearray()

    def fileno(self) -> int:
        return (self.conn or self.listener).fileno()

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message (blocking up to ``timeout``; 0 polls), or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._take_frame()
            if msg is not None:
                return msg
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fileno()], [], [], left)
            if not ready:
                return None
            if self.conn is None:
                self.conn, _ = self.listener.accept()
                _tune(self.conn)
                continue
            try:
                chunk = self.conn.recv(1 << 20)
            except OSError as exc:  # reset: the root ended (failed, or closed unread data)
                raise AggBoxError(f"the root reset the TCP broadcast connection ({exc}): "
                                  "it failed or stopped; its own error says why") from exc
            if not chunk:
                raise AggBoxError("the root closed the TCP broadcast connection")
            self.buf += chunk

    def _take_frame(self) -> bytes | None:
        if len(self.buf) < FRAME.size:
            return None
        msg_no, length = FRAME.unpack_from(self.buf)
        end = FRAME.size + length
        if len(self.buf) < end:
            return None
        data = bytes(self.buf[FRAME.size:end])
        del self.buf[:end]
        self._acknowledge(msg_no)
        return data

    def _acknowledge(self, msg_no: int) -> None:
        """The application-level ACK (tcp_kack's members send none)."""
        assert self.conn is not None
        try:
            self.conn.sendall(ACK.pack(msg_no))
        except OSError as exc:
            raise AggBoxError(f"the root broke the TCP broadcast connection ({exc}): it "
                              "failed or stopped; its own error says why") from exc

    def close(self) -> None:
        if self.conn:
            self.conn.close()
        self.listener.close()

    def __enter__(self) -> TcpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
