"""Fresh message ids: UUIDv7 (RFC 9562) with random bits from a pool.

``os.urandom`` per id is a system call per message; a pool drawn from the
OS a few kilobytes at a time costs a slice per id instead. The bits are the
OS's CSPRNG output, so another service cannot guess ids to collide with
ours in the broker's dedup window. A forked child draws a fresh pool (it
would otherwise repeat its parent's ids).
"""

from __future__ import annotations

import os
import time

_POOL_BYTES = 4096
_ID_RANDOM_BYTES = 10

_pool = b""
_used = _POOL_BYTES


def _forget_pool() -> None:
    global _pool, _used
    _pool = b""
    _used = _POOL_BYTES


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def new_id_bytes() -> bytes:
    """The 16 bytes of a fresh UUIDv7: 48 bits of Unix milliseconds, then
    74 random bits around the version (7) and variant (0b10) bits."""
    global _pool, _used
    used = _used
    if used + _ID_RANDOM_BYTES > len(_pool):
        _pool = os.urandom(_POOL_BYTES)
        used = 0
    _used = used + _ID_RANDOM_BYTES
    r = _pool[used : used + _ID_RANDOM_BYTES]
    return (
        (time.time_ns() // 1_000_000).to_bytes(6, "big")
        + bytes((0x70 | (r[0] & 0x0F), r[1], 0x80 | (r[2] & 0x3F)))
        + r[3:]
    )
