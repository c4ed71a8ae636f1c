"""Broadcast over TCP whose completion is every member's *kernel* ACK of the bytes: the same
promise as AggBox's group ACK ("every member's kernel holds the data"), for the headline
comparison of completion times.

The root is :class:`~aggbox.baselines.tcp.TcpBroadcaster` (one persistent TCP_NODELAY
connection per member, the frame written with one ``sendall`` per member); ``send``
returns once every connection has nothing left unacknowledged. Members read and return
every message like :class:`~aggbox.baselines.tcp.TcpReceiver` but send no application
ACK, so a member whose application is busy (or stopped) does not delay completion, as
long as its socket's receive buffer has room.

What "acked" is read from: ``SIOCOUTQ`` (ioctl), which for TCP is ``write_seq - snd_una``,
the bytes written but not yet cumulatively ACKed by the peer, *unsent bytes included*. It
is one lockless read per socket. ``TCP_INFO`` was the other candidate: it copies a ~250-byte
struct under the socket lock, and its ``tcpi_unacked`` counts segments in flight only, so
it needs ``tcpi_notsent_bytes`` too to see data still in the write queue.

How the root waits: there is no readiness event for "acked" (EPOLLOUT is about send
buffer space; SO_SNDLOWAT cannot be set on Linux; TCP_NOTSENT_LOWAT concerns unsent
bytes), and a loop of ioctls would burn the root's CPU, which this benchmark measures.
But TCP can report the ACK itself: with ``SO_TIMESTAMPING`` =
``SOF_TIMESTAMPING_TX_ACK | OPT_TSONLY`` the kernel queues a (payload-less) timestamp on
the socket's error queue when the last byte of each ``send`` call is cumulatively ACKed,
and a non-empty error queue makes the socket report ``POLLERR``. So ``send``:

1. checks ``SIOCOUTQ`` of every socket right after the writes (on this testbed the veth
   delivers within the sender's own softirq, so most members have ACKed already);
2. for each member still pending: empties its error queue (stale timestamps of earlier
   messages), checks ``SIOCOUTQ`` again (an ACK may have come meanwhile), and
3. sleeps in ``poll()`` on the pending sockets (events 0: only POLLERR/POLLHUP wake it),
   rechecking ``SIOCOUTQ`` on every wake-up. A timestamp queued after step 2 wakes it; no
   spinning, no sleep granularity added to completion. A slow re-check every
   ``backstop_s`` guards against a lost event; ``stats["backstop_found"]`` counts the
   times it found a member complete without an event (0 when the mechanism works).

Stale timestamps: a member that has ACKed by step 1 leaves one timestamp per message in
its error queue, never read. The root's receive buffer of each connection is clamped to
the minimum (the members send no data, and it bounds the error queue), so at most a
couple wait there and step 2 stays one or two ``recvmsg`` calls.

Measured roughly (16 members, 64 B, 2 shared vCPUs, root thread's CPU per message): idle,
every ACK is in by step 1, so this, a tight ioctl loop and a sleep back-off all cost the
same (~80 us, the 16 writes) and complete alike (~50 us). With 5% loss on every link,
where waits span TCP retransmission timeouts: 0.5 ms per message here, 8 ms for a
20 us..1 ms sleep back-off, 350 ms (a whole CPU) for the tight loop.

Delayed ACKs must not decide completion: a member's kernel would otherwise ACK a small
message only when its delayed-ACK timer (40 ms and more) fires. The testbeds give TCP
from :data:`aggbox.testbed.netns.KERNEL_ACK_PORTS` (member side port 45200-45299) a route
with ``quickack 1``. ``TCP_QUICKACK`` set by the member instead is reset by the kernel,
and setting it again after each read would tie the ACK to the application reading,
which is the other promise. On hosts that lack the rule (ssh/ansible machines) add it,
or completion includes delayed ACKs.
"""

from __future__ import annotations

import fcntl
import math
import os
import select
import socket
import struct
import termios
import time

from aggbox.baselines.tcp import TcpBroadcaster, TcpReceiver
from aggbox.collectives.group import Group
from aggbox.errors import AggBoxError, CollectiveTimeout

PROMISE = "kernel"  # send returns once every member's kernel has ACKed the bytes

SO_TIMESTAMPING = getattr(socket, "SO_TIMESTAMPING", 37)  # Linux; Python lacks the name
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOF_TIMESTAMPING_OPT_ID = 1 << 7
SOF_TIMESTAMPING_TX_ACK = 1 << 9
SOF_TIMESTAMPING_OPT_TSONLY = 1 << 11  # no payload copy: allowed without CAP_NET_RAW
ACK_TIMESTAMPS = (SOF_TIMESTAMPING_TX_ACK | SOF_TIMESTAMPING_SOFTWARE
                  | SOF_TIMESTAMPING_OPT_ID | SOF_TIMESTAMPING_OPT_TSONLY)
SIOCOUTQ = termios.TIOCOUTQ  # the same ioctl number; for TCP: written minus ACKed bytes
_INT = struct.Struct("i")
_INT_ZERO = bytes(_INT.size)
_ERRQUEUE_FLAGS = socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT


def unacked_bytes(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that the peer's kernel has not ACKed (unsent included)."""
    return _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQ, _INT_ZERO))[0]


def drain_error_queue(sock: socket.socket) -> int:
    """Read (and drop) every queued timestamp; returns how many there were."""
    n = 0
    while True:
        try:
            sock.recvmsg(0, 0, _ERRQUEUE_FLAGS)  # the ancillary data is not needed
        except BlockingIOError:
            return n
        n += 1


class TcpKackBroadcaster(TcpBroadcaster):
    """The root: ``send`` returns once every member's kernel ACKed the whole frame."""

    def __init__(self, group: Group, connect_timeout: float = 15.0, backstop_s: float = 0.2):
        super().__init__(group, connect_timeout)
        self.backstop_s = backstop_s
        self.stats: dict[str, int] = {"sends": 0, "waited": 0, "wakeups": 0,
                                      "backstop_found": 0}
        for sock in self.conns.values():
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, ACK_TIMESTAMPS)
            # The kernel rounds this up to its minimum (about 2.3 KB): room for a couple
            # of stale timestamps, no more (see the module docstring).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)

    def _wait_acks(self, msg_no: int, deadline: float) -> None:
        self.stats["sends"] += 1
        pending = {sock.fileno(): (rank, sock) for rank, sock in self.conns.items()
                   if unacked_bytes(sock)}
        if not pending:
            return
        self.stats["waited"] += 1
        poller = select.poll()
        for fd, (_, sock) in list(pending.items()):
            drain_error_queue(sock)
            if unacked_bytes(sock):
                poller.register(fd, 0)  # 0: only POLLERR (a timestamp) or POLLHUP
            else:
                del pending[fd]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted(rank for rank, _ in pending.values())
                raise CollectiveTimeout(
                    f"TCP kernel-ACK broadcast {msg_no}: ranks {ranks} did not ACK", ranks)
            events = poller.poll(math.ceil(min(left, self.backstop_s) * 1000))
            self.stats["wakeups"] += 1
            for fd, _ in events:
                rank, sock = pending[fd]
                if not drain_error_queue(sock):
                    self._raise_socket_error(rank, sock)
            for fd, (_, sock) in list(pending.items()):
                if not unacked_bytes(sock):
                    del pending[fd]
                    poller.unregister(fd)
                    if not events:
                        self.stats["backstop_found"] += 1

    @staticmethod
    def _raise_socket_error(rank: int, sock: socket.socket) -> None:
        """POLLERR with an empty error queue: the connection itself failed (e.g. reset)."""
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise AggBoxError(f"member rank {rank}'s connection failed: {os.strerror(err)}")
        raise AggBoxError(f"member rank {rank} hung up")

    def __enter__(self) -> TcpKackBroadcaster:
        return self


class TcpKackReceiver(TcpReceiver):
    """A member: returns each whole message and sends nothing back; its kernel's ACK is
    the acknowledgment."""

    def _acknowledge(self, msg_no: int) -> None:
        pass

    def __enter__(self) -> TcpKackReceiver:
        return self
