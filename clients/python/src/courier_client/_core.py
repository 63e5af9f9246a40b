"""The client's state and its writer."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from . import protocol as p
from ._common import Handler
from ._connection import _Connection
from ._messages import Incoming, PendingAck
from ._options import _Options
from ._stream import ReplyStream
from .errors import Refused
from .protocol import Message

if TYPE_CHECKING:
    from ._handling import _KeyLine, _Subscription


class _ClientCore:
    """The client's state, and writing it out: what every part of the
    client (sending, handling, the connection's lifecycle) works on."""

    def __init__(self, options: _Options) -> None:
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._writer = p.FrameWriter()
        self._frame_bytes_max = p.FRAME_BYTES_MAX_DEFAULT
        self._version = p.PROTOCOL_VERSION
        self._key_lines: dict[bytes, _KeyLine] = {}
        self._conn: _Connection | None = None
        # The index in the options' addresses of the broker connected to last.
        self._address = 0
        self._generation = 0
        self._connected = False
        self._service = options.service
        self._broker = ""
        self._max_in_flight = options.max_in_flight
        self._next_seq = 0
        self._pending: dict[int, PendingAck] = {}
        self._requests: dict[bytes, ReplyStream] = {}
        self._quiet_requests: dict[int, bytes] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._routes: dict[str, _Subscription | None] = {}
        self._next_op = 0
        self._ops: dict[int, asyncio.Future[BaseException | None]] = {}
        self._flushes: deque[tuple[int, asyncio.Future[BaseException | None]]] = deque()
        self._next_nonce = 0
        self._drained: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        self._writable: asyncio.Future[None] | None = None
        self._running = 0
        self._backlog: deque[tuple[Handler, Incoming]] = deque()
        self._pumping = False
        self._idle: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._driver: asyncio.Task[None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._closing = False
        self._closed = False
        self._closed_event = asyncio.Event()
        self._stop: asyncio.Future[None] = self._loop.create_future()
        self.unheard_refusals = 0
        """Refusals of sends nobody awaits: quiet sends, and sends whose wait
        timed out before the broker answered (each is also logged)."""
        self.last_unheard_refusal: Refused | None = None

    # -- writing --

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self._conn
        if self._connected and conn is not None and conn.transport is not None and len(self._writer):
            conn.transport.write(self._writer.take())

    def _on_writable(self, conn: _Connection) -> None:
        if conn is self._conn:
            self._wake_writable()

    def _wake_writable(self) -> None:
        waiter = self._writable
        if waiter is not None:
            self._writable = None
            if not waiter.done():
                waiter.set_result(None)

    def _settle(self, generation: int, delivery: int, message: Message, nack_delay: float | None) -> None:
        """Writes the ACK or NACK, if the delivery came on the current
        connection; after a reconnect the broker has taken it back already."""
        if message.transient or generation != self._generation or not self._connected:
            return
        if nack_delay is None:
            self._writer.push_ack(delivery)
        else:
            self._writer.push_nack(delivery, int(nack_delay * 1000))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # -- closing --
