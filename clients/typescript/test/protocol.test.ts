// The client's side of the protocol against a scripted broker (a socket
// server speaking through the codec): what the client writes, byte for
// byte, where a real broker would not show it — keep-alive, answering
// PINGs, giving up a silent connection, re-sending by id and seq.

import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { after, test } from "node:test";

import { Client, Nack } from "../src/index.js";
import { FrameReader, encodeFrame, type Frame } from "../src/codec.js";
import { eventually } from "./broker.js";

/** One connection to the scripted broker: the frames it got, and a way to answer. */
interface Peer {
  socket: Socket;
  frames: Frame[];
  send(frame: Frame): void;
}

/**
 * A scripted broker of one protocol version (1 unless told): answers HELLO
 * with WELCOME of that version (so the client speaks it), records
 * everything else.
 */
class ScriptedBroker {
  readonly peers: Peer[] = [];
  private server: Server;
  /** Whether to answer PINGs with PONGs. */
  answerPings = true;

  private constructor(
    server: Server,
    private readonly version: number,
  ) {
    this.server = server;
  }

  static async start(version = 1): Promise<ScriptedBroker> {
    const server = createServer();
    const broker = new ScriptedBroker(server, version);
    server.on("connection", (socket) => broker.accept(socket));
    await new Promise<void>((ready) => server.listen(0, "127.0.0.1", ready));
    return broker;
  }

  get addr(): string {
    const address = this.server.address();
    assert.ok(address !== null && typeof address === "object");
    return `127.0.0.1:${address.port}`;
  }

  private accept(socket: Socket): void {
    const reader = new FrameReader();
    reader.version = this.version;
    const peer: Peer = { socket, frames: [], send: (frame) => socket.write(encodeFrame(frame, this.version)) };
    this.peers.push(peer);
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      reader.push(chunk);
      for (let frame = reader.next(); frame !== null; frame = reader.next()) {
        peer.frames.push(frame);
        if (frame.type === "hello") {
          peer.send({ type: "welcome", version: this.version, connectionId: BigInt(this.peers.length), frameBytesMax: 1 << 20, broker: "scripted" });
        } else if (frame.type === "ping" && this.answerPings) {
          peer.send({ type: "pong", nonce: frame.nonce });
        }
      }
    });
  }

  async stop(): Promise<void> {
    for (const peer of this.peers) peer.socket.destroy();
    await new Promise((done) => this.server.close(done));
  }
}

const brokers: ScriptedBroker[] = [];
const clients: Client[] = [];

after(async () => {
  for (const c of clients) {
    void c.close();
  }
  await Promise.all(brokers.map((b) => b.stop()));
});

async function setup(
  options: Partial<Parameters<typeof Client.connect>[0]> = {},
  version = 1,
): Promise<{ broker: ScriptedBroker; client: Client }> {
  const broker = await ScriptedBroker.start(version);
  brokers.push(broker);
  const client = await Client.connect({
    url: broker.addr,
    service: "web",
    instance: "web-7",
    maxInFlight: 32,
    logger: null,
    drainTimeoutMs: 100,
    ...options,
  });
  clients.push(client);
  return { broker, client };
}

test("HELLO carries the service, instance, max_in_flight and token", async () => {
  const { broker, client } = await setup({ token: "crr_secret" });
  const hello = broker.peers[0]!.frames[0];
  // The client offers its newest version; this broker answers 1.
  assert.deepEqual(hello, { type: "hello", version: 4, service: "web", instance: "web-7", maxInFlight: 32, token: "crr_secret" });
  assert.equal(client.connection?.protocolVersion, 1);
  assert.equal(client.connection?.broker, "scripted");
  assert.equal(client.connection?.frameBytesMax, 1 << 20);
  // A message that would not fit the broker's frame limit is refused here.
  await assert.rejects(client.publish("too.big", Buffer.alloc(1 << 20)), { code: "payload_too_large" });
});

test("a PING from the broker is answered with its nonce; the client pings an idle connection", async () => {
  const { broker } = await setup({ pingIntervalMs: 50 });
  const peer = broker.peers[0]!;
  peer.send({ type: "ping", nonce: 0xfeed_beef_cafen });
  await eventually("the PONG came", () => peer.frames.some((f) => f.type === "pong"));
  assert.deepEqual(
    peer.frames.find((f) => f.type === "pong"),
    { type: "pong", nonce: 0xfeed_beef_cafen },
  );
  await eventually("keep-alive PINGs went out", () => peer.frames.filter((f) => f.type === "ping").length >= 2);
});

test("a connection on which nothing arrives is given up; the new one subscribes again and re-sends by seq and id", async () => {
  const { broker, client } = await setup({ pingIntervalMs: 40, idleTimeoutMs: 200, reconnectDelayMinMs: 10 });
  const first = broker.peers[0]!;
  const subscribed = client.on("todo.*", () => {});
  await eventually("SUBSCRIBE sent", () => first.frames.some((f) => f.type === "subscribe"));
  const subscribe = first.frames.find((f) => f.type === "subscribe");
  assert.ok(subscribe?.type === "subscribe");
  first.send({ type: "result", request: subscribe.request, code: 0, reason: "" });
  await subscribed;

  broker.answerPings = false; // silent from here on
  const sent = client.publish("todo.created", { n: 1 });
  await eventually("SEND written", () => first.frames.some((f) => f.type === "send"));
  const original = first.frames.find((f) => f.type === "send");
  assert.ok(original?.type === "send");

  await eventually("the client reconnected", () => broker.peers.length === 2, 5_000);
  const second = broker.peers[1]!;
  await eventually("the new connection subscribed and re-sent", () =>
    second.frames.some((f) => f.type === "send") && second.frames.some((f) => f.type === "subscribe"),
  );
  assert.equal(first.socket.destroyed || first.socket.readableEnded || first.socket.closed, true, "the silent connection was closed");
  const resent = second.frames.find((f) => f.type === "send");
  assert.ok(resent?.type === "send");
  assert.equal(resent.entries[0]!.seq, original.entries[0]!.seq, "same seq");
  assert.equal(resent.entries[0]!.message.id, original.entries[0]!.message.id, "same id");
  const resubscribe = second.frames.find((f) => f.type === "subscribe");
  assert.ok(resubscribe?.type === "subscribe" && resubscribe.pattern === "todo.*");

  second.send({ type: "send_result", entries: [{ seq: resent.entries[0]!.seq, code: 0, reason: "duplicate" }] });
  assert.equal(await sent, original.entries[0]!.message.id);
});

test("acks and nacks are batched; an unknown error code is still a refusal", async () => {
  const { broker, client } = await setup();
  const peer = broker.peers[0]!;
  const settled: string[] = [];
  const subscribed = client.on("job.*", (msg) => {
    settled.push(msg.name);
    if (msg.name === "job.fail") throw new Error("no");
  });
  await eventually("SUBSCRIBE sent", () => peer.frames.some((f) => f.type === "subscribe"));
  const subscribe = peer.frames.find((f) => f.type === "subscribe");
  assert.ok(subscribe?.type === "subscribe");
  peer.send({ type: "result", request: subscribe.request, code: 0, reason: "" });
  await subscribed;
  const message = (name: string, id: string) => ({
    kind: "command" as const,
    name,
    version: { major: 1, minor: 0 },
    id,
    activityId: id,
    timestamp: 1n,
    sender: "todo",
    transient: false,
    final: false,
    headers: [],
    payload: Buffer.from("{}"),
  });
  peer.send({
    type: "deliver",
    entries: [
      { delivery: 11n, attempt: 1, message: message("job.ok", "01890a5d-ac96-774b-bcce-b302099a8001") },
      { delivery: 12n, attempt: 1, message: message("job.ok", "01890a5d-ac96-774b-bcce-b302099a8002") },
      { delivery: 13n, attempt: 3, message: message("job.fail", "01890a5d-ac96-774b-bcce-b302099a8003") },
    ],
  });
  await eventually("settled", () => peer.frames.some((f) => f.type === "ack") && peer.frames.some((f) => f.type === "nack"));
  assert.deepEqual(peer.frames.find((f) => f.type === "ack"), { type: "ack", deliveries: [11n, 12n] }, "one ACK frame for both");
  assert.deepEqual(peer.frames.find((f) => f.type === "nack"), { type: "nack", entries: [{ delivery: 13n, delayMs: 1000 }] });

  const refused = client.send("job.ok", {});
  await eventually("SEND written", () => peer.frames.some((f) => f.type === "send"));
  const send = peer.frames.find((f) => f.type === "send");
  assert.ok(send?.type === "send");
  peer.send({ type: "send_result", entries: [{ seq: send.entries[0]!.seq, code: 999, reason: "a newer broker's reason" }] });
  await assert.rejects(refused, { code: "unknown", wireCode: 999, reason: "a newer broker's reason" });
});

test("an ERROR from the broker ends the connection and the client reconnects", async () => {
  const { broker, client } = await setup({ reconnectDelayMinMs: 10 });
  const disconnected: Error[] = [];
  client.events.on("disconnected", (e: Error) => disconnected.push(e));
  broker.peers[0]!.send({ type: "error", code: 19, message: "too slow" });
  await eventually("reconnected", () => broker.peers.length === 2 && client.connected);
  assert.equal((disconnected[0] as { code?: string }).code, "slow_consumer");
});

test("a long run of handlers that finish at once, queued behind a slow one, does not grow the stack", async () => {
  const { broker, client } = await setup({ concurrency: 1 });
  const peer = broker.peers[0]!;
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let handled = 0;
  // Only the first returns a promise; the rest finish within the call.
  const subscribed = client.on("burst.*", (msg) => {
    handled++;
    return msg.name === "burst.first" ? gate : undefined;
  });
  await eventually("SUBSCRIBE sent", () => peer.frames.some((f) => f.type === "subscribe"));
  const subscribe = peer.frames.find((f) => f.type === "subscribe");
  assert.ok(subscribe?.type === "subscribe");
  peer.send({ type: "result", request: subscribe.request, code: 0, reason: "" });
  await subscribed;
  const count = 20_000;
  const entries = Array.from({ length: count }, (_, i) => {
    const id = `01890a5d-ac96-774b-bcce-${(i + 1).toString(16).padStart(12, "0")}`;
    return {
      delivery: BigInt(i + 1),
      attempt: 1,
      message: {
        kind: "event" as const,
        name: i === 0 ? "burst.first" : "burst.next",
        version: { major: 1, minor: 0 },
        id,
        activityId: id,
        timestamp: 1n,
        sender: "src",
        transient: false,
        final: false,
        headers: [],
        payload: Buffer.alloc(0),
      },
    };
  });
  peer.send({ type: "deliver", entries });
  await eventually("the first handler holds the one slot", () => handled === 1);
  release();
  await eventually("every delivery was handled", () => handled === count);
  const acked = (): number =>
    peer.frames.reduce((n, f) => n + (f.type === "ack" ? f.deliveries.length : 0), 0);
  await eventually("every delivery was acked", () => acked() === count);
});

test("version 4: a key's deliveries go to the handler one at a time; after a nack its stale arrivals are dropped unsettled until the key start", async () => {
  const { broker, client } = await setup({ concurrency: 8, nackDelayMs: 0 }, 4);
  assert.equal(client.connection?.protocolVersion, 4);
  const peer = broker.peers[0]!;
  const handled: string[] = [];
  const subscribed = client.on("ledger.post", async (msg) => {
    const at = `${msg.key!.toString()}:${msg.text()}#${msg.attempt}`;
    handled.push(at);
    await new Promise((r) => setImmediate(r));
    if (at === "k:1#1") throw new Nack("nacked by the test", { delayMs: 0 });
  });
  await eventually("SUBSCRIBE sent", () => peer.frames.some((f) => f.type === "subscribe"));
  const subscribe = peer.frames.find((f) => f.type === "subscribe");
  assert.ok(subscribe?.type === "subscribe");
  peer.send({ type: "result", request: subscribe.request, code: 0, reason: "" });
  await subscribed;
  const START = 0x8000_0000;
  const entry = (delivery: bigint, key: string, n: number, attempt: number) => ({
    delivery,
    attempt,
    message: {
      kind: "command" as const,
      name: "ledger.post",
      version: { major: 1, minor: 0 },
      id: `01890a5d-ac96-774b-bcce-b30209${String(n).padStart(2, "0")}${key === "k" ? "aa" : "bb"}${String(delivery).padStart(2, "0")}`,
      activityId: "01890a5d-ac96-774b-bcce-b302099a8000",
      timestamp: 1n,
      sender: "web",
      key: Buffer.from(key),
      transient: false,
      final: false,
      headers: [],
      payload: Buffer.from(String(n)),
    },
  });
  // The key k pipelined (1, 2, 3) and another key j beside it.
  peer.send({
    type: "deliver",
    entries: [entry(1n, "k", 1, START + 1), entry(2n, "k", 2, 1), entry(3n, "k", 3, 1), entry(4n, "j", 1, START + 1)],
  });
  await eventually("k:1 nacked", () => peer.frames.some((f) => f.type === "nack"));
  assert.deepEqual(
    peer.frames.find((f) => f.type === "nack"),
    { type: "nack", entries: [{ delivery: 1n, delayMs: 0 }] },
  );
  // What of k was already on its way is stale (5); then the broker starts
  // k again from the nacked one, marked as a key start.
  peer.send({
    type: "deliver",
    entries: [entry(5n, "k", 4, 1), entry(6n, "k", 1, START + 2), entry(7n, "k", 2, 1), entry(8n, "k", 3, 1)],
  });
  const acked = (): bigint[] => peer.frames.flatMap((f) => (f.type === "ack" ? f.deliveries : []));
  await eventually("k handled again", () => acked().includes(8n));
  assert.deepEqual(
    handled.filter((h) => h.startsWith("k:")),
    ["k:1#1", "k:1#2", "k:2#1", "k:3#1"],
    "one at a time, in order; 2, 3 and the stale 4 never handled before the key start",
  );
  assert.ok(handled.includes("j:1#1"));
  assert.deepEqual([...acked()].sort(), [4n, 6n, 7n, 8n]);
  const nacked = peer.frames.flatMap((f) => (f.type === "nack" ? f.entries.map((e) => e.delivery) : []));
  assert.deepEqual(nacked, [1n], "no ACK or NACK for what the broker took back");
});
