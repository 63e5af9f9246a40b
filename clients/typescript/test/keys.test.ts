// Ordering keys on protocol version 4 (docs/PROTOCOL.md §8.4), against a
// real broker: a key's deliveries come pipelined, and the client hands them
// to its handler one at a time, in order, while other keys keep flowing.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, Nack, type ClientOptions } from "../src/index.js";
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
    // One handler here never finishes: closing need not wait for it long.
    drainTimeoutMs: 500,
    ...options,
  });
  clients.push(client);
  return client;
}

before(async () => {
  broker = await Broker.start();
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await broker.stop();
});

test("a key is pipelined to the client and handled one at a time", async () => {
  const handled: number[] = [];
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const ledger = await connect("pipelined-ledger", { maxInFlight: 16, concurrency: 16 });
  assert.equal(ledger.connection?.protocolVersion, 4, "HELLO offers version 4 and the broker speaks it");
  await ledger.on("ledger.post", async (msg) => {
    handled.push(msg.json<{ n: number }>().n);
    await gate;
  });
  const web = await connect("pipelined-web");
  for (let n = 0; n < 5; n++) {
    await web.send("ledger.post", { n }, { key: "account-7" });
  }
  // One in flight per key (versions 1 to 3) would stop at 1: on version 4
  // the broker sends the key's next ones ahead ...
  await eventually("5 of one key in flight", () => broker.service("pipelined-ledger").in_flight === 5);
  // ... and the client still gives its handler only the first.
  assert.deepEqual(handled, [0]);
  release();
  await eventually("all five handled", () => handled.length === 5);
  assert.deepEqual(handled, [0, 1, 2, 3, 4]);
  await eventually("all acked", () => broker.service("pipelined-ledger").in_flight === 0);
});

test("keys are handled in order each while others flow, and a nack starts its key again", async () => {
  const keys = ["account-0", "account-1", "account-2", "account-3"];
  const perKey = 40;
  // What the handler was given, per key.
  const seen = new Map<string, Array<{ n: number; attempt: number; nacked: boolean }>>(keys.map((k) => [k, []]));
  const active = new Set<string>();
  const overlaps: string[] = [];
  let peakKeys = 0;
  const ledger = await connect("ordered-ledger", { maxInFlight: 64, nackDelayMs: 0 });
  await ledger.on("ledger.post", async (msg) => {
    const { key, n } = msg.json<{ key: string; n: number }>();
    if (active.has(key)) overlaps.push(`${key} #${n} began while another of its key ran`);
    active.add(key);
    peakKeys = Math.max(peakKeys, active.size);
    try {
      // Give every other delivery a chance to start meanwhile.
      await new Promise((r) => setImmediate(r));
      const nacked = n % 7 === 3 && msg.attempt === 1;
      seen.get(key)!.push({ n, attempt: msg.attempt, nacked });
      if (nacked) throw new Nack("nacked by the test", { delayMs: 0 });
    } finally {
      active.delete(key);
    }
  });
  const web = await connect("ordered-web");
  const sends = [];
  for (let n = 0; n < perKey; n++) {
    for (const key of keys) {
      sends.push(web.enqueue("command", "ledger.post", { key, n }, { key }));
    }
  }
  await Promise.all(sends);
  await eventually("every message of every key handled", () =>
    keys.every((k) => seen.get(k)!.filter((c) => !c.nacked).length === perKey),
  );
  await eventually("all acked", () => broker.service("ordered-ledger").in_flight === 0);

  assert.deepEqual(overlaps, []);
  assert.ok(peakKeys > 1, "different keys are handled at the same time");
  for (const key of keys) {
    const calls = seen.get(key)!;
    assert.equal(calls[0]!.n, 0, key);
    // Strictly in order: after an ack the next message, after a nack the
    // same one again (the broker takes the later ones back and starts the
    // key from the nacked one).
    for (let i = 1; i < calls.length; i++) {
      const before = calls[i - 1]!;
      const call = calls[i]!;
      if (before.nacked) {
        assert.deepEqual([call.n, call.attempt], [before.n, 2], `${key}: ${JSON.stringify(calls)}`);
      } else {
        assert.equal(call.n, before.n + 1, `${key}: ${JSON.stringify(calls)}`);
      }
    }
    assert.deepEqual(
      calls.filter((c) => !c.nacked).map((c) => c.n),
      Array.from({ length: perKey }, (_, n) => n),
    );
    assert.equal(calls.filter((c) => c.nacked).length, Array.from({ length: perKey }, (_, n) => n).filter((n) => n % 7 === 3).length);
  }
});

test("a key held when the broker dies starts again from its first unacked message", async () => {
  const handled: number[] = [];
  const stuck = signal();
  const ledger = await connect("crashed-ledger");
  await ledger.on("ledger.post", async (msg) => {
    const { n } = msg.json<{ n: number }>();
    handled.push(n);
    if (n === 2 && msg.attempt === 1) {
      stuck.resolve();
      await new Promise(() => {}); // never answers: the broker dies first
    }
  });
  const web = await connect("crashed-web");
  for (let n = 0; n < 6; n++) {
    await web.send("ledger.post", { n }, { key: "account-7" });
  }
  await stuck.promise;
  // 0 and 1 acked; 2 with the handler, 3 to 5 pipelined behind it.
  await eventually("4 of the key in flight", () => broker.service("crashed-ledger").in_flight === 4);
  assert.deepEqual(handled, [0, 1, 2]);
  await broker.restart();
  await eventually("the key handled again", () => handled.length > 6 && handled[handled.length - 1] === 5, 20_000);
  await eventually("all acked", () => broker.service("crashed-ledger").in_flight === 0);
  // After the crash the key starts again from its first unacked message
  // (2) and goes on in order.
  const again = handled.slice(3);
  assert.ok(again[0]! <= 2, JSON.stringify(handled));
  assert.deepEqual(again, Array.from({ length: 6 - again[0]! }, (_, i) => again[0]! + i), JSON.stringify(handled));
});
