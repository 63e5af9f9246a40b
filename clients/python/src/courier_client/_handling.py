"""Handling what the service receives: subscriptions, deliveries handed to
handlers within the concurrency limit, ordering keys on pipelined
connections, ack and nack."""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any, Awaitable, cast

from . import protocol as p
from ._common import _HANDLING, _MISSING, TRANSIENT_BACKLOG_MAX, Handler, Seconds, Start, log, _seconds, _wait
from ._messages import Incoming
from ._sending import _Sending
from .errors import ClientClosed, ConnectionLost, CourierTimeout, Nack, Refused
from .names import pattern_matches, validate_pattern
from .protocol import Kind, Message

if TYPE_CHECKING:
    from .client import Client


class _KeyLine:
    """One ordering key on a pipelined connection (protocol version 4,
    PROTOCOL.md §8.4): the broker sends a key's next deliveries before the
    earlier ones are acked, and this hands them to handlers one at a time,
    in arrival order (which is the key's order). A nacked one makes the
    broker take back every later delivery of the key; those that arrive
    before the broker's next key start (bit 31 of ``attempt``) are dropped
    unhandled and unsettled."""

    __slots__ = ("run", "arrivals", "drop_after", "busy", "waiting")

    def __init__(self) -> None:
        self.run = 0
        """Key starts seen."""
        self.arrivals = 0
        self.drop_after: int | None = None
        """Deliveries of this run that arrived after this one are stale."""
        self.busy = False
        """A delivery of the key is with a handler, or queued for a slot."""
        self.waiting: deque[tuple[Handler, Incoming]] = deque()

    def live(self, run: int, n: int) -> bool:
        return run == self.run and (self.drop_after is None or n <= self.drop_after)


class _Subscription:
    __slots__ = ("pattern", "handler", "start", "start_time", "ack_deadline_ms", "max_deliveries")

    def __init__(
        self, pattern: str, handler: Handler, start: int, start_time: int, ack_deadline_ms: int, max_deliveries: int
    ) -> None:
        self.pattern = pattern
        self.handler = handler
        self.start = start
        self.start_time = start_time
        self.ack_deadline_ms = ack_deadline_ms
        self.max_deliveries = max_deliveries



class _Handling(_Sending):
    """Subscriptions and the handlers that take their deliveries."""

    # -- subscribing --

    async def on(
        self,
        pattern: str,
        handler: Handler,
        *,
        start: Start = "end",
        ack_deadline: Seconds | None = None,
        max_deliveries: int | None = None,
    ) -> None:
        """Handles every command or event whose name matches ``pattern``
        (``*``: one segment, ``>``: the rest). The subscription belongs to
        the service: messages wait for it while no instance runs.

        The handler gets an :class:`Incoming`. Returning acks the delivery;
        raising nacks it for a redelivery after ``nack_delay`` (raise
        :class:`Nack` to choose the delay) — unless it settled it itself.
        ``start`` says where a subscription new to the service begins:
        ``"end"`` (new messages), ``"beginning"`` (every retained event) or
        a :class:`~datetime.datetime` (retained events from then on).
        """
        validate_pattern(pattern)
        if isinstance(start, datetime):
            start_code, start_time = 2, max(int(start.timestamp() * 1e9), 0)
        elif start == "end":
            start_code, start_time = 0, 0
        elif start == "beginning":
            start_code, start_time = 1, 0
        else:
            raise ValueError(f"start must be 'end', 'beginning' or a datetime, not {start!r}")
        o = self._options
        deadline = o.ack_deadline if ack_deadline is None else _seconds(ack_deadline)
        sub = _Subscription(
            pattern,
            handler,
            start_code,
            start_time,
            0 if deadline is None else min(max(int(deadline * 1000), 1), 0xFFFF_FFFF),
            (o.max_deliveries if max_deliveries is None else max_deliveries) or 0,
        )
        if self._closed:
            raise ClientClosed("the client is closed")
        self._subscriptions.pop(pattern, None)
        self._subscriptions[pattern] = sub
        self._routes.clear()
        if not self._connected:
            return  # subscribed on the next connect
        error = await self._await_op(self._push_subscribe(sub))
        if error is not None:
            if self._subscriptions.get(pattern) is sub and isinstance(error, Refused):
                del self._subscriptions[pattern]
                self._routes.clear()
            raise error

    async def unsubscribe(self, pattern: str) -> None:
        """Removes the service's subscription to ``pattern`` (for every
        instance); messages waiting for it are discarded."""
        self._subscriptions.pop(pattern, None)
        self._routes.clear()
        if not self._connected:
            raise ConnectionLost("not connected to the broker")
        self._next_op += 1
        future: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._ops[self._next_op] = future
        self._writer.push(p.Unsubscribe(self._next_op, pattern))
        self._schedule_flush()
        error = await self._await_op(future)
        if error is not None:
            raise error

    def _push_subscribe(self, sub: _Subscription) -> asyncio.Future[BaseException | None]:
        self._next_op += 1
        future: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._ops[self._next_op] = future
        self._writer.push(
            p.Subscribe(
                self._next_op, sub.pattern, sub.ack_deadline_ms, sub.max_deliveries, sub.start, sub.start_time
            )
        )
        self._schedule_flush()
        return future

    async def _await_op(self, future: asyncio.Future[BaseException | None]) -> BaseException | None:
        await _wait(future, self._options.send_timeout)
        if not future.done():
            return CourierTimeout(f"the broker did not answer within {self._options.send_timeout:g}s")
        return future.result()

    # -- what arrives --

    def _on_deliver(self, deliveries: list[tuple[int, int, Message]], generation: int, version: int) -> None:
        routes = self._routes
        client = cast("Client", self)  # once a frame: cast is a call
        # Version 4: a key's deliveries come pipelined (PROTOCOL.md §8.4).
        pipelined = version >= p.PIPELINED_KEYS_VERSION
        for delivery, attempt, message in deliveries:
            if message.kind == _REPLY:
                self._route_reply(message)
                continue
            key = message.key if pipelined and not message.transient else None
            key_start = False
            if attempt >= _KEY_START and pipelined:
                key_start = True
                attempt &= ~_KEY_START
            name = message.name
            sub = routes.get(name, _MISSING)
            if sub is _MISSING:
                sub = None
                for candidate in self._subscriptions.values():
                    if pattern_matches(candidate.pattern, name):
                        sub = candidate
                        break
                if len(routes) > 4096:
                    routes.clear()
                routes[name] = sub
            if sub is None:
                # Subscribed by another instance of this service, not handled
                # here: let the broker try elsewhere soon.
                self._settle(generation, delivery, message, self._options.nack_delay)
                if key is not None:
                    self._key_refused(key, key_start)
                continue
            incoming = Incoming(client, generation, delivery, attempt, message)
            if key is not None:
                self._deliver_keyed(sub.handler, incoming, key, key_start)
            elif self._running < self._options.max_concurrency:
                self._start(sub.handler, incoming)
            elif message.transient and len(self._backlog) >= TRANSIENT_BACKLOG_MAX:
                log.warning("too many transient deliveries wait for a handler; %s dropped", name)
            else:
                self._backlog.append((sub.handler, incoming))

    def _deliver_keyed(self, handler: Handler, incoming: Incoming, key: bytes, key_start: bool) -> None:
        """A keyed delivery on a pipelined connection goes to its handler
        once the one before it of its key is settled, or is dropped if the
        broker took it back (see :class:`_KeyLine`)."""
        line = self._key_lines.get(key)
        if line is None:
            line = self._key_lines[key] = _KeyLine()
        if key_start:
            # Whatever of an earlier run still waits was taken back.
            line.run += 1
            line.drop_after = None
            line.waiting.clear()
        if line.drop_after is not None:
            return  # stale: taken back after a nack; no ack or nack for it
        line.arrivals += 1
        incoming._ticket = (key, line.run, line.arrivals)
        if line.busy:
            line.waiting.append((handler, incoming))
            return
        line.busy = True
        self._schedule(handler, incoming)

    def _key_refused(self, key: bytes, key_start: bool) -> None:
        """A keyed delivery no handler here takes was nacked: the broker
        takes it back with every later delivery of its key."""
        line = self._key_lines.get(key)
        if line is None:
            line = self._key_lines[key] = _KeyLine()
        if key_start:
            line.run += 1
            line.waiting.clear()
        line.drop_after = line.arrivals

    def _key_live(self, incoming: Incoming) -> bool:
        """Whether a keyed delivery still goes to its handler: the broker
        may have taken it back since it arrived."""
        ticket = incoming._ticket
        if ticket is None:
            return True
        if incoming._generation != self._generation:
            return False
        line = self._key_lines.get(ticket[0])
        return line is not None and line.live(ticket[1], ticket[2])

    def _key_next(self, incoming: Incoming) -> None:
        """A keyed delivery is done with (handled, or dropped unhandled):
        its key's next live one goes to a handler."""
        ticket = incoming._ticket
        if ticket is None or incoming._generation != self._generation:
            return
        key, run, n = ticket
        line = self._key_lines.get(key)
        if line is None:
            return
        if incoming._nacked and run == line.run:
            # The broker takes back every later delivery of the key.
            line.drop_after = n if line.drop_after is None else min(line.drop_after, n)
        waiting = line.waiting
        while waiting:
            handler, following = waiting.popleft()
            if following._ticket is not None and line.live(following._ticket[1], following._ticket[2]):
                self._schedule(handler, following)
                return
        line.busy = False
        if line.drop_after is None:
            del self._key_lines[key]

    def _schedule(self, handler: Handler, incoming: Incoming) -> None:
        """Starts a handler now if a slot is free, else queues it."""
        if self._running < self._options.max_concurrency:
            self._start(handler, incoming)
        else:
            self._backlog.append((handler, incoming))

    def _start(self, handler: Handler, incoming: Incoming) -> None:
        if incoming._ticket is not None and not self._key_live(incoming):
            # Taken back while it waited for a slot: not handled, not settled.
            self._key_next(incoming)
            return
        self._running += 1
        token = _HANDLING.set(incoming.message)
        error: BaseException | None = None
        try:
            result = handler(incoming)
            if result is not None and inspect.isawaitable(result):
                # The task copies the context as it is now: with the activity.
                task = self._loop.create_task(self._run_handler(result, incoming))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
        except Exception as e:  # a plain function that raised
            error = e
        finally:
            _HANDLING.reset(token)
        self._finish(incoming, error)

    async def _run_handler(self, awaitable: Awaitable[Any], incoming: Incoming) -> None:
        error: BaseException | None = None
        try:
            await awaitable
        except BaseException as e:
            error = e
        self._finish(incoming, error)
        if error is not None and not isinstance(error, Exception):
            raise error  # cancellation and interpreter exits go on

    def _finish(self, incoming: Incoming, error: BaseException | None) -> None:
        if not incoming._settled:
            if error is None:
                incoming._settle(None)
            elif isinstance(error, Nack):
                delay = self._options.nack_delay if error.delay is None else error.delay
                incoming._settle(delay)
            else:
                if isinstance(error, Exception):
                    log.warning(
                        "handler for %s failed; nacking for a retry", incoming.name, exc_info=error
                    )
                incoming._settle(self._options.nack_delay)
        self._running -= 1
        if incoming._ticket is not None:
            self._key_next(incoming)
        self._pump()

    def _pump(self) -> None:
        """Starts waiting deliveries while handler slots are free. A loop,
        not a recursion: plain-function handlers finish inside ``_start``."""
        if self._pumping:
            return
        self._pumping = True
        try:
            backlog = self._backlog
            limit = self._options.max_concurrency
            while backlog and self._running < limit:
                handler, waiting = backlog.popleft()
                self._start(handler, waiting)
        finally:
            self._pumping = False
        idle = self._idle  # only close() waits for it
        if idle is not None and self._running == 0 and not self._backlog and not idle.done():
            idle.set_result(None)


_DELIVERY_HEAD = struct.Struct(">QI")
_KEY_START = p.ATTEMPT_KEY_START
_REPLY = Kind.REPLY


def _decode_deliveries(body: bytes, version: int) -> list[tuple[int, int, Message]]:
    """A DELIVER body as ``(delivery, attempt, message)`` entries, the whole
    frame checked before any entry is handled."""
    r = p._Reader(body, 1, None, version)
    count = r.count(8 + 4 + p.MESSAGE_BYTES_MIN)
    entries = []
    unpack = _DELIVERY_HEAD.unpack_from
    for _ in range(count):
        if r.end - r.pos < 12:
            raise r.eof(12)
        delivery, attempt = unpack(body, r.pos)
        r.pos += 12
        entries.append((delivery, attempt, r.message()[0]))
    r.finish()
    return entries
