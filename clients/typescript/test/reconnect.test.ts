// Reconnecting across a broker killed with SIGKILL and started again on
// the same data directory: subscriptions come back, unacknowledged sends
// are re-sent with their ids, nothing acknowledged is lost.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, ConnectionError, type ClientOptions } from "../src/index.js";
import { Broker, eventually, signal } from "./broker.js";

let broker: Broker;
const clients: Client[] = [];

async function connect(service: string, options: Partial<ClientOptions> = {}): Promise<Client> {
  const client = await Client.connect({
    url: broker.addr,
    service,
    logger: null,
    reconnectDelayMinMs: 20,
    reconnectDelayMaxMs: 200,
    // Some handlers here never finish: closing need not wait for them long.
    drainTimeoutMs: 500,
    ...options,
  });
  clients.push(client);
  return client;
}

function countConnects(client: Client): () => number {
  let n = 0;
  client.events.on("connected", () => n++);
  return () => n;
}

before(async () => {
  broker = await Broker.start();
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await broker.stop();
});

test("nothing acknowledged is lost across a kill -9 of the broker; sends made meanwhile go out after the reconnect", async () => {
  const got = new Set<string>();
  const sink = await connect("ledger");
  await sink.on("ledger.entry", (msg) => {
    got.add(msg.id);
  });
  const source = await connect("teller");
  const sinkConnects = countConnects(sink);
  const sourceConnects = countConnects(source);
  const acknowledged: string[] = [];
  const sends: Array<Promise<unknown>> = [];
  const publish = (from: number, to: number): void => {
    for (let i = from; i < to; i++) {
      sends.push(source.publish("ledger.entry", { i }).then((id) => acknowledged.push(id)));
    }
  };
  publish(0, 300);
  await Promise.all(sends);
  // Frozen, the broker answers nothing: these 300 are in flight when it dies.
  broker.freeze();
  publish(300, 600);
  await new Promise((r) => setImmediate(r)); // written to the socket
  await broker.kill();
  assert.equal(acknowledged.length, 300, "nothing was acknowledged after the freeze");
  await eventually("both clients saw the connection go", () => !source.connected && !sink.connected);
  publish(600, 700); // queued while the broker is down
  await broker.restart();
  await Promise.all(sends);
  assert.equal(acknowledged.length, 700, "every send was accepted in the end");
  assert.equal(sourceConnects(), 1, "the sender reconnected");
  await eventually("the receiver reconnected and resubscribed", () => sinkConnects() === 1);
  await eventually(
    "every acknowledged message was delivered",
    () => acknowledged.every((id) => got.has(id)),
    20_000,
  );
});

test("a durable command in a handler's hands when the broker dies is delivered again and answered", async () => {
  const firstAttempt = signal();
  const echo = await connect("echo");
  await echo.on("echo.say", async (msg) => {
    if (msg.attempt === 1) {
      firstAttempt.resolve();
      await new Promise(() => {}); // never answers: the broker dies first
    }
    await msg.reply("echo.said", msg.json());
  });
  const caller = await connect("caller");
  const reply = caller.request("echo.say", { words: "hello" }, { timeoutMs: 30_000 });
  await firstAttempt.promise;
  await broker.restart();
  const answered = await reply;
  assert.deepEqual(answered.json(), { words: "hello" });
  assert.equal(answered.sender, "echo");
});

test("a transient request fails at once when the connection is lost (it is never sent twice)", async () => {
  const started = signal();
  await (
    await connect("void")
  ).on("void.ask", async () => {
    started.resolve();
    await new Promise(() => {});
  });
  const asker = await connect("asker");
  const reply = asker.request("void.ask", {}, { transient: true, timeoutMs: 30_000 });
  await started.promise;
  const began = Date.now();
  const failed = assert.rejects(reply, (e: unknown) => e instanceof ConnectionError && /at most once/.test(e.message));
  await broker.restart();
  await failed;
  assert.ok(Date.now() - began < 10_000, "long before its timeout");
  // Quiet sends are not queued across reconnects either.
  await eventually("reconnected", () => asker.connected);
  await asker.flush();
});
