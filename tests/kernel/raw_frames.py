"""Raw Ethernet / IPv4 / UDP frames for kernel tests: what a forger on the bridge sends,
or what a corrupting link delivers (checksums right unless broken on purpose)."""

from __future__ import annotations

import socket

from aggbox.protocol import inet_checksum, raw_frame
from aggbox.testbed.netns import NetnsHost

# One builder for the tests and the fault campaign (aggbox/protocol.py).
csum = inet_checksum
frame = raw_frame


def mac_of(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def send_frame(host: NetnsHost, raw: bytes) -> None:
    def go() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((host.ifname, 0))
            s.send(raw)

    host.call(go)
