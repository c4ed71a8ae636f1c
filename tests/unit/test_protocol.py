"""aggbox/protocol.py mirrors bpf/aggbox.h: the constants, enums and field order agree."""

import re

import pytest

from aggbox import BPF_DIR, protocol
from aggbox.protocol import Flags, Header, MsgType

HEADER_TEXT = (BPF_DIR / "aggbox.h").read_text()


def c_define(name: str) -> int:
    match = re.search(rf"#define\s+{name}\s+(0x[0-9a-fA-F]+|\d+)", HEADER_TEXT)
    assert match, f"{name} not defined in aggbox.h"
    return int(match.group(1).rstrip("uU"), 0)


def c_enum_members(enum_name: str) -> list[str]:
    body = re.search(rf"enum {enum_name} \{{(.*?)\}};", HEADER_TEXT, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [m.group(1) for m in re.finditer(r"^\s*([A-Z_0-9]+)", body, re.M)]


def test_magic_version_and_limits_match_the_c_header():
    assert protocol.MAGIC == int(re.search(r"AGGBOX_MAGIC\s+(0x[0-9a-fA-F]+)", HEADER_TEXT)
                                 .group(1), 16)
    assert protocol.VERSION == c_define("AGGBOX_VERSION")
    assert protocol.MAX_MEMBERS == c_define("AGGBOX_MAX_MEMBERS")
    assert protocol.MAX_JOBS == c_define("AGGBOX_MAX_JOBS")
    assert protocol.MARK_FANOUT == int(re.search(r"AGGBOX_MARK_FANOUT\s+(0x[0-9a-f]+)",
                                                 HEADER_TEXT).group(1), 16)
    assert protocol.MARK_ACK == int(re.search(r"AGGBOX_MARK_ACK\s+(0x[0-9a-f]+)",
                                              HEADER_TEXT).group(1), 16)


def test_message_types_match_the_c_enum():
    for t in MsgType:
        assert re.search(rf"AGGBOX_{t.name}\s*=\s*{t.value},", HEADER_TEXT), t


def test_flags_match_the_c_defines():
    c_flags = dict(re.findall(r"#define\s+AGGBOX_F_(\w+)\s+(0x[0-9a-fA-F]+)", HEADER_TEXT))
    assert {name: int(v, 16) for name, v in c_flags.items()} == {
        f.name: f.value for f in Flags if f.value}


def test_the_allreduce_flags_are_the_headers():
    from aggbox.collectives import allreduce

    assert (allreduce.F_OP_MAX, allreduce.F_STATUS, allreduce.F_ALIGN) == (
        c_define("AGGBOX_F_OP_MAX"), c_define("AGGBOX_F_STATUS"), c_define("AGGBOX_F_ALIGN"))
    # No program file defines wire flags of its own any more.
    for source in BPF_DIR.glob("*.c"):
        assert not re.search(r"#define\s+\w*_F_\w+\s+0x", source.read_text()), source


def test_each_familys_job_slots_fit_the_headers_limit():
    """Each family's default job count (the per-job arrays' size) is at most
    AGGBOX_MAX_JOBS, and user space installs at most as many jobs as it compiled for."""
    from aggbox.collectives import allreduce, reduce_kernel

    limit = c_define("AGGBOX_MAX_JOBS")
    for family, name, python in (("aggregate", "AGG_MAX_JOBS", allreduce.MAX_JOBS),
                                 ("reduce", "KV_MAX_JOBS", reduce_kernel.MAX_JOBS)):
        text = (BPF_DIR / f"{family}.c").read_text()
        default = int(re.search(rf"#define\s+{name}\s+(\d+)", text).group(1))
        assert default <= limit and python <= limit, (family, default, python)


def test_counter_names_follow_the_c_enum_order():
    names = [n for n in c_enum_members("aggbox_counter") if n != "CNT_MAX"]
    assert [n.removeprefix("CNT_").lower() for n in names] == list(protocol.COUNTERS)


def test_header_fields_are_declared_in_the_c_struct_in_the_same_order():
    body = re.search(r"struct aggbox_hdr \{(.*?)\};", HEADER_TEXT, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    c_fields = re.findall(r"__[us]\d+\s+(\w+);", body)
    assert c_fields == [name for name, *_ in protocol.FIELDS]


def test_offsets_are_contiguous_and_the_header_is_32_bytes():
    end = 0
    for _, _code, offset, size in protocol.FIELDS:
        assert offset == end
        end = offset + size
    assert end == protocol.HEADER_SIZE == 32


def test_pack_unpack_round_trip_is_little_endian():
    hdr = Header(type=MsgType.ACK, job_id=0x01020304, token=0xA0B0C0D0, seq=7, round=2,
                 rank=3, count=9, scale_exp=-4, aux=0xFFFFFFFF, flags=int(Flags.LAST_FRAG))
    raw = hdr.pack()
    assert raw[:4] == b"AGBX"
    assert raw[8:12] == bytes([4, 3, 2, 1])
    assert Header.unpack(raw) == hdr


def test_a_short_buffer_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="needs 32 bytes"):
        Header.unpack(b"AGBX")


def test_max_payload_fits_an_ethernet_mtu():
    assert protocol.max_payload(1500) == 1500 - 20 - 8 - 32


def test_raw_frames_carry_right_checksums_unless_broken_on_purpose():
    import socket as s

    from aggbox.protocol import inet_checksum, raw_frame

    f = raw_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "10.0.0.1", "10.0.0.2", 47000,
                  b"payload")
    ip, udp = f[14:34], f[34:]
    assert f[:6] == bytes.fromhex("020000000002") and f[12:14] == b"\x08\x00"
    assert inet_checksum(ip) == 0  # a header with its checksum sums to 0xffff
    pseudo = ip[12:20] + bytes([0, s.IPPROTO_UDP]) + len(udp).to_bytes(2, "big")
    assert inet_checksum(pseudo + udp) == 0 and udp[8:] == b"payload"
    broken = raw_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "10.0.0.1", "10.0.0.2",
                       47000, b"payload", break_ip=True, break_udp=True)
    assert inet_checksum(broken[14:34]) != 0
    assert inet_checksum(pseudo + broken[34:]) != 0
