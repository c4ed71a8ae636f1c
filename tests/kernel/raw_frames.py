"""Raw Ethernet / IPv4 / UDP frames for kernel tests: what a forger on the bridge sends,
or what a corrupting link delivers (checksums right unless broken on purpose)."""

from __future__ import annotations

import socket
import struct

from aggbox.testbed.netns import NetnsHost


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_of(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, port: int,
          data: bytes, break_ip: bool = False, break_udp: bool = False) -> bytes:
    """Ethernet / IPv4 / UDP with correct checksums (unless broken on purpose): what a
    forger on the bridge sends, or what a corrupting link delivers."""
    sip, dip = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    ulen = 8 + len(data)
    pseudo = sip + dip + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
    udp = struct.pack("!HHHH", port, port, ulen, 0) + data
    ucs = (csum(pseudo + udp) or 0xFFFF) ^ (0x0100 if break_udp else 0)
    udp = udp[:6] + struct.pack("!H", ucs) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0, 64, socket.IPPROTO_UDP, 0,
                     sip, dip)
    ip = ip[:10] + struct.pack("!H", csum(ip) ^ (0x0010 if break_ip else 0)) + ip[12:]
    return mac_of(dst_mac) + mac_of(src_mac) + b"\x08\x00" + ip + udp


def send_frame(host: NetnsHost, raw: bytes) -> None:
    def go() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((host.ifname, 0))
            s.send(raw)

    host.call(go)
