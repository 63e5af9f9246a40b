"""Fresh message ids: UUIDv7 (RFC 9562) with random bits from a pool.

``os.urandom`` per id is a system call per message; a pool drawn from the
OS a few kilobytes at a time, with the version and variant bits set for
all its ids at once, costs a slice per id instead. The bits are the OS's
CSPRNG output, so another service cannot guess ids to collide with ours
in the broker's dedup window. A forked child draws a fresh pool (it would
otherwise repeat its parent's ids).
"""

from __future__ import annotations

import os
import time

_IDS_PER_POOL = 512
_RANDOM_BYTES = 10
"""Random bytes per id: v7 keeps 74 of these 80 bits; the rest are its
version (0b0111) and variant (0b10)."""

_pool = b""
_used = 0
_last_ms = -1
_prefix = b""


def _forget_pool() -> None:
    global _pool, _used
    _pool = b""
    _used = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _refill() -> None:
    global _pool, _used
    raw = bytearray(os.urandom(_IDS_PER_POOL * _RANDOM_BYTES))
    for at in range(0, len(raw), _RANDOM_BYTES):
        raw[at] = 0x70 | (raw[at] & 0x0F)
        raw[at + 2] = 0x80 | (raw[at + 2] & 0x3F)
    _pool = bytes(raw)
    _used = 0


def new_id_bytes() -> bytes:
    """The 16 bytes of a fresh UUIDv7: 48 bits of Unix milliseconds, then
    74 random bits around the version (7) and variant (0b10) bits."""
    global _used, _last_ms, _prefix
    ms = time.time_ns() // 1_000_000
    if ms != _last_ms:
        _last_ms = ms
        _prefix = ms.to_bytes(6, "big")
    used = _used
    if used >= len(_pool):
        _refill()
        used = 0
    _used = used + _RANDOM_BYTES
    return _prefix + _pool[used : used + _RANDOM_BYTES]
