"""What BCC compiled agrees with aggbox/protocol.py: the struct layout, seen through the
ctypes type BCC generates for a map whose value is struct aggbox_hdr; and what the kernel
puts on the wire carries UDP checksums a NIC and a receiver accept."""

import socket
import struct
import time

import families
import pytest

from aggbox import protocol
from aggbox.sockets import udp_socket

pytestmark = pytest.mark.kernel

PROBE = r"""
#include "aggbox.h"
BPF_ARRAY(hdr_probe, struct aggbox_hdr, 1);
"""


def test_compiled_header_layout_matches_protocol_fields(tmp_path):
    from bcc import BPF

    from aggbox import BPF_DIR

    bpf = BPF(text=PROBE, cflags=[f"-I{BPF_DIR}"])
    try:
        leaf = bpf["hdr_probe"].Leaf
        import ctypes

        assert ctypes.sizeof(leaf) == protocol.HEADER_SIZE
        layout = [(name, getattr(leaf, name).offset, getattr(leaf, name).size)
                  for name, *_ in leaf._fields_]
        assert layout == [(name, off, size) for name, _, off, size in protocol.FIELDS]
        # And a value written through the map reads back as the same wire bytes.
        value = leaf()
        hdr = protocol.Header(type=protocol.MsgType.DATA, job_id=77, token=0xDEADBEEF, seq=5,
                              rank=2, count=10, scale_exp=-3, aux=9)
        ctypes.memmove(ctypes.addressof(value), hdr.pack(), protocol.HEADER_SIZE)
        table = bpf["hdr_probe"]
        table[table.Key(0)] = value
        assert bytes(table[table.Key(0)]) == hdr.pack()
    finally:
        bpf.cleanup()


# ------------------------------------------------ kernel-made packets' UDP checksums
#
# A packet the kernel rewrites (an ACK, a KV_ACK, an allreduce result) leaves with a UDP
# checksum a real NIC or a receiver accepts, whether the skb is CHECKSUM_PARTIAL (the
# sender's socket had offload: the check field must hold the pseudo-header's sum, the NIC
# or skb_checksum_help adds the rest) or not (the whole sum, or 0). Shown on a veth with
# tx checksum offload on and off on each end: h0 runs the three families, h1 is the peer
# whose stack verifies what arrives (/proc/net/snmp Udp InCsumErrors) and whose packet
# socket sees the bytes and whether the skb still awaits its checksum (PACKET_AUXDATA).

TP_STATUS_CSUMNOTREADY = 1 << 3
ETH_P_IP = 0x0800
PORTS = {"broadcast": 47210, "allreduce": 48210, "allreduce-multicast": 48211,
         "reduce": 49210}


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_check_verdict(frame: bytes, not_ready: bool) -> str:
    """'full' (the whole sum is right), 'none' (0), 'partial' (the pseudo-header's sum,
    on an skb that awaits its checksum) or 'wrong'."""
    ip = frame[14:34]
    udp_len = struct.unpack("!H", frame[38:40])[0]
    udp = frame[34:34 + udp_len]
    check = struct.unpack("!H", udp[6:8])[0]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    if not_ready:
        return "partial" if check == ones_sum(pseudo) else "wrong"
    if check == 0:
        return "none"
    return "full" if ones_sum(pseudo + udp) == 0xFFFF else "wrong"


def udp_csum_errors(host) -> int:
    lines = [line.split() for line in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["InCsumErrors"])


def set_tx_offload(host, on: bool) -> None:
    host.run(["ethtool", "-K", host.ifname, "tx", "on" if on else "off"])


class Capture:
    """h1's view of the frames h0 sends to UDP port ``port``: bytes and checksum state."""

    def __init__(self, host, port: int):
        self.host, self.port = host, port
        self.sock = host.call(self._open)

    def _open(self) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        s.bind((self.host.ifname, 0))
        s.setsockopt(263, 8, 1)  # SOL_PACKET, PACKET_AUXDATA
        s.settimeout(0.2)
        return s

    def frames(self, want: int, wait: float = 3.0) -> list[tuple[bytes, bool]]:
        got: list[tuple[bytes, bool]] = []
        end = time.monotonic() + wait
        while len(got) < want and time.monotonic() < end:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(20))
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 42 or data[23] != 17:
                continue
            if struct.unpack("!H", data[36:38])[0] != self.port:
                continue
            status = struct.unpack("I", anc[0][2][:4])[0] if anc else 0
            got.append((data, bool(status & TP_STATUS_CSUMNOTREADY)))
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def csum_bed():
    from aggbox.testbed import NetnsTestbed

    with NetnsTestbed(2) as tb, families.attached(tb.hosts[0]) as attached:
        yield tb, attached.all()


def exchange(tb, programs, family: str, job_id: int) -> tuple[list, list, int]:
    """h1 sends what makes h0's kernel answer; returns (h1 socket's datagrams, captured
    frames from h0, InCsumErrors added in h1)."""
    from aggbox.collectives.group import Group, Member

    h0, h1 = tb.hosts
    bcast, agg, kv = programs
    port = PORTS[family]
    h0m, h1m = Member(0, h0.ip, h0.mac), Member(0, h1.ip, h1.mac)
    token = 0x5EED0000 + job_id
    hdr = dict(job_id=job_id, token=token)
    if family == "broadcast":  # h1 the root (rank 0), h0 a member: its kernel ACKs
        group = Group(job_id=job_id, token=token, members=(h1m, Member(1, h0.ip, h0.mac)),
                      rank=1, port=port)
        h0.call(bcast.install_job, group)
        # A member's kernel ACKs only while its application holds the port.
        member_sock = h0.call(udp_socket, port)
        sends = [protocol.packet(protocol.Header(type=protocol.MsgType.DATA, seq=1, aux=1,
                                                 flags=int(protocol.Flags.LAST_FRAG), **hdr),
                                 b"x" * 700)]
        replies = 1

        def cleanup() -> None:
            member_sock.close()
            h0.call(bcast.remove_job, job_id)
    elif family.startswith("allreduce"):  # h1 the only worker: its block completes
        results = "multicast" if family.endswith("multicast") else "unicast"
        group = Group(job_id=job_id, token=token, members=(h1m,), rank=0, port=port,
                      aggregator=h0m, options={"results": results})
        h0.call(agg.install_job, group)
        block = protocol.Header(type=protocol.MsgType.AGG, seq=0, count=180,
                                **hdr).pack() + bytes(range(180)) * 4
        sends = [block, block]  # the second is a late duplicate: answered from the copy
        replies, cleanup = 2, lambda: h0.call(agg.remove_job, job_id)
    else:  # h1 a mapper (rank 1), h0 the reducer: its kernel answers with a KV_ACK
        group = Group(job_id=job_id, token=token, members=(h0m, Member(1, h1.ip, h1.mac)),
                      rank=0, port=port)
        h0.call(kv.install_job, group)
        pair = b"checksum".ljust(protocol.KV_KEY_WIDTH, b"\0") + struct.pack("<q", 7)
        sends = [protocol.Header(type=protocol.MsgType.KV, seq=1, rank=1, count=1,
                                 **hdr).pack() + pair]
        replies, cleanup = 1, lambda: h0.call(kv.remove_job, job_id)
    capture = Capture(h1, port)
    errors_before = udp_csum_errors(h1)
    sock = h1.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.bind(("0.0.0.0", port))
        sock.settimeout(2.0)
        got = []
        for data in sends:
            h1.call(sock.sendto, data, (h0.ip, port))
            if family != "allreduce-multicast":  # h1 joined no group: only the capture
                try:
                    got.append(sock.recv(65536))
                except TimeoutError:
                    got.append(None)
        frames = capture.frames(replies)
    finally:
        sock.close()
        capture.close()
        cleanup()
    return got, frames, udp_csum_errors(h1) - errors_before


@pytest.mark.parametrize("family", list(PORTS))
@pytest.mark.parametrize("h0_tx", [True, False], ids=["h0-offload", "h0-no-offload"])
@pytest.mark.parametrize("h1_tx", [True, False], ids=["h1-offload", "h1-no-offload"])
def test_kernel_made_packets_leave_with_a_udp_checksum_a_receiver_accepts(csum_bed, family,
                                                                          h0_tx, h1_tx):
    tb, programs = csum_bed
    h0, h1 = tb.hosts
    set_tx_offload(h0, h0_tx)
    set_tx_offload(h1, h1_tx)
    job_id = 61000 + 10 * list(PORTS).index(family) + 2 * h0_tx + h1_tx
    try:
        got, frames, errors = exchange(tb, programs, family, job_id)
    finally:
        set_tx_offload(h0, True)
        set_tx_offload(h1, True)
    verdicts = [udp_check_verdict(f, not_ready) for f, not_ready in frames]
    want_type = {"broadcast": protocol.MsgType.ACK, "reduce": protocol.MsgType.KV_ACK}.get(
        family, protocol.MsgType.AGG_RESULT)
    assert frames and all(protocol.Header.unpack(f[42:]).type == want_type
                          for f, _ in frames), frames
    assert "wrong" not in verdicts, verdicts
    assert errors == 0
    if family != "allreduce-multicast":
        assert got and all(d is not None and protocol.Header.unpack(d).type == want_type
                           for d in got), got
