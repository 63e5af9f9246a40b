"""Frame and message types of the wire protocol, its constants and error
codes (``docs/PROTOCOL.md`` §4, §5, §9)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence, Union

from .._base import CourierError


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
        from .._ids import new_id_bytes

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
