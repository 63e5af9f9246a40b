"""Several broker addresses in one ``url``: how they are read, the order
in which a connection attempt tries them, and a client that carries on
with the next broker when its own is killed."""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Callable

import pytest
from support import Broker, eventually, free_port

from courier_client import ConnectError, ErrorCode, Incoming, PendingAck, Refused, connect, connect_from_env
from courier_client._options import _parse_addresses, _rotation


def test_a_url_is_one_address_or_several_separated_by_commas() -> None:
    assert _parse_addresses("127.0.0.1:7700") == ["127.0.0.1:7700"]
    assert _parse_addresses("a:1,b:2") == ["a:1", "b:2"]
    assert _parse_addresses(" a:1 ,  b:2,c:3 ") == ["a:1", "b:2", "c:3"], "spaces around the commas"
    assert _parse_addresses("[::1]:7700,[::1]:7701") == ["[::1]:7700", "[::1]:7701"]
    for bad in ["", " ", "a:1,", ",a:1", "a:1,,b:2", "a:1, ,b:2"]:
        with pytest.raises(ValueError, match="empty entry") as error:
            _parse_addresses(bad)
        assert "127.0.0.1:7701,127.0.0.1:7702" in str(error.value), bad


def test_an_empty_entry_fails_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'127.0.0.1:7701,,127.0.0.1:7702'.*empty entry.*HOST:PORT"):
        connect("127.0.0.1:7701,,127.0.0.1:7702", "web")
    monkeypatch.setenv("COURIER_URL", "127.0.0.1:7701,")
    with pytest.raises(ValueError, match="COURIER_URL.*empty entry"):
        connect_from_env(service="web")
    with pytest.raises(ValueError, match="not host:port"):
        connect("127.0.0.1:7701, 127.0.0.1:x", "web")


def test_each_attempt_starts_after_the_address_connected_to_last() -> None:
    def order(count: int, last: int | None) -> list[int]:
        return list(_rotation(count, last))

    assert order(1, None) == [0]
    assert order(1, 0) == [0], "one address: always that one"
    assert order(3, None) == [0, 1, 2], "the first connect: as written"
    assert order(3, 0) == [1, 2, 0], "the one that died comes last"
    assert order(3, 1) == [2, 0, 1]
    assert order(3, 2) == [0, 1, 2], "round past the end"
    assert order(0, None) == []


async def test_the_first_connect_tries_the_addresses_in_order(broker: Broker) -> None:
    down = f"127.0.0.1:{free_port()}"
    async with connect(f"{broker.addr}, {down}", "web") as web:
        assert web.broker_address == broker.addr
    async with connect(f"{down},{broker.addr}", "web") as web:
        assert web.broker_address == broker.addr, "a dead first address: on to the second"
        await web.publish("note.taken")
    other = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError) as error:
        await connect(f"{down},{other}", "web")
    text = str(error.value)
    assert text.startswith(f"cannot reach a broker at {down} (") and f", {other} (" in text, text
    assert text.endswith("is 'courier serve' running?"), text
    # A broker that answered with a refusal says more than one that is down.
    with pytest.raises(Refused) as refused:
        await connect(f"{down},{broker.addr}", "")
    assert refused.value.code == ErrorCode.INVALID_NAME
    assert isinstance(refused.value.__cause__, ConnectError)
    assert f"{down} (" in str(refused.value.__cause__) and f"{broker.addr} (" in str(refused.value.__cause__)


async def test_a_client_whose_broker_is_killed_carries_on_with_the_next(start_broker: Callable[..., Broker]) -> None:
    first, second = start_broker(), start_broker()
    url = f"{first.addr},{second.addr}"
    # The second broker knows the sink service's subscription before the
    # sink moves there, so events re-sent to it wait for the sink instead
    # of racing its re-subscription.
    async with connect(second.addr, "sink") as sink:
        await sink.on("load.tick", lambda msg: None)
    received: dict[uuid.UUID, Incoming] = {}
    async with (
        connect(url, "sink", reconnect_delay_max=0.2) as sink,
        connect(url, "todo", reconnect_delay_max=0.2) as todo,
        connect(url, "web", reconnect_delay_max=0.2) as web,
    ):
        clients = (sink, todo, web)

        def record(msg: Incoming) -> None:
            received[msg.id] = msg

        async def create(msg: Incoming) -> None:
            await msg.reply("todo.created", {"on": msg.json()})

        await sink.on("load.tick", record)
        await todo.on("todo.create", create)
        assert all(c.broker_address == first.addr for c in clients)
        assert (await web.request("todo.create", "first")).json() == {"on": "first"}
        before = [await web.publish("load.tick", n) for n in range(10)]
        await eventually(lambda: all(i in received for i in before), what="the first broker's deliveries")

        # Stopped, the first broker answers nothing: what is enqueued now
        # stays unacknowledged, and all of it must go to the second.
        first.signal(signal.SIGSTOP)
        pending: list[PendingAck] = [web.event("load.tick", n).enqueue() for n in range(10, 510)]
        await asyncio.sleep(0.2)
        assert not any(ack.done() for ack in pending)
        first.kill9()  # SIGKILL: no goodbye to any client

        ids = [await ack for ack in pending]
        assert ids == [ack.id for ack in pending], "re-sent with the ids they had"
        await eventually(
            lambda: all(c.is_connected and c.broker_address == second.addr for c in clients),
            what="every client on the second broker",
        )
        await eventually(lambda: all(i in received for i in ids), timeout=20, what="re-sent events delivered")
        assert [received[i].json() for i in ids] == list(range(10, 510))
        assert all(received[i].sender == "web" for i in ids)
        # The handler was subscribed again on the second broker (the flush
        # returns once it answered everything sent before, the SUBSCRIBE too).
        await todo.flush()
        assert (await web.request("todo.create", "second")).json() == {"on": "second"}
        later = await web.publish("load.tick", 510)
        await eventually(lambda: later in received)

        # The first broker back, the second killed: round to the first.
        first.start()
        second.kill9()
        await eventually(
            lambda: all(c.is_connected and c.broker_address == first.addr for c in clients),
            what="every client back on the first broker",
        )
        await todo.flush()
        assert (await web.request("todo.create", "third")).json() == {"on": "third"}


async def test_a_reconnect_starts_after_the_broker_connected_to_last(start_broker: Callable[..., Broker]) -> None:
    brokers = [start_broker(), start_broker(), start_broker()]
    addrs = [b.addr for b in brokers]
    async with connect(",".join(addrs), "web", reconnect_delay_max=0.2) as web:
        assert web.broker_address == addrs[0]
        # Each broker killed while the others run: the client goes on to the
        # one after it, not back to the first written.
        for dead, expected in ((0, 1), (1, 2), (2, 0)):
            brokers[dead].kill9()
            await eventually(
                lambda: web.is_connected and web.broker_address != addrs[dead], what=f"moved off {addrs[dead]}"
            )
            assert web.broker_address == addrs[expected]
            await web.publish("note.taken")
            brokers[dead].start()
