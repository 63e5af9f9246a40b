// This codec against the conformance vectors (docs/protocol-vectors.json,
// docs/PROTOCOL.md §12): every frame decoded and encoded, every malformed
// and incomplete input, the error code table, and every broker case played
// against a fresh `courier serve` through this codec.

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import * as net from "node:net";
import { join } from "node:path";
import { describe, test } from "node:test";

import {
  DecodeError,
  FRAME_BYTES_MAX_DEFAULT,
  FrameReader,
  PROTOCOL_VERSION,
  decodeFrame,
  encodeFrame,
  type Frame,
} from "../src/codec.js";
import { ERROR_CODES, errorCodeName } from "../src/errors.js";
import { Broker, removeDir, tempDir } from "./broker.js";
import {
  answerItems,
  canonical,
  frameFromJson,
  frameToJson,
  loadVectors,
  matches,
  type Json,
  type JsonObject,
} from "./vectors.js";

const vectors = loadVectors();

function list(key: string): JsonObject[] {
  const value = vectors[key];
  assert.ok(Array.isArray(value) && value.length > 0, `the vectors have a non-empty ${key} list`);
  // A vector of a newer protocol version than this codec speaks (it says
  // so in its own protocol_version) is not for it; every other one is read
  // at its own version.
  return (value as JsonObject[]).filter((v) => Number(v.protocol_version ?? 1) <= PROTOCOL_VERSION);
}

/** Without the `note`s meant for humans. */
function withoutNotes(value: Json): Json {
  if (Array.isArray(value)) return value.map(withoutNotes);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value)
        .filter(([k]) => k !== "note")
        .map(([k, v]) => [k, withoutNotes(v)]),
    );
  }
  return value;
}

function show(value: unknown): string {
  return JSON.stringify(value, (_, v: unknown) => (typeof v === "bigint" ? v.toString() : v));
}

function versionOf(vector: JsonObject): number {
  return Number(vector.protocol_version ?? 1);
}

function hexOf(item: JsonObject): Buffer {
  return Buffer.from(item.hex as string, "hex");
}

test("the vectors cover this client's protocol version", () => {
  assert.ok(Number(vectors.protocol_version) >= PROTOCOL_VERSION);
});

test("the error code table is the vectors' table", () => {
  const rows = list("error_codes");
  for (const row of rows) {
    assert.equal(errorCodeName(row.code as number), row.name, `code ${String(row.code)}`);
  }
  assert.equal(Object.keys(ERROR_CODES).length, rows.length, "no code this client knows is missing from the vectors");
});

describe("frames decode to their fields and encode to their bytes", () => {
  for (const vector of list("frames")) {
    test(vector.name as string, () => {
      const bytes = hexOf(vector);
      const expected = withoutNotes(vector.frame as Json);
      const version = versionOf(vector);
      const decoded = decodeFrame(bytes, FRAME_BYTES_MAX_DEFAULT, version);
      assert.ok(decoded !== null, "a whole frame");
      assert.equal(decoded.size, bytes.length, "the frame takes all the bytes");
      assert.deepEqual(canonical(frameToJson(decoded.frame)), canonical(expected));
      const frame: Frame = frameFromJson(expected as JsonObject, vector.name as string, version);
      assert.equal(encodeFrame(frame, version).toString("hex"), vector.hex);
    });
  }
});

describe("malformed bytes are refused as the vectors say", () => {
  for (const vector of list("malformed")) {
    test(vector.name as string, () => {
      const limit = (vector.frame_bytes_max as number | undefined) ?? FRAME_BYTES_MAX_DEFAULT;
      const check = (error: unknown): boolean => {
        assert.ok(error instanceof DecodeError, `a DecodeError, not ${String(error)}`);
        assert.equal(error.kind, vector.error, error.message);
        assert.equal(error.wireCode, vector.code);
        assert.equal(errorCodeName(error.wireCode), vector.code_name);
        if (vector.details !== undefined) {
          assert.deepEqual(canonical(error.details as Json), canonical(withoutNotes(vector.details)));
        }
        return true;
      };
      assert.throws(() => decodeFrame(hexOf(vector), limit, versionOf(vector)), check);
      const reader = new FrameReader(limit);
      reader.version = versionOf(vector);
      reader.push(hexOf(vector));
      assert.throws(() => reader.next(), check, "the stream reader agrees");
    });
  }
});

describe("incomplete bytes wait for more", () => {
  for (const vector of list("incomplete")) {
    test(vector.name as string, () => {
      const limit = (vector.frame_bytes_max as number | undefined) ?? FRAME_BYTES_MAX_DEFAULT;
      assert.equal(decodeFrame(hexOf(vector), limit, versionOf(vector)), null);
      const reader = new FrameReader(limit);
      reader.version = versionOf(vector);
      reader.push(hexOf(vector));
      assert.equal(reader.next(), null);
    });
  }
});

/** How long one connection may take to give its answers. */
const ANSWERS_TIMEOUT_MS = 10_000;

/**
 * The broker's answers on `socket` as answer items, and whether it closed
 * the connection: until it closes, or until `enough` items came.
 */
function answers(
  socket: net.Socket,
  enough: number | null,
  version: number,
): Promise<{ items: JsonObject[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const items: JsonObject[] = [];
    const reader = new FrameReader(0xffff_ffff);
    // Read at the HELLO's version until WELCOME settles it.
    reader.version = version;
    const done = (closed: boolean): void => {
      clearTimeout(timer);
      socket.removeAllListeners("data");
      resolve({ items, closed });
    };
    const timer = setTimeout(() => done(false), ANSWERS_TIMEOUT_MS);
    socket.on("data", (chunk: Buffer) => {
      reader.push(chunk);
      try {
        for (let frame = reader.next(); frame !== null; frame = reader.next()) {
          if (frame.type === "welcome") reader.version = frame.version;
          items.push(...answerItems(frame));
        }
      } catch (e) {
        clearTimeout(timer);
        reject(new Error(`the broker's frames decode: ${(e as Error).message}`));
        return;
      }
      if (enough !== null && items.length >= enough) done(false);
    });
    // A reset after the broker's ERROR and close counts as closed.
    socket.on("error", () => {});
    socket.on("close", () => done(true));
  });
}

/**
 * Closes a connection left open and waits until the broker closed its side
 * too: it forgets a connection (and takes back what it held) before it
 * closes it, so the next connection cannot race the last one's end.
 */
function closeAndWait(socket: net.Socket): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error("the broker did not close a connection the client closed")),
      ANSWERS_TIMEOUT_MS,
    );
    socket.on("close", () => {
      clearTimeout(timer);
      resolve();
    });
    socket.resume(); // what still comes is read and dropped
    socket.end();
  });
}

function allMatch(expected: Json[], got: JsonObject[], anyOrder: boolean): boolean {
  if (expected.length !== got.length) return false;
  if (!anyOrder) return expected.every((e, i) => matches(e, got[i], errorCodeName));
  const unused = [...got];
  return expected.every((e) => {
    const i = unused.findIndex((g) => matches(e, g, errorCodeName));
    if (i < 0) return false;
    unused.splice(i, 1);
    return true;
  });
}

describe("a real broker answers every broker case, through this codec", () => {
  const manifests = vectors.manifests as JsonObject;
  for (const vector of list("broker")) {
    test(vector.name as string, async () => {
      const dir = tempDir("conformance");
      const args = ((vector.serve as string[] | undefined) ?? []).slice();
      if (vector.manifest !== undefined) {
        const path = join(dir, "courier.toml");
        writeFileSync(path, manifests[vector.manifest as string] as string);
        args.push("--manifest", path);
      }
      const broker = await Broker.start({ args });
      try {
        const connections = vector.connections as JsonObject[];
        for (const [i, connection] of connections.entries()) {
          const send = connection.send as JsonObject[];
          // A connection speaks the version its HELLO asks for (the broker speaks them all).
          const hello = send.find((item) => (item.frame as JsonObject | undefined)?.type === "HELLO");
          const version = Number((hello?.frame as JsonObject | undefined)?.version ?? 1);
          const bytes = Buffer.concat(
            send.map((item, j) =>
              item.frame !== undefined
                ? encodeFrame(frameFromJson(item.frame as JsonObject, `connections[${i}].send[${j}]`, version), version)
                : hexOf(item),
            ),
          );
          const [host, port] = broker.addr.split(":");
          const socket = net.connect({ host: host!, port: Number(port) });
          await new Promise<void>((ready, fail) => {
            socket.once("connect", ready);
            socket.once("error", fail);
          });
          const expected = connection.expect as Json[];
          const closes = connection.then === "closed";
          const answered = answers(socket, closes ? null : expected.length, version);
          // The broker may close before taking everything (an oversized
          // length is refused from its 4 bytes): what it answered counts.
          socket.write(bytes);
          const { items, closed } = await answered;
          if (!closed) {
            await closeAndWait(socket);
          }
          socket.destroy();
          assert.ok(
            allMatch(expected, items, connection.any_order === true) && closed === closes,
            `connection ${i}: expected ${show(expected)}${closes ? ", then close" : ""}\n  got ${show(items)}${closed ? ", then close" : ""}`,
          );
        }
      } finally {
        await broker.stop();
        removeDir(dir);
      }
    });
  }
});
