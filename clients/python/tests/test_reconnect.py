"""Reconnecting across a broker crash (kill -9 and restart) and a broker
that stops answering (keep-alive)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from support import Broker, eventually

from courier_client import ConnectionLost, Incoming, PendingAck, connect


async def test_nothing_acknowledged_is_lost_across_a_broker_crash(broker: Broker) -> None:
    total = 3000
    received: set[int] = set()
    async with (
        connect(broker.addr, "sink", reconnect_delay_max=0.2) as sink,
        connect(broker.addr, "web", reconnect_delay_max=0.2) as web,
        connect(broker.addr, "todo", reconnect_delay_max=0.2) as todo,
    ):

        def record(msg: Incoming) -> None:
            received.add(msg.json())

        async def create(msg: Incoming) -> None:
            await msg.reply("todo.created", msg.json())

        await sink.on("load.tick", record)
        await todo.on("todo.create", create)
        acks: list[PendingAck] = []
        for n in range(total):
            acks.append(web.event("load.tick", n).enqueue())
            if n % 100 == 99:
                await asyncio.sleep(0.002)
            if n == total // 3:
                # Some sends are acknowledged, some are on the wire, some
                # not yet written: the crash catches all three kinds.
                await acks[n // 2]
                broker.kill9()
                await eventually(lambda: not web.is_connected, what="the client saw the crash")
                broker.start()
        for ack in acks:
            await ack  # every send is accepted in the end, re-sent with its id
        await eventually(lambda: web.is_connected and sink.is_connected and todo.is_connected)
        await eventually(lambda: len(received) == total, timeout=20, what=f"all {total} events delivered")
        # The handler was subscribed again on the new connection.
        reply = await web.request("todo.create", {"after": "restart"})
        assert reply.json() == {"after": "restart"}


async def test_a_durable_send_waits_for_the_broker_to_come_back(broker: Broker) -> None:
    async with connect(broker.addr, "sink", reconnect_delay_max=0.2) as sink, connect(
        broker.addr, "web", reconnect_delay_max=0.2
    ) as web:
        got: list[str] = []

        async def record(msg: Incoming) -> None:
            got.append(msg.json())

        await sink.on("note.taken", record)
        broker.kill9()
        await eventually(lambda: not web.is_connected)
        sending = asyncio.ensure_future(web.publish("note.taken", "while down"))
        with pytest.raises(ConnectionLost):
            await web.event("note.taken", "quiet", transient=True).send_quiet()
        await asyncio.sleep(0.1)
        assert not sending.done()
        broker.start()
        await sending
        await eventually(lambda: got == ["while down"])


async def test_a_broker_that_stops_answering_is_given_up_and_reconnected(broker: Broker) -> None:
    async with connect(
        broker.addr, "web", ping_interval=0.1, idle_timeout=0.6, handshake_timeout=1.0, reconnect_delay_max=0.2
    ) as web, connect(broker.addr, "todo") as todo:

        async def create(msg: Incoming) -> None:
            await msg.reply("todo.created", {})

        await todo.on("todo.create", create)
        await asyncio.sleep(0.3)
        assert web.is_connected, "PONGs keep an idle connection alive"
        broker.signal(signal.SIGSTOP)
        try:
            await eventually(lambda: not web.is_connected, timeout=5, what="idle connection given up")
        finally:
            broker.signal(signal.SIGCONT)
        await eventually(lambda: web.is_connected, timeout=10, what="reconnected")
        assert (await web.request("todo.create", {})).name == "todo.created"
