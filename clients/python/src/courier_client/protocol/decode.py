"""Bytes to frames and messages, every length and field checked."""

from __future__ import annotations

from ._wire import _DELIVERY_HEAD, _SEND_OUTCOME, _U16, _U32, _U64, _VERSION
from .frames import (
    BATCH_ENTRIES_MAX,
    FRAME_BYTES_MAX_DEFAULT,
    HEADERS_MAX,
    HELLO_MAGIC,
    LENGTH_PREFIX_BYTES,
    LOG_SEQ_VERSION,
    MESSAGE_BYTES_MIN,
    PROTOCOL_VERSION,
    Ack,
    DecodeError,
    Deliver,
    Delivery,
    Drain,
    Drained,
    ErrorFrame,
    Flag,
    Flow,
    Frame,
    FrameType,
    Hello,
    Kind,
    Message,
    Nack,
    NackEntry,
    Ping,
    Pong,
    Result,
    Send,
    SendEntry,
    SendOutcome,
    SendResult,
    Subscribe,
    Unsubscribe,
    Welcome,
    _message_flags,
)


class _Reader:
    """A cursor over one frame body (type byte at position 0)."""

    __slots__ = ("buf", "pos", "end", "flags", "last_name_raw", "last_name", "last_sender_raw", "last_sender")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None, version: int = PROTOCOL_VERSION) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end
        # The message flags this connection's version allows.
        self.flags = _message_flags(version)
        self.last_name_raw = b""
        self.last_name = ""
        # The empty sender (what clients send) needs no decoding either.
        self.last_sender_raw = b""
        self.last_sender = ""

    def eof(self, need: int) -> DecodeError:
        have = self.end - self.pos
        return DecodeError(
            "UnexpectedEof",
            f"frame ends early at byte {self.pos}: need {need} more bytes, have {have}",
            self.pos,
        )

    def take(self, n: int) -> bytes:
        pos = self.pos
        if self.end - pos < n:
            raise self.eof(n)
        self.pos = pos + n
        return self.buf[pos : pos + n]

    def u8(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise self.eof(1)
        self.pos = pos + 1
        return self.buf[pos]

    def u16(self) -> int:
        if self.end - self.pos < 2:
            raise self.eof(2)
        (v,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def u32(self) -> int:
        if self.end - self.pos < 4:
            raise self.eof(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        if self.end - self.pos < 8:
            raise self.eof(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def text(self, n: int) -> str:
        offset = self.pos
        raw = self.take(n)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise DecodeError("InvalidUtf8", f"text at byte {offset} is not valid UTF-8", offset) from None

    def str8(self) -> str:
        return self.text(self.u8())

    def str16(self) -> str:
        return self.text(self.u16())

    def count(self, entry_bytes_min: int) -> int:
        count = self.u32()
        if count == 0:
            raise DecodeError("EmptyBatch", "batch frame has 0 entries; send no frame instead")
        fits = min((self.end - self.pos) // entry_bytes_min, BATCH_ENTRIES_MAX)
        if count > fits:
            raise DecodeError(
                "TooManyEntries", f"batch claims {count} entries; at most {fits} fit in this frame"
            )
        return count

    def message(self, extra_flags: int = 0) -> tuple[Message, int]:
        """The message at the cursor and its flags byte.

        The usual message (valid, no optional field but a key or none,
        few headers) takes the fast path, reading straight from the buffer
        with the checks it needs; anything else, errors included, takes the
        careful path, which says exactly what is wrong and where."""
        buf = self.buf
        start = self.pos
        end = self.end
        if end - start >= 3:
            kind_code = buf[start]
            flags = buf[start + 1]
            n = buf[start + 2]
            pos = start + 3
            if (
                1 <= kind_code <= 3
                and not flags & (0xFF ^ (self.flags | extra_flags))
                and not flags & (Flag.RESPONSE_TO | Flag.EXPIRES_AT | Flag.DELIVER_AT | Flag.PARENT_ID)
                and end - pos >= n + 45
            ):
                raw = buf[pos : pos + n]
                if raw == self.last_name_raw and n:
                    name = self.last_name
                else:
                    try:
                        name = raw.decode()
                    except UnicodeDecodeError:
                        return self._message_checked(extra_flags)
                    self.last_name_raw = raw
                    self.last_name = name
                pos += n
                major, minor = _VERSION.unpack_from(buf, pos)
                id_bytes = buf[pos + 4 : pos + 20]
                activity = buf[pos + 20 : pos + 36]
                (timestamp,) = _U64.unpack_from(buf, pos + 36)
                sn = buf[pos + 44]
                pos += 45
                raw = buf[pos : pos + sn]
                if raw == self.last_sender_raw:
                    sender = self.last_sender
                else:
                    try:
                        sender = raw.decode()
                    except UnicodeDecodeError:
                        return self._message_checked(extra_flags)
                    if len(raw) != sn:
                        return self._message_checked(extra_flags)
                    self.last_sender_raw = raw
                    self.last_sender = sender
                pos += sn
                key = None
                if flags & Flag.KEY:
                    if end - pos < 2:
                        return self._message_checked(extra_flags)
                    (kn,) = _U16.unpack_from(buf, pos)
                    key = buf[pos + 2 : pos + 2 + kn]
                    pos += 2 + kn
                if end - pos >= 2:
                    (header_count,) = _U16.unpack_from(buf, pos)
                    pos += 2
                    if header_count <= HEADERS_MAX:
                        self.pos = pos
                        try:
                            headers = [(self.str8(), self.str16()) for _ in range(header_count)] if header_count else []
                            payload = self.take(self.u32())
                        except DecodeError:
                            self.pos = start
                            return self._message_checked(extra_flags)
                        m = _new_object(Message)
                        m.kind = _KINDS[kind_code]
                        m.name = name
                        m.version = (major, minor)
                        m.id_bytes = id_bytes
                        m.activity_id_bytes = activity
                        m.timestamp = timestamp
                        m.sender = sender
                        m.response_to_bytes = None
                        m.key = key
                        m.expires_at = None
                        m.deliver_at = None
                        m.parent_id_bytes = None
                        m.transient = bool(flags & Flag.TRANSIENT)
                        m.final = bool(flags & Flag.FINAL)
                        m.headers = headers
                        m.payload = payload
                        return m, flags
        self.pos = start
        return self._message_checked(extra_flags)

    def _message_checked(self, extra_flags: int) -> tuple[Message, int]:
        offset = self.pos
        kind_code = self.u8()
        if not 1 <= kind_code <= 3:
            raise DecodeError("UnknownKind", f"unknown message kind {kind_code} at byte {offset}", offset)
        offset = self.pos
        flags = self.u8()
        if flags & ~(self.flags | extra_flags):
            raise DecodeError("UnknownFlags", f"unknown message flags 0x{flags:02x} at byte {offset}", offset)
        # The entries of a batch mostly share a name: decode it once.
        n = self.u8()
        raw = self.take(n)
        if raw == self.last_name_raw and n:
            name = self.last_name
        else:
            self.pos -= n
            name = self.text(n)
            self.last_name_raw = raw
            self.last_name = name
        buf = self.buf
        pos = self.pos
        if self.end - pos < 4 + 16 + 16 + 8:
            raise self.eof(4 + 16 + 16 + 8)
        major, minor = _VERSION.unpack_from(buf, pos)
        id_bytes = buf[pos + 4 : pos + 20]
        activity = buf[pos + 20 : pos + 36]
        (timestamp,) = _U64.unpack_from(buf, pos + 36)
        self.pos = pos + 44
        sender = self.str8()
        response_to = self.take(16) if flags & Flag.RESPONSE_TO else None
        key = self.take(self.u16()) if flags & Flag.KEY else None
        expires_at = self.u64() if flags & Flag.EXPIRES_AT else None
        deliver_at = self.u64() if flags & Flag.DELIVER_AT else None
        parent_id = self.take(16) if flags & Flag.PARENT_ID else None
        header_count = self.u16()
        if header_count > HEADERS_MAX:
            raise DecodeError(
                "TooManyHeaders", f"message has {header_count} headers; at most {HEADERS_MAX} are allowed"
            )
        headers = [(self.str8(), self.str16()) for _ in range(header_count)]
        payload = self.take(self.u32())
        m = Message.__new__(Message)
        m.kind = _KINDS[kind_code]
        m.name = name
        m.version = (major, minor)
        m.id_bytes = id_bytes
        m.activity_id_bytes = activity
        m.timestamp = timestamp
        m.sender = sender
        m.response_to_bytes = response_to
        m.key = key
        m.expires_at = expires_at
        m.deliver_at = deliver_at
        m.parent_id_bytes = parent_id
        m.transient = bool(flags & Flag.TRANSIENT)
        m.final = bool(flags & Flag.FINAL)
        m.headers = headers
        m.payload = payload
        return m, flags

    def finish(self) -> None:
        extra = self.end - self.pos
        if extra:
            raise DecodeError(
                "TrailingBytes",
                f"frame has {extra} bytes left over after its body ends at byte {self.pos}",
                self.pos,
            )


_KINDS = {1: Kind.COMMAND, 2: Kind.EVENT, 3: Kind.REPLY}
_new_object = object.__new__


def decode_frame(
    buf: bytes | bytearray, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT, version: int = PROTOCOL_VERSION
) -> tuple[Frame, int] | None:
    """The frame at the start of ``buf`` and the bytes it took, or ``None``
    if a whole frame is not there yet; read as a connection of ``version``
    carries it. The length is checked before the
    frame is looked at, so a hostile length cannot make anyone buffer it."""
    if len(buf) < LENGTH_PREFIX_BYTES:
        return None
    (length,) = _U32.unpack_from(buf, 0)
    check_length(length, frame_bytes_max)
    total = LENGTH_PREFIX_BYTES + length
    if len(buf) < total:
        return None
    return decode_body(bytes(buf[LENGTH_PREFIX_BYTES:total]), version), total


def check_length(length: int, frame_bytes_max: int) -> None:
    """Raises :class:`DecodeError` for a length prefix no frame may have."""
    if length == 0:
        raise DecodeError("EmptyFrame", "frame length is 0; a frame has at least its type byte")
    if length > frame_bytes_max:
        raise DecodeError(
            "FrameTooLarge", f"frame of {length} bytes exceeds the limit of {frame_bytes_max} bytes"
        )


def decode_body(body: bytes, version: int = PROTOCOL_VERSION) -> Frame:
    """Decodes a frame body: the type byte first, no length prefix."""
    r = _Reader(body, 0, None, version)
    frame_type = r.u8()
    frame: Frame
    if frame_type == FrameType.SEND_RESULT:
        with_log_seq = version >= LOG_SEQ_VERSION
        count = r.count(20 if with_log_seq else 12)
        outcomes = []
        buf = body
        for _ in range(count):
            if r.end - r.pos < 12:
                raise r.eof(12)
            seq, code, n = _SEND_OUTCOME.unpack_from(buf, r.pos)
            r.pos += 12
            reason = r.text(n) if n else ""
            log_seq = r.u64() if with_log_seq else 0
            outcomes.append(tuple.__new__(SendOutcome, (seq, code, reason, log_seq)))
        frame = SendResult(outcomes)
    elif frame_type == FrameType.DELIVER:
        count = r.count(8 + 4 + MESSAGE_BYTES_MIN)
        deliveries = []
        for _ in range(count):
            if r.end - r.pos < 12:
                raise r.eof(12)
            delivery, attempt = _DELIVERY_HEAD.unpack_from(body, r.pos)
            r.pos += 12
            deliveries.append(Delivery(delivery, attempt, r.message()[0]))
        frame = Deliver(deliveries)
    elif frame_type == FrameType.HELLO:
        if r.take(4) != HELLO_MAGIC:
            raise DecodeError("BadMagic", 'HELLO does not start with the magic bytes "CRR1"; is this a Courier client?')
        version = r.u16()
        service = r.str8()
        instance = r.str8()
        max_in_flight = r.u32()
        offset = r.pos
        kind = r.u8()
        if kind == 0:
            token = None
        elif kind == 1:
            token = r.str16()
        else:
            raise DecodeError("UnknownCredentials", f"unknown credentials kind {kind} at byte {offset}", offset)
        frame = Hello(service, instance, max_in_flight, token, version)
    elif frame_type == FrameType.WELCOME:
        version = r.u16()
        connection_id = r.u64()
        frame_bytes_max = r.u32()
        broker = r.str8()
        # Brokers that tell the authenticated service append it.
        authenticated = r.str8() if r.pos < r.end else None
        frame = Welcome(version, connection_id, frame_bytes_max, broker, authenticated)
    elif frame_type == FrameType.SEND:
        count = r.count(8 + MESSAGE_BYTES_MIN)
        entries = []
        for _ in range(count):
            seq = r.u64()
            message, flags = r.message(Flag.QUIET)
            entries.append(SendEntry(seq, message, bool(flags & Flag.QUIET)))
        frame = Send(entries)
    elif frame_type == FrameType.SUBSCRIBE:
        request = r.u64()
        pattern = r.str8()
        ack_deadline_ms = r.u32()
        max_deliveries = r.u32()
        offset = r.pos
        start = r.u8()
        start_time = r.u64()
        if start in (0, 1) and start_time != 0:
            raise DecodeError(
                "StrayStartTime",
                f"subscription start {start} carries a start_time; it must be 0 unless start is 2 (time)",
            )
        if start not in (0, 1, 2):
            raise DecodeError("UnknownStart", f"unknown subscription start {start} at byte {offset}", offset)
        frame = Subscribe(request, pattern, ack_deadline_ms, max_deliveries, start, start_time)
    elif frame_type == FrameType.UNSUBSCRIBE:
        frame = Unsubscribe(r.u64(), r.str8())
    elif frame_type == FrameType.RESULT:
        request = r.u64()
        code = r.u16()
        frame = Result(request, code, r.str16())
    elif frame_type == FrameType.ACK:
        count = r.count(8)
        frame = Ack([r.u64() for _ in range(count)])
    elif frame_type == FrameType.NACK:
        count = r.count(12)
        frame = Nack([NackEntry(r.u64(), r.u32()) for _ in range(count)])
    elif frame_type == FrameType.FLOW:
        frame = Flow(r.u32())
    elif frame_type == FrameType.PING:
        frame = Ping(r.u64())
    elif frame_type == FrameType.PONG:
        frame = Pong(r.u64())
    elif frame_type == FrameType.ERROR:
        code = r.u16()
        frame = ErrorFrame(code, r.str16())
    elif frame_type == FrameType.DRAIN:
        frame = Drain()
    elif frame_type == FrameType.DRAINED:
        frame = Drained()
    else:
        raise DecodeError("UnknownFrameType", f"unknown frame type 0x{frame_type:02x}")
    r.finish()
    return frame


def decode_message(raw: bytes, version: int = PROTOCOL_VERSION) -> Message:
    """One message alone, as :func:`encode_message` writes it."""
    r = _Reader(bytes(raw), 0, None, version)
    message, _ = r.message()
    r.finish()
    return message
