// The client against a real broker: sending, requests and streams,
// handlers with ack and nack, activities, flow control, closing.

import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { after, before, describe, test } from "node:test";

import {
  Client,
  ClosedError,
  IncomingMessage,
  Nack,
  RefusedError,
  TimeoutError,
  currentActivity,
  withActivity,
  type ClientOptions,
} from "../src/index.js";
import { Broker, eventually, signal } from "./broker.js";

let broker: Broker;
const clients: Client[] = [];

async function connect(service: string, options: Partial<ClientOptions> = {}): Promise<Client> {
  const client = await Client.connect({ url: broker.addr, service, logger: null, ...options });
  clients.push(client);
  return client;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

before(async () => {
  // On disk, as by default: retained events can be replayed.
  broker = await Broker.start();
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await broker.stop();
});

describe("sending", () => {
  test("a request gets the reply of the service that handles the command", async () => {
    const todo = await connect("todo");
    await todo.on("todo.create", async (msg) => {
      await msg.reply("todo.created", { ...msg.json<object>(), id: 1 });
    });
    const web = await connect("web");
    const reply = await web.request("todo.create", { text: "milk" });
    assert.equal(reply.name, "todo.created");
    assert.deepEqual(reply.json(), { text: "milk", id: 1 });
    assert.equal(reply.sender, "todo", "the broker names the sender");
    assert.equal(reply.final, true);
    assert.equal(reply.header("content-type"), "application/json");
    // A new activity is named after the command that starts it.
    assert.equal(reply.activityId, reply.responseTo);
    assert.equal(web.service, "web");
  });

  test("send and publish carry every option to the handler", async () => {
    const inbox = await connect("inbox");
    const got: IncomingMessage[] = [];
    await inbox.on("inbox.>", (msg) => {
      got.push(msg);
    });
    const sender = await connect("outbox");
    const id = "01890a5d-ac96-774b-bcce-b302099a8057";
    const sent = await sender.send("inbox.put", Buffer.from([1, 2, 3]), {
      id,
      key: "user-1",
      ttlMs: 60_000,
      delayMs: 1,
      headers: { traceparent: "00-abc-def-01" },
      version: "2.3",
    });
    assert.equal(sent, id);
    const published = await sender.publish("inbox.noted", "text as JSON", { headers: [["x-a", "1"]] });
    await eventually("both arrived", () => got.length === 2);
    const put = got.find((m) => m.name === "inbox.put")!;
    assert.equal(put.kind, "command");
    assert.equal(put.id, id);
    assert.deepEqual([...put.payload], [1, 2, 3]);
    assert.equal(put.header("content-type"), undefined, "raw bytes carry no content-type");
    assert.equal(put.header("traceparent"), "00-abc-def-01");
    assert.equal(put.key?.toString(), "user-1");
    assert.deepEqual(put.envelope.version, { major: 2, minor: 3 });
    assert.ok(put.envelope.expiresAt! > BigInt(Date.now()) * 1_000_000n);
    assert.ok(put.envelope.deliverAt !== undefined);
    assert.equal(put.sender, "outbox");
    assert.equal(put.attempt, 1);
    assert.ok(Math.abs(put.timestamp.getTime() - Date.now()) < 60_000);
    const noted = got.find((m) => m.name === "inbox.noted")!;
    assert.equal(noted.kind, "event");
    assert.equal(noted.id, published);
    assert.equal(noted.json(), "text as JSON");
    assert.equal(noted.header("x-a"), "1");
  });

  test("a second send with an accepted id is acknowledged and not delivered again", async () => {
    const got: string[] = [];
    await (await connect("dedup-sink")).on("dedup.happened", (msg) => {
      got.push(msg.id);
    });
    const sender = await connect("dedup-source");
    const id = "01890a5d-ac96-774b-bcce-b302099a8058";
    await sender.publish("dedup.happened", { n: 1 }, { id });
    await sender.publish("dedup.happened", { n: 2 }, { id });
    await sender.publish("dedup.happened", { n: 3 });
    await eventually("the third arrived", () => got.length >= 2);
    await sender.flush();
    assert.deepEqual(got.filter((g) => g === id).length, 1);
  });

  test("events fan out to every subscribed service", async () => {
    const seen: string[] = [];
    for (const service of ["fan-a", "fan-b"]) {
      await (await connect(service)).on("fan.out", () => {
        seen.push(service);
      });
    }
    await (await connect("fan-source")).publish("fan.out", {});
    await eventually("both services got it", () => seen.length === 2);
    assert.deepEqual(seen.sort(), ["fan-a", "fan-b"]);
  });

  test("an event nobody receives is accepted; a command nobody receives is refused with the broker's code and reason", async () => {
    const web = await connect("lonely");
    assert.match(await web.publish("nobody.listens", {}), /^[0-9a-f-]{36}$/);
    await assert.rejects(web.send("nobody.handles", {}), (e: unknown) => {
      assert.ok(e instanceof RefusedError);
      assert.equal(e.code, "no_receiver");
      assert.equal(e.wireCode, 6);
      assert.match(e.reason, /nobody\.handles/);
      return true;
    });
    await assert.rejects(web.request("nobody.handles", {}), (e: RefusedError) => e.code === "no_receiver");
    await assert.rejects(
      web.request("nobody.handles", {}, { transient: true }),
      (e: RefusedError) => e.code === "no_receiver",
      "a transient (quiet) request ends with the refusal too",
    );
    await assert.rejects(web.publish("too.late", {}, { ttlMs: 0 }), (e: RefusedError) => e.code === "expired");
  });

  test("bad input is refused before it is sent, naming the fix", async () => {
    const web = await connect("careless");
    await assert.rejects(web.send("Todo.Create", {}), /character "T" at byte 0/);
    assert.throws(() => web.enqueue("event", "a..b"), /empty segment/);
    await assert.rejects(web.send("big.one", Buffer.alloc(8 * 1024 * 1024)), (e: RefusedError) => e.code === "payload_too_large");
    await assert.rejects(web.publish("x.y", {}, { id: "not-a-uuid" }), /not a UUID/);
    await assert.rejects(web.publish("x.y", {}, { version: "one" }), /MAJOR\.MINOR/);
    await assert.rejects(web.on("todo.>.x", () => {}), /'>' before its last segment/);
  });

  test("enqueue pipelines sends: the id at once, the acceptance later, in order", async () => {
    const got: number[] = [];
    await (await connect("pipe-sink")).on("pipe.item", (msg) => {
      got.push(msg.json<{ i: number }>().i);
    });
    const source = await connect("pipe-source");
    const acks = Array.from({ length: 500 }, (_, i) => source.enqueue("event", "pipe.item", { i }));
    assert.equal(new Set(acks.map((a) => a.id)).size, 500);
    const ids = await Promise.all(acks);
    assert.deepEqual(ids, acks.map((a) => a.id));
    await eventually("all 500 delivered", () => got.length === 500);
    assert.deepEqual(new Set(got).size, 500);
  });

  test("quiet sends are answered only when refused; flush confirms the rest", async () => {
    let count = 0;
    await (await connect("quiet-sink")).on("quiet.tick", () => {
      count++;
    });
    const source = await connect("quiet-source");
    for (let i = 0; i < 1000; i++) {
      await source.publish("quiet.tick", { i }, { transient: true, quiet: true });
    }
    await source.flush();
    assert.equal(source.unheardRefusals, 0);
    await source.send("quiet.nobody", {}, { quiet: true });
    await source.flush();
    assert.equal(source.unheardRefusals, 1);
    assert.equal(source.lastUnheardRefusal?.code, "no_receiver");
    await eventually("the transient events arrived", () => count === 1000);
  });

  test("a request stream yields replies until the final one", async () => {
    await (await connect("files")).on("file.copy", async (msg) => {
      for (const pct of [25, 50, 75]) {
        await msg.reply("file.copy.progress", { pct }, { final: false });
      }
      await msg.reply("file.copy.done", { pct: 100 });
    });
    const web = await connect("copier");
    const seen: Array<[string, boolean, number]> = [];
    const stream = web.requestStream("file.copy", { from: "a" });
    for await (const reply of stream) {
      seen.push([reply.name, reply.final, reply.json<{ pct: number }>().pct]);
      assert.equal(reply.responseTo, stream.commandId);
    }
    assert.deepEqual(seen, [
      ["file.copy.progress", false, 25],
      ["file.copy.progress", false, 50],
      ["file.copy.progress", false, 75],
      ["file.copy.done", true, 100],
    ]);
  });

  test("a stream without a final reply ends with the timeout; requests time out and abort", async () => {
    await (await connect("stalls")).on("stall.>", async (msg) => {
      if (msg.name === "stall.partly") {
        await msg.reply("stall.progress", {}, { final: false });
      }
    });
    const web = await connect("impatient");
    const names: string[] = [];
    await assert.rejects(async () => {
      for await (const reply of web.requestStream("stall.partly", {}, { timeoutMs: 300 })) {
        names.push(reply.name);
      }
    }, (e: unknown) => e instanceof TimeoutError && e.timeoutMs === 300);
    assert.deepEqual(names, ["stall.progress"]);
    const started = Date.now();
    await assert.rejects(web.request("stall.forever", {}, { timeoutMs: 200 }), TimeoutError);
    assert.ok(Date.now() - started >= 190);
    const abort = new AbortController();
    const pending = web.request("stall.forever", {}, { signal: abort.signal });
    abort.abort();
    await assert.rejects(pending, { name: "AbortError" });
    // One signal for many requests: each answered request lets go of it.
    const shared = new AbortController();
    await (await connect("echoes")).on("echo.back", (msg) => msg.reply("echo.came", msg.json()));
    for (let i = 0; i < 3; i++) {
      assert.equal((await web.request("echo.back", i, { signal: shared.signal })).json(), i);
    }
    assert.equal(getEventListeners(shared.signal, "abort").length, 0);
  });

  test("a subscription new to the service can start at the beginning of retained events", async () => {
    const source = await connect("history-source");
    await source.publish("history.made", { n: 1 });
    await source.publish("history.made", { n: 2 });
    const got: number[] = [];
    await (await connect("historian")).on(
      "history.*",
      (msg) => {
        got.push(msg.json<{ n: number }>().n);
      },
      { from: "beginning" },
    );
    await eventually("the history was replayed", () => got.length === 2);
    assert.deepEqual(got, [1, 2]);
  });

  test("unsubscribe removes the subscription; a second time is refused", async () => {
    const client = await connect("quitter");
    await client.on("quit.now", () => {});
    await client.unsubscribe("quit.now");
    await assert.rejects(client.unsubscribe("quit.now"), (e: RefusedError) => e.code === "not_subscribed");
  });
});

describe("handlers", () => {
  test("throwing nacks and the message comes again; resolving acks", async () => {
    const attempts: number[] = [];
    const done = signal();
    await (await connect("flaky", { nackDelayMs: 50 })).on("flaky.work", (msg) => {
      attempts.push(msg.attempt);
      if (msg.attempt === 1) {
        throw new Error("first time fails");
      }
      done.resolve();
    });
    await (await connect("flaky-client")).send("flaky.work", {});
    await done.promise;
    await eventually("the acked message left the service's queue", () => {
      const state = broker.service("flaky");
      return state.backlog === 0 && state.in_flight === 0;
    });
    assert.equal(broker.service("flaky").dead_letters, 0);
    assert.deepEqual(attempts, [1, 2], "acked: not delivered again");
  });

  test("a Nack with a delay is redelivered no sooner", async () => {
    const times: number[] = [];
    const done = signal();
    await (await connect("patient")).on("patient.work", (msg) => {
      times.push(Date.now());
      if (msg.attempt === 1) {
        throw new Nack("bank down", { delayMs: 400 });
      }
      done.resolve();
    });
    await (await connect("patient-client")).send("patient.work", {});
    await done.promise;
    assert.equal(times.length, 2);
    assert.ok(times[1]! - times[0]! >= 390, `redelivered after ${times[1]! - times[0]!} ms`);
  });

  test("a handler may settle by hand, once", async () => {
    const attempts: number[] = [];
    const done = signal();
    await (await connect("manual")).on("manual.work", async (msg) => {
      attempts.push(msg.attempt);
      if (msg.attempt === 1) {
        msg.nack(0);
        assert.throws(() => msg.ack(), /already nacked/);
        return; // resolving does not ack what was nacked
      }
      msg.ack();
      assert.ok(msg.settled);
      done.resolve();
    });
    await (await connect("manual-client")).send("manual.work", {});
    await done.promise;
    await eventually("the acked message left the service's queue", () => broker.service("manual").backlog === 0);
    assert.deepEqual(attempts, [1, 2]);
  });

  test("everything sent while handling a message carries its activity", async () => {
    const audited: Array<[string, string]> = [];
    const parents: Array<string | undefined> = [];
    let placed = "";
    await (await connect("audit")).on("orders.*", (msg) => {
      audited.push([msg.name, msg.activityId]);
      parents.push(msg.parentId);
    });
    const orders = await connect("orders");
    await orders.on("order.place", async (msg) => {
      placed = msg.id;
      assert.equal(currentActivity(), msg.activityId);
      await sleep(10); // the activity survives awaits
      await orders.publish("orders.placed", {});
      setTimeout(() => void orders.publish("orders.audited", {}), 5);
      await msg.reply("order.accepted", {});
    });
    const shop = await connect("shop");
    const activity = "01890a5d-ac96-774b-bcce-b302099a8059";
    const reply = await withActivity(activity, () => shop.request("order.place", {}));
    assert.equal(reply.activityId, activity);
    await eventually("both events audited", () => audited.length === 2);
    assert.deepEqual(audited.map(([, a]) => a), [activity, activity]);
    // Each names the message whose handling caused it (protocol version 2 on).
    assert.deepEqual(parents, [placed, placed]);
    assert.equal(reply.parentId, placed, "a reply's parent is the command it answers");
    assert.equal(reply.parentId, reply.responseTo);
    assert.equal(currentActivity(), undefined);
    const own = await shop.publish("orders.other", {});
    await eventually("the unrelated event audited", () => audited.length === 3);
    assert.equal(audited[2]![1], own, "outside a handler a message starts its own activity");
    assert.equal(parents[2], undefined, "and has no parent");
  });

  test("no more handlers run at once than the concurrency allows", async () => {
    let running = 0;
    let most = 0;
    let done = 0;
    await (await connect("bounded", { concurrency: 2 })).on("bounded.job", async () => {
      running++;
      most = Math.max(most, running);
      await sleep(20);
      running--;
      done++;
    });
    const source = await connect("bounded-source");
    await Promise.all(Array.from({ length: 12 }, () => source.send("bounded.job", {})));
    await eventually("all jobs done", () => done === 12);
    assert.equal(most, 2);
  });

  test("the broker sends no more than max_in_flight unacknowledged deliveries; FLOW raises it", async () => {
    let running = 0;
    let most = 0;
    let done = 0;
    let gate: Promise<void> | null = null;
    const worker = await connect("flow-worker", { maxInFlight: 2, concurrency: 50 });
    await worker.on("flow.job", async () => {
      running++;
      most = Math.max(most, running);
      await (gate ?? sleep(30));
      running--;
      done++;
    });
    const source = await connect("flow-source");
    await Promise.all(Array.from({ length: 10 }, () => source.send("flow.job", {})));
    await eventually("the first jobs done", () => done === 10);
    assert.equal(most, 2, "max_in_flight of HELLO bounds the deliveries");
    // Held until released: exactly as many start as FLOW allows.
    let release!: () => void;
    gate = new Promise((r) => (release = r));
    most = 0;
    worker.setMaxInFlight(6);
    await Promise.all(Array.from({ length: 30 }, () => source.send("flow.job", {})));
    await eventually("six deliveries are held at once", () => running === 6);
    release();
    gate = null;
    await eventually("the next jobs done", () => done === 40);
    assert.equal(most, 6, "after FLOW 6, six at most");
  });

  test("close drains: running handlers finish and their acks go out; then sends are refused", async () => {
    const started = signal();
    let finished = false;
    const worker = await Client.connect({ url: broker.addr, service: "drainer", logger: null });
    await worker.on("drain.job", async () => {
      started.resolve();
      await sleep(200);
      finished = true;
    });
    await (await connect("drain-source")).send("drain.job", {});
    await started.promise;
    await worker.close();
    assert.ok(finished, "close waited for the running handler");
    assert.equal(worker.connected, false);
    await assert.rejects(worker.publish("drain.more", {}), ClosedError);
    // Acked before closing: nothing is left for another instance.
    await eventually("the broker saw the connection go", () => broker.service("drainer").instances.length === 0);
    const state = broker.service("drainer");
    assert.deepEqual([state.backlog, state.in_flight], [0, 0]);
  });
});
