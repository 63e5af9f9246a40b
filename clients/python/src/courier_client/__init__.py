"""Courier for Python services: send commands, publish events, request
replies and handle what your service receives, over Courier's wire protocol.

    import courier_client

    async with courier_client.connect("127.0.0.1:7700", "web") as client:
        reply = await client.request("todo.create", {"text": "milk"})
"""

from .client import (
    Client,
    Handler,
    Incoming,
    Outgoing,
    PendingAck,
    Reply,
    ReplyStream,
    connect,
    connect_from_env,
    current_activity,
    tls_context,
)
from .errors import (
    AlreadySettled,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    CourierError,
    CourierTimeout,
    DecodeError,
    EncodeError,
    InvalidName,
    Nack,
    Refused,
)
from ._trace import TRACEPARENT, TraceParent
from .names import pattern_matches, validate_name, validate_pattern
from .protocol import ErrorCode, Kind, Message

__version__ = "0.1.0"

__all__ = [
    "AlreadySettled",
    "Client",
    "ClientClosed",
    "ConnectError",
    "ConnectionLost",
    "CourierError",
    "CourierTimeout",
    "DecodeError",
    "EncodeError",
    "ErrorCode",
    "Handler",
    "Incoming",
    "InvalidName",
    "Kind",
    "Message",
    "Nack",
    "Outgoing",
    "PendingAck",
    "Refused",
    "Reply",
    "ReplyStream",
    "TRACEPARENT",
    "TraceParent",
    "connect",
    "connect_from_env",
    "current_activity",
    "pattern_matches",
    "tls_context",
    "validate_name",
    "validate_pattern",
]
