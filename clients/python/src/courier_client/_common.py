"""What the client's modules share: the types users pass, limits, and
small helpers."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import struct
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Mapping, Sequence, Union

from . import protocol as p
from .protocol import Message

if TYPE_CHECKING:
    from ._messages import Incoming


log = logging.getLogger("courier_client")

Seconds = Union[float, int, timedelta]
"""A duration: seconds (as asyncio takes them) or a :class:`~datetime.timedelta`."""
Payload = Any
"""``bytes`` (or ``bytearray``/``memoryview``) travel as they are;
anything else is encoded as JSON with ``content-type: application/json``."""
Headers = Union[Mapping[str, str], Sequence[tuple[str, str]], None]
Handler = Callable[["Incoming"], Union[Awaitable[Any], Any]]
"""A handler: ``async def handle(msg: Incoming) -> None`` (or a plain
function). Returning acks the delivery, raising nacks it."""
Start = Union[Literal["end", "beginning"], datetime]

ALPN = "courier/1"
QUIET_BUFFER_BYTES_MAX = 1024 * 1024
"""Bytes of quiet sends that may wait for the socket before a quiet send
waits for room (so a fast publisher cannot grow memory without bound)."""
EAGER_WRITE_BYTES = 256 * 1024
"""Bytes of sends queued in one go (a loop of ``enqueue()`` calls does not
yield to the event loop) that are handed to the socket at once, so the
broker works on them while more are encoded."""
INBOUND_FRAME_BYTES_MAX = 64 * 1024 * 1024
"""The biggest frame accepted from the broker."""
REPLY_BUFFER_MAX = 1024
"""Replies buffered per request stream before newer ones are dropped."""
TRANSIENT_BACKLOG_MAX = 65_536
"""Transient deliveries waiting for a free handler slot before newer ones
are dropped (durable ones are bounded by ``max_in_flight`` at the broker)."""

_HANDLING: contextvars.ContextVar[Message | None] = contextvars.ContextVar("courier_handling", default=None)
"""The message being handled: what is sent meanwhile takes its activity and
names it as parent."""

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_SEND_OUTCOME = struct.Struct(">QHH")
_VERSION_1_0 = b"\x00\x01\x00\x00"
_NO_TIMESTAMP_NO_SENDER = bytes(9)
_NO_HEADERS = b"\x00\x00"
_JSON_HEADERS = p.encode_headers([("content-type", "application/json")])
_MISSING: Any = object()


def current_activity() -> uuid.UUID | None:
    """The activity a message sent now would carry: the one of the message
    being handled, when called from a handler (or code it runs)."""
    handling = _HANDLING.get()
    return None if handling is None else uuid.UUID(bytes=handling.activity_id_bytes)


def _seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _now_ns() -> int:
    return time.time_ns()



def _uuid(raw: bytes) -> uuid.UUID:
    """A :class:`uuid.UUID` of 16 bytes known to be one, without the
    constructor's argument checks (a third of a pipelined send's cost)."""
    u = _new_object(uuid.UUID)
    _set_attribute(u, "int", int.from_bytes(raw, "big"))
    _set_attribute(u, "is_safe", uuid.SafeUUID.unknown)
    return u


_new_object = object.__new__
_set_attribute = object.__setattr__


async def _wait(future: asyncio.Future[Any], timeout: float) -> None:
    """Waits until ``future`` is done or ``timeout`` passed, without
    cancelling it (it may be shared) and without a task."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
