"""The Courier client: one connection to the broker on behalf of one
service instance, kept up across broker restarts."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as sslmod

from . import protocol as p
from ._common import Handler, Seconds, _seconds, _wait, current_activity, log
from ._connection import _Connection
from ._handling import _Handling, _decode_deliveries
from ._messages import Incoming, Outgoing, PendingAck, Reply
from ._options import _Address, _rotation, connect, connect_from_env, tls_context
from ._stream import ReplyStream
from .errors import ClientClosed, ConnectError, ConnectionLost, Refused
from .protocol import ErrorCode, FrameType

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


class Client(_Handling):
    """A connection to the broker on behalf of one service instance.

    Made by :func:`connect`. It sends commands (:meth:`send`), publishes
    events (:meth:`publish`), asks and awaits replies (:meth:`request`,
    :meth:`request_stream`) and handles what its service receives
    (:meth:`on`). It reconnects by itself after a broker restart (or to
    the next of several brokers), subscribes again and re-sends what was
    not yet acknowledged (with the same ids: the broker drops duplicates).
    """

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
    def broker_address(self) -> str:
        """``host:port`` of the broker this client is connected to, or was
        last connected to while it reconnects: one of the addresses of
        ``url``."""
        return self._options.addresses[self._address].text

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
        conn = await self._establish(None)
        self._on_connected(conn)
        self._driver = self._loop.create_task(self._drive())

    async def _establish(self, last: int | None) -> _Connection:
        """Connects and completes HELLO/WELCOME with the broker at each
        address in turn, from the one after ``last`` (the index of the
        address connected to last), until one answers. With one address,
        its failure is the error; with several, a :class:`ConnectError`
        naming each (or, when a broker refused, the first refusal)."""
        addresses = self._options.addresses
        failures: list[tuple[str, Exception]] = []
        for index in _rotation(len(addresses), last):
            address = addresses[index]
            try:
                conn = await self._establish_at(address)
            except Exception as e:  # the next address may work
                if len(addresses) == 1:
                    raise
                log.debug("no broker at %s (%s); trying the next address", address.text, e)
                failures.append((address.text, e))
                continue
            self._address = index
            return conn
        unreachable = ConnectError(
            f"cannot reach a broker at {', '.join(_described(a, e) for a, e in failures)}"
            " — is 'courier serve' running?"
        )
        refusal = next((e for _, e in failures if isinstance(e, Refused)), None)
        if refusal is not None:
            raise refusal from unreachable
        raise unreachable

    async def _establish_at(self, address: _Address) -> _Connection:
        o = self._options
        conn = _Connection(self, address.text)
        try:
            if o.ssl is not None:
                await asyncio.wait_for(
                    self._loop.create_connection(
                        lambda: conn,
                        address.host,
                        address.port,
                        ssl=o.ssl,
                        server_hostname=o.server_hostname or address.host,
                        ssl_handshake_timeout=o.handshake_timeout,
                    ),
                    o.handshake_timeout,
                )
            else:
                await asyncio.wait_for(
                    self._loop.create_connection(lambda: conn, address.host, address.port), o.handshake_timeout
                )
        except asyncio.TimeoutError:
            raise ConnectError(
                f"cannot reach broker at {address.text}: no connection within {o.handshake_timeout:g}s"
            ) from None
        except sslmod.SSLError as e:
            hint = ""
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                hint = "; the broker's certificate is not signed by the trusted CA or does not name this host"
            elif "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "PACKET_LENGTH_TOO_LONG" in text:
                hint = "; is the broker listening with TLS (courier serve --tls-cert --tls-key)?"
            raise ConnectError(f"TLS session with {address.text} failed: {e}{hint}") from e
        except OSError as e:
            raise ConnectError(f"cannot reach broker at {address.text}: {e} — is 'courier serve' running?") from e
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
                    conn = await self._establish(self._address)
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
                log.info("reconnected to %s as %s", self.broker_address, self._service)
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


def _described(address: str, error: Exception) -> str:
    """``a:1 ([Errno 111] Connection refused)``: one address's failure
    without the advice the whole message gives once."""
    cause = error.__cause__
    if isinstance(error, ConnectError) and isinstance(cause, OSError) and not isinstance(cause, sslmod.SSLError):
        return f"{address} ({cause})"
    return f"{address} ({error})"
