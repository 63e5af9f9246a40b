// W3C `traceparent`: reading and writing the header as the Rust SDK does,
// and the header of messages sent while handling others, through a real
// broker.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, IncomingMessage, TRACEPARENT, TraceParent, withActivity, type ClientOptions } from "../src/index.js";
import type { Message } from "../src/codec.js";
import { Broker, eventually } from "./broker.js";

const W3C = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/** The last 8 bytes of a UUID, as 16 hex digits. */
const lastEight = (id: string): string => id.replaceAll("-", "").slice(16).toLowerCase();

function envelope(fields: Partial<Message>): Message {
  return {
    kind: "command",
    name: "a.b",
    version: { major: 1, minor: 0 },
    id: "01890a5d-ac96-774b-bcce-b302099a8057",
    activityId: "01890a5d-ac96-774b-bcce-b302099a8057",
    timestamp: 0n,
    sender: "",
    responseTo: undefined,
    key: undefined,
    expiresAt: undefined,
    deliverAt: undefined,
    parentId: undefined,
    transient: false,
    final: false,
    headers: [],
    payload: Buffer.alloc(0),
    ...fields,
  };
}

describe("TraceParent", () => {
  test("parses and writes the W3C examples", () => {
    const t = TraceParent.parse(W3C);
    assert.ok(t !== undefined);
    assert.equal(t.traceId, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert.equal(t.spanId, "00f067aa0ba902b7");
    assert.equal(t.flags, 1);
    assert.equal(t.toHeader(), W3C);
    assert.equal(TraceParent.parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), undefined);
    assert.equal(TraceParent.parse(`  ${W3C}\t`)?.toHeader(), W3C, "spaces around are trimmed");
    // Trimmed as Rust's str::trim does (Unicode White_Space).
    assert.equal(TraceParent.parse(`\u0085${W3C}\u3000`)?.toHeader(), W3C);
    assert.equal(TraceParent.parse(`\ufeff${W3C}`), undefined, "a byte order mark is no space");
    assert.equal(TraceParent.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0a")?.toHeader().slice(-3), "-0a");
  });

  test("a future version is read by its version-00 fields", () => {
    const future = TraceParent.parse(`01${W3C.slice(2)}-more`);
    assert.equal(future?.toHeader(), W3C, "written back as version 00");
    assert.equal(TraceParent.parse(`cc${W3C.slice(2)}`)?.toHeader(), W3C, "at exactly 55 characters too");
    assert.equal(TraceParent.parse(`01${W3C.slice(2)}more`), undefined, "what follows must start with '-'");
  });

  test("malformed values, version ff and all-zero ids are not read", () => {
    for (const bad of [
      "",
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
      "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0G",
      "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u00e9",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b\u00e9-01",
      "00-abc-def-01",
    ]) {
      assert.equal(TraceParent.parse(bad), undefined, JSON.stringify(bad));
    }
  });

  test("a message's trace is its traceparent, else its activity's", () => {
    const handled = envelope({ id: "01890a5d-ac96-774b-bcce-b302099a8057", activityId: "01890a5d-0000-7000-8000-00000000abcd" });
    const root = TraceParent.of(handled);
    assert.equal(root.traceId, handled.activityId.replaceAll("-", ""), "without a header, the activity is the trace");
    assert.equal(root.spanId, lastEight(handled.id));
    assert.equal(root.flags, 1, "sampled");

    const sent = "01890a5d-ac97-7000-9123-456789abcdef";
    const child = root.child(sent);
    assert.equal(child.traceId, root.traceId);
    assert.equal(child.spanId, "9123456789abcdef", "the last 8 bytes of the new message's id");
    assert.notEqual(child.spanId, root.spanId);

    const carried = TraceParent.of(
      envelope({ headers: [["traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"]] }),
    );
    assert.equal(carried.traceId, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert.equal(carried.child(sent).flags, 0, "flags carry over");
    assert.equal(carried.child(sent).toHeader(), "00-4bf92f3577b34da6a3ce929d0e0e4736-9123456789abcdef-00");

    const invalid = TraceParent.of(envelope({ headers: [["traceparent", "00-abc-def-01"]] }));
    assert.equal(invalid.traceId, "01890a5dac96774bbcceb302099a8057", "an invalid header counts as none");

    // Ids in upper case are written in lower case; nil ids give nonzero ones.
    assert.equal(root.child("01890A5D-AC97-7000-9123-456789ABCDEF").spanId, "9123456789abcdef");
    assert.equal(root.child("01890a5d-ac97-7000-0000-000000000000").spanId, "0000000000000001");
    const nil = "00000000-0000-0000-0000-000000000000";
    assert.equal(TraceParent.of(envelope({ id: nil, activityId: nil })).toHeader(), `00-${"0".repeat(31)}1-${"0".repeat(15)}1-01`);
  });

  test("the constructor takes only what the header can carry", () => {
    assert.equal(new TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1).toHeader(), W3C);
    assert.throws(() => new TraceParent("4BF92F3577B34DA6A3CE929D0E0E4736", "00f067aa0ba902b7", 1), RangeError);
    assert.throws(() => new TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "0000000000000000", 1), RangeError);
    assert.throws(() => new TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 256), RangeError);
  });
});

describe("traceparent of messages sent while handling", () => {
  let broker: Broker;
  const clients: Client[] = [];

  async function connect(service: string, options: Partial<ClientOptions> = {}): Promise<Client> {
    const client = await Client.connect({ url: broker.addr, service, logger: null, ...options });
    clients.push(client);
    return client;
  }

  before(async () => {
    broker = await Broker.start({ inMemory: true });
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await broker.stop();
  });

  test("an event published while handling a command continues the command's trace", async () => {
    const commands: IncomingMessage[] = [];
    const events: IncomingMessage[] = [];
    await (await connect("audit")).on("shipped.*", (msg) => {
      events.push(msg);
    });
    const shipping = await connect("shipping");
    await shipping.on("shipment.book", async (msg) => {
      commands.push(msg);
      await shipping.publish("shipped.booked", {});
      if (msg.json<{ own?: boolean }>().own) {
        // A traceparent the handler sets itself is kept.
        await shipping.publish("shipped.noted", {}, { headers: { traceparent: W3C } });
      }
      await msg.reply("shipment.booking-taken", {});
    });
    const shop = await connect("shop");

    // A command that carries a traceparent (from an HTTP request, say).
    const given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    const reply = await shop.request("shipment.book", {}, { headers: { traceparent: given } });
    await eventually("the event arrived", () => events.length === 1);
    const booked = events[0]!;
    const context = TraceParent.parse(booked.header(TRACEPARENT)!);
    assert.ok(context !== undefined, `a valid traceparent: ${String(booked.header(TRACEPARENT))}`);
    assert.equal(context.traceId, "4bf92f3577b34da6a3ce929d0e0e4736", "the command's trace");
    assert.equal(context.flags, 0, "and its flags");
    assert.equal(context.spanId, lastEight(booked.id), "the span id is the last 8 bytes of the event's own id");
    assert.equal(booked.headers.filter(([k]) => k === TRACEPARENT).length, 1, "one header");
    assert.equal(booked.parentId, commands[0]!.id);
    const replied = TraceParent.parse(reply.header(TRACEPARENT) ?? "");
    assert.equal(replied?.toHeader(), `00-4bf92f3577b34da6a3ce929d0e0e4736-${lastEight(reply.id)}-00`, "a reply too");

    // A command without one started its activity: the trace is the activity.
    const second = await shop.request("shipment.book", { own: true });
    await eventually("both events arrived", () => events.length === 3);
    const command = commands[1]!;
    assert.equal(command.header(TRACEPARENT), undefined, "a message that starts an activity carries no header");
    assert.equal(command.activityId, command.id);
    const bookedAgain = events.find((e) => e.name === "shipped.booked" && e.parentId === command.id)!;
    assert.equal(
      bookedAgain.header(TRACEPARENT),
      `00-${command.activityId.replaceAll("-", "")}-${lastEight(bookedAgain.id)}-01`,
      "trace id = activity id, sampled",
    );
    const noted = events.find((e) => e.name === "shipped.noted")!;
    assert.equal(noted.header(TRACEPARENT), W3C, "the handler's own traceparent, unchanged");
    assert.equal(noted.headers.filter(([k]) => k === TRACEPARENT).length, 1);
    assert.equal(TraceParent.parse(second.header(TRACEPARENT)!)?.traceId, command.activityId.replaceAll("-", ""));

    // Joining an activity without handling anything adds no header either.
    const activity = "01890a5d-ac96-774b-bcce-b302099a8059";
    await withActivity(activity, () => shop.request("shipment.book", {}));
    await eventually("the third event arrived", () => events.length === 4);
    const third = commands[2]!;
    assert.equal(third.activityId, activity);
    assert.equal(third.header(TRACEPARENT), undefined);
    assert.equal(TraceParent.parse(events[3]!.header(TRACEPARENT)!)?.traceId, activity.replaceAll("-", ""));
  });
});
