"""Frames and messages to bytes, and the batching writer."""

from __future__ import annotations

from typing import Sequence

from ._wire import (
    _BATCH_HEAD,
    _DELIVERY_HEAD,
    _FRAME_HEAD,
    _MASK_U32,
    _MASK_U64,
    _NACK,
    _U8,
    _U16,
    _U32,
    _U64,
    _VERSION,
    _WELCOME_HEAD,
)
from .frames import (
    BATCH_BYTES_TARGET,
    BATCH_ENTRIES_MAX,
    FRAME_BYTES_MAX_DEFAULT,
    HEADERS_MAX,
    HELLO_MAGIC,
    LOG_SEQ_VERSION,
    PARENT_ID_VERSION,
    PROTOCOL_VERSION,
    Ack,
    Deliver,
    Drain,
    Drained,
    EncodeError,
    ErrorFrame,
    Flag,
    Flow,
    Frame,
    FrameType,
    Hello,
    Message,
    Nack,
    Ping,
    Pong,
    Result,
    Send,
    SendResult,
    Subscribe,
    Unsubscribe,
    Welcome,
)


def _str8(text: str, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFF:
        raise EncodeError(f"{what} is {len(raw)} bytes; at most 255 fit")
    return bytes((len(raw),)) + raw


def _str16(text: str, what: str, truncate: bool = False) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        if not truncate:
            raise EncodeError(f"{what} is {len(raw)} bytes; at most 65535 fit")
        # Cut at a character boundary, as the reference encoder does.
        raw = raw[:0xFFFF].decode(errors="ignore").encode()
    return _U16.pack(len(raw)) + raw


def _check_uint(value: int, mask: int, what: str) -> int:
    if not 0 <= value <= mask:
        raise EncodeError(f"{what} {value} does not fit {mask.bit_length()} unsigned bits")
    return value


def encode_message(message: Message, extra_flags: int = 0, version: int = PROTOCOL_VERSION) -> bytes:
    """The message as it travels inside SEND and DELIVER entries (§4), on
    a connection of ``version`` (below 2 without ``parent_id``, as the
    broker leaves it out)."""
    m = message
    flags = extra_flags
    if m.transient:
        flags |= Flag.TRANSIENT
    if m.final:
        flags |= Flag.FINAL
    optional: list[bytes] = []
    if m.response_to_bytes is not None:
        flags |= Flag.RESPONSE_TO
        optional.append(m.response_to_bytes)
    if m.key is not None:
        flags |= Flag.KEY
        if len(m.key) > 0xFFFF:
            raise EncodeError(f"key is {len(m.key)} bytes; at most 65535 fit")
        optional.append(_U16.pack(len(m.key)) + bytes(m.key))
    if m.expires_at is not None:
        flags |= Flag.EXPIRES_AT
        optional.append(_U64.pack(_check_uint(m.expires_at, _MASK_U64, "expires_at")))
    if m.deliver_at is not None:
        flags |= Flag.DELIVER_AT
        optional.append(_U64.pack(_check_uint(m.deliver_at, _MASK_U64, "deliver_at")))
    if m.parent_id_bytes is not None and version >= PARENT_ID_VERSION:
        flags |= Flag.PARENT_ID
        optional.append(m.parent_id_bytes)
    return b"".join(
        (
            bytes((int(m.kind), flags)),
            _str8(m.name, "name"),
            _VERSION.pack(
                _check_uint(m.version[0], 0xFFFF, "version.major"),
                _check_uint(m.version[1], 0xFFFF, "version.minor"),
            ),
            m.id_bytes,
            m.activity_id_bytes,
            _U64.pack(_check_uint(m.timestamp, _MASK_U64, "timestamp")),
            _str8(m.sender, "sender"),
            *optional,
            encode_headers(m.headers),
            _payload(m.payload),
        )
    )


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """``header_count`` and the headers, as a message carries them."""
    if len(headers) > HEADERS_MAX:
        raise EncodeError(f"message has {len(headers)} headers; at most {HEADERS_MAX} are allowed")
    parts = [_U16.pack(len(headers))]
    for k, v in headers:
        parts.append(_str8(k, f"header name {k[:40]!r}"))
        parts.append(_str16(v, f"header {k[:40]!r}"))
    return b"".join(parts)


def _payload(payload: bytes) -> bytes:
    if len(payload) > _MASK_U32:
        raise EncodeError(f"payload is {len(payload)} bytes; at most {_MASK_U32} fit")
    return _U32.pack(len(payload)) + bytes(payload)


def _frame(frame_type: int, body: bytes) -> bytes:
    return _FRAME_HEAD.pack(1 + len(body), frame_type) + body


def _batch(frame_type: int, entries: Sequence[bytes]) -> bytes:
    if not entries:
        raise EncodeError("a batch frame needs at least one entry; send no frame instead")
    if len(entries) > BATCH_ENTRIES_MAX:
        raise EncodeError(f"a batch frame holds at most {BATCH_ENTRIES_MAX} entries, not {len(entries)}")
    body = b"".join(entries)
    return _BATCH_HEAD.pack(5 + len(body), frame_type, len(entries)) + body


def encode_frame(frame: Frame, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame with its length prefix, as a connection of ``version``
    carries it. A batch frame becomes exactly one frame with all its
    entries (use :class:`FrameWriter` to merge and split)."""
    if isinstance(frame, Hello):
        credentials = b"\x00" if frame.token is None else b"\x01" + _str16(frame.token, "token")
        return _frame(
            FrameType.HELLO,
            HELLO_MAGIC
            + _U16.pack(_check_uint(frame.version, 0xFFFF, "version"))
            + _str8(frame.service, "service")
            + _str8(frame.instance, "instance")
            + _U32.pack(_check_uint(frame.max_in_flight, _MASK_U32, "max_in_flight"))
            + credentials,
        )
    if isinstance(frame, Welcome):
        service = b"" if frame.service is None else _str8(frame.service, "service")
        return _frame(
            FrameType.WELCOME,
            _WELCOME_HEAD.pack(frame.version, frame.connection_id, frame.frame_bytes_max)
            + _str8(frame.broker, "broker")
            + service,
        )
    if isinstance(frame, Send):
        return _batch(
            FrameType.SEND,
            [
                _U64.pack(_check_uint(e.seq, _MASK_U64, "seq"))
                + encode_message(e.message, Flag.QUIET if e.quiet else 0, version)
                for e in frame.entries
            ],
        )
    if isinstance(frame, SendResult):
        return _batch(
            FrameType.SEND_RESULT,
            [
                _U64.pack(o.seq)
                + _U16.pack(o.code)
                + _str16(o.reason, "reason", truncate=True)
                + (_U64.pack(o.log_seq) if version >= LOG_SEQ_VERSION else b"")
                for o in frame.entries
            ],
        )
    if isinstance(frame, Subscribe):
        if frame.start not in (0, 1, 2):
            raise EncodeError(f"subscription start {frame.start} is not 0, 1 or 2")
        if frame.start != 2 and frame.start_time != 0:
            raise EncodeError("start_time must be 0 unless start is 2 (time)")
        return _frame(
            FrameType.SUBSCRIBE,
            _U64.pack(frame.request)
            + _str8(frame.pattern, "pattern")
            + _U32.pack(_check_uint(frame.ack_deadline_ms, _MASK_U32, "ack_deadline_ms"))
            + _U32.pack(_check_uint(frame.max_deliveries, _MASK_U32, "max_deliveries"))
            + _U8.pack(frame.start)
            + _U64.pack(_check_uint(frame.start_time, _MASK_U64, "start_time")),
        )
    if isinstance(frame, Unsubscribe):
        return _frame(FrameType.UNSUBSCRIBE, _U64.pack(frame.request) + _str8(frame.pattern, "pattern"))
    if isinstance(frame, Result):
        return _frame(
            FrameType.RESULT,
            _U64.pack(frame.request) + _U16.pack(frame.code) + _str16(frame.reason, "reason", truncate=True),
        )
    if isinstance(frame, Deliver):
        return _batch(
            FrameType.DELIVER,
            [_DELIVERY_HEAD.pack(d.delivery, d.attempt) + encode_message(d.message, 0, version) for d in frame.entries],
        )
    if isinstance(frame, Ack):
        return _batch(FrameType.ACK, [_U64.pack(d) for d in frame.deliveries])
    if isinstance(frame, Nack):
        return _batch(FrameType.NACK, [_NACK.pack(n.delivery, n.delay_ms) for n in frame.entries])
    if isinstance(frame, Flow):
        return _frame(FrameType.FLOW, _U32.pack(_check_uint(frame.max_in_flight, _MASK_U32, "max_in_flight")))
    if isinstance(frame, Ping):
        return _frame(FrameType.PING, _U64.pack(frame.nonce))
    if isinstance(frame, Pong):
        return _frame(FrameType.PONG, _U64.pack(frame.nonce))
    if isinstance(frame, ErrorFrame):
        return _frame(FrameType.ERROR, _U16.pack(frame.code) + _str16(frame.message, "message", truncate=True))
    if isinstance(frame, Drain):
        return _frame(FrameType.DRAIN, b"")
    if isinstance(frame, Drained):
        return _frame(FrameType.DRAINED, b"")
    raise TypeError(f"not a frame: {frame!r}")


class FrameWriter:
    """Encodes frames into one buffer, merging consecutive entries of the
    same batch type (SEND, ACK, NACK, …) into one frame while it holds
    fewer than :data:`BATCH_BYTES_TARGET` bytes, as the reference encoder
    does. One :meth:`take` becomes one socket write, so under load many
    messages share a frame and a system call.
    """

    __slots__ = ("buf", "_open_type", "_open_start", "_open_count", "frame_bytes_max", "version")

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, version: int = PROTOCOL_VERSION) -> None:
        self.version = version
        self.buf = bytearray()
        self._open_type = 0
        self._open_start = 0
        self._open_count = 0
        self.frame_bytes_max = frame_bytes_max

    def __len__(self) -> int:
        return len(self.buf)

    def _close(self) -> None:
        if self._open_type:
            start = self._open_start
            _BATCH_HEAD.pack_into(
                self.buf, start, len(self.buf) - start - 4, self._open_type, self._open_count
            )
            self._open_type = 0

    def _entry(self, frame_type: int, entry_len: int) -> None:
        """Opens a batch of ``frame_type`` for an entry of ``entry_len``
        bytes, unless the open one still takes it."""
        buf = self.buf
        if self._open_type == frame_type:
            size = len(buf) - self._open_start
            if (
                size < BATCH_BYTES_TARGET
                and self._open_count < BATCH_ENTRIES_MAX
                and size - 4 + entry_len <= self.frame_bytes_max
            ):
                self._open_count += 1
                return
        self._close()
        self._open_type = frame_type
        self._open_start = len(buf)
        self._open_count = 1
        buf += b"\0\0\0\0\0\0\0\0\0"  # length, type and count, patched on close

    def push_send(self, seq: int, message: bytes, quiet: bool = False) -> None:
        """A SEND entry of an already encoded message (:func:`encode_message`)."""
        self._entry(FrameType.SEND, 8 + len(message))
        buf = self.buf
        buf += _U64.pack(seq)
        at = len(buf) + 1
        buf += message
        if quiet:
            buf[at] |= Flag.QUIET

    def push_ack(self, delivery: int) -> None:
        self._entry(FrameType.ACK, 8)
        self.buf += _U64.pack(delivery)

    def push_nack(self, delivery: int, delay_ms: int) -> None:
        self._entry(FrameType.NACK, 12)
        self.buf += _NACK.pack(delivery, min(max(delay_ms, 0), _MASK_U32))

    def push(self, frame: Frame) -> None:
        """Any frame; batch frames merge entry by entry with their neighbours."""
        if isinstance(frame, Send):
            for e in frame.entries:
                self.push_send(e.seq, encode_message(e.message, 0, self.version), e.quiet)
        elif isinstance(frame, Ack):
            for d in frame.deliveries:
                self.push_ack(d)
        elif isinstance(frame, Nack):
            for n in frame.entries:
                self.push_nack(n.delivery, n.delay_ms)
        else:
            self._close()
            self.buf += encode_frame(frame, self.version)

    def take(self) -> bytes:
        """Everything encoded so far; the writer starts afresh."""
        self._close()
        out = bytes(self.buf)
        self.buf.clear()
        return out
