"""Socket settings shared by AggBox and its baselines (so both get the same treatment)."""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections.abc import Callable

RCVBUF_BYTES = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python lacks the name


def big_receive_buffer(sock: socket.socket, size: int = RCVBUF_BYTES) -> None:
    """Ask for ``size`` bytes of receive buffer. SO_RCVBUF is capped by net.core.rmem_max
    (212992 by default), which a burst of 16 members' traffic overflows; as root,
    SO_RCVBUFFORCE is not capped."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def udp_socket(port: int) -> socket.socket:
    """A UDP socket bound to ``port`` on every address, with a big receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big_receive_buffer(sock)
    sock.bind(("0.0.0.0", port))
    return sock


# -- lingering endpoints ------------------------------------------------------------------
# A closed endpoint may keep its port for a while to answer retransmissions (a reducer's
# DONE-ACKs, a broadcast member's kernel ACKs). A new endpoint on that port in the same
# process supersedes it: the linger is cut short and has let go (socket and kernel job)
# before the new one binds and installs its job, which may have the same id.

_lingering_on: dict[int, tuple[threading.Event, threading.Thread]] = {}


def start_linger(port: int, sock: socket.socket, seconds: float,
                 on_ready: Callable[[], None], release: Callable[[], None]) -> threading.Thread:
    """For ``seconds`` (or until a new endpoint wants ``port``), call ``on_ready()`` whenever
    ``sock`` is readable, then ``release()``; in a daemon thread, returned (to join)."""
    stop = threading.Event()

    def body() -> None:
        end = time.monotonic() + seconds
        try:
            while (left := end - time.monotonic()) > 0 and not stop.is_set():
                ready, _, _ = select.select([sock], [], [], min(left, 0.05))
                if ready:
                    on_ready()
        finally:
            try:
                release()
            finally:
                if _lingering_on.get(port, (None, None))[0] is stop:
                    del _lingering_on[port]

    thread = threading.Thread(target=body, daemon=True)
    _lingering_on[port] = (stop, thread)
    thread.start()
    return thread


def udp_socket_taking_over(port: int, wait_s: float) -> socket.socket:
    """``udp_socket(port)``, after ending this process's linger on the port; a linger of
    another process is waited for up to ``wait_s``, then one clear error."""
    from aggbox.errors import AggBoxError

    deadline = time.monotonic() + wait_s
    while True:
        old = _lingering_on.get(port)
        if old is not None:
            old[0].set()
            old[1].join(wait_s)
        try:
            return udp_socket(port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise AggBoxError(
                    f"UDP port {port} is in use on this host ({exc.strerror}): another job "
                    "or program holds it; end it or give this job another port") from None
            time.sleep(0.02)
