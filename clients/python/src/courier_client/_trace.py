"""W3C Trace Context (``traceparent``) for messages: a message sent while
handling another carries a child of the handled message's trace, so
tracing systems see one trace per activity across services.

A message's own span id is taken from its id (the random half of its
UUID v7), so no random draw is made per message, and a span id found in a
tracing system names its message. A message that starts an activity
carries no header: its trace id is its activity id, which every message of
the activity carries anyway.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from .protocol import Message

TRACEPARENT = "traceparent"
"""The header's name (lower case, as W3C Trace Context writes it)."""

_SAMPLED = 0x01
"""Bit 0 of the header's flags: the trace is sampled (recorded)."""
_HEADER_BYTES = 55
"""``00-`` + 32 + ``-`` + 16 + ``-`` + 2: a version-00 header."""
_FIELDS = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
"""Unicode's White_Space, trimmed off a value as the reference SDK trims
it (``str.strip()`` would also take the separators U+001C to U+001F)."""


@dataclass(frozen=True)
class TraceParent:
    """The trace a message belongs to and the span that sent it: the fields
    of a ``traceparent`` header (version 00).

    >>> t = TraceParent.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    >>> t is not None and t.to_header()
    '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
    >>> TraceParent.parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    True
    """

    trace_id: bytes
    """16 bytes."""
    span_id: bytes
    """8 bytes: the sending span ("parent-id" in the header)."""
    flags: int

    @classmethod
    def parse(cls, text: str) -> TraceParent | None:
        """Reads a ``traceparent`` value. Version 00 exactly; a higher
        version is read by its version-00 prefix, as the specification
        asks; ``ff``, all-zero ids and malformed text are ``None``."""
        raw = text.strip(_WHITE_SPACE).encode(errors="replace")
        fields = _FIELDS.match(raw)
        if fields is None:
            return None
        version = int(fields[1], 16)
        if version == 0xFF or (version == 0 and len(raw) != _HEADER_BYTES):
            return None
        if len(raw) > _HEADER_BYTES and raw[_HEADER_BYTES] != 0x2D:  # '-'
            return None
        trace_id = bytes.fromhex(fields[2].decode())
        span_id = bytes.fromhex(fields[3].decode())
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return cls(trace_id, span_id, int(fields[4], 16))

    def to_header(self) -> str:
        """The header's value: ``00-<trace id>-<span id>-<flags>``, lower-case hex."""
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{self.flags:02x}"

    @classmethod
    def of(cls, message: Message) -> TraceParent:
        """The trace of ``message``: its ``traceparent`` if it carries a
        valid one, else the trace its activity started (trace id = activity
        id, span id from the message's id, sampled)."""
        header = message.header(TRACEPARENT)
        carried = None if header is None else cls.parse(header)
        if carried is not None:
            return carried
        trace_id = message.activity_id_bytes
        if trace_id == _ZERO_TRACE:
            trace_id = trace_id[:15] + b"\x01"
        return cls(trace_id, _span_id_of(message.id_bytes), _SAMPLED)

    def child(self, message_id: uuid.UUID | bytes) -> TraceParent:
        """The context a message with id ``message_id`` carries when this
        span sends it: same trace and flags, the message's own span id."""
        raw = message_id.bytes if isinstance(message_id, uuid.UUID) else message_id
        return TraceParent(self.trace_id, _span_id_of(raw), self.flags)


def child_header(cause: Message, id_bytes: bytes) -> str:
    """The ``traceparent`` of a message with id ``id_bytes`` sent as a
    consequence of ``cause``: ``TraceParent.of(cause).child(id).to_header()``,
    the cause's part kept from the call before (a handler's sends share
    their cause; reading its header again for each was half the cost of
    building a message)."""
    global _last_cause, _last_ends
    if cause is not _last_cause:
        trace = TraceParent.of(cause)
        _last_ends = (f"00-{trace.trace_id.hex()}-", f"-{trace.flags:02x}")
        _last_cause = cause
    head, tail = _last_ends
    return head + _span_id_of(id_bytes).hex() + tail


_last_cause: Message | None = None
_last_ends = ("", "")


def _span_id_of(id_bytes: bytes) -> bytes:
    """A span id from a message id: its last eight bytes, the random half of
    a UUID v7 (never all zero but by a 2^-62 chance, then made nonzero)."""
    span = id_bytes[8:16]
    return span[:7] + b"\x01" if span == _ZERO_SPAN else span


_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
