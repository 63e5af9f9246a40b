"""One TCP (or TLS) connection to the broker: frames in, bytes out."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import protocol as p
from ._common import INBOUND_FRAME_BYTES_MAX, _U32, log
from .errors import ConnectError, Refused

if TYPE_CHECKING:
    from .client import Client


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: frames in, bytes out. Until
    :meth:`attach` it only waits for WELCOME; frames behind it stay
    buffered so that nothing is handled before the client took over."""

    def __init__(self, client: Client, address: str) -> None:
        self.client = client
        self.address = address
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
                why = f"TLS session with {self.address} failed: {exc}; is this client certificate signed by the broker's --tls-client-ca?"
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
