"""aggbox/auth.py: the keyed header tag, as bpf/lib/siphash.h computes it."""

import numpy as np
import pytest

from aggbox import auth
from aggbox.protocol import Flags, Header, MsgType

REFERENCE_KEY = bytes(range(16))
# SipHash-2-4 of the 32 bytes 00..1f under the key 00..0f: the reference vector (the
# SipHash paper's test vectors, entry 32).
REFERENCE_TAG = 0x7127512F72F27CCE


def test_the_reference_vector():
    assert auth.tag(REFERENCE_KEY, bytes(range(32))) == REFERENCE_TAG
    assert auth.tag_bytes(REFERENCE_KEY, bytes(range(32))) == REFERENCE_TAG.to_bytes(8, "little")


def test_many_headers_at_once_give_each_headers_own_tag():
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 256, size=(300, 32), dtype=np.uint8)
    rows[0] = np.arange(32, dtype=np.uint8)
    key = auth.new_key()
    got = auth.tags(key, rows)
    assert got.dtype == np.dtype("<u8") and got.shape == (300,)
    assert [int(t) for t in got] == [auth.tag(key, bytes(r)) for r in rows]
    assert int(auth.tags(REFERENCE_KEY, rows[:1])[0]) == REFERENCE_TAG


def test_every_header_field_and_key_bit_changes_the_tag():
    key = auth.new_key()
    base = Header(type=MsgType.AGG, flags=Flags.AUTH, job_id=5, token=9, seq=3, rank=1,
                  count=256, scale_exp=-7, aux=0)
    t = auth.tag(key, base.pack())
    for field, value in (("job_id", 6), ("token", 8), ("seq", 4), ("rank", 2), ("count", 255),
                         ("scale_exp", -6), ("aux", 1), ("flags", Flags.AUTH | Flags.ALIGN)):
        changed = Header(**{**base.__dict__, field: value})
        assert auth.tag(key, changed.pack()) != t, field
    flipped = bytes([key[0] ^ 1]) + key[1:]
    assert auth.tag(flipped, base.pack()) != t


def test_keys_are_fresh_and_sized():
    assert len({auth.new_key() for _ in range(32)}) == 32
    with pytest.raises(ValueError, match="16 bytes"):
        auth.tag(b"short", bytes(32))


def test_init_takes_a_key_as_bytes_hex_or_from_the_environment(monkeypatch):
    from aggbox.errors import AggBoxError

    key = auth.new_key()
    assert auth.key_hex(key) == auth.key_hex(key.hex()) == key.hex()
    monkeypatch.setenv("AGGBOX_AUTH_KEY", key.hex())
    assert auth.key_hex(None) == key.hex()
    monkeypatch.delenv("AGGBOX_AUTH_KEY")
    assert auth.key_hex(None) == "" and auth.check_value("") == ""
    with pytest.raises(AggBoxError, match="16 bytes"):
        auth.key_hex(b"12345")
    with pytest.raises(AggBoxError, match="hex digits"):
        auth.key_hex("not hex")
    # ranks compare the check value, which differs per key and is not the key
    other = auth.new_key()
    assert auth.check_value(key.hex()) != auth.check_value(other.hex())
    assert key.hex() not in auth.check_value(key.hex())


def test_an_authenticated_block_leaves_room_for_its_tag():
    from aggbox.collectives.allreduce import max_block
    from aggbox.protocol import max_payload

    for mtu in (1500, 9000, 65000):
        assert 4 * max_block(mtu, authenticated=True) + auth.TAG_SIZE <= max_payload(mtu)
        assert max_block(mtu, authenticated=True) < max_block(mtu) or max_block(mtu) == 16384
