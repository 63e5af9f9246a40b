"""The `todo` service: keeps the todo list, answers `todos.list` and
`todo.create`, and publishes the event `todo.created` for whoever listens
(the notifier).

The same message contracts as the Rust todo service (examples/todo): a
`todo.create` carries `{"text": ...}`, the reply `todo.created` carries
`{"id": n, "text": ...}` and `todos.listing` carries `{"todos": [...]}`.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import courier_client
from courier_client import Incoming


class Store:
    def __init__(self) -> None:
        self.todos: list[dict[str, Any]] = []
        # Commands already executed, so a redelivered `todo.create` (the
        # sender retried, or we stopped before acking) creates nothing twice.
        self.done: dict[uuid.UUID, dict[str, Any]] = {}

    def create(self, command_id: uuid.UUID, text: str) -> tuple[dict[str, Any], bool]:
        existing = self.done.get(command_id)
        if existing is not None:
            return existing, False
        todo = {"id": len(self.todos) + 1, "text": text}
        self.todos.append(todo)
        self.done[command_id] = todo
        return todo, True


async def serve() -> None:
    store = Store()
    async with courier_client.connect_from_env(service="todo") as client:

        async def listing(msg: Incoming) -> None:
            await msg.reply("todos.listing", {"todos": store.todos})

        async def create(msg: Incoming) -> None:
            body = msg.json()
            text = body.get("text") if isinstance(body, dict) else None
            if not isinstance(text, str):
                raise ValueError('todo.create needs a JSON object {"text": "..."}')
            todo, new = store.create(msg.message.id, text)
            if new:
                await client.publish("todo.created", todo)
            await msg.reply("todo.created", todo)
            print(f"stored todo {todo['id']}: {text}", flush=True)

        await client.on("todos.list", listing)
        await client.on("todo.create", create)
        print("todo service ready", flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    # Leaving the block closes gracefully: running handlers finish, their
    # replies and acks go out; what was not handled stays with the bus.
    print("todo service stopped (drained)", flush=True)


def run() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    run()
