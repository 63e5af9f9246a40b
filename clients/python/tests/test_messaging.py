"""Sending, publishing, requesting and streaming against a real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from typing import Awaitable, Callable

import pytest
from support import Broker, eventually

from courier_client import (
    ConnectError,
    CourierTimeout,
    ErrorCode,
    Incoming,
    InvalidName,
    Refused,
    connect,
    connect_from_env,
    current_activity,
)


async def test_a_command_is_handled_and_answered(broker: Broker) -> None:
    async with connect(broker.addr, "todo") as todo, connect(broker.addr, "web") as web:
        assert todo.broker.startswith("courier")

        async def create(msg: Incoming) -> None:
            await msg.reply("todo.created", {"text": msg.json()["text"], "from": msg.sender})

        await todo.on("todo.create", create)
        command = web.command("todo.create", {"text": "milk"})
        reply = await command.request()
        assert reply.name == "todo.created"
        assert reply.final
        assert reply.json() == {"text": "milk", "from": "web"}
        assert reply.sender == "todo"
        assert reply.response_to == command.id
        assert reply.header("content-type") == "application/json"


async def test_a_command_nobody_receives_is_refused_with_the_brokers_code_and_reason(broker: Broker) -> None:
    async with connect(broker.addr, "web") as web:
        with pytest.raises(Refused) as refused:
            await web.send("todo.create", {"text": "milk"})
        assert refused.value.code == ErrorCode.NO_RECEIVER
        assert refused.value.code_name == "no_receiver"
        assert "no service receives todo.create" in refused.value.reason
        assert "[no_receiver (6)]" in str(refused.value)
        with pytest.raises(Refused) as durable_request:
            await web.request("todo.create", timeout=5)
        assert durable_request.value.code == ErrorCode.NO_RECEIVER
        # A transient request goes quiet; its refusal still ends it at once.
        started = time.monotonic()
        with pytest.raises(Refused) as transient_request:
            await web.request("todo.create", transient=True, timeout=5)
        assert transient_request.value.code == ErrorCode.NO_RECEIVER
        assert time.monotonic() - started < 2


async def test_events_reach_every_service_once_and_instances_of_one_service_share_them(broker: Broker) -> None:
    got: dict[str, list[int]] = {"audit-1": [], "audit-2": [], "mail": []}

    def recorder(who: str) -> Callable[[Incoming], Awaitable[None]]:
        async def handle(msg: Incoming) -> None:
            got[who].append(msg.json()["n"])

        return handle

    async with (
        connect(broker.addr, "audit", instance="audit-1") as audit1,
        connect(broker.addr, "audit", instance="audit-2") as audit2,
        connect(broker.addr, "mail") as mail,
        connect(broker.addr, "web") as web,
    ):
        await audit1.on("todo.*", recorder("audit-1"))
        await audit2.on("todo.*", recorder("audit-2"))
        await mail.on("todo.>", recorder("mail"))
        for n in range(20):
            await web.publish("todo.created", {"n": n})
        await eventually(lambda: len(got["audit-1"]) + len(got["audit-2"]) == 20 and len(got["mail"]) == 20)
        assert sorted(got["audit-1"] + got["audit-2"]) == list(range(20))
        assert got["audit-1"] and got["audit-2"], "both instances of audit took a share"
        assert sorted(got["mail"]) == list(range(20))
    # An event nobody receives is accepted and dropped.
    async with connect(broker.addr, "web") as web:
        assert isinstance(await web.publish("nobody.listens"), uuid.UUID)


async def test_streaming_replies_end_with_the_final_one(broker: Broker) -> None:
    async with connect(broker.addr, "files") as files, connect(broker.addr, "web") as web:

        async def copy(msg: Incoming) -> None:
            for pct in (25, 50, 75):
                await msg.reply("file.copy.progress", {"pct": pct}, final=False)
            await msg.reply("file.copy.done", {"pct": 100})

        await files.on("file.copy", copy)
        replies = [(r.name, r.json()["pct"], r.final) async for r in web.request_stream("file.copy", {"from": "a"})]
        assert replies == [
            ("file.copy.progress", 25, False),
            ("file.copy.progress", 50, False),
            ("file.copy.progress", 75, False),
            ("file.copy.done", 100, True),
        ]
        # The first reply alone.
        first = await web.request("file.copy")
        assert (first.name, first.final) == ("file.copy.progress", False)


async def test_requests_and_streams_time_out(broker: Broker) -> None:
    async with connect(broker.addr, "slow") as slow, connect(broker.addr, "web") as web:
        release = asyncio.Event()

        async def answer_once(msg: Incoming) -> None:
            if msg.name == "job.start":
                await msg.reply("job.progress", {}, final=False)
            await release.wait()

        await slow.on("job.*", answer_once)
        started = time.monotonic()
        with pytest.raises(CourierTimeout):
            await web.request("job.silent", timeout=0.3)
        assert 0.25 < time.monotonic() - started < 3
        seen = []
        with pytest.raises(TimeoutError):
            async for reply in web.request_stream("job.start", timeout=timedelta(milliseconds=400)):
                seen.append(reply.name)
        assert seen == ["job.progress"]
        release.set()


async def test_envelope_options_reach_the_receiver(broker: Broker) -> None:
    got: list[Incoming] = []
    async with connect(broker.addr, "sink") as sink, connect(broker.addr, "web") as web:

        async def record(msg: Incoming) -> None:
            got.append(msg)

        await sink.on("opt.>", record)
        explicit = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
        await web.send(
            "opt.all",
            b"\x00raw",
            key="user-1",
            ttl=60,
            headers={"x-tenant": "acme"},
            version="1.2",
            id=explicit,
        )
        await eventually(lambda: len(got) == 1)
        m = got[0].message
        assert m.id == explicit and got[0].id == explicit
        assert m.activity_id == explicit, "a new activity is named after the message that starts it"
        assert m.key == b"user-1"
        assert m.version == (1, 2)
        assert m.payload == b"\x00raw"
        assert m.headers == [("x-tenant", "acme")], "raw payloads get no content-type"
        assert m.expires_at is not None and 59e9 < m.expires_at - time.time_ns() <= 60e9
        assert m.sender == "web" and m.timestamp > 0

        sent_at = time.monotonic()
        await web.publish("opt.later", {"n": 1}, delay=0.5)
        await eventually(lambda: len(got) == 2)
        assert time.monotonic() - sent_at >= 0.45, "delivered no sooner than its delay"
        assert got[1].message.deliver_at is not None

        with pytest.raises(Refused) as expired:
            await web.publish("opt.gone", ttl=timedelta(0))
        assert expired.value.code == ErrorCode.EXPIRED


async def test_the_same_id_is_accepted_twice_and_delivered_once(broker: Broker) -> None:
    got: list[str] = []
    async with connect(broker.addr, "sink") as sink, connect(broker.addr, "web") as web:

        async def record(msg: Incoming) -> None:
            got.append(msg.json())

        await sink.on("dedup.*", record)
        same = uuid.uuid4()
        assert await web.send("dedup.cmd", "first", id=same, key="k") == same
        assert await web.send("dedup.cmd", "again", id=same, key="k") == same
        await web.send("dedup.cmd", "sentinel", key="k")
        await eventually(lambda: "sentinel" in got)
        assert got == ["first", "sentinel"]


async def test_messages_with_one_key_are_handled_in_order(broker: Broker) -> None:
    got: list[int] = []
    async with connect(broker.addr, "sink", max_in_flight=64) as sink, connect(broker.addr, "web") as web:

        async def record(msg: Incoming) -> None:
            await asyncio.sleep(0.001 * (msg.json() % 3))
            got.append(msg.json())

        await sink.on("ordered.item", record)
        acks = [web.event("ordered.item", n, key=b"one-key").enqueue() for n in range(30)]
        for ack in acks:
            await ack
        await eventually(lambda: len(got) == 30)
        assert got == list(range(30))


async def test_pipelined_sends_are_acknowledged_and_delivered(broker: Broker) -> None:
    got: set[int] = set()
    async with connect(broker.addr, "sink") as sink, connect(broker.addr, "web") as web:

        def record(msg: Incoming) -> None:  # a plain function handler
            got.add(msg.json())

        await sink.on("bulk.item", record)
        acks = [web.event("bulk.item", n).enqueue() for n in range(3000)]
        assert not all(a.done() for a in acks), "enqueue does not wait for the broker"
        ids = [await a for a in acks]
        assert len(set(ids)) == 3000 and ids[0] == acks[0].id
        await eventually(lambda: len(got) == 3000)


async def test_quiet_sends_answer_only_refusals(broker: Broker) -> None:
    got: list[int] = []
    async with connect(broker.addr, "sink") as sink, connect(broker.addr, "web") as web:

        async def record(msg: Incoming) -> None:
            got.append(msg.json())

        await sink.on("metric.sampled", record)
        for n in range(500):
            await web.event("metric.sampled", n, transient=True).send_quiet()
        await web.flush()
        assert web.unheard_refusals == 0
        await eventually(lambda: len(got) == 500)
        await web.command("nobody.home", transient=True).send_quiet()
        await web.flush()
        assert web.unheard_refusals == 1
        assert web.last_unheard_refusal is not None
        assert web.last_unheard_refusal.code == ErrorCode.NO_RECEIVER


async def test_bad_messages_are_refused_before_they_leave(broker: Broker) -> None:
    async with connect(broker.addr, "web") as web:
        with pytest.raises(InvalidName, match="character 'T'"):
            await web.publish("Todo.created")
        with pytest.raises(Refused) as too_large:
            await web.publish("big.blob", bytes(9 * 1024 * 1024))
        assert too_large.value.code == ErrorCode.PAYLOAD_TOO_LARGE
        with pytest.raises(ValueError, match="only commands get replies"):
            web.event("todo.created").request_stream()
        with pytest.raises(InvalidName, match="whole segment"):
            await web.on("todo.cr*", lambda msg: None)


async def test_activity_flows_into_everything_sent_while_handling(broker: Broker) -> None:
    seen: dict[str, uuid.UUID] = {}
    parents: dict[str, uuid.UUID | None] = {}
    async with (
        connect(broker.addr, "orders") as orders,
        connect(broker.addr, "audit") as audit,
        connect(broker.addr, "web") as web,
    ):

        async def place(msg: Incoming) -> None:
            seen["handler"] = current_activity() or uuid.UUID(int=0)
            await msg.client.publish("order.placed", {"by": "handler"})

            async def later() -> None:  # a task started by the handler keeps the activity
                await orders.publish("order.audited", {"by": "task"})

            await asyncio.create_task(later())
            await msg.reply("order.accepted", {})

        async def record(msg: Incoming) -> None:
            seen[msg.name] = msg.activity_id
            parents[msg.name] = msg.parent_id

        await orders.on("order.place", place)
        await audit.on("order.*", record)
        command = web.command("order.place", {})
        reply = await command.request()
        await eventually(lambda: {"order.placed", "order.audited"} <= seen.keys())
        assert current_activity() is None
        assert seen["handler"] == command.id
        assert seen["order.placed"] == command.id
        assert seen["order.audited"] == command.id
        assert reply.activity_id == command.id
        # Each names the message whose handling caused it (protocol version 2 on).
        assert parents["order.placed"] == command.id
        assert parents["order.audited"] == command.id
        assert reply.parent_id == command.id


async def test_an_unreachable_broker_fails_at_once_with_the_address() -> None:
    from support import free_port

    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError, match=f"cannot reach broker at {addr}.*courier serve"):
        await connect(addr, "web")


async def test_connect_from_env_reads_the_cli_variables(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COURIER_TOKEN", "COURIER_TLS_CA", "COURIER_TLS_CERT", "COURIER_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COURIER_URL", broker.addr)
    monkeypatch.setenv("COURIER_SERVICE", "reporting")
    async with connect_from_env(instance="reporting-7") as client:
        assert client.service == "reporting"
        await client.publish("report.made")
    monkeypatch.delenv("COURIER_SERVICE")
    async with connect_from_env() as client:
        assert client.service == "cli", "without a service or credentials: cli, as the courier CLI"
