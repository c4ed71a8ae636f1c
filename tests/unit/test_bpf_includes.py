"""What the eBPF sources include from the system, and the protocol numbers they define.

With Debian's 6.1 kernel headers (what `make setup` links for BCC), a header that reaches
the kernel-internal tree costs clang 0.4-2 s per family, paid by every host that compiles
one (docs/kernel.md, "Toolchain"). These headers were each measured not to.
"""

import re
import socket

from aggbox import BPF_DIR

#: System headers measured cheap: they stay inside include/uapi (and asm).
CHEAP = {
    "uapi/linux/bpf.h",
    "uapi/linux/pkt_cls.h",
    "uapi/linux/if_ether.h",
    "uapi/linux/if_packet.h",
    "uapi/linux/ip.h",
    "uapi/linux/udp.h",
}
SYSTEM_INCLUDE = re.compile(r"^\s*#\s*include\s*<([^>]+)>", re.M)
PROTO_DEFINE = re.compile(r"^#define (IPPROTO_\w+) (\d+)$", re.M)


def sources():
    return sorted([*BPF_DIR.glob("*.c"), *BPF_DIR.glob("*.h"), *BPF_DIR.glob("lib/*.h")])


def test_the_bpf_sources_include_only_headers_measured_cheap():
    found = {(src.relative_to(BPF_DIR).as_posix(), h)
             for src in sources() for h in SYSTEM_INCLUDE.findall(src.read_text())}
    assert found, "no system include found: the pattern is wrong"
    costly = sorted((src, h) for src, h in found if h not in CHEAP)
    # uapi/linux/in.h and tcp.h include the kernel-internal <linux/socket.h>: ~0.4 s each.
    assert not costly, f"measure these headers' compile time first (docs/kernel.md): {costly}"


def test_the_protocol_numbers_defined_in_place_of_in_h_are_the_real_ones():
    defined = [(src.name, name, int(value)) for src in sources()
               for name, value in PROTO_DEFINE.findall(src.read_text())]
    assert {name for _, name, _ in defined} == {"IPPROTO_TCP", "IPPROTO_UDP"}
    for src, name, value in defined:
        assert value == getattr(socket, name), (src, name)
