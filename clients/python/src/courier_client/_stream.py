"""The replies to one command, as an async iterator."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from typing import TYPE_CHECKING

from ._common import REPLY_BUFFER_MAX, log
from ._messages import PendingAck, Reply
from .errors import CourierTimeout

if TYPE_CHECKING:
    from ._sending import _Sending


class ReplyStream:
    """The replies to one command, as an async iterator (``async for``);
    ends after the final reply, raises :class:`CourierTimeout` when the
    request's timeout passes first and :class:`Refused` if the broker
    refused the command. Also an async context manager that forgets the
    request on exit."""

    __slots__ = (
        "_client",
        "_command",
        "_name",
        "_replies",
        "_waiter",
        "_error",
        "_deadline",
        "_timeout",
        "_acceptance",
        "_quiet_seq",
        "_done",
        "__weakref__",
    )

    def __init__(self, client: _Sending, name: str, command: bytes, timeout: float) -> None:
        self._client = client
        self._name = name
        self._command = command
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._timeout = timeout
        self._deadline = client._loop.time() + timeout
        self._acceptance: PendingAck | None = None
        self._quiet_seq: int | None = None
        self._done = False

    @property
    def command_id(self) -> uuid.UUID:
        """The id of the command these replies answer."""
        return uuid.UUID(bytes=self._command)

    def _wake(self, _: object = None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _push(self, reply: Reply) -> None:
        if len(self._replies) >= REPLY_BUFFER_MAX:
            log.warning("reply buffer of the request %s is full; reply %s dropped", self._name, reply.name)
            return
        self._replies.append(reply)
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> Reply:
        while True:
            if self._done:
                raise StopAsyncIteration
            acceptance = self._acceptance
            if acceptance is not None and acceptance.done():
                error = acceptance._error()
                self._acceptance = acceptance = None
                if error is not None:
                    self.close()
                    raise error
            if self._replies:
                reply = self._replies.popleft()
                if reply.final:
                    self.close()
                return reply
            if self._error is not None:
                self.close()
                raise self._error
            loop = self._client._loop
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                self.close()
                raise CourierTimeout(f"no final reply to {self._name} within {self._timeout:g}s")
            waiter = loop.create_future()
            self._waiter = waiter
            timer = loop.call_later(remaining, self._wake)
            accepted = None if acceptance is None else acceptance._wakeup()
            if accepted is not None:
                accepted.add_done_callback(self._wake)
            try:
                await waiter
            finally:
                self._waiter = None
                timer.cancel()
                if accepted is not None:
                    accepted.remove_done_callback(self._wake)

    def close(self) -> None:
        """Stops listening: later replies to this command are dropped."""
        if not self._done:
            self._done = True
            self._client._forget_request(self)

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            try:
                self.close()
            except Exception:  # interpreter shutdown: nothing left to forget
                pass
