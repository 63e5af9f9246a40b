"""The Courier client: one connection to the broker on behalf of one
service instance, kept up across broker restarts."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json as jsonlib
import logging
import os
import random
import ssl as sslmod
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import (
    Any,
    Awaitable,
    Callable,
    Generator,
    Literal,
    Mapping,
    Sequence,
    Union,
)

from . import protocol as p
from ._ids import new_id_bytes
from .errors import (
    AlreadySettled,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    CourierTimeout,
    Nack,
    Refused,
)
from .names import pattern_matches, validate_name, validate_pattern
from .protocol import ErrorCode, Flag, FrameType, Kind, Message

__all__ = [
    "Client",
    "Handler",
    "Incoming",
    "PendingAck",
    "Reply",
    "ReplyStream",
    "Outgoing",
    "connect",
    "connect_from_env",
    "current_activity",
    "tls_context",
]

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

_ACTIVITY: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "courier_activity", default=None
)

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
    raw = _ACTIVITY.get()
    return None if raw is None else uuid.UUID(bytes=raw)


def _seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _now_ns() -> int:
    return time.time_ns()


def tls_context(
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> sslmod.SSLContext:
    """A TLS 1.3 context that trusts only the CA in ``ca`` (PEM), offers ALPN
    ``courier/1`` and, with ``cert`` and ``key``, presents that client
    certificate (for brokers started with ``--tls-client-ca``)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    ctx = sslmod.SSLContext(sslmod.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = sslmod.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (OSError, sslmod.SSLError) as e:
        raise ValueError(f"cannot use the TLS CA file {os.fspath(ca)}: {e}") from e
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
        except (OSError, sslmod.SSLError) as e:
            raise ValueError(
                f"cannot use the client certificate {os.fspath(cert)} with key {os.fspath(key)}: {e}"
            ) from e
    ctx.set_alpn_protocols([ALPN])
    return ctx


@dataclass(frozen=True)
class _Options:
    url: str
    host: str
    port: int
    service: str
    instance: str
    token: str | None
    ssl: sslmod.SSLContext | None
    server_hostname: str | None
    max_in_flight: int
    max_concurrency: int
    send_timeout: float
    request_timeout: float
    ack_deadline: float | None
    max_deliveries: int | None
    nack_delay: float
    reconnect_delay_min: float
    reconnect_delay_max: float
    drain_timeout: float
    handshake_timeout: float
    ping_interval: float
    idle_timeout: float


def _split_url(url: str) -> tuple[str, int]:
    text = url.split("://", 1)[-1].rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "7700"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "7700"
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"broker address {url!r} is not host:port (e.g. 127.0.0.1:7700)") from None


class _Connect:
    """What :func:`connect` returns: await it for a :class:`Client`, or use
    it as ``async with`` to close the client at the end of the block."""

    def __init__(self, options: _Options) -> None:
        self._options = options
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def _open(self) -> Client:
        client = Client(self._options)
        await client._connect_first()
        return client

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


def connect(
    url: str = "127.0.0.1:7700",
    service: str = "",
    *,
    instance: str = "",
    token: str | None = None,
    ssl: sslmod.SSLContext | None = None,
    server_hostname: str | None = None,
    max_in_flight: int = 64,
    max_concurrency: int | None = None,
    send_timeout: Seconds = 30.0,
    request_timeout: Seconds = 30.0,
    ack_deadline: Seconds | None = None,
    max_deliveries: int | None = None,
    nack_delay: Seconds = 1.0,
    reconnect_delay_min: Seconds = 0.05,
    reconnect_delay_max: Seconds = 5.0,
    drain_timeout: Seconds = 30.0,
    handshake_timeout: Seconds = 10.0,
    ping_interval: Seconds = 10.0,
    idle_timeout: Seconds = 30.0,
) -> _Connect:
    """Connects to the broker at ``url`` (``host:port``) as ``service``.

    ``await connect(...)`` returns a connected :class:`Client` (or raises
    :class:`ConnectError` / :class:`Refused` at once); ``async with
    connect(...) as client:`` also closes it gracefully at the end. After
    the first connection the client reconnects by itself.

    - ``service``: the service this instance belongs to; empty lets the
      token (or the TLS client certificate) decide, on brokers with a
      manifest. ``instance``: this instance's name (empty: the broker's).
    - ``token``: credentials for brokers with a manifest.
    - ``ssl``: TLS to the broker (see :func:`tls_context`);
      ``server_hostname`` overrides the name the certificate must carry.
    - ``max_in_flight``: deliveries the broker may have outstanding on this
      connection (flow control); ``max_concurrency``: handlers running at
      once (default: ``max_in_flight``; 1 handles in delivery order).
    - ``ack_deadline``, ``max_deliveries``: asked for this service's
      subscriptions (``None`` keeps the broker's).
    - ``nack_delay``: redelivery delay after a handler raised.
    - ``ping_interval``, ``idle_timeout``: keep-alive; a connection on which
      nothing arrived for ``idle_timeout`` is given up and reconnected.
    """
    host, port = _split_url(url)
    if max_in_flight < 0 or max_in_flight > 0xFFFF_FFFF:
        raise ValueError(f"max_in_flight must be 0..{0xFFFF_FFFF}, not {max_in_flight}")
    concurrency = max_concurrency if max_concurrency is not None else max(max_in_flight, 1)
    if concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, not {concurrency}")
    if service:
        validate_name(service)
    return _Connect(
        _Options(
            url=url,
            host=host,
            port=port,
            service=service,
            instance=instance,
            token=token,
            ssl=ssl,
            server_hostname=server_hostname,
            max_in_flight=max_in_flight,
            max_concurrency=concurrency,
            send_timeout=_seconds(send_timeout),
            request_timeout=_seconds(request_timeout),
            ack_deadline=None if ack_deadline is None else _seconds(ack_deadline),
            max_deliveries=max_deliveries,
            nack_delay=_seconds(nack_delay),
            reconnect_delay_min=_seconds(reconnect_delay_min),
            reconnect_delay_max=_seconds(reconnect_delay_max),
            drain_timeout=_seconds(drain_timeout),
            handshake_timeout=_seconds(handshake_timeout),
            ping_interval=_seconds(ping_interval),
            idle_timeout=_seconds(idle_timeout),
        )
    )


def connect_from_env(**overrides: Any) -> _Connect:
    """:func:`connect` with ``COURIER_URL`` (default ``127.0.0.1:7700``),
    ``COURIER_SERVICE`` (default: the token's service, else ``cli``),
    ``COURIER_TOKEN``, and TLS trusting ``COURIER_TLS_CA`` when set, with
    the client certificate of ``COURIER_TLS_CERT``/``COURIER_TLS_KEY``.
    Keyword arguments override the environment."""
    env = os.environ
    kwargs: dict[str, Any] = {"url": env.get("COURIER_URL", "127.0.0.1:7700")}
    if env.get("COURIER_TOKEN"):
        kwargs["token"] = env["COURIER_TOKEN"]
    ca = env.get("COURIER_TLS_CA")
    if ca:
        kwargs["ssl"] = tls_context(ca, env.get("COURIER_TLS_CERT"), env.get("COURIER_TLS_KEY"))
    kwargs["service"] = env.get("COURIER_SERVICE") or (
        "" if "token" in kwargs or env.get("COURIER_TLS_CERT") else "cli"
    )
    kwargs.update(overrides)
    return connect(**kwargs)


# --- what arrives ----------------------------------------------------------------


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

    Everything sent while its handler runs carries its ``activity_id``.
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
            self.message.activity_id_bytes,
            self.message.id_bytes,
            final,
            None,
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

    def __init__(self, client: Client, seq: int, id_bytes: bytes, body: bytes) -> None:
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


class Outgoing:
    """A message ready to go: finish it with :meth:`send`, :meth:`enqueue`,
    :meth:`send_quiet`, :meth:`request` or :meth:`request_stream`.
    Made by :meth:`Client.command` and :meth:`Client.event`."""

    __slots__ = ("_client", "_kind", "_name", "_id", "_body", "_transient", "_timeout")

    def __init__(
        self, client: Client, kind: Kind, name: str, id_bytes: bytes, body: bytes, transient: bool, timeout: float | None
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

    def __init__(self, client: Client, name: str, command: bytes, timeout: float) -> None:
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


# --- the connection ----------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: frames in, bytes out. Until
    :meth:`attach` it only waits for WELCOME; frames behind it stay
    buffered so that nothing is handled before the client took over."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.loop = client._loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        # The handshake's outcome, a refusal as a value: set when nobody
        # waits any more (a timed-out handshake), an exception would be
        # reported as never retrieved.
        self.welcome: asyncio.Future[p.Welcome | BaseException] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.attached = False
        self.generation = 0
        self.last_received = self.loop.time()
        self.paused = False
        self.error: tuple[int, str] | None = None
        # The protocol version WELCOME settled on.
        self.version = p.PROTOCOL_VERSION

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Pause writers well before the broker's slow-consumer limit.
        transport.set_write_buffer_limits(high=1024 * 1024, low=256 * 1024)

    def data_received(self, data: bytes) -> None:
        self.last_received = self.loop.time()
        buf = self.buf
        buf += data
        if not self.attached:
            self._handshake()
            return
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        size = len(buf)
        pos = 0
        client = self.client
        generation = self.generation
        try:
            while size - pos >= 4:
                (length,) = _U32.unpack_from(buf, pos)
                p.check_length(length, INBOUND_FRAME_BYTES_MAX)
                end = pos + 4 + length
                if end > size:
                    break
                body = bytes(buf[pos + 4 : end])
                pos = end
                if not client._handle(body, generation, self):
                    break
        except p.DecodeError as e:
            log.warning("bad frame from the broker (%s); reconnecting", e)
            self._abort()
            return
        except Exception:
            log.exception("failed to handle a frame from the broker; reconnecting")
            self._abort()
            return
        del buf[:pos]

    def _abort(self) -> None:
        del self.buf[:]
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self) -> None:
        buf = self.buf
        try:
            got = p.decode_frame(buf, INBOUND_FRAME_BYTES_MAX)
        except p.DecodeError as e:
            hint = ""
            if bytes(buf[:1]) in (b"\x15", b"\x16") and bytes(buf[1:2]) == b"\x03":
                hint = "; it looks like TLS: connect with ssl=tls_context(ca)"
            self._fail_handshake(ConnectError(f"broker sent a bad frame: {e}{hint}"))
            return
        if got is None:
            return
        frame, used = got
        del buf[:used]
        if isinstance(frame, p.Welcome):
            self.version = frame.version
            if not self.welcome.done():
                self.welcome.set_result(frame)
        elif isinstance(frame, p.ErrorFrame):
            self._fail_handshake(Refused(frame.code, frame.message))
        else:
            self._fail_handshake(ConnectError(f"expected WELCOME from the broker, got {type(frame).__name__}"))

    def _fail_handshake(self, error: BaseException) -> None:
        if not self.welcome.done():
            self.welcome.set_result(error)
        if self.transport is not None:
            self.transport.abort()

    def attach(self, generation: int) -> None:
        """The client took over: handle what came behind WELCOME."""
        self.attached = True
        self.generation = generation
        if self.buf:
            self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            if exc is not None and self.client._options.ssl is not None:
                why = f"TLS session with {self.client._options.url} failed: {exc}; is this client certificate signed by the broker's --tls-client-ca?"
            elif self.client._options.ssl is not None:
                why = "broker closed the connection during the handshake (did it refuse this client certificate?)"
            else:
                why = f"broker closed the connection during the handshake{f': {exc}' if exc else ''}"
            self.welcome.set_result(ConnectError(why))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.attached:
            self.client._on_connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.client._on_writable(self)


# --- the client ----------------------------------------------------------------


class Client:
    """A connection to the broker on behalf of one service instance.

    Made by :func:`connect`. It sends commands (:meth:`send`), publishes
    events (:meth:`publish`), asks and awaits replies (:meth:`request`,
    :meth:`request_stream`) and handles what its service receives
    (:meth:`on`). It reconnects by itself after a broker restart,
    subscribes again and re-sends what was not yet acknowledged (with the
    same ids: the broker drops duplicates).
    """

    def __init__(self, options: _Options) -> None:
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._writer = p.FrameWriter()
        self._frame_bytes_max = p.FRAME_BYTES_MAX_DEFAULT
        self._version = p.PROTOCOL_VERSION
        self._key_lines: dict[bytes, _KeyLine] = {}
        self._conn: _Connection | None = None
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

    # -- identity and state --

    @property
    def service(self) -> str:
        """The service this client acts for: the one the broker
        authenticated when it says so in WELCOME, else the one asked for."""
        return self._service

    @property
    def broker(self) -> str:
        """The broker's name and version, from WELCOME."""
        return self._broker

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connecting --

    async def _connect_first(self) -> None:
        conn = await self._establish()
        self._on_connected(conn)
        self._driver = self._loop.create_task(self._drive())

    async def _establish(self) -> _Connection:
        o = self._options
        conn = _Connection(self)
        try:
            if o.ssl is not None:
                await asyncio.wait_for(
                    self._loop.create_connection(
                        lambda: conn,
                        o.host,
                        o.port,
                        ssl=o.ssl,
                        server_hostname=o.server_hostname or o.host,
                        ssl_handshake_timeout=o.handshake_timeout,
                    ),
                    o.handshake_timeout,
                )
            else:
                await asyncio.wait_for(self._loop.create_connection(lambda: conn, o.host, o.port), o.handshake_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"cannot reach broker at {o.url}: no connection within {o.handshake_timeout:g}s") from None
        except sslmod.SSLError as e:
            hint = ""
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                hint = "; the broker's certificate is not signed by the trusted CA or does not name this host"
            elif "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "PACKET_LENGTH_TOO_LONG" in text:
                hint = "; is the broker listening with TLS (courier serve --tls-cert --tls-key)?"
            raise ConnectError(f"TLS session with {o.url} failed: {e}{hint}") from e
        except OSError as e:
            raise ConnectError(f"cannot reach broker at {o.url}: {e} — is 'courier serve' running?") from e
        transport = conn.transport
        assert transport is not None
        try:
            hello = p.Hello(o.service, o.instance, self._max_in_flight, o.token)
            transport.write(p.encode_frame(hello))
            try:
                welcome = await asyncio.wait_for(asyncio.shield(conn.welcome), o.handshake_timeout)
            except asyncio.TimeoutError:
                raise ConnectError(f"no WELCOME from the broker within {o.handshake_timeout:g}s") from None
            if isinstance(welcome, BaseException):
                raise welcome
        except BaseException as e:
            transport.abort()
            if isinstance(e, Refused) and e.code == ErrorCode.INVALID_NAME and not o.service:
                raise Refused(
                    e.code, f"{e.reason}; name the service (service=...) or pass a token that decides it"
                ) from None
            raise
        self._frame_bytes_max = welcome.frame_bytes_max or p.FRAME_BYTES_MAX_DEFAULT
        if welcome.service:
            self._service = welcome.service
        self._broker = welcome.broker
        return conn

    def _on_connected(self, conn: _Connection) -> None:
        """A new connection is up: subscribe again and re-send what was not
        yet acknowledged (same ids, so the broker's dedup makes it safe)."""
        self._generation += 1
        self._conn = conn
        self._connected = True
        self._version = conn.version
        # The broker took back every delivery of the last connection.
        self._key_lines.clear()
        self._writer = p.FrameWriter(self._frame_bytes_max, self._version)
        for sub in self._subscriptions.values():
            # Nobody awaits a re-subscription; a refusal is logged when it arrives.
            self._push_subscribe(sub)
        writer = self._writer
        for seq, ack in self._pending.items():
            writer.push_send(seq, ack.body)
        if self._closing and self._drained is not None:
            writer.push(p.Drain())
        conn.attach(self._generation)
        self._schedule_flush()
        self._keepalive = self._loop.call_later(self._options.ping_interval, self._keep_alive, conn)
        if conn.closed.done():
            # Lost between WELCOME and now, before it was ours to report.
            self._on_connection_lost(conn, None)

    async def _drive(self) -> None:
        """Reconnects with exponential backoff and jitter until closed."""
        o = self._options
        while not self._closed:
            conn = self._conn
            assert conn is not None
            await asyncio.wait([conn.closed, self._stop], return_when=asyncio.FIRST_COMPLETED)
            delay = o.reconnect_delay_min
            while not self._closed:
                try:
                    conn = await self._establish()
                except Exception as e:  # whatever failed, the next try may work
                    level = logging.WARNING if isinstance(e, Refused) else logging.DEBUG
                    log.log(level, "reconnecting to %s failed: %s; next try in %.2fs", o.url, e, delay)
                    pause = delay * (0.5 + random.random() / 2)
                    await asyncio.wait([self._stop], timeout=pause)
                    delay = min(delay * 2, o.reconnect_delay_max)
                    continue
                if self._closed:
                    if conn.transport is not None:
                        conn.transport.abort()
                    return
                self._on_connected(conn)
                log.info("reconnected to %s as %s", o.url, self._service)
                break

    def _on_connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn or not self._connected:
            return
        self._connected = False
        if self._keepalive is not None:
            self._keepalive.cancel()
        # Unsent bytes die with the connection: pending sends are re-sent on
        # the next one, the broker takes back deliveries that were not acked.
        self._writer = p.FrameWriter(self._frame_bytes_max, self._version)
        lost = ConnectionLost("connection to the broker lost before it answered")
        for future in self._ops.values():
            if not future.done():
                future.set_result(lost)
        self._ops.clear()
        for command in self._quiet_requests.values():
            stream = self._requests.pop(command, None)
            if stream is not None:
                stream._fail(
                    ConnectionLost(
                        "connection lost while the transient request waited for its reply; a transient "
                        "command is sent at most once, so it was not sent again: send it again, or make it "
                        "durable (the default) to have it re-sent across reconnects"
                    )
                )
        self._quiet_requests.clear()
        for _, future in self._flushes:
            if not future.done():
                future.set_result(ConnectionLost("connection lost before the broker answered the flush"))
        self._flushes.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._wake_writable()
        if not self._closed:
            why = f": {exc}" if exc else ""
            if conn.error is not None:
                why = f": broker error {p.error_code_name(conn.error[0])} ({conn.error[0]}): {conn.error[1]}"
            log.warning("connection to the broker lost%s; reconnecting", why)

    def _keep_alive(self, conn: _Connection) -> None:
        if conn is not self._conn or not self._connected:
            return
        o = self._options
        if self._loop.time() - conn.last_received > o.idle_timeout:
            log.warning("nothing received from the broker for %.0fs; reconnecting", o.idle_timeout)
            if conn.transport is not None:
                conn.transport.abort()
            return
        self._writer.push(p.Ping(0))
        self._schedule_flush()
        self._keepalive = self._loop.call_later(o.ping_interval, self._keep_alive, conn)

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

    # -- building messages --

    def _outgoing(
        self,
        kind: Kind,
        name: str,
        payload: Payload,
        key: bytes | str | None,
        ttl: Seconds | None,
        delay: Seconds | None,
        deliver_at: datetime | None,
        transient: bool,
        headers: Headers,
        version: tuple[int, int] | str,
        id: uuid.UUID | None,
        activity_id: uuid.UUID | bytes | None,
        response_to: bytes | None,
        final: bool,
        timeout: Seconds | None,
        /,
    ) -> Outgoing:
        """The message encoded once, as every send of it will carry it
        (arguments by position: this is every send's path)."""
        name8 = _NAME8.get(name)
        if name8 is None:
            validate_name(name)
            name8 = _remember_name(name)
        id_bytes = new_id_bytes() if id is None else id.bytes
        if activity_id is None:
            activity = _ACTIVITY.get() or id_bytes
        elif isinstance(activity_id, uuid.UUID):
            activity = activity_id.bytes
        else:
            activity = activity_id
        flags = Flag.TRANSIENT if transient else 0
        optional = b""
        if final:
            flags |= Flag.FINAL
        if response_to is not None:
            flags |= Flag.RESPONSE_TO
            optional += response_to
        if key is not None:
            raw_key = key.encode() if isinstance(key, str) else bytes(key)
            if len(raw_key) > 0xFFFF:
                raise p.EncodeError(f"key is {len(raw_key)} bytes; at most 65535 fit")
            flags |= Flag.KEY
            optional += _U16.pack(len(raw_key)) + raw_key
        if ttl is not None:
            flags |= Flag.EXPIRES_AT
            optional += _U64.pack(min(_now_ns() + int(_seconds(ttl) * 1e9), _U64_MAX))
        if delay is not None or deliver_at is not None:
            flags |= Flag.DELIVER_AT
            at = int(deliver_at.timestamp() * 1e9) if deliver_at is not None else _now_ns()
            if delay is not None:
                at += int(_seconds(delay) * 1e9)
            optional += _U64.pack(min(max(at, 0), _U64_MAX))
        if isinstance(payload, (bytes, bytearray, memoryview)):
            raw = bytes(payload)
            header_bytes = _NO_HEADERS if not headers else p.encode_headers(_header_list(headers))
        else:
            raw = jsonlib.dumps(payload, separators=(",", ":")).encode()
            if not headers:
                header_bytes = _JSON_HEADERS
            else:
                listed = _header_list(headers)
                if not any(k == "content-type" for k, _ in listed):
                    listed.append(("content-type", "application/json"))
                header_bytes = p.encode_headers(listed)
        if version == (1, 0) or version == "1.0":
            version_bytes = _VERSION_1_0
        else:
            major, minor = _parse_version(version)
            version_bytes = _VERSION.pack(major, minor)
        body = b"".join(
            (
                bytes((kind, flags)),
                name8,
                version_bytes,
                id_bytes,
                activity,
                _NO_TIMESTAMP_NO_SENDER,
                optional,
                header_bytes,
                _U32.pack(len(raw)),
                raw,
            )
        )
        if len(body) + 64 > self._frame_bytes_max:
            raise Refused(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{name} is {len(body)} bytes encoded; the broker takes at most {self._frame_bytes_max}",
            )
        return Outgoing(self, kind, name, id_bytes, body, transient, None if timeout is None else _seconds(timeout))

    def command(
        self,
        name: str,
        payload: Payload = b"",
        *,
        key: bytes | str | None = None,
        ttl: Seconds | None = None,
        delay: Seconds | None = None,
        deliver_at: datetime | None = None,
        transient: bool = False,
        headers: Headers = None,
        version: tuple[int, int] | str = (1, 0),
        id: uuid.UUID | None = None,
        activity_id: uuid.UUID | None = None,
        timeout: Seconds | None = None,
    ) -> Outgoing:
        """A command, ready to :meth:`~Outgoing.send`, :meth:`~Outgoing.enqueue`
        or :meth:`~Outgoing.request`.

        - ``payload``: bytes as they are, anything else as JSON;
        - ``key``: ordering key (same key: in order, one at a time per service);
        - ``ttl``: dropped undelivered after this long; ``delay`` /
          ``deliver_at``: not delivered before then;
        - ``transient``: at most once, memory only;
        - ``headers``, ``version`` (``(1, 2)`` or ``"1.2"``);
        - ``id``: an explicit id (the broker's dedup key: a retry with the
          same id is accepted once); ``activity_id``: another activity than
          the current one; ``timeout``: for ``request``.
        """
        return self._outgoing(
            Kind.COMMAND,
            name,
            payload,
            key,
            ttl,
            delay,
            deliver_at,
            transient,
            headers,
            version,
            id,
            activity_id,
            None,
            False,
            timeout,
        )

    def event(
        self,
        name: str,
        payload: Payload = b"",
        *,
        key: bytes | str | None = None,
        ttl: Seconds | None = None,
        delay: Seconds | None = None,
        deliver_at: datetime | None = None,
        transient: bool = False,
        headers: Headers = None,
        version: tuple[int, int] | str = (1, 0),
        id: uuid.UUID | None = None,
        activity_id: uuid.UUID | None = None,
    ) -> Outgoing:
        """An event, ready to :meth:`~Outgoing.send`, :meth:`~Outgoing.enqueue`
        or :meth:`~Outgoing.send_quiet`; options as for :meth:`command`."""
        return self._outgoing(
            Kind.EVENT,
            name,
            payload,
            key,
            ttl,
            delay,
            deliver_at,
            transient,
            headers,
            version,
            id,
            activity_id,
            None,
            False,
            None,
        )

    async def send(self, name: str, payload: Payload = b"", **options: Any) -> uuid.UUID:
        """Sends a command; returns its id once the broker accepted it (not
        once it was handled). Raises :class:`Refused` (e.g. ``no_receiver``).
        Options as for :meth:`command`."""
        return await self.command(name, payload, **options).send()

    async def publish(self, name: str, payload: Payload = b"", **options: Any) -> uuid.UUID:
        """Publishes an event; returns its id once the broker accepted it.
        Options as for :meth:`command`."""
        return await self.event(name, payload, **options).send()

    async def request(self, name: str, payload: Payload = b"", **options: Any) -> Reply:
        """Sends a command and returns its first reply (within ``timeout``,
        default the client's ``request_timeout``)."""
        return await self.command(name, payload, **options).request()

    def request_stream(self, name: str, payload: Payload = b"", **options: Any) -> ReplyStream:
        """Sends a command now and returns its replies: ``async for reply in
        client.request_stream(...)`` ends after the final reply."""
        return self.command(name, payload, **options).request_stream()

    # -- sending --

    def _enqueue(self, id_bytes: bytes, body: bytes) -> PendingAck:
        if self._closed:
            raise ClientClosed("the client is closed")
        self._next_seq = seq = self._next_seq + 1
        ack = self._pending[seq] = PendingAck(self, seq, id_bytes, body)
        if self._connected:
            writer = self._writer
            writer.push_send(seq, body)
            if len(writer) >= EAGER_WRITE_BYTES:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        return ack

    def _check_quiet(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if not self._connected:
            raise ConnectionLost(
                "not connected to the broker; a quiet send is not queued across reconnects"
            )

    def _try_quiet(self, body: bytes) -> bool:
        """Queues a QUIET send if the socket is not behind; ``False`` when it
        is (the caller waits for room)."""
        self._check_quiet()
        conn = self._conn
        if len(self._writer) >= QUIET_BUFFER_BYTES_MAX or (conn is not None and conn.paused):
            return False
        self._next_seq += 1
        writer = self._writer
        writer.push_send(self._next_seq, body, quiet=True)
        if len(writer) >= EAGER_WRITE_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    async def _send_quiet_when_room(self, body: bytes) -> None:
        while not self._try_quiet(body):
            # No room: hand what waits to the socket now, then wait until it
            # drained if the transport is behind.
            self._flush()
            conn = self._conn
            if conn is not None and conn.paused:
                if self._writable is None:
                    self._writable = self._loop.create_future()
                await self._writable

    async def flush(self) -> None:
        """Returns once the broker answered everything this client sent
        before the call — accepted durable messages are on disk, refusals of
        quiet sends are counted in :attr:`unheard_refusals` — by a PING the
        broker answers behind those answers."""
        self._check_quiet()
        self._next_nonce += 1
        nonce = self._next_nonce
        future: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._flushes.append((nonce, future))
        self._writer.push(p.Ping(nonce))
        self._schedule_flush()
        await _wait(future, self._options.send_timeout)
        if not future.done():
            raise CourierTimeout(f"the broker did not answer a flush within {self._options.send_timeout:g}s")
        error = future.result()
        if error is not None:
            raise error

    def set_max_in_flight(self, max_in_flight: int) -> None:
        """Changes how many deliveries the broker may have outstanding on
        this connection (FLOW); kept for reconnects. 0: the broker's default."""
        if not 0 <= max_in_flight <= 0xFFFF_FFFF:
            raise ValueError(f"max_in_flight must be 0..{0xFFFF_FFFF}, not {max_in_flight}")
        self._max_in_flight = max_in_flight
        if self._connected:
            self._writer.push(p.Flow(max_in_flight))
            self._schedule_flush()

    # -- requests --

    def _open_request(self, name: str, command: bytes, body: bytes, transient: bool, timeout: float) -> ReplyStream:
        if self._closed:
            raise ClientClosed("the client is closed")
        stream = ReplyStream(self, name, command, timeout)
        if transient and self._connected:
            # The broker's acceptance would arrive just before the reply and
            # say nothing the reply does not: the command goes QUIET, and
            # only a refusal is answered, into the stream.
            self._next_seq = seq = self._next_seq + 1
            self._writer.push_send(seq, body, quiet=True)
            self._schedule_flush()
            stream._quiet_seq = seq
            self._quiet_requests[seq] = command
        else:
            stream._acceptance = self._enqueue(command, body)
        self._requests[command] = stream
        return stream

    def _forget_request(self, stream: ReplyStream) -> None:
        if self._requests.get(stream._command) is stream:
            del self._requests[stream._command]
        if stream._quiet_seq is not None:
            self._quiet_requests.pop(stream._quiet_seq, None)

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

    def _handle(self, body: bytes, generation: int, conn: _Connection) -> bool:
        """Handles one frame body; ``False`` when the connection is done."""
        frame_type = body[0]
        if frame_type == FrameType.SEND_RESULT:
            self._on_send_results(body, conn.version >= p.LOG_SEQ_VERSION)
            return True
        if frame_type == FrameType.DELIVER:
            self._on_deliver(_decode_deliveries(body, conn.version), generation, conn.version)
            return True
        frame = p.decode_body(body, conn.version)
        if isinstance(frame, p.Result):
            future = self._ops.pop(frame.request, None)
            error = None if frame.code == 0 else Refused(frame.code, frame.reason)
            if future is not None:
                if not future.done():
                    future.set_result(error)
            elif error is not None:
                log.warning("re-subscription refused: %s", error)
        elif isinstance(frame, p.Pong):
            flushes = self._flushes
            while flushes and flushes[0][0] <= frame.nonce:
                _, future = flushes.popleft()
                if not future.done():
                    future.set_result(None)
        elif isinstance(frame, p.Ping):
            self._writer.push(p.Pong(frame.nonce))
            self._schedule_flush()
        elif isinstance(frame, p.Drained):
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        elif isinstance(frame, p.ErrorFrame):
            # Reported when the broker closes the connection right after.
            conn.error = (frame.code, frame.message)
            return False
        else:
            raise p.DecodeError("UnexpectedFrame", f"unexpected frame from the broker: {type(frame).__name__}")
        return True

    def _on_send_results(self, body: bytes, with_log_seq: bool) -> None:
        # The hot path of a pipelined publisher: no objects per entry.
        size = len(body)
        if size < 5:
            raise p.DecodeError("UnexpectedEof", "SEND_RESULT ends before its count")
        (count,) = _U32.unpack_from(body, 1)
        if count == 0:
            raise p.DecodeError("EmptyBatch", "batch frame has 0 entries; send no frame instead")
        # Version 3 on, each entry ends with its log_seq (not needed here).
        tail = 8 if with_log_seq else 0
        if count > (size - 5) // (12 + tail) or count > p.BATCH_ENTRIES_MAX:
            raise p.DecodeError("TooManyEntries", f"batch claims {count} entries; they do not fit in this frame")
        pending = self._pending
        pos = 5
        unpack = _SEND_OUTCOME.unpack_from
        for _ in range(count):
            if size - pos < 12:
                raise p.DecodeError("UnexpectedEof", f"frame ends early at byte {pos}")
            seq, code, n = unpack(body, pos)
            pos += 12
            if n:
                if size - pos < n:
                    raise p.DecodeError("UnexpectedEof", f"frame ends early at byte {pos}")
                reason = body[pos : pos + n].decode(errors="replace")
                pos += n
            else:
                reason = ""
            if tail:
                if size - pos < tail:
                    raise p.DecodeError("UnexpectedEof", f"frame ends early at byte {pos}")
                pos += tail
            ack = pending.pop(seq, None)
            if ack is not None:
                ack._resolve(None if code == 0 else Refused(code, reason))
            elif seq in self._quiet_requests:
                command = self._quiet_requests.pop(seq)
                stream = self._requests.pop(command, None)
                if stream is not None:
                    stream._fail(Refused(code, reason))
            elif code != 0:
                refusal = Refused(code, reason)
                log.warning("the broker refused a send nobody awaits: %s", refusal)
                self.unheard_refusals += 1
                self.last_unheard_refusal = refusal
        if pos != size:
            raise p.DecodeError("TrailingBytes", f"frame has {size - pos} bytes left over after its body")

    def _route_reply(self, message: Message) -> None:
        command = message.response_to_bytes
        if command is None:
            return
        stream = self._requests.get(command)
        if stream is None:
            log.debug("reply %s for a request nobody awaits; dropped", message.name)
            return
        if message.final:
            del self._requests[command]
            if stream._quiet_seq is not None:
                self._quiet_requests.pop(stream._quiet_seq, None)
        stream._push(Reply(message))

    def _on_deliver(self, deliveries: list[tuple[int, int, Message]], generation: int, version: int) -> None:
        routes = self._routes
        # Version 4: a key's deliveries come pipelined (PROTOCOL.md §8.4).
        pipelined = version >= p.PIPELINED_KEYS_VERSION
        for delivery, attempt, message in deliveries:
            if message.kind == Kind.REPLY:
                self._route_reply(message)
                continue
            key = message.key if pipelined and not message.transient else None
            key_start = False
            if pipelined:
                key_start = bool(attempt & p.ATTEMPT_KEY_START)
                attempt &= ~p.ATTEMPT_KEY_START
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
            incoming = Incoming(self, generation, delivery, attempt, message)
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
        token = _ACTIVITY.set(incoming.message.activity_id_bytes)
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
            _ACTIVITY.reset(token)
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
        if self._running == 0 and not self._backlog and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

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

    async def close(self, timeout: Seconds | None = None) -> None:
        """Stops taking deliveries (DRAIN), waits — up to ``timeout``,
        default the client's ``drain_timeout`` — for running handlers to
        finish and for the broker to answer every send still waiting, then
        closes the connection. Sends stay possible until then (a handler
        may still reply); after it, everything raises :class:`ClientClosed`."""
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        limit = self._options.drain_timeout if timeout is None else _seconds(timeout)
        deadline = self._loop.time() + limit
        if self._connected:
            self._drained = self._loop.create_future()
            self._writer.push(p.Drain())
            self._schedule_flush()
            await _wait(self._drained, limit)
        if self._running or self._backlog:
            self._idle = self._loop.create_future()
            await _wait(self._idle, max(deadline - self._loop.time(), 0))
            if self._running or self._backlog:
                log.warning("handlers still running at the drain timeout; closing anyway")
        while self._pending and self._loop.time() < deadline:
            last = next(reversed(self._pending.values()))._wakeup()
            await _wait(last, max(deadline - self._loop.time(), 0))
        self._flush()
        self._closed = True
        if not self._stop.done():
            self._stop.set_result(None)
        if self._keepalive is not None:
            self._keepalive.cancel()
        conn = self._conn
        self._connected = False
        if conn is not None and conn.transport is not None:
            conn.transport.close()
        closed = ClientClosed("the client closed before the broker answered")
        for ack in self._pending.values():
            ack._resolve(closed)
        self._pending.clear()
        for future in self._ops.values():
            if not future.done():
                future.set_result(closed)
        self._ops.clear()
        for _, future in self._flushes:
            if not future.done():
                future.set_result(closed)
        self._flushes.clear()
        for stream in list(self._requests.values()):
            stream._fail(ClientClosed("the client closed before the final reply"))
        self._requests.clear()
        self._wake_writable()
        for task in list(self._tasks):
            task.cancel()
        if self._driver is not None:
            await asyncio.gather(self._driver, return_exceptions=True)
        if conn is not None:
            await asyncio.wait([conn.closed], timeout=1.0)
        self._closed_event.set()


_U16 = struct.Struct(">H")
_VERSION = struct.Struct(">HH")
_DELIVERY_HEAD = struct.Struct(">QI")


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
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_NAME8: dict[str, bytes] = {}
_NAME8_MAX = 4096


def _remember_name(name: str) -> bytes:
    """The name's str8 encoding, remembered: a publisher sends few names."""
    raw = name.encode()
    encoded = bytes((len(raw),)) + raw
    if len(_NAME8) >= _NAME8_MAX:
        _NAME8.clear()
    _NAME8[name] = encoded
    return encoded


def _header_list(headers: Mapping[str, str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _parse_version(version: tuple[int, int] | str) -> tuple[int, int]:
    if isinstance(version, str):
        major, _, minor = version.partition(".")
        try:
            parsed = (int(major), int(minor or 0))
        except ValueError:
            raise ValueError(f"version {version!r} is not MAJOR.MINOR (e.g. '1.2')") from None
    else:
        parsed = (int(version[0]), int(version[1]))
    if not all(0 <= v <= 0xFFFF for v in parsed):
        raise ValueError(f"version {version!r}: each part must be 0..65535")
    return parsed

