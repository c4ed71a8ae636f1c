"""Socket settings shared by AggBox and its baselines (so both get the same treatment)."""

from __future__ import annotations

import socket

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
