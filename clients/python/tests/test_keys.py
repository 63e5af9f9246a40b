"""Ordering keys on protocol version 4 (PROTOCOL.md §8.4), against a real
broker: a key's deliveries come pipelined, and the client hands them to
its handler one at a time, in order, while other keys keep flowing."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from support import Broker, eventually

from courier_client import Incoming, Nack, connect
from courier_client import protocol as p


def service_row(broker: Broker, name: str) -> dict[str, Any]:
    rows = [row for row in broker.cli_json("services") if row["name"] == name]
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    return row


async def test_a_key_is_pipelined_to_the_client_and_handled_one_at_a_time(broker: Broker) -> None:
    handled: list[int] = []
    release = asyncio.Event()
    async with (
        connect(broker.addr, "ledger", max_in_flight=16, max_concurrency=16) as ledger,
        connect(broker.addr, "web") as web,
    ):

        async def post(msg: Incoming) -> None:
            handled.append(msg.json()["n"])
            await release.wait()

        await ledger.on("ledger.post", post)
        for n in range(5):
            await web.send("ledger.post", {"n": n}, key="account-7")
        # One in flight per key (versions 1 to 3) would stop at 1: on
        # version 4 the broker sends the key's next ones ahead ...
        await eventually(lambda: service_row(broker, "ledger")["in_flight"] == 5, what="5 of one key in flight")
        # ... and the client still gives its handler only the first.
        assert handled == [0]
        release.set()
        await eventually(lambda: handled == [0, 1, 2, 3, 4])
        await eventually(lambda: service_row(broker, "ledger")["in_flight"] == 0)


async def test_keys_are_handled_in_order_each_while_others_flow_and_nacks_start_a_key_again(broker: Broker) -> None:
    keys = [f"account-{k}" for k in range(4)]
    per_key = 40
    # What the handler was given, per key: (n, attempt, nacked).
    seen: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    active: set[str] = set()
    overlaps: list[str] = []
    peak_keys = 0
    async with (
        connect(broker.addr, "ledger", max_in_flight=64, nack_delay=0) as ledger,
        connect(broker.addr, "web") as web,
    ):

        async def post(msg: Incoming) -> None:
            nonlocal peak_keys
            body = msg.json()
            key, n = body["key"], body["n"]
            assert msg.message.key == key.encode()
            if key in active:
                overlaps.append(f"{key} #{n} began while another of its key ran")
            active.add(key)
            peak_keys = max(peak_keys, len(active))
            try:
                # Give every other delivery a chance to start meanwhile.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                nack = n % 7 == 3 and msg.attempt == 1
                seen[key].append((n, msg.attempt, nack))
                if nack:
                    raise Nack(delay=0)
            finally:
                active.discard(key)

        await ledger.on("ledger.post", post)
        sends = [
            web.command("ledger.post", {"key": key, "n": n}, key=key).enqueue()
            for n in range(per_key)
            for key in keys
        ]
        await asyncio.gather(*sends)

        def all_handled() -> bool:
            return all(sum(1 for _, _, nacked in seen[k] if not nacked) == per_key for k in keys)

        await eventually(all_handled, what="every message of every key handled")
        await eventually(lambda: service_row(broker, "ledger")["in_flight"] == 0)

    assert overlaps == []
    assert peak_keys > 1, "different keys are handled at the same time"
    for key in keys:
        calls = seen[key]
        # Strictly in order: after an ack the next message, after a nack the
        # same one again (the broker takes the later ones back and starts
        # the key from the nacked one).
        assert calls[0][0] == 0, (key, calls[:5])
        for (n, _, nacked), (following, attempt, _) in zip(calls, calls[1:]):
            if nacked:
                assert (following, attempt) == (n, 2), (key, n, calls)
            else:
                assert following == n + 1, (key, n, calls)
        assert [n for n, _, nacked in calls if not nacked] == list(range(per_key))
        assert sum(1 for _, _, nacked in calls if nacked) == len([n for n in range(per_key) if n % 7 == 3])


async def test_a_key_held_when_the_broker_dies_starts_again_from_its_first_unacked_message(broker: Broker) -> None:
    handled: list[int] = []
    never = asyncio.Event()
    async with (
        connect(broker.addr, "ledger", reconnect_delay_max=0.2, drain_timeout=0.5) as ledger,
        connect(broker.addr, "web", reconnect_delay_max=0.2) as web,
    ):

        async def post(msg: Incoming) -> None:
            n = msg.json()["n"]
            handled.append(n)
            if n == 2 and msg.attempt == 1:
                await never.wait()  # the broker dies first

        await ledger.on("ledger.post", post)
        for n in range(6):
            await web.send("ledger.post", {"n": n}, key="account-7")
        await eventually(lambda: handled == [0, 1, 2])
        # 0 and 1 acked; 2 with the handler, 3 to 5 pipelined behind it.
        await eventually(lambda: service_row(broker, "ledger")["in_flight"] == 4, what="4 of the key in flight")
        broker.kill9()
        await eventually(lambda: not ledger.is_connected, what="the client saw the crash")
        broker.start()
        await eventually(lambda: handled[-1:] == [5] and len(handled) > 6, timeout=20, what="the key handled again")
        await eventually(lambda: service_row(broker, "ledger")["in_flight"] == 0)
    # After the crash the key starts again from its first unacked message
    # (2) and goes on in order.
    again = handled[3:]
    assert again == list(range(again[0], 6)) and again[0] <= 2, handled


class ScriptedBroker:
    """A broker of protocol version 4 played by the test through the codec:
    answers HELLO with WELCOME and records every frame the client sends."""

    def __init__(self) -> None:
        self.frames: list[p.Frame] = []
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        buf = b""
        while chunk := await reader.read(65536):
            buf += chunk
            while (got := p.decode_frame(buf, version=4)) is not None:
                frame, used = got
                buf = buf[used:]
                self.frames.append(frame)
                if isinstance(frame, p.Hello):
                    self.send(p.Welcome(4, 1, 1 << 20, "scripted"))

    def send(self, frame: p.Frame) -> None:
        assert self.writer is not None
        self.writer.write(p.encode_frame(frame, 4))

    def of(self, kind: type[Any]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_stale_arrivals_of_a_nacked_key_are_dropped_unsettled_until_the_key_start() -> None:
    broker = ScriptedBroker()
    addr = await broker.start()
    handled: list[str] = []
    start = p.ATTEMPT_KEY_START
    try:
        # This broker answers no DRAIN: closing need not wait for it long.
        async with connect(
            addr, "ledger", nack_delay=0, max_concurrency=8, drain_timeout=0.2
        ) as ledger:

            async def post(msg: Incoming) -> None:
                assert msg.message.key is not None
                at = f"{msg.message.key.decode()}:{msg.text()}#{msg.attempt}"
                handled.append(at)
                await asyncio.sleep(0)
                if at == "k:1#1":
                    raise Nack(delay=0)

            subscribing = asyncio.ensure_future(ledger.on("ledger.post", post))
            await eventually(lambda: bool(broker.of(p.Subscribe)), what="SUBSCRIBE sent")
            broker.send(p.Result(broker.of(p.Subscribe)[0].request, 0))
            await subscribing

            def entry(delivery: int, key: str, n: int, attempt: int) -> p.Delivery:
                message = p.Message(p.Kind.COMMAND, "ledger.post", str(n).encode(), sender="web", timestamp=1)
                message.key = key.encode()
                return p.Delivery(delivery, attempt, message)

            # The key k pipelined (1, 2, 3) and another key j beside it.
            broker.send(
                p.Deliver(
                    [entry(1, "k", 1, start + 1), entry(2, "k", 2, 1), entry(3, "k", 3, 1), entry(4, "j", 1, start + 1)]
                )
            )
            await eventually(lambda: bool(broker.of(p.Nack)), what="k:1 nacked")
            assert [e.delivery for f in broker.of(p.Nack) for e in f.entries] == [1]
            # What of k was already on its way is stale (5); then the broker
            # starts k again from the nacked one, marked as a key start.
            broker.send(
                p.Deliver([entry(5, "k", 4, 1), entry(6, "k", 1, start + 2), entry(7, "k", 2, 1), entry(8, "k", 3, 1)])
            )

            def acked() -> list[int]:
                return [d for f in broker.of(p.Ack) for d in f.deliveries]

            await eventually(lambda: 8 in acked(), what="k handled again")
            assert [h for h in handled if h.startswith("k:")] == ["k:1#1", "k:1#2", "k:2#1", "k:3#1"]
            assert "j:1#1" in handled
            assert sorted(acked()) == [4, 6, 7, 8]
            assert [e.delivery for f in broker.of(p.Nack) for e in f.entries] == [1], "nothing taken back is settled"
    finally:
        await broker.stop()
