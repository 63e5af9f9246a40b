// The codec against the worked examples of docs/PROTOCOL.md §10, round
// trips of every frame type, and every way a frame can be malformed.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  DecodeError,
  FrameReader,
  FrameWriter,
  decodeBody,
  decodeFrame,
  decodeMessage,
  encodeFrame,
  encodeMessage,
  encodedMessageLength,
  layoutMessage,
  type Frame,
  type Message,
} from "../src/codec.js";
import { patternMatches, validateName, validatePattern } from "../src/names.js";
import { isUuid, uuidv7 } from "../src/uuid.js";

function hex(text: string): Buffer {
  return Buffer.from(text.replace(/\s+/g, ""), "hex");
}

function decodeError(bytes: Buffer, frameBytesMax?: number, version?: number): DecodeError {
  try {
    decodeFrame(bytes, frameBytesMax, version);
  } catch (e) {
    assert.ok(e instanceof DecodeError, `a DecodeError, not ${String(e)}`);
    return e;
  }
  assert.fail("the bytes decoded without an error");
}

function sampleMessage(overrides: Partial<Message> = {}): Message {
  return {
    kind: "event",
    name: "todo.created",
    version: { major: 1, minor: 0 },
    id: "017f22e2-79b0-7cc3-98c4-dc0c0c07398f",
    activityId: "017f22e2-79b0-7cc3-98c4-dc0c0c073990",
    timestamp: 0n,
    sender: "",
    responseTo: undefined,
    key: Buffer.from("u1"),
    expiresAt: undefined,
    deliverAt: undefined,
    parentId: undefined,
    transient: false,
    final: false,
    headers: [],
    payload: Buffer.from("hi"),
    ...overrides,
  };
}

describe("worked examples of the protocol document", () => {
  test("HELLO with a token (§10.1)", () => {
    const bytes = hex(`00 00 00 1b 01 43 52 52 31 00 01 03 77 65 62 05
      77 65 62 2d 31 00 00 00 40 01 00 03 74 6f 6b`);
    const frame: Frame = { type: "hello", version: 1, service: "web", instance: "web-1", maxInFlight: 64, token: "tok" };
    assert.deepEqual(encodeFrame(frame), bytes);
    assert.deepEqual(decodeFrame(bytes), { frame, size: 31 });
  });

  test("HELLO without credentials is six bytes shorter (§10.1)", () => {
    const bytes = encodeFrame({ type: "hello", version: 1, service: "web", instance: "web-1", maxInFlight: 64 });
    assert.equal(bytes.readUInt32BE(0), 22);
    assert.equal(bytes[bytes.length - 1], 0);
  });

  test("WELCOME (§10.2)", () => {
    const bytes = hex(`00 00 00 17 02 00 01 00 00 00 00 00 00 00 01 00
      80 00 00 07 63 6f 75 72 69 65 72`);
    const frame: Frame = {
      type: "welcome",
      version: 1,
      connectionId: 1n,
      frameBytesMax: 8_388_608,
      broker: "courier",
      service: undefined,
    };
    assert.deepEqual(decodeFrame(bytes), { frame, size: 27 });
    assert.deepEqual(encodeFrame(frame), bytes);
  });

  test("WELCOME naming the authenticated service after the broker name", () => {
    // A broker that authenticated another service than HELLO named appends it.
    const bytes = hex(`00 00 00 1b 02 00 01 00 00 00 00 00 00 00 01 00
      80 00 00 07 63 6f 75 72 69 65 72 03 77 65 62`);
    const decoded = decodeFrame(bytes);
    assert.equal(decoded?.frame.type, "welcome");
    assert.equal(decoded?.frame.type === "welcome" && decoded.frame.service, "web");
    assert.deepEqual(encodeFrame(decoded!.frame), bytes);
  });

  test("SEND with one message (§10.3)", () => {
    const bytes = hex(`00 00 00 55 03 00 00 00 01 00 00 00 00 00 00 00
      01 02 08 0c 74 6f 64 6f 2e 63 72 65 61 74 65 64
      00 01 00 00 01 7f 22 e2 79 b0 7c c3 98 c4 dc 0c
      0c 07 39 8f 01 7f 22 e2 79 b0 7c c3 98 c4 dc 0c
      0c 07 39 90 00 00 00 00 00 00 00 00 00 00 02 75
      31 00 00 00 00 00 02 68 69`);
    const message = sampleMessage();
    assert.equal(encodedMessageLength(message), 72);
    const frame: Frame = { type: "send", entries: [{ seq: 1n, quiet: false, message }] };
    assert.deepEqual(encodeFrame(frame), bytes);
    assert.deepEqual(decodeFrame(bytes), { frame, size: 89 });
  });

  test("SEND_RESULT and ACK (§10.4)", () => {
    const result = hex(`00 00 00 11 04 00 00 00 01 00 00 00 00 00 00 00 01 00 00 00 00`);
    const frame: Frame = { type: "send_result", entries: [{ seq: 1n, code: 0, reason: "" }] };
    // Of version 1 (and 2): SEND_RESULT's log_seq came with version 3.
    assert.deepEqual(encodeFrame(frame, 1), result);
    assert.deepEqual(decodeFrame(result, undefined, 1)?.frame, frame);
    const ack = hex(`00 00 00 15 09 00 00 00 02 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 02`);
    assert.deepEqual(encodeFrame({ type: "ack", deliveries: [1n, 2n] }), ack);
    assert.deepEqual(decodeFrame(ack)?.frame, { type: "ack", deliveries: [1n, 2n] });
  });
});

describe("round trips", () => {
  const full = sampleMessage({
    kind: "reply",
    name: "file.copy.in-progress",
    version: { major: 2, minor: 7 },
    timestamp: 1_700_000_000_123_456_789n,
    sender: "files",
    responseTo: "017f22e2-79b0-7cc3-98c4-dc0c0c0739aa",
    key: Buffer.from([0, 255, 7]),
    expiresAt: 0xffff_ffff_ffff_ffffn,
    deliverAt: 1n,
    parentId: "017f22e2-79b0-7cc3-98c4-dc0c0c0739ab",
    transient: true,
    final: true,
    headers: [
      ["content-type", "application/json"],
      ["x-note", "grüße ✓"],
      ["x-note", "duplicates keep their order"],
    ],
    payload: Buffer.from('{"pct":50}'),
  });
  const frames: Frame[] = [
    { type: "hello", version: 1, service: "todo", instance: "", maxInFlight: 0, token: undefined },
    { type: "send", entries: [{ seq: 0xffff_ffff_ffff_ffffn, quiet: true, message: full }, { seq: 2n, quiet: false, message: sampleMessage() }] },
    { type: "send_result", entries: [{ seq: 3n, code: 6, reason: "no service receives todo.create", logSeq: 0n }, { seq: 4n, code: 0, reason: "", logSeq: 42n }] },
    { type: "subscribe", request: 1n, pattern: "todo.>", ackDeadlineMs: 30_000, maxDeliveries: 5, start: { kind: "new" } },
    { type: "subscribe", request: 2n, pattern: "*.created", ackDeadlineMs: 0, maxDeliveries: 0, start: { kind: "beginning" } },
    { type: "subscribe", request: 3n, pattern: "a", ackDeadlineMs: 1, maxDeliveries: 1, start: { kind: "time", time: 42n } },
    { type: "unsubscribe", request: 4n, pattern: "todo.>" },
    { type: "result", request: 4n, code: 20, reason: "not subscribed" },
    { type: "deliver", entries: [{ delivery: 9n, attempt: 2, message: { ...full, transient: false } }] },
    { type: "nack", entries: [{ delivery: 9n, delayMs: 1500 }] },
    { type: "flow", maxInFlight: 1024 },
    { type: "ping", nonce: 7n },
    { type: "pong", nonce: 7n },
    { type: "error", code: 19, message: "slow consumer" },
    { type: "drain" },
    { type: "drained" },
  ];
  for (const frame of frames) {
    test(`${frame.type} decodes to what was encoded`, () => {
      const bytes = encodeFrame(frame);
      assert.equal(bytes.readUInt32BE(0), bytes.length - 4);
      const decoded = decodeFrame(bytes);
      assert.deepEqual(decoded, { frame, size: bytes.length });
      assert.deepEqual(encodeFrame(decoded!.frame), bytes, "one encoding per frame");
    });
  }

  test("a message alone decodes to what was encoded", () => {
    assert.deepEqual(decodeMessage(encodeMessage(full)), full);
    assert.equal(encodeMessage(full).length, encodedMessageLength(full));
    const smallest = sampleMessage({ name: "", key: undefined, payload: Buffer.alloc(0) });
    assert.equal(encodeMessage(smallest).length, 54, "the smallest message is 54 bytes");
  });

  test("reasons longer than a str16 are cut at a character boundary", () => {
    const reason = "é".repeat(40_000); // 80 000 bytes
    const bytes = encodeFrame({ type: "error", code: 14, message: reason });
    const decoded = decodeFrame(bytes)?.frame;
    assert.equal(decoded?.type, "error");
    const message = decoded?.type === "error" ? decoded.message : "";
    assert.equal(Buffer.byteLength(message), 65_534);
    assert.equal(message, "é".repeat(32_767));
  });

  test("strings too long for their prefix are refused", () => {
    assert.throws(() => encodeMessage(sampleMessage({ name: "a".repeat(256) })), /name is 256 bytes; at most 255/);
    const headers = Array.from({ length: 65 }, (_, i): [string, string] => [`h${i}`, "v"]);
    assert.throws(() => encodeMessage(sampleMessage({ headers })), /65 headers; at most 64/);
  });
});

describe("the writer batches", () => {
  test("consecutive entries of one type share a frame; any other frame closes it", () => {
    const w = new FrameWriter();
    const message = encodeMessage(sampleMessage());
    w.pushSend(1n, message);
    w.pushSend(2n, message, true);
    w.pushAck(5n);
    w.pushAck(6n);
    w.push({ type: "ping", nonce: 1n });
    w.pushAck(7n);
    const reader = new FrameReader();
    reader.push(w.take()!);
    const send = reader.next();
    assert.equal(send?.type, "send");
    assert.deepEqual(
      send?.type === "send" && send.entries.map((e) => [e.seq, e.quiet, e.message.transient]),
      [
        [1n, false, false],
        [2n, true, false],
      ],
    );
    assert.deepEqual(reader.next(), { type: "ack", deliveries: [5n, 6n] });
    assert.deepEqual(reader.next(), { type: "ping", nonce: 1n });
    assert.deepEqual(reader.next(), { type: "ack", deliveries: [7n] });
    assert.equal(reader.next(), null);
    assert.equal(w.take(), null, "the writer starts afresh");
  });

  test("a message encoded in place is the message encoded on its own", () => {
    const message = sampleMessage({ headers: [["a", "ü"]], responseTo: "017f22e2-79b0-7cc3-98c4-dc0c0c0739aa", kind: "reply", final: true });
    const inPlace = new FrameWriter();
    inPlace.pushSendMessage(3n, message, layoutMessage(message, 0x40));
    const copied = new FrameWriter();
    copied.pushSend(3n, encodeMessage(message), true);
    assert.deepEqual(inPlace.take(), copied.take());
  });

  test("a batch frame takes entries while it holds less than 256 KiB", () => {
    const w = new FrameWriter();
    const message = encodeMessage(sampleMessage({ payload: Buffer.alloc(1000) }));
    for (let i = 1; i <= 600; i++) {
      w.pushSend(BigInt(i), message);
    }
    const reader = new FrameReader();
    reader.push(w.take()!);
    const counts: number[] = [];
    for (let frame = reader.next(); frame !== null; frame = reader.next()) {
      assert.equal(frame.type, "send");
      counts.push(frame.type === "send" ? frame.entries.length : 0);
    }
    assert.equal(counts.reduce((a, b) => a + b), 600);
    assert.ok(counts.length === 3, `600 entries of ~1.1 KB make 3 frames: ${counts.join(",")}`);
  });
});

describe("the reader", () => {
  test("takes frames split anywhere, and several frames in one chunk", () => {
    const w = new FrameWriter();
    w.push({ type: "ping", nonce: 1n });
    w.pushSend(1n, encodeMessage(sampleMessage()));
    w.push({ type: "drained" });
    const bytes = w.take()!;
    const reader = new FrameReader();
    const frames: Frame[] = [];
    for (let i = 0; i < bytes.length; i++) {
      reader.push(bytes.subarray(i, i + 1));
      for (let f = reader.next(); f !== null; f = reader.next()) frames.push(f);
    }
    assert.deepEqual(
      frames.map((f) => f.type),
      ["ping", "send", "drained"],
    );
    assert.equal(reader.pending, 0);
  });

  test("checks the length prefix before buffering the frame", () => {
    const reader = new FrameReader(1024);
    reader.push(hex("00 00 04 01 08"));
    assert.throws(() => reader.next(), (e: DecodeError) => e.kind === "FrameTooLarge" && e.wireCode === 2);
  });
});

describe("malformed frames", () => {
  const cases: Array<[string, string, DecodeError["kind"]]> = [
    ["length 0", "00 00 00 00", "EmptyFrame"],
    ["unknown type", "00 00 00 01 11", "UnknownFrameType"],
    ["truncated body", "00 00 00 05 0c 00 00 00 00", "UnexpectedEof"],
    ["trailing bytes", "00 00 00 0a 0c 00 00 00 00 00 00 00 01 ff", "TrailingBytes"],
    ["invalid UTF-8", "00 00 00 07 0e 00 01 00 02 c3 28", "InvalidUtf8"],
    ["bad magic", "00 00 00 0e 01 43 52 52 32 00 01 00 00 00 00 00 40 00", "BadMagic"],
    ["unknown credentials", "00 00 00 0e 01 43 52 52 31 00 01 00 00 00 00 00 40 02", "UnknownCredentials"],
    ["empty batch", "00 00 00 05 09 00 00 00 00", "EmptyBatch"],
    ["a count more than the body holds", "00 00 00 0d 09 00 00 00 02 00 00 00 00 00 00 00 01", "TooManyEntries"],
    ["unknown start", `00 00 00 1c 05 ${"00 ".repeat(7)}01 01 61 00 00 00 00 00 00 00 00 03 ${"00 ".repeat(8)}`, "UnknownStart"],
    ["a start time with start 0", `00 00 00 1c 05 ${"00 ".repeat(7)}01 01 61 00 00 00 00 00 00 00 00 00 ${"00 ".repeat(7)}01`, "StrayStartTime"],
  ];
  for (const [what, bytes, kind] of cases) {
    test(what, () => {
      const error = decodeError(hex(bytes));
      assert.equal(error.kind, kind, error.message);
      assert.equal(error.wireCode, 1);
    });
  }

  test("a frame over the limit is code 2", () => {
    const error = decodeError(hex("00 80 00 01 0c"));
    assert.equal(error.kind, "FrameTooLarge");
    assert.equal(error.wireCode, 2);
  });

  function sendWith(patch: (message: Buffer) => Buffer): Buffer {
    const message = patch(encodeMessage(sampleMessage({ key: undefined })));
    const w = new FrameWriter();
    w.pushSend(1n, message);
    return w.take()!;
  }

  test("unknown kind and flags", () => {
    assert.equal(decodeError(sendWith((m) => Buffer.concat([Buffer.from([4]), m.subarray(1)]))).kind, "UnknownKind");
    // Bit 7 is PARENT_ID from version 2 on: 16 bytes of it are read from what follows.
    assert.equal(decodeError(sendWith((m) => ((m[1] = 0x80), m)), undefined, 1).kind, "UnknownFlags");
    assert.equal(decodeError(sendWith((m) => ((m[1] = 0x80), m)), undefined, 2).kind, "UnexpectedEof");
  });

  test("QUIET outside a SEND entry", () => {
    const w = new FrameWriter();
    const message = encodeMessage(sampleMessage());
    message[1]! |= 0x40;
    w.pushDelivery(1n, 1, message);
    assert.equal(decodeError(w.take()!).kind, "UnknownFlags");
    assert.throws(() => decodeMessage(message), (e: DecodeError) => e.kind === "UnknownFlags");
  });

  test("more than 64 headers", () => {
    const message = encodeMessage(sampleMessage({ key: undefined, headers: [] }));
    // header_count sits right before the payload's u32 length and 2 bytes.
    message.writeUInt16BE(65, message.length - 2 - 4 - 2);
    assert.throws(() => decodeMessage(message), (e: DecodeError) => e.kind === "TooManyHeaders");
  });
});

describe("names, patterns and ids", () => {
  test("names", () => {
    for (const good of ["todo.create", "file.copy.in-progress", "a_b.c-d.9", "x"]) {
      assert.doesNotThrow(() => validateName(good), good);
    }
    assert.throws(() => validateName(""), /name is empty/);
    assert.throws(() => validateName("a".repeat(256)), /256 bytes long; at most 255/);
    assert.throws(() => validateName("todo..create"), /empty segment/);
    assert.throws(() => validateName(".todo"), /empty segment/);
    assert.throws(() => validateName("Todo.create"), /character "T" at byte 0/);
    assert.throws(() => validateName("todo.*"), /character "\*" at byte 5/);
  });

  test("patterns", () => {
    for (const good of ["todo.*", "todo.>", ">", "*.created", "todo.create"]) {
      assert.doesNotThrow(() => validatePattern(good), good);
    }
    assert.throws(() => validatePattern("todo.>.x"), /'>' before its last segment/);
    assert.throws(() => validatePattern("todo.cr*"), /whole segment/);
  });

  test("matching", () => {
    assert.ok(patternMatches("todo.*", "todo.create"));
    assert.ok(!patternMatches("todo.*", "todo"));
    assert.ok(!patternMatches("todo.*", "todo.item.create"));
    assert.ok(patternMatches("todo.>", "todo.a"));
    assert.ok(patternMatches("todo.>", "todo.a.b.c"));
    assert.ok(!patternMatches("todo.>", "todo"));
    assert.ok(patternMatches(">", "anything.at.all"));
    assert.ok(patternMatches("*.created", "todo.created"));
    assert.ok(!patternMatches("todo.create", "todo.created"));
  });

  test("ids are distinct UUIDv7s carrying the current millisecond", () => {
    const before = Date.now();
    const ids = Array.from({ length: 1000 }, () => uuidv7());
    const after = Date.now();
    assert.equal(new Set(ids).size, 1000);
    for (const id of ids) {
      assert.ok(isUuid(id), id);
      assert.equal(id[14], "7", `version 7: ${id}`);
      assert.ok("89ab".includes(id[19]!), `variant 10: ${id}`);
      const ms = parseInt(id.slice(0, 8) + id.slice(9, 13), 16);
      assert.ok(ms >= before && ms <= after, `${ms} within [${before}, ${after}]`);
    }
  });

  test("a body without its length prefix decodes too", () => {
    assert.deepEqual(decodeBody(hex("0c 00 00 00 00 00 00 00 2a")), { type: "ping", nonce: 42n });
  });
});
