"""Broadcast over IP multicast: the kernel's own fan-out, without eBPF. The root sends each
datagram of a message ONCE, to an IP multicast group; the testbed's bridge copies it to
every port; each member's kernel keeps it because the member joined the group. The rest
is :mod:`aggbox.baselines.udp`: the same datagrams (a large message is split by the
application into MTU-sized ones), the same application ACKs gathered by the root, the
same retransmission rule (after 20 ms, doubling up to 0.5 s, the members that did not ack
get the message again, by unicast: a repair to the group would reach, and be re-acked by,
every member that already has it). :class:`McastBroadcaster` differs from
:class:`~aggbox.baselines.udp.UdpBroadcaster` only in how the first copy reaches the
members.

Crossing the bridge: the testbed bridges run with IGMP snooping off, so a group's frames
flood to every port (``mcast_flood``, on for each port; only unknown-unicast flooding is
off), and a host that did not join drops them in its IP layer. With snooping on and no
querier (a docker bridge), Linux bridges flood unregistered groups too.

Routes: none is needed for the group. The root names its interface with
``IP_MULTICAST_IF`` (its own address), so the kernel sends on it without a 224.0.0.0/4
route; members join on the interface that has their address (``IP_ADD_MEMBERSHIP``). The
root does not receive its own datagrams (``IP_MULTICAST_LOOP`` 0, and it never joins);
members' ACKs are unicast to the root, and the bridge's static FDB keeps them from other
members. ``IP_MULTICAST_ALL`` 0 keeps a member's socket to the group it joined itself.

The group address is administratively scoped (239.0.0.0/8), in 239.213.0.0/16, derived
from the job id, token and port, so two jobs on one bridge do not share a group; a
group's ``options["mcast_ip"]`` overrides it.
"""

from __future__ import annotations

import socket

from aggbox.baselines.udp import UdpBroadcaster, UdpReceiver
from aggbox.collectives.group import Group, multicast_address
from aggbox.errors import AggBoxError

PROMISE = "app"  # send returns once every member's application has the message

IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux; Python may lack it


def group_address(group: Group) -> str:
    """The job's multicast group: ``options["mcast_ip"]`` or 239.213.x.y from the job."""
    return multicast_address(group, "mcast_ip")


class McastBroadcaster(UdpBroadcaster):
    """The root: one copy of each datagram to the group; ``send`` returns once every
    member's application acknowledged."""

    def __init__(self, group: Group, mtu: int = 1500, rto_s: float = 0.02):
        super().__init__(group, mtu, rto_s)
        self.mcast_ip = group_address(group)
        ip = socket.inet_aton(group.me.ip)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ip)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # one LAN

    def _first_copy(self, packets: list[bytes], waiting: dict[str, int]) -> None:
        for pkt in packets:
            self.sock.sendto(pkt, (self.mcast_ip, self.group.port))

    def __enter__(self) -> McastBroadcaster:
        return self


class McastReceiver(UdpReceiver):
    """A member: joins the group on its interface, then reassembles and acks like UDP."""

    def __init__(self, group: Group):
        super().__init__(group)
        self.mcast_ip = group_address(group)
        try:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                 socket.inet_aton(self.mcast_ip) + socket.inet_aton(group.me.ip))
        except OSError as exc:
            self.sock.close()
            raise AggBoxError(f"cannot join multicast group {self.mcast_ip} on "
                              f"{group.me.ip}: {exc}") from exc

    def __enter__(self) -> McastReceiver:
        return self
