"""What BCC compiled agrees with aggbox/protocol.py: the struct layout, seen through the
ctypes type BCC generates for a map whose value is struct aggbox_hdr."""

import pytest

from aggbox import protocol

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
