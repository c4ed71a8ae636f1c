"""The AggBox wire format, mirrored from bpf/aggbox.h (the one source of truth).

tests/unit/test_protocol.py checks the constants against the C header's text and
tests/kernel/test_protocol_kernel.py checks the struct layout against what BCC compiled.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

import numpy as np

MAGIC = 0x58424741  # "AGBX" as little-endian bytes
VERSION = 1
MAX_MEMBERS = 64
MAX_JOBS = 16

MARK_FANOUT = 0xAB0C0001
MARK_ACK = 0xAB0C0002

# IPv4 (20) + UDP (8): what sits between the Ethernet frame and the AggBox header.
IP_UDP_OVERHEAD = 28

# Reduce-by-key pairs (AGGBOX_KV): a key zero-padded to KV_KEY_WIDTH, then an int64 value.
KV_KEY_WIDTH = 16
KV_PAIR_SIZE = KV_KEY_WIDTH + 8
KV_MAX_PAIRS = 64


class MsgType(IntEnum):
    DATA = 1
    ACK = 2
    GROUP_ACK = 3
    NACK = 4
    AGG = 5
    AGG_RESULT = 6
    KV = 7
    KV_ACK = 8
    KV_SPILL = 9


class Flags(IntFlag):
    """aggbox_hdr.flags: bpf/aggbox.h's AGGBOX_F_<name>."""

    NONE = 0
    LAST_FRAG = 0x0001
    RETRANSMIT = 0x0002
    KV_DONE = 0x0004
    KV_LONG = 0x0008
    OP_MAX = 0x0100  # AGG: element-wise max instead of sum (scale agreement)
    STATUS = 0x0200  # AGG_RESULT: a status, the bitmap of the workers whose block is in
    ALIGN = 0x0400  # AGG: each worker's own exponent; the kernel aligns them
    AUTH = 0x0800  # an authenticated job: SipHash-2-4 tag of the header after the payload


# (name, struct code, offset, size) in wire order; little-endian, no padding.
FIELDS: tuple[tuple[str, str, int, int], ...] = (
    ("magic", "I", 0, 4),
    ("version", "B", 4, 1),
    ("type", "B", 5, 1),
    ("flags", "H", 6, 2),
    ("job_id", "I", 8, 4),
    ("token", "I", 12, 4),
    ("seq", "I", 16, 4),
    ("round", "H", 20, 2),
    ("rank", "H", 22, 2),
    ("count", "H", 24, 2),
    ("scale_exp", "h", 26, 2),
    ("aux", "I", 28, 4),
)
HEADER = struct.Struct("<" + "".join(code for _, code, _, _ in FIELDS))
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 32
# The same layout as a numpy record, one header per row: a worker builds (and tags) a
# whole call's headers at once.
HEADER_DTYPE = np.dtype([(name, "<" + code) for name, code, _, _ in FIELDS])
assert HEADER_DTYPE.itemsize == HEADER_SIZE

# Same order as enum aggbox_counter in bpf/aggbox.h.
COUNTERS: tuple[str, ...] = (
    "accepted",
    "drop_truncated",
    "drop_bad_magic",
    "drop_bad_version",
    "drop_bad_type",
    "drop_unknown_job",
    "drop_bad_token",
    "drop_non_member",
    "drop_ip_options",
    "fanout_copies",
    "fanout_errors",
    "ack_sent",
    "ack_stale",
    "ack_folded",
    "group_ack",
    "data_duplicate",
    "data_out_of_window",
    "ack_errors",
    "nack",
    "drop_not_mine",
    "agg_added",
    "agg_duplicate",
    "agg_completed",
    "agg_late_reply",
    "agg_status",
    "agg_stale_round",
    "drop_gso",
    # reduce-by-key (bpf/reduce.c)
    "kv_pairs",
    "kv_spilled",
    "kv_spill_packets",
    "kv_update_failed",
    "kv_duplicate",
    "kv_stale",
    "kv_in_progress",
    "kv_tail_calls",
    "kv_chain_broken",
    # aggregation, continued
    "agg_shape_mismatch",
    "agg_bad_scale",
    # issue 11: forged traffic and pass-through
    "passed_not_ours",
    "ack_beyond_sent",
    "drop_wrong_mac",
    "kv_out_of_window",
    "kv_busy_reclaimed",
    "drop_bad_csum",
    "agg_chain_broken",
    "data_no_socket",
    "drop_bad_mac",
)


@dataclass
class Header:
    """One AggBox header. ``pack()`` / ``Header.unpack()`` convert to and from wire bytes."""

    type: int
    job_id: int
    token: int
    seq: int = 0
    round: int = 0
    rank: int = 0
    count: int = 0
    scale_exp: int = 0
    aux: int = 0
    flags: int = 0
    magic: int = MAGIC
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, name) for name, *_ in FIELDS))

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Header:
        if len(buf) < HEADER_SIZE:
            raise ValueError(f"an AggBox header needs {HEADER_SIZE} bytes, got {len(buf)}")
        values = HEADER.unpack_from(buf)
        return cls(**{name: v for (name, *_), v in zip(FIELDS, values, strict=True)})

    def is_valid(self) -> bool:
        return self.magic == MAGIC and self.version == VERSION


def packet(hdr: Header, payload: bytes = b"") -> bytes:
    """Header + payload, with ``count`` set when the caller left it 0 (broadcast: bytes)."""
    if not hdr.count and payload:
        hdr.count = len(payload)
    return hdr.pack() + payload


def ip_to_u32(ip: str) -> int:
    """An IPv4 address as the u32 the eBPF maps hold: network byte order in memory."""
    return struct.unpack("<I", socket.inet_aton(ip))[0]


def mac_bytes(mac: str) -> bytes:
    """'02:ab:00:00:00:01' -> its six bytes."""
    return bytes(int(part, 16) for part in mac.split(":"))


def max_payload(mtu: int = 1500) -> int:
    """Bytes of payload one AggBox packet carries at this IP MTU."""
    return mtu - IP_UDP_OVERHEAD - HEADER_SIZE


# -- whole frames --------------------------------------------------------------------------
# What a host on the bridge puts on the wire, for the kernel tests and the fault
# campaign's forger (a raw AF_PACKET socket sends them as they are).


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def raw_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, port: int,
              data: bytes, break_ip: bool = False, break_udp: bool = False) -> bytes:
    """Ethernet / IPv4 / UDP (``port`` both ends) around ``data``, with right checksums
    unless broken on purpose (one bit flipped)."""
    sip, dip = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    ulen = 8 + len(data)
    pseudo = sip + dip + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
    udp = struct.pack("!HHHH", port, port, ulen, 0) + data
    ucs = (inet_checksum(pseudo + udp) or 0xFFFF) ^ (0x0100 if break_udp else 0)
    udp = udp[:6] + struct.pack("!H", ucs) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0, 64, socket.IPPROTO_UDP, 0,
                     sip, dip)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip) ^ (0x0010 if break_ip else 0)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + udp


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))
