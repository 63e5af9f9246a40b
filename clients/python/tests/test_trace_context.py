"""W3C Trace Context (``traceparent``, PROTOCOL.md §8.9): the header read
and written as the reference SDK does, and carried from a handled message
to what its handler sends, against a real broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from support import Broker, eventually

from courier_client import TRACEPARENT, Incoming, Message, TraceParent, connect
from courier_client import protocol as p
from courier_client._common import _HANDLING
from courier_client.client import Client

W3C = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
VECTORS = Path(__file__).resolve().parents[3] / "docs" / "protocol-vectors.json"


def test_parses_and_writes_the_w3c_examples() -> None:
    t = TraceParent.parse(W3C)
    assert t is not None
    assert t.trace_id == bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
    assert t.span_id == bytes([0x00, 0xF0, 0x67, 0xAA, 0x0B, 0xA9, 0x02, 0xB7])
    assert t.flags == 1
    assert t.to_header() == W3C
    assert TraceParent.parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    sampled_not = TraceParent.parse(W3C[:-2] + "00")
    assert sampled_not is not None and sampled_not.flags == 0
    assert TraceParent.parse(f"  {W3C}\n") == t, "surrounding white space is trimmed"


def test_a_higher_version_is_read_by_its_version_00_prefix() -> None:
    t = TraceParent.parse(W3C)
    assert TraceParent.parse(f"01{W3C[2:]}-more") == t
    assert TraceParent.parse(f"cc{W3C[2:]}") == t, "nothing after the prefix"
    assert TraceParent.parse(f"01{W3C[2:]}more") is None, "what follows starts with '-'"
    written = TraceParent.parse(f"01{W3C[2:]}-more")
    assert written is not None and written.to_header() == W3C, "written as version 00"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1g",
        "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\x1f",
    ],
)
def test_malformed_values_are_none(bad: str) -> None:
    assert TraceParent.parse(bad) is None


def test_a_child_keeps_the_trace_and_takes_the_message_s_span() -> None:
    handled = Message(p.Kind.COMMAND, "a.b")
    root = TraceParent.of(handled)
    assert root.trace_id == handled.activity_id_bytes, "without a header, the activity is the trace"
    assert root.span_id == handled.id_bytes[8:]
    assert root.flags == 1
    sent = Message(p.Kind.EVENT, "a.c")
    child = root.child(sent.id)
    assert child.trace_id == root.trace_id
    assert child.span_id == sent.id_bytes[8:]
    assert child.span_id != root.span_id
    assert root.child(sent.id_bytes) == child

    carried = Message(p.Kind.COMMAND, "a.b", headers=[(TRACEPARENT, W3C[:-2] + "00")])
    trace = TraceParent.of(carried)
    assert trace.to_header()[3:35] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace.child(sent.id).flags == 0, "flags carry over"
    broken = Message(p.Kind.COMMAND, "a.b", headers=[(TRACEPARENT, "00-abc-01")])
    assert TraceParent.of(broken).trace_id == broken.activity_id_bytes, "an invalid header: the activity's trace"
    # A span id is never all zero, nor a trace id.
    zero = uuid.UUID(bytes=bytes(16))
    assert TraceParent.of(Message(p.Kind.COMMAND, "a.b", id=zero)).span_id == bytes(7) + b"\x01"
    assert TraceParent.of(Message(p.Kind.COMMAND, "a.b", id=zero)).trace_id == bytes(15) + b"\x01"


async def test_the_event_of_the_conformance_vectors_is_encoded_byte_for_byte() -> None:
    """The SEND of PROTOCOL.md's event published while handling a command:
    the client gives it the parent_id and the traceparent of the vector."""
    vectors = json.loads(VECTORS.read_text())
    vector = next(v for v in vectors["frames"] if v["name"].startswith("SEND of an event published while handling"))
    fields = vector["frame"]["entries"][0]["message"]
    client = Client(connect("127.0.0.1:7700", "web")._options)
    client._version = vector["protocol_version"]
    command = uuid.UUID(fields["activity_id"])
    token = _HANDLING.set(Message(p.Kind.COMMAND, "todo.create", id=command))
    try:
        event = client.event(
            fields["name"],
            bytes.fromhex(fields["payload"]),
            key=bytes.fromhex(fields["key"]),
            deliver_at=datetime.fromtimestamp(fields["deliver_at"] / 1e9, tz=timezone.utc),
            id=uuid.UUID(fields["id"]),
        )
    finally:
        _HANDLING.reset(token)
    writer = p.FrameWriter(version=vector["protocol_version"])
    writer.push_send(vector["frame"]["entries"][0]["seq"], event._body)
    assert writer.take().hex() == vector["hex"]


async def test_what_a_handler_sends_continues_the_handled_message_s_trace(broker: Broker) -> None:
    created: list[Message] = []
    mailed: list[Message] = []
    async with (
        connect(broker.addr, "todo") as todo,
        connect(broker.addr, "audit") as audit,
        connect(broker.addr, "watcher") as watcher,
        connect(broker.addr, "web") as web,
    ):

        async def create(msg: Incoming) -> None:
            await todo.publish("todo.created", msg.json())
            await msg.reply("todo.done", "ok")

        async def audit_created(msg: Incoming) -> None:
            # From a task the handler starts: the handling context goes along.
            await asyncio.ensure_future(audit.send("mail.send", "hi"))

        await todo.on("todo.create", create)
        await audit.on("todo.created", audit_created)
        await watcher.on("todo.created", lambda msg: created.append(msg.message))
        await watcher.on("mail.send", lambda msg: mailed.append(msg.message))

        def trace_of(m: Message) -> TraceParent:
            header = m.header(TRACEPARENT)
            assert header is not None, f"{m.name} carries a traceparent"
            trace = TraceParent.parse(header)
            assert trace is not None, header
            assert [k for k, _ in m.headers].count(TRACEPARENT) == 1
            return trace

        # A command that starts an activity carries no header: its trace is
        # its activity.
        command = web.command("todo.create", "milk")
        assert command.message.header(TRACEPARENT) is None
        reply = await command.request()
        await eventually(lambda: len(created) == 1 and len(mailed) == 1)
        event, mail = created[0], mailed[0]
        assert [k for k, _ in event.headers] == ["content-type", TRACEPARENT]
        for m, parent in ((reply.message, command.id), (event, command.id), (mail, event.id)):
            assert m.activity_id == command.id, m.name
            assert m.parent_id == parent, m.name
            trace = trace_of(m)
            assert trace.trace_id == command.id.bytes, f"{m.name}: one trace, named by the activity"
            assert trace.span_id == m.id.bytes[8:], f"{m.name}'s own span"
            assert trace.flags == 1

        # A command that carries a traceparent (from an HTTP request, say):
        # the same trace id and flags, each message its own span.
        upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        reply = await web.request("todo.create", "bread", headers={TRACEPARENT: upstream})
        await eventually(lambda: len(created) == 2 and len(mailed) == 2)
        event, mail = created[1], mailed[1]
        for m in (reply.message, event, mail):
            trace = trace_of(m)
            assert trace.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c", m.name
            assert trace.flags == 0, f"{m.name}: flags carry over"
            assert trace.span_id == m.id.bytes[8:], f"{m.name}'s own span"


async def test_a_traceparent_the_handler_sets_is_kept(broker: Broker) -> None:
    own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    created: list[Message] = []
    async with connect(broker.addr, "todo") as todo, connect(broker.addr, "web") as web:

        async def create(msg: Incoming) -> None:
            await todo.publish("todo.created", b"", headers=[(TRACEPARENT, own)])

        await todo.on("todo.create", create)
        await todo.on("todo.created", lambda msg: created.append(msg.message))
        await web.send("todo.create", {}, headers={TRACEPARENT: W3C})
        await eventually(lambda: len(created) == 1)
        assert created[0].headers == [(TRACEPARENT, own)], "continued as set, not replaced"
        assert created[0].parent_id is not None, "still named as the handled message's consequence"
