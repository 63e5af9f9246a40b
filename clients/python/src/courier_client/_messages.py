"""Messages in and out: deliveries and replies as handlers and requesters
see them, messages ready to go, and the broker's answer to a send."""

from __future__ import annotations

import asyncio
import json as jsonlib
import uuid
from typing import TYPE_CHECKING, Any, Generator

from . import protocol as p
from ._common import Headers, Payload, Seconds, _seconds, _uuid, _wait
from .errors import AlreadySettled, ConnectionLost, CourierTimeout
from .protocol import Kind, Message

if TYPE_CHECKING:
    from ._core import _ClientCore
    from ._sending import _Sending
    from ._stream import ReplyStream
    from .client import Client


class _Received:
    """Accessors shared by deliveries and replies."""

    __slots__ = ("message",)

    message: Message

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def payload(self) -> bytes:
        """The raw payload bytes, whatever their encoding."""
        return self.message.payload

    def json(self) -> Any:
        """The payload decoded from JSON."""
        return jsonlib.loads(self.message.payload)

    def text(self) -> str:
        """The payload decoded from UTF-8."""
        return self.message.payload.decode()

    @property
    def id(self) -> uuid.UUID:
        return self.message.id

    @property
    def activity_id(self) -> uuid.UUID:
        return self.message.activity_id

    @property
    def parent_id(self) -> uuid.UUID | None:
        """The message whose handling caused this one, when the sender said."""
        return self.message.parent_id

    @property
    def sender(self) -> str:
        """The service that sent it (set by the broker)."""
        return self.message.sender

    @property
    def timestamp(self) -> int:
        """Unix nanoseconds at which the broker accepted it."""
        return self.message.timestamp

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self.message.headers

    def header(self, name: str) -> str | None:
        return self.message.header(name)


class Reply(_Received):
    """One reply to a command: its name is the outcome (``todo.created``)."""

    __slots__ = ()

    def __init__(self, message: Message) -> None:
        self.message = message

    @property
    def final(self) -> bool:
        """No more replies follow."""
        return self.message.final

    @property
    def response_to(self) -> uuid.UUID | None:
        return self.message.response_to

    def __repr__(self) -> str:
        return f"Reply(name={self.name!r}, final={self.final}, payload={self.payload[:64]!r})"


class Incoming(_Received):
    """A delivered command or event, and the means to answer it.

    Everything sent while its handler runs carries its ``activity_id``, its
    id as ``parent_id`` and a child of its trace (``traceparent``).
    """

    __slots__ = ("client", "delivery", "attempt", "_generation", "_settled", "_nacked", "_ticket")

    def __init__(self, client: Client, generation: int, delivery: int, attempt: int, message: Message) -> None:
        self.client = client
        self.delivery = delivery
        self.attempt = attempt
        """1 on the first delivery; more when redelivered."""
        self.message = message
        self._generation = generation
        self._settled = False
        self._nacked = False
        # Keyed on a pipelined connection: (key, run, arrival), see _KeyLine.
        self._ticket: tuple[bytes, int, int] | None = None

    @property
    def kind(self) -> Kind:
        return self.message.kind

    @property
    def settled(self) -> bool:
        """Acked or nacked already."""
        return self._settled

    async def reply(
        self,
        outcome: str,
        payload: Payload = b"",
        *,
        final: bool = True,
        headers: Headers = None,
        version: tuple[int, int] | str = (1, 0),
    ) -> uuid.UUID:
        """Replies to this command with an outcome (``todo.created``); with
        ``final=False`` more replies follow (a stream). Waits until the
        broker accepted the reply."""
        return await self.client._outgoing(
            Kind.REPLY,
            outcome,
            payload,
            None,
            None,
            None,
            None,
            False,
            headers,
            version,
            None,
            None,
            self.message.id_bytes,
            final,
            None,
            self.message,
        ).send()

    def ack(self) -> None:
        """Marks the delivery handled (done for you when the handler returns)."""
        self._settle(None)

    def nack(self, delay: Seconds | None = None) -> None:
        """Asks for redelivery no sooner than ``delay`` (default: the
        client's ``nack_delay``); done for you when the handler raises."""
        self._settle(self.client._options.nack_delay if delay is None else _seconds(delay))

    def _settle(self, nack_delay: float | None) -> None:
        if self._settled:
            raise AlreadySettled(f"delivery {self.delivery} of {self.name} was already acked or nacked")
        self._settled = True
        self._nacked = nack_delay is not None
        self.client._settle(self._generation, self.delivery, self.message, nack_delay)

    def __repr__(self) -> str:
        return f"Incoming(name={self.name!r}, attempt={self.attempt}, sender={self.sender!r})"


# --- what goes out --------------------------------------------------------------


class PendingAck:
    """The broker's answer to one enqueued message; ``await`` it (within the
    client's ``send_timeout``) for the message's id, or :class:`Refused`.

    No future per send: the outcome is kept here, and a future is made only
    for a wait that starts before the answer came (a pipelined publisher
    awaits mostly answered sends)."""

    __slots__ = ("_client", "_seq", "_id", "body", "_outcome", "_future")

    def __init__(self, client: _ClientCore, seq: int, id_bytes: bytes, body: bytes) -> None:
        self._client = client
        self._seq = seq
        self._id = id_bytes
        self.body = body
        self._outcome: BaseException | None | object = _PENDING
        self._future: asyncio.Future[None] | None = None

    @property
    def id(self) -> uuid.UUID:
        return _uuid(self._id)

    def done(self) -> bool:
        """The broker answered (or the client gave up)."""
        return self._outcome is not _PENDING

    def _resolve(self, outcome: BaseException | None) -> None:
        if self._outcome is _PENDING:
            self._outcome = outcome
            future = self._future
            if future is not None and not future.done():
                future.set_result(None)

    def _wakeup(self) -> asyncio.Future[None]:
        """A future done once the answer is in."""
        future = self._future
        if future is None:
            future = self._future = self._client._loop.create_future()
            if self._outcome is not _PENDING:
                future.set_result(None)
        return future

    def _error(self) -> BaseException | None:
        outcome = self._outcome
        return outcome if isinstance(outcome, BaseException) else None

    def __await__(self) -> Generator[Any, None, uuid.UUID]:
        if self._outcome is _PENDING:
            timeout = self._client._options.send_timeout
            yield from _wait(self._wakeup(), timeout).__await__()
            if self._outcome is _PENDING:
                self._client._pending.pop(self._seq, None)
                raise CourierTimeout(f"the broker did not answer a send within {timeout:g}s")
        outcome = self._outcome
        if outcome is not None:
            assert isinstance(outcome, BaseException)
            raise outcome
        return _uuid(self._id)


_PENDING: Any = object()




class Outgoing:
    """A message ready to go: finish it with :meth:`send`, :meth:`enqueue`,
    :meth:`send_quiet`, :meth:`request` or :meth:`request_stream`.
    Made by :meth:`Client.command` and :meth:`Client.event`."""

    __slots__ = ("_client", "_kind", "_name", "_id", "_body", "_transient", "_timeout")

    def __init__(
        self, client: _Sending, kind: Kind, name: str, id_bytes: bytes, body: bytes, transient: bool, timeout: float | None
    ) -> None:
        self._client = client
        self._kind = kind
        self._name = name
        self._id = id_bytes
        self._body = body
        self._transient = transient
        self._timeout = timeout

    @property
    def id(self) -> uuid.UUID:
        """The message's id (its dedup key)."""
        return uuid.UUID(bytes=self._id)

    @property
    def message(self) -> Message:
        """The message as it will travel."""
        return p.decode_message(self._body)

    def enqueue(self) -> PendingAck:
        """Queues the message now — messages queued one after another reach
        the broker in that order — and returns the broker's answer to await
        later: many sends in flight, one round trip for all."""
        return self._client._enqueue(self._id, self._body)

    async def send(self) -> uuid.UUID:
        """Sends and waits until the broker accepted it (durable messages:
        persisted); raises :class:`Refused` with the broker's code."""
        return await self._client._enqueue(self._id, self._body)

    async def send_quiet(self) -> uuid.UUID:
        """Sends without asking for the broker's acceptance: only a refusal
        is answered, counted in :attr:`Client.unheard_refusals`, and
        :meth:`Client.flush` waits until the broker answered everything sent
        before it. Meant for high-rate transient traffic: nothing is re-sent
        after a reconnect, and while disconnected it raises at once."""
        client = self._client
        if not client._try_quiet(self._body):
            await client._send_quiet_when_room(self._body)
        return _uuid(self._id)

    async def request(self) -> Reply:
        """Sends this command and waits for its first reply."""
        stream = self.request_stream()
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            raise ConnectionLost("the reply stream ended without a reply") from None
        finally:
            stream.close()

    def request_stream(self) -> ReplyStream:
        """Sends this command now and returns its replies as an async
        iterator, which ends after the final reply and raises
        :class:`CourierTimeout` if the timeout passes first."""
        if self._kind != Kind.COMMAND:
            raise ValueError(f"only commands get replies; {self._name} is a {self._kind.name.lower()}")
        timeout = self._timeout if self._timeout is not None else self._client._options.request_timeout
        return self._client._open_request(self._name, self._id, self._body, self._transient, timeout)
