"""Authenticated jobs: the keyed tag of an AggBox header (SipHash-2-4, 128-bit job key).

A job installed with a key (``Group.auth_key``, 16 bytes) carries Flags.AUTH in every
packet and, as the 8 bytes after the payload, SipHash-2-4 of the 32-byte header under the
key, little-endian. The kernel computes the same function (bpf/lib/siphash.h): it drops a
packet whose tag is wrong (counter ``drop_bad_mac``) and tags what it sends back. The key
is a per-job secret that never travels in a packet, so a host that sniffed the token
still cannot make a packet the job accepts.

What the tag covers is the header (job, token, rank, block number, count, exponent, ...),
not the payload: it keeps every sender but the members out of the job, and a recorded
packet replayed is a duplicate. A host able to rewrite a member's packet in flight (not
just to sniff and send) could still change its values; see docs/reliability.md.

Two implementations, checked against each other and the reference vector in
tests/unit/test_auth.py: :func:`tag` for one header (pure Python, ~10-20 us) and
:func:`tags` for many at once (numpy, a few microseconds per header in a batch of
hundreds): a worker tags a whole call's blocks in one go.
"""

from __future__ import annotations

import os
import secrets
import struct

import numpy as np

from aggbox.errors import AggBoxError

KEY_SIZE = 16
TAG_SIZE = 8
_M = (1 << 64) - 1
_WORDS = struct.Struct("<4Q")
_KEY = struct.Struct("<2Q")
_TAG = struct.Struct("<Q")


def new_key() -> bytes:
    """A fresh job key (from ``secrets``: never from a seeded generator)."""
    return secrets.token_bytes(KEY_SIZE)


def key_words(key: bytes) -> tuple[int, int]:
    if len(key) != KEY_SIZE:
        raise ValueError(f"an auth key is {KEY_SIZE} bytes, got {len(key)}")
    return _KEY.unpack(key)


def _rounds(v0: int, v1: int, v2: int, v3: int, n: int) -> tuple[int, int, int, int]:
    for _ in range(n):
        v0 = (v0 + v1) & _M
        v1 = ((v1 << 13) | (v1 >> 51)) & _M
        v1 ^= v0
        v0 = ((v0 << 32) | (v0 >> 32)) & _M
        v2 = (v2 + v3) & _M
        v3 = ((v3 << 16) | (v3 >> 48)) & _M
        v3 ^= v2
        v0 = (v0 + v3) & _M
        v3 = ((v3 << 21) | (v3 >> 43)) & _M
        v3 ^= v0
        v2 = (v2 + v1) & _M
        v1 = ((v1 << 17) | (v1 >> 47)) & _M
        v1 ^= v2
        v2 = ((v2 << 32) | (v2 >> 32)) & _M
    return v0, v1, v2, v3


def tag(key: bytes, header: bytes | bytearray | memoryview) -> int:
    """SipHash-2-4 of a 32-byte header under ``key``."""
    k0, k1 = key_words(key)
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573
    for m in (*_WORDS.unpack_from(header), 32 << 56):
        v3 ^= m
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
        v0 ^= m
    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    return v0 ^ v1 ^ v2 ^ v3


def tag_bytes(key: bytes, header: bytes | bytearray | memoryview) -> bytes:
    """The tag as it travels: 8 bytes, little-endian."""
    return _TAG.pack(tag(key, header))


def tag_of(trailer: bytes | bytearray | memoryview) -> int:
    return _TAG.unpack_from(trailer)[0]


def _rotl(x: np.ndarray, b: int) -> np.ndarray:
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


def _np_rounds(v: list[np.ndarray], n: int) -> None:
    v0, v1, v2, v3 = v
    for _ in range(n):
        v0 += v1
        v1 = _rotl(v1, 13)
        v1 ^= v0
        v0 = _rotl(v0, 32)
        v2 += v3
        v3 = _rotl(v3, 16)
        v3 ^= v2
        v0 += v3
        v3 = _rotl(v3, 21)
        v3 ^= v0
        v2 += v1
        v1 = _rotl(v1, 17)
        v1 ^= v2
        v2 = _rotl(v2, 32)
    v[:] = [v0, v1, v2, v3]


def tags(key: bytes, headers: np.ndarray) -> np.ndarray:
    """SipHash-2-4 of each row of ``headers`` (uint8, shape (n, 32)); uint64, shape (n,):
    ``tags(...).view(np.uint8)`` is the tags as they travel, back to back."""
    words = np.ascontiguousarray(headers, dtype=np.uint8).view("<u8").reshape(-1, 4)
    k0, k1 = (np.uint64(k) for k in key_words(key))
    n = words.shape[0]
    v = [np.full(n, k0 ^ np.uint64(0x736F6D6570736575)),
         np.full(n, k1 ^ np.uint64(0x646F72616E646F6D)),
         np.full(n, k0 ^ np.uint64(0x6C7967656E657261)),
         np.full(n, k1 ^ np.uint64(0x7465646279746573))]
    with np.errstate(over="ignore"):
        for j in range(5):
            m = words[:, j] if j < 4 else np.uint64(32 << 56)
            v[3] ^= m
            _np_rounds(v, 2)
            v[0] ^= m
        v[2] ^= np.uint64(0xFF)
        _np_rounds(v, 4)
    return (v[0] ^ v[1] ^ v[2] ^ v[3]).astype("<u8")


def key_hex(key: bytes | str | None) -> str:
    """A job's auth key as 32 hex digits ("" for none), from the argument or the
    environment's ``AGGBOX_AUTH_KEY``; a malformed key is refused before anything is set
    up."""
    if key is None:
        key = os.environ.get("AGGBOX_AUTH_KEY", "")
    if isinstance(key, str):
        try:
            key = bytes.fromhex(key)
        except ValueError:
            raise AggBoxError("auth_key (AGGBOX_AUTH_KEY) must be hex digits, e.g. from "
                              "`python -c 'import secrets; print(secrets.token_hex(16))'`"
                              ) from None
    if key and len(key) != KEY_SIZE:
        raise AggBoxError(f"auth_key must be {KEY_SIZE} bytes ({2 * KEY_SIZE} hex digits), "
                          f"got {len(key)}")
    return key.hex()


def check_value(key_hex: str) -> str:
    """What the sides of a job compare to agree on its key without sending it: the key's
    tag of a header of zeros (a PRF value: it says nothing of the key); "" for none."""
    return f"{tag(bytes.fromhex(key_hex), bytes(32)):016x}" if key_hex else ""
