"""The Courier wire protocol, versions 1 to 4: frames and messages to and from bytes.

Sans-I/O: this module knows nothing of sockets or asyncio. It follows
``docs/PROTOCOL.md`` of the Courier repository byte by byte; every integer is
big-endian and unsigned.

>>> from courier_client.protocol import Ping, encode_frame, decode_frame
>>> wire = encode_frame(Ping(7))
>>> wire.hex(" ")
'00 00 00 09 0c 00 00 00 00 00 00 00 07'
>>> decode_frame(wire)
(Ping(nonce=7), 13)
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence, Union

from ._base import CourierError

__all__ = [
    "BATCH_BYTES_TARGET",
    "BATCH_ENTRIES_MAX",
    "FRAME_BYTES_MAX_DEFAULT",
    "HEADERS_MAX",
    "HELLO_MAGIC",
    "MESSAGE_BYTES_MIN",
    "PROTOCOL_VERSION",
    "PARENT_ID_VERSION",
    "LOG_SEQ_VERSION",
    "PIPELINED_KEYS_VERSION",
    "ATTEMPT_KEY_START",
    "Ack",
    "DecodeError",
    "Deliver",
    "Delivery",
    "Drain",
    "Drained",
    "EncodeError",
    "ErrorCode",
    "ErrorFrame",
    "Flag",
    "Flow",
    "Frame",
    "FrameType",
    "FrameWriter",
    "Hello",
    "Kind",
    "Message",
    "Nack",
    "NackEntry",
    "Ping",
    "Pong",
    "Result",
    "Send",
    "SendEntry",
    "SendOutcome",
    "SendResult",
    "Subscribe",
    "Unsubscribe",
    "Welcome",
    "decode_body",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
    "error_code",
    "error_code_name",
]

PROTOCOL_VERSION = 4
"""The newest protocol version this module speaks (HELLO and WELCOME);
it reads and writes 1 to 4, each as that version has it."""
PARENT_ID_VERSION = 2
"""From this version on a message may carry ``parent_id`` (flag 0x80)."""
LOG_SEQ_VERSION = 3
"""From this version on a SEND_RESULT entry carries ``log_seq``."""
PIPELINED_KEYS_VERSION = 4
"""From this version on the broker sends a key's deliveries ahead
(``docs/PROTOCOL.md`` §8.4) and marks a key start in ``attempt``."""
ATTEMPT_KEY_START = 0x8000_0000
"""Bit 31 of a DELIVER entry's ``attempt`` (version 4): the first delivery
of its key this connection holds."""
HELLO_MAGIC = b"CRR1"
FRAME_BYTES_MAX_DEFAULT = 8 * 1024 * 1024
"""A receiver's default limit on a frame's ``length`` field, in bytes."""
BATCH_ENTRIES_MAX = 65_536
BATCH_BYTES_TARGET = 256 * 1024
"""A batch frame takes more entries while it holds fewer bytes than this."""
HEADERS_MAX = 64
MESSAGE_BYTES_MIN = 54
"""The smallest encoded message: empty name, sender, headers and payload."""
LENGTH_PREFIX_BYTES = 4


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    SEND = 0x03
    SEND_RESULT = 0x04
    SUBSCRIBE = 0x05
    UNSUBSCRIBE = 0x06
    RESULT = 0x07
    DELIVER = 0x08
    ACK = 0x09
    NACK = 0x0A
    FLOW = 0x0B
    PING = 0x0C
    PONG = 0x0D
    ERROR = 0x0E
    DRAIN = 0x0F
    DRAINED = 0x10


class Kind(IntEnum):
    """A message's kind: how the broker routes it."""

    COMMAND = 1
    EVENT = 2
    REPLY = 3


class Flag:
    """Bits of a message's ``flags`` byte."""

    TRANSIENT = 0x01
    FINAL = 0x02
    RESPONSE_TO = 0x04
    KEY = 0x08
    EXPIRES_AT = 0x10
    DELIVER_AT = 0x20
    QUIET = 0x40
    """Only in a SEND entry: answer only a refusal."""
    PARENT_ID = 0x80
    """Version 2 on: the message carries the id of the message that caused it."""
    ALL = 0x3F
    """Every bit a message of version 1 may carry anywhere (QUIET is SEND-only)."""


def _message_flags(version: int) -> int:
    """The flag bits a message may carry on a connection of ``version``."""
    return Flag.ALL | Flag.PARENT_ID if version >= PARENT_ID_VERSION else Flag.ALL


class ErrorCode(IntEnum):
    """The broker's error codes (``docs/PROTOCOL.md`` §9).

    Codes are never reused and new ones are appended, so a receiver keeps
    codes it does not know as plain ints (see :func:`error_code`).
    """

    OK = 0
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    HANDSHAKE_REQUIRED = 4
    INVALID_NAME = 5
    NO_RECEIVER = 6
    EXPIRED = 7
    UNKNOWN_DELIVERY = 8
    STORAGE_FAILED = 9
    UNAUTHORIZED = 10
    INVALID_PATTERN = 11
    UNKNOWN_REQUEST = 12
    PAYLOAD_TOO_LARGE = 13
    INTERNAL = 14
    RATE_LIMITED = 15
    SHUTTING_DOWN = 16
    INVALID_MESSAGE = 17
    HANDSHAKE_TIMEOUT = 18
    SLOW_CONSUMER = 19
    NOT_SUBSCRIBED = 20
    TOO_MANY_CONNECTIONS = 21
    READ_TIMEOUT = 22
    STREAM_FULL = 23
    ACK_DEADLINE_PASSED = 24

    @property
    def wire_name(self) -> str:
        """The code's name as the protocol writes it (``no_receiver``)."""
        return self.name.lower()


_ERROR_CODES = {int(c): c for c in ErrorCode}


def error_code(code: int) -> ErrorCode | int:
    """The :class:`ErrorCode` for ``code``, or ``code`` itself if unknown."""
    return _ERROR_CODES.get(code, code)


def error_code_name(code: int) -> str:
    """``no_receiver`` for 6; ``unknown`` for a code this module does not know."""
    known = _ERROR_CODES.get(code)
    return known.wire_name if known is not None else "unknown"


class DecodeError(CourierError, ValueError):
    """Bytes that are not a valid frame. ``kind`` names the failure as the
    reference decoder does (``UnexpectedEof``, ``TrailingBytes``, …);
    ``offset`` counts from the type byte (wire offset − 4) where known."""

    def __init__(self, kind: str, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.offset = offset

    @property
    def code(self) -> ErrorCode:
        """The code of the ERROR frame a broker answers this failure with."""
        if self.kind == "FrameTooLarge":
            return ErrorCode.FRAME_TOO_LARGE
        return ErrorCode.MALFORMED_FRAME


class EncodeError(CourierError, ValueError):
    """A value that does not fit its field (a name over 255 bytes, …)."""


class Message:
    """A message: the envelope and its payload (``docs/PROTOCOL.md`` §4).

    Ids are :class:`uuid.UUID`; the ``*_bytes`` attributes hold the same
    16 bytes as they travel (cheaper when only compared or copied).

    >>> m = Message(Kind.EVENT, "todo.created", b"{}")
    >>> m.activity_id == m.id, m.id.version
    (True, 7)
    """

    __slots__ = (
        "kind",
        "name",
        "version",
        "id_bytes",
        "activity_id_bytes",
        "timestamp",
        "sender",
        "response_to_bytes",
        "key",
        "expires_at",
        "deliver_at",
        "parent_id_bytes",
        "transient",
        "final",
        "headers",
        "payload",
    )

    def __init__(
        self,
        kind: Kind,
        name: str,
        payload: bytes = b"",
        *,
        version: tuple[int, int] = (1, 0),
        id: uuid.UUID | bytes | None = None,
        activity_id: uuid.UUID | bytes | None = None,
        timestamp: int = 0,
        sender: str = "",
        response_to: uuid.UUID | bytes | None = None,
        key: bytes | None = None,
        expires_at: int | None = None,
        deliver_at: int | None = None,
        parent_id: uuid.UUID | bytes | None = None,
        transient: bool = False,
        final: bool | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        from ._ids import new_id_bytes

        self.kind = kind
        self.name = name
        self.version = version
        self.id_bytes = _uuid_bytes(id) if id is not None else new_id_bytes()
        # A new activity is named after the message that starts it.
        self.activity_id_bytes = (
            _uuid_bytes(activity_id) if activity_id is not None else self.id_bytes
        )
        self.timestamp = timestamp
        self.sender = sender
        self.response_to_bytes = _uuid_bytes(response_to) if response_to is not None else None
        self.key = key
        self.expires_at = expires_at
        self.deliver_at = deliver_at
        self.parent_id_bytes = _uuid_bytes(parent_id) if parent_id is not None else None
        self.transient = transient
        self.final = (kind == Kind.REPLY) if final is None else final
        self.headers = list(headers)
        self.payload = payload

    @property
    def id(self) -> uuid.UUID:
        """Unique per message; the broker's dedup key."""
        return uuid.UUID(bytes=self.id_bytes)

    @property
    def activity_id(self) -> uuid.UUID:
        """Correlates the messages of one activity."""
        return uuid.UUID(bytes=self.activity_id_bytes)

    @property
    def response_to(self) -> uuid.UUID | None:
        """On a reply: the id of the command it answers."""
        raw = self.response_to_bytes
        return None if raw is None else uuid.UUID(bytes=raw)

    @property
    def parent_id(self) -> uuid.UUID | None:
        """The message whose handling caused this one (version 2 on)."""
        raw = self.parent_id_bytes
        return None if raw is None else uuid.UUID(bytes=raw)

    def header(self, name: str) -> str | None:
        """The first header called ``name``, if any."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Message(kind={self.kind.name}, name={self.name!r}, id={self.id}, "
            f"activity_id={self.activity_id}, response_to={self.response_to}, "
            f"sender={self.sender!r}, final={self.final}, transient={self.transient}, "
            f"payload={self.payload[:64]!r}{'…' if len(self.payload) > 64 else ''})"
        )


def _uuid_bytes(value: uuid.UUID | bytes) -> bytes:
    if isinstance(value, uuid.UUID):
        return value.bytes
    if len(value) != 16:
        raise EncodeError(f"a uuid is 16 bytes, not {len(value)}")
    return bytes(value)


# --- frames ---------------------------------------------------------------


@dataclass
class Hello:
    service: str
    instance: str = ""
    max_in_flight: int = 0
    token: str | None = None
    """``None``: credentials kind 0 (none); a string: kind 1 (token)."""
    version: int = PROTOCOL_VERSION


@dataclass
class Welcome:
    version: int
    connection_id: int
    frame_bytes_max: int
    broker: str
    service: str | None = None
    """The service the broker authenticated, on brokers that say it."""


@dataclass
class SendEntry:
    seq: int
    message: Message
    quiet: bool = False


@dataclass
class Send:
    entries: list[SendEntry]


class SendOutcome(tuple[int, int, str, int]):
    """``(seq, code, reason, log_seq)`` of one SEND_RESULT entry (a plain
    tuple: a publisher decodes one per message). ``log_seq`` is 0 below
    version 3 and wherever the log holds nothing."""

    __slots__ = ()

    def __new__(cls, seq: int, code: int, reason: str = "", log_seq: int = 0) -> SendOutcome:
        return tuple.__new__(cls, (seq, code, reason, log_seq))

    @property
    def seq(self) -> int:
        return self[0]

    @property
    def code(self) -> int:
        return self[1]

    @property
    def reason(self) -> str:
        return self[2]

    @property
    def log_seq(self) -> int:
        """Version 3 on: where the broker's log holds the accepted message."""
        return self[3]

    def __repr__(self) -> str:
        return f"SendOutcome(seq={self[0]}, code={self[1]}, reason={self[2]!r}, log_seq={self[3]})"


@dataclass
class SendResult:
    entries: list[SendOutcome]


@dataclass
class Subscribe:
    request: int
    pattern: str
    ack_deadline_ms: int = 0
    max_deliveries: int = 0
    start: int = 0
    """0 = new messages only, 1 = every retained event, 2 = from ``start_time``."""
    start_time: int = 0


@dataclass
class Unsubscribe:
    request: int
    pattern: str


@dataclass
class Result:
    request: int
    code: int
    reason: str = ""


@dataclass
class Delivery:
    delivery: int
    attempt: int
    message: Message


@dataclass
class Deliver:
    entries: list[Delivery]


@dataclass
class Ack:
    deliveries: list[int]


@dataclass
class NackEntry:
    delivery: int
    delay_ms: int = 0


@dataclass
class Nack:
    entries: list[NackEntry]


@dataclass
class Flow:
    max_in_flight: int


@dataclass
class Ping:
    nonce: int


@dataclass
class Pong:
    nonce: int


@dataclass
class ErrorFrame:
    code: int
    message: str = ""


@dataclass
class Drain:
    pass


@dataclass
class Drained:
    pass


Frame = Union[
    Hello,
    Welcome,
    Send,
    SendResult,
    Subscribe,
    Unsubscribe,
    Result,
    Deliver,
    Ack,
    Nack,
    Flow,
    Ping,
    Pong,
    ErrorFrame,
    Drain,
    Drained,
]

# --- encoding --------------------------------------------------------------

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FRAME_HEAD = struct.Struct(">IB")
_BATCH_HEAD = struct.Struct(">IBI")
_VERSION = struct.Struct(">HH")
_SEND_OUTCOME = struct.Struct(">QHH")
_DELIVERY_HEAD = struct.Struct(">QI")
_NACK = struct.Struct(">QI")
_WELCOME_HEAD = struct.Struct(">HQI")
_U64_ZERO_AND_EMPTY_STR8 = bytes(9)
_MASK_U32 = 0xFFFF_FFFF
_MASK_U64 = 0xFFFF_FFFF_FFFF_FFFF


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


# --- decoding --------------------------------------------------------------


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


# --- the batching writer ------------------------------------------------------


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
