"""Sending: messages built once, pipelined sends and their acceptance,
quiet sends, flushes, requests and the replies routed to them."""

from __future__ import annotations

import asyncio
import json as jsonlib
import struct
import uuid
from datetime import datetime
from typing import Any, Mapping, Sequence

from . import protocol as p
from ._common import (
    _HANDLING,
    EAGER_WRITE_BYTES,
    _JSON_HEADERS,
    _NO_HEADERS,
    _NO_TIMESTAMP_NO_SENDER,
    QUIET_BUFFER_BYTES_MAX,
    _SEND_OUTCOME,
    _U32,
    _U64,
    _VERSION_1_0,
    Headers,
    Payload,
    Seconds,
    log,
    _now_ns,
    _seconds,
    _wait,
)
from ._core import _ClientCore
from ._ids import new_id_bytes
from ._messages import Outgoing, PendingAck, Reply
from ._stream import ReplyStream
from ._trace import TRACEPARENT, child_header
from .errors import ClientClosed, ConnectionLost, CourierTimeout, Refused
from .names import validate_name
from .protocol import ErrorCode, Flag, Kind, Message


class _Sending(_ClientCore):
    """Building messages and sending them; requests and their replies."""

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
        cause: Message | None,
        /,
    ) -> Outgoing:
        """The message encoded once, as every send of it will carry it
        (arguments by position: this is every send's path). ``cause``: the
        message this one is a consequence of (a reply: the command it
        answers); by default the one being handled, if any."""
        name8 = _NAME8.get(name)
        if name8 is None:
            validate_name(name)
            name8 = _remember_name(name)
        id_bytes = new_id_bytes() if id is None else id.bytes
        # A message sent while handling another inherits its activity, names
        # it as its parent and carries a child of its trace; one that starts
        # an activity carries no traceparent (its trace id is its activity).
        parent = None
        traceparent = None
        if activity_id is None:
            if cause is None:
                cause = _HANDLING.get()
            if cause is None:
                activity = id_bytes
            else:
                activity = cause.activity_id_bytes
                parent = cause.id_bytes
                traceparent = child_header(cause, id_bytes)
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
        if parent is not None and self._version >= p.PARENT_ID_VERSION:
            flags |= Flag.PARENT_ID
            optional += parent
        is_raw = isinstance(payload, (bytes, bytearray, memoryview))
        if is_raw:
            raw = bytes(payload)
        else:
            raw = jsonlib.dumps(payload, separators=(",", ":")).encode()
        if not headers:
            if traceparent is None:
                header_bytes = _NO_HEADERS if is_raw else _JSON_HEADERS
            else:
                header_bytes = (_TRACE_ONLY if is_raw else _JSON_AND_TRACE) + traceparent.encode()
        else:
            listed = _header_list(headers)
            if not is_raw and not any(k == "content-type" for k, _ in listed):
                listed.append(("content-type", "application/json"))
            # A traceparent the sender set (from an HTTP request, say) is
            # continued as it is.
            if traceparent is not None and not any(k == TRACEPARENT for k, _ in listed):
                listed.append((TRACEPARENT, traceparent))
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
            None,
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





_U16 = struct.Struct(">H")
# Headers of a message sent while handling one, without headers of its own,
# before the traceparent's 55 characters (the header's length is fixed).
_TRACE_HEAD = bytes((len(TRACEPARENT),)) + TRACEPARENT.encode() + _U16.pack(55)
_TRACE_ONLY = _U16.pack(1) + _TRACE_HEAD
_JSON_AND_TRACE = _U16.pack(2) + _JSON_HEADERS[2:] + _TRACE_HEAD
_VERSION = struct.Struct(">HH")
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
