"""Handlers: ack, nack and redelivery, dead letters, flow control,
concurrency and graceful close, against a real broker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from support import Broker, eventually

from courier_client import AlreadySettled, Incoming, Nack, connect


def service_row(broker: Broker, name: str) -> dict[str, Any]:
    rows = [row for row in broker.cli_json("services") if row["name"] == name]
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    return row


async def test_returning_acks_and_the_broker_forgets_the_message(broker: Broker) -> None:
    handled: list[int] = []
    async with connect(broker.addr, "todo") as todo, connect(broker.addr, "web") as web:

        async def create(msg: Incoming) -> None:
            handled.append(msg.attempt)

        await todo.on("todo.create", create)
        await web.send("todo.create", {"text": "milk"})
        await eventually(lambda: handled == [1])
        # Still connected: only an ACK empties the service's in-flight count.
        await eventually(lambda: service_row(broker, "todo")["in_flight"] == 0, what="in_flight back to 0")
        assert service_row(broker, "todo")["backlog"] == 0
        assert handled == [1]


async def test_raising_nacks_and_the_message_comes_again(broker: Broker) -> None:
    attempts: list[tuple[int, float]] = []
    async with connect(broker.addr, "todo", nack_delay=0) as todo, connect(broker.addr, "web") as web:

        async def flaky(msg: Incoming) -> None:
            attempts.append((msg.attempt, time.monotonic()))
            if msg.attempt == 1:
                raise RuntimeError("database is restarting")
            if msg.attempt == 2:
                raise Nack(delay=0.4)

        await todo.on("todo.create", flaky)
        await web.send("todo.create", {})
        await eventually(lambda: len(attempts) == 3)
        assert [a for a, _ in attempts] == [1, 2, 3]
        assert attempts[2][1] - attempts[1][1] >= 0.35, "Nack(delay=0.4) waits before the redelivery"
        await eventually(lambda: service_row(broker, "todo")["in_flight"] == 0)


async def test_settling_by_hand_and_twice(broker: Broker) -> None:
    outcomes: list[str] = []
    async with connect(broker.addr, "todo") as todo, connect(broker.addr, "web") as web:

        async def handle(msg: Incoming) -> None:
            msg.ack()
            try:
                msg.nack()
            except AlreadySettled:
                outcomes.append("already settled")
            raise RuntimeError("after the ack: no nack follows")

        await todo.on("todo.create", handle)
        await web.send("todo.create", {})
        await eventually(lambda: outcomes == ["already settled"])
        await eventually(lambda: service_row(broker, "todo")["in_flight"] == 0)
        assert outcomes == ["already settled"], "acked by hand: not redelivered"


async def test_a_message_that_keeps_failing_becomes_a_dead_letter(broker: Broker) -> None:
    attempts: list[int] = []
    smtp_up = False
    async with connect(broker.addr, "mailer") as mailer, connect(broker.addr, "web") as web:

        async def send_mail(msg: Incoming) -> None:
            attempts.append(msg.attempt)
            if not smtp_up:
                raise Nack("smtp down", delay=0)

        await mailer.on("mail.send", send_mail, max_deliveries=3)
        await web.send("mail.send", {"to": "a@b"})
        await eventually(lambda: len(broker.cli_json("dead-letters", "list", "--service", "mailer")) == 1)
        assert attempts == [1, 2, 3]
        (letter,) = broker.cli_json("dead-letters", "list", "--service", "mailer")
        assert letter["name"] == "mail.send" and letter["attempts"] == 3
        (shown,) = broker.cli_json("dead-letters", "show", str(letter["id"]), "--service", "mailer")
        assert shown["payload"] == {"to": "a@b"}
        # Replayed, it comes back to the handler, which now succeeds.
        smtp_up = True
        broker.cli("dead-letters", "replay", str(letter["id"]), "--service", "mailer")
        await eventually(lambda: len(attempts) == 4)
        await eventually(lambda: service_row(broker, "mailer")["in_flight"] == 0)
        assert broker.cli_json("dead-letters", "list", "--service", "mailer") == []


async def test_max_in_flight_bounds_what_the_broker_sends_and_flow_raises_it(broker: Broker) -> None:
    running = 0
    release = asyncio.Event()
    async with (
        connect(broker.addr, "worker", max_in_flight=3, max_concurrency=10) as worker,
        connect(broker.addr, "web") as web,
    ):

        async def work(msg: Incoming) -> None:
            nonlocal running
            running += 1
            await release.wait()

        await worker.on("job.run", work)
        for n in range(8):
            await web.send("job.run", n)
        await eventually(lambda: running == 3)
        row = service_row(broker, "worker")
        assert (row["in_flight"], row["backlog"]) == (3, 8), "the broker holds back what does not fit"
        worker.set_max_in_flight(5)
        await eventually(lambda: running == 5)
        release.set()
        await eventually(lambda: running == 8)
        await eventually(lambda: service_row(broker, "worker")["in_flight"] == 0)


async def test_max_concurrency_bounds_the_handlers_running_at_once(broker: Broker) -> None:
    running = 0
    most = 0
    done = 0
    async with (
        connect(broker.addr, "worker", max_in_flight=50, max_concurrency=2) as worker,
        connect(broker.addr, "web") as web,
    ):

        async def work(msg: Incoming) -> None:
            nonlocal running, most, done
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)
            running -= 1
            done += 1

        await worker.on("job.run", work)
        acks = [web.command("job.run", n).enqueue() for n in range(20)]
        for ack in acks:
            await ack
        await eventually(lambda: done == 20)
        assert most == 2


async def test_close_drains_running_handlers_and_their_replies(broker: Broker) -> None:
    started = asyncio.Event()
    finished: list[str] = []
    todo = await connect(broker.addr, "todo")
    async with connect(broker.addr, "web") as web:

        async def slow(msg: Incoming) -> None:
            started.set()
            await asyncio.sleep(0.3)
            await msg.reply("todo.created", {})
            finished.append(msg.name)

        await todo.on("todo.create", slow)
        request = asyncio.ensure_future(web.request("todo.create", {}))
        await started.wait()
        await todo.close()
        assert finished == ["todo.create"]
        reply = await request
        assert reply.name == "todo.created"
        assert todo.closed and not todo.is_connected
        await eventually(lambda: service_row(broker, "todo")["in_flight"] == 0)
        assert service_row(broker, "todo")["backlog"] == 0, "acked before the connection closed"
        with pytest.raises(Exception, match="closed"):
            await todo.publish("todo.created")
