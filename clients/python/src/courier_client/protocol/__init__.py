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

from .decode import _Reader as _Reader
from .decode import check_length as check_length
from .decode import decode_body, decode_frame, decode_message
from .encode import FrameWriter, encode_frame, encode_message
from .encode import encode_headers as encode_headers
from .frames import (
    ATTEMPT_KEY_START,
    BATCH_BYTES_TARGET,
    BATCH_ENTRIES_MAX,
    FRAME_BYTES_MAX_DEFAULT,
    HEADERS_MAX,
    HELLO_MAGIC,
    LOG_SEQ_VERSION,
    MESSAGE_BYTES_MIN,
    PARENT_ID_VERSION,
    PIPELINED_KEYS_VERSION,
    PROTOCOL_VERSION,
    Ack,
    DecodeError,
    Deliver,
    Delivery,
    Drain,
    Drained,
    EncodeError,
    ErrorCode,
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
    error_code,
    error_code_name,
)

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
