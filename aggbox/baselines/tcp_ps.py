"""Allreduce through a TCP parameter server, as a good engineer would write it: one
persistent connection per worker (TCP_NODELAY, 8 MiB socket buffers, so every worker's
tensor is already in the server's kernel while it reads them in turn), numpy buffers
summed in place, the result written back to every worker; no per-element Python, no
per-call connect."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import numpy as np

from aggbox.baselines import result_buffer
from aggbox.collectives.group import Group
from aggbox.cpu import ProcessCpu
from aggbox.errors import AggBoxError
from aggbox.sockets import big_receive_buffer

FRAME = struct.Struct("<QQ")  # call number, payload bytes
BUF_BYTES = 8 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF_BYTES)
    big_receive_buffer(sock, BUF_BYTES)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise AggBoxError("the peer closed the parameter-server connection")
        view = view[n:]


class ParameterServer:
    """Runs on the aggregator host: ``serve()`` until every worker has disconnected."""

    def __init__(self, group: Group, port: int):
        self.group = group
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", port))
        self.listener.listen(group.size)

    def serve(self, accept_timeout: float = 120.0, cpu: ProcessCpu | None = None,
              warmup: int = 0) -> None:
        """``cpu``: bill this process's CPU per call, the first ``warmup`` calls under
        ``"tcp_ps-warmup"``, the others under ``"tcp_ps"`` (one op each), the accepts
        under ``"tcp_ps-setup"``."""
        self.listener.settimeout(accept_timeout)
        conns = []
        with cpu.window("tcp_ps-setup", 0) if cpu is not None else contextlib.nullcontext():
            for _ in range(self.group.size):
                conn, _ = self.listener.accept()
                _tune(conn)
                conns.append(conn)
        try:
            calls = 0
            while (head := self._first_head(conns[0])) is not None:
                calls += 1
                key = "tcp_ps" if calls > warmup else "tcp_ps-warmup"
                # The window opens once the first worker's frame is in: the wait for it
                # is idle, and a window is an op only if a call came.
                with cpu.window(key, 1) if cpu is not None else contextlib.nullcontext():
                    self._one_call(conns, head)
        finally:
            for c in conns:
                c.close()

    @staticmethod
    def _first_head(conn: socket.socket) -> bytearray | None:
        head = bytearray(FRAME.size)
        try:
            _recv_exact(conn, memoryview(head))
        except AggBoxError:
            return None  # the workers are done
        return head

    def _one_call(self, conns: list[socket.socket], head: bytearray) -> None:
        call, nbytes = FRAME.unpack(head)
        total = np.empty(nbytes // 4, dtype=np.float32)
        buf = np.empty_like(total)
        _recv_exact(conns[0], memoryview(total).cast("B"))
        for conn in conns[1:]:  # the socket buffers hold what the others already sent
            _recv_exact(conn, memoryview(head))
            _recv_exact(conn, memoryview(buf).cast("B"))
            np.add(total, buf, out=total)
        frame = FRAME.pack(call, nbytes)
        out = memoryview(total).cast("B")
        for conn in conns:
            conn.sendall(frame)
            conn.sendall(out)

    def close(self) -> None:
        self.listener.close()


class TcpPsAllreducer:
    """A worker's side: send the tensor to the server, read back the sum."""

    def __init__(self, group: Group, port: int, connect_timeout: float = 30.0):
        if group.aggregator is None:
            raise AggBoxError("the group names no aggregator host for the parameter server")
        self.group = group
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.create_connection((group.aggregator.ip, port), timeout=1.0)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AggBoxError(f"cannot reach the parameter server at "
                                      f"{group.aggregator.ip}:{port}: {exc}") from exc
                time.sleep(0.05)
        self.sock.settimeout(None)
        _tune(self.sock)
        self.calls = 0

    def allreduce(self, tensor: np.ndarray, op: str = "sum",
                  out: np.ndarray | None = None) -> np.ndarray:
        """The sum (or mean) over the group, received into ``out`` if given (float32,
        C-contiguous, the tensor's size), else into a new array."""
        x = np.ascontiguousarray(tensor, dtype=np.float32).reshape(-1)
        self.calls += 1
        self.sock.sendall(FRAME.pack(self.calls, x.nbytes))
        self.sock.sendall(memoryview(x).cast("B"))
        head = bytearray(FRAME.size)
        _recv_exact(self.sock, memoryview(head))
        result = np.empty_like(x) if out is None else result_buffer(out, x)
        _recv_exact(self.sock, memoryview(result).cast("B"))
        if op == "mean":
            result /= self.group.size
        return result.reshape(np.shape(tensor)) if out is None else out

    def close(self) -> None:
        self.sock.close()
