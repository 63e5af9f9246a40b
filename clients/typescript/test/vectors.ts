// Reading docs/protocol-vectors.json (docs/PROTOCOL.md §12): a lossless
// JSON reader (some integers exceed 2^53), and the vectors' frames as this
// codec's frames and back.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { Flag, type Frame, type Kind, type Message } from "../src/codec.js";

export type Json = null | boolean | number | bigint | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

const here = dirname(fileURLToPath(import.meta.url));
/** The vectors of this repository (this file runs from clients/typescript/dist/test). */
export const VECTORS_PATH = resolve(here, "..", "..", "..", "..", "docs", "protocol-vectors.json");

/**
 * JSON with integers beyond Number.MAX_SAFE_INTEGER as bigints (JSON.parse
 * would round them; a reviver sees them rounded already).
 */
export function parseJson(text: string): Json {
  let at = 0;
  const fail = (what: string): never => {
    throw new SyntaxError(`${what} at offset ${at} of ${VECTORS_PATH}`);
  };
  const space = (): void => {
    while (at < text.length && " \t\r\n".includes(text[at]!)) at++;
  };
  const value = (): Json => {
    space();
    const c = text[at];
    if (c === "{") {
      at++;
      const object: JsonObject = {};
      space();
      if (text[at] === "}") {
        at++;
        return object;
      }
      for (;;) {
        space();
        const key = value();
        if (typeof key !== "string") fail("an object key that is not a string");
        space();
        if (text[at++] !== ":") fail("no ':' after a key");
        object[key as string] = value();
        space();
        const next = text[at++];
        if (next === "}") return object;
        if (next !== ",") fail("no ',' or '}' in an object");
      }
    }
    if (c === "[") {
      at++;
      const array: Json[] = [];
      space();
      if (text[at] === "]") {
        at++;
        return array;
      }
      for (;;) {
        array.push(value());
        space();
        const next = text[at++];
        if (next === "]") return array;
        if (next !== ",") fail("no ',' or ']' in an array");
      }
    }
    if (c === '"') {
      const start = at;
      at++;
      while (text[at] !== '"') {
        if (text[at] === "\\") at++;
        at++;
        if (at >= text.length) fail("an unterminated string");
      }
      at++;
      return JSON.parse(text.slice(start, at)) as string;
    }
    const literal = /^(?:-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)/.exec(text.slice(at, at + 40));
    if (literal === null) return fail("an unexpected character");
    const token = literal[0];
    at += token.length;
    if (token === "true") return true;
    if (token === "false") return false;
    if (token === "null") return null;
    if (/^-?\d+$/.test(token)) {
      const n = BigInt(token);
      return n > BigInt(Number.MAX_SAFE_INTEGER) || n < -BigInt(Number.MAX_SAFE_INTEGER) ? n : Number(token);
    }
    return Number(token);
  };
  const result = value();
  space();
  if (at !== text.length) fail("text after the JSON value");
  return result;
}

export function loadVectors(): JsonObject {
  return parseJson(readFileSync(VECTORS_PATH, "utf8")) as JsonObject;
}

function obj(value: Json | undefined, path: string): JsonObject {
  assert.ok(value !== null && typeof value === "object" && !Array.isArray(value), `${path} is an object`);
  return value as JsonObject;
}

function arr(value: Json | undefined, path: string): Json[] {
  assert.ok(Array.isArray(value), `${path} is an array`);
  return value;
}

function str(value: Json | undefined, path: string): string {
  assert.equal(typeof value, "string", `${path} is a string`);
  return value as string;
}

function int(value: Json | undefined, path: string): number {
  assert.equal(typeof value, "number", `${path} is an integer`);
  return value as number;
}

function u64(value: Json | undefined, path: string): bigint {
  assert.ok(typeof value === "number" || typeof value === "bigint", `${path} is an integer`);
  return BigInt(value);
}

function bool(value: Json | undefined, path: string): boolean {
  assert.equal(typeof value, "boolean", `${path} is a boolean`);
  return value as boolean;
}

const KINDS: Record<number, Kind> = { 1: "command", 2: "event", 3: "reply" };
const KIND_CODES: Record<Kind, number> = { command: 1, event: 2, reply: 3 };

function messageFromJson(j: JsonObject, path: string): Message {
  const version = obj(j.version, `${path}.version`);
  const kind = KINDS[int(j.kind, `${path}.kind`)];
  assert.ok(kind !== undefined, `${path}.kind is 1, 2 or 3`);
  return {
    kind,
    name: str(j.name, `${path}.name`),
    version: { major: int(version.major, `${path}.version.major`), minor: int(version.minor, `${path}.version.minor`) },
    id: str(j.id, `${path}.id`),
    activityId: str(j.activity_id, `${path}.activity_id`),
    timestamp: u64(j.timestamp, `${path}.timestamp`),
    sender: str(j.sender, `${path}.sender`),
    responseTo: j.response_to === undefined ? undefined : str(j.response_to, `${path}.response_to`),
    key: j.key === undefined ? undefined : Buffer.from(str(j.key, `${path}.key`), "hex"),
    expiresAt: j.expires_at === undefined ? undefined : u64(j.expires_at, `${path}.expires_at`),
    deliverAt: j.deliver_at === undefined ? undefined : u64(j.deliver_at, `${path}.deliver_at`),
    parentId: j.parent_id === undefined ? undefined : str(j.parent_id, `${path}.parent_id`),
    transient: bool(j.transient, `${path}.transient`),
    final: bool(j.final, `${path}.final`),
    headers: arr(j.headers, `${path}.headers`).map((h, i) => {
      const pair = arr(h, `${path}.headers[${i}]`);
      return [str(pair[0], `${path}.headers[${i}][0]`), str(pair[1], `${path}.headers[${i}][1]`)];
    }),
    payload: Buffer.from(str(j.payload, `${path}.payload`), "hex"),
  };
}

/** The wire flags byte of `m` (in a SEND entry, with `quiet`). */
function flagsOf(m: Message, quiet: boolean): number {
  return (
    (m.transient ? Flag.TRANSIENT : 0) |
    (m.final ? Flag.FINAL : 0) |
    (m.responseTo !== undefined ? Flag.RESPONSE_TO : 0) |
    (m.key !== undefined ? Flag.KEY : 0) |
    (m.expiresAt !== undefined ? Flag.EXPIRES_AT : 0) |
    (m.deliverAt !== undefined ? Flag.DELIVER_AT : 0) |
    (m.parentId !== undefined ? Flag.PARENT_ID : 0) |
    (quiet ? Flag.QUIET : 0)
  );
}

function messageToJson(m: Message, quiet: boolean): JsonObject {
  const j: JsonObject = {
    kind: KIND_CODES[m.kind],
    flags: flagsOf(m, quiet),
    transient: m.transient,
    final: m.final,
    name: m.name,
    version: { major: m.version.major, minor: m.version.minor },
    id: m.id,
    activity_id: m.activityId,
    timestamp: m.timestamp,
    sender: m.sender,
  };
  if (m.responseTo !== undefined) j.response_to = m.responseTo;
  if (m.key !== undefined) j.key = m.key.toString("hex");
  if (m.expiresAt !== undefined) j.expires_at = m.expiresAt;
  if (m.deliverAt !== undefined) j.deliver_at = m.deliverAt;
  if (m.parentId !== undefined) j.parent_id = m.parentId;
  j.headers = m.headers.map(([k, v]) => [k, v]);
  j.payload = m.payload.toString("hex");
  return j;
}

/** A vector's `frame` object as this codec's frame, at protocol `version` (SEND_RESULT's log_seq from 3). */
export function frameFromJson(j: JsonObject, path: string, version = 1): Frame {
  const type = str(j.type, `${path}.type`);
  const entries = (): Json[] => arr(j.entries, `${path}.entries`);
  switch (type) {
    case "HELLO": {
      const credentials = int(j.credentials, `${path}.credentials`);
      return {
        type: "hello",
        version: int(j.version, `${path}.version`),
        service: str(j.service, `${path}.service`),
        instance: str(j.instance, `${path}.instance`),
        maxInFlight: int(j.max_in_flight, `${path}.max_in_flight`),
        token: credentials === 1 ? str(j.token, `${path}.token`) : undefined,
      };
    }
    case "WELCOME":
      return {
        type: "welcome",
        version: int(j.version, `${path}.version`),
        connectionId: u64(j.connection_id, `${path}.connection_id`),
        frameBytesMax: int(j.frame_bytes_max, `${path}.frame_bytes_max`),
        broker: str(j.broker, `${path}.broker`),
        service: j.service === undefined ? undefined : str(j.service, `${path}.service`),
      };
    case "SEND":
      return {
        type: "send",
        entries: entries().map((e, i) => {
          const entry = obj(e, `${path}.entries[${i}]`);
          return {
            seq: u64(entry.seq, `${path}.entries[${i}].seq`),
            quiet: bool(entry.quiet, `${path}.entries[${i}].quiet`),
            message: messageFromJson(obj(entry.message, `${path}.entries[${i}].message`), `${path}.entries[${i}].message`),
          };
        }),
      };
    case "SEND_RESULT":
      return {
        type: "send_result",
        entries: entries().map((e, i) => {
          const entry = obj(e, `${path}.entries[${i}]`);
          return {
            seq: u64(entry.seq, `${path}.entries[${i}].seq`),
            code: int(entry.code, `${path}.entries[${i}].code`),
            reason: str(entry.reason, `${path}.entries[${i}].reason`),
            ...(version >= 3
              ? { logSeq: entry.log_seq === undefined ? 0n : u64(entry.log_seq, `${path}.entries[${i}].log_seq`) }
              : {}),
          };
        }),
      };
    case "SUBSCRIBE": {
      const start = int(j.start, `${path}.start`);
      const time = u64(j.start_time, `${path}.start_time`);
      assert.ok(start === 2 || time === 0n, `${path}: start_time only with start 2`);
      return {
        type: "subscribe",
        request: u64(j.request, `${path}.request`),
        pattern: str(j.pattern, `${path}.pattern`),
        ackDeadlineMs: int(j.ack_deadline_ms, `${path}.ack_deadline_ms`),
        maxDeliveries: int(j.max_deliveries, `${path}.max_deliveries`),
        start: start === 0 ? { kind: "new" } : start === 1 ? { kind: "beginning" } : { kind: "time", time },
      };
    }
    case "UNSUBSCRIBE":
      return { type: "unsubscribe", request: u64(j.request, `${path}.request`), pattern: str(j.pattern, `${path}.pattern`) };
    case "RESULT":
      return {
        type: "result",
        request: u64(j.request, `${path}.request`),
        code: int(j.code, `${path}.code`),
        reason: str(j.reason, `${path}.reason`),
      };
    case "DELIVER":
      return {
        type: "deliver",
        entries: entries().map((e, i) => {
          const entry = obj(e, `${path}.entries[${i}]`);
          return {
            delivery: u64(entry.delivery, `${path}.entries[${i}].delivery`),
            attempt: int(entry.attempt, `${path}.entries[${i}].attempt`),
            message: messageFromJson(obj(entry.message, `${path}.entries[${i}].message`), `${path}.entries[${i}].message`),
          };
        }),
      };
    case "ACK":
      return { type: "ack", deliveries: entries().map((d, i) => u64(d, `${path}.entries[${i}]`)) };
    case "NACK":
      return {
        type: "nack",
        entries: entries().map((e, i) => {
          const entry = obj(e, `${path}.entries[${i}]`);
          return {
            delivery: u64(entry.delivery, `${path}.entries[${i}].delivery`),
            delayMs: int(entry.delay_ms, `${path}.entries[${i}].delay_ms`),
          };
        }),
      };
    case "FLOW":
      return { type: "flow", maxInFlight: int(j.max_in_flight, `${path}.max_in_flight`) };
    case "PING":
      return { type: "ping", nonce: u64(j.nonce, `${path}.nonce`) };
    case "PONG":
      return { type: "pong", nonce: u64(j.nonce, `${path}.nonce`) };
    case "ERROR":
      return { type: "error", code: int(j.code, `${path}.code`), message: str(j.message, `${path}.message`) };
    case "DRAIN":
      return { type: "drain" };
    case "DRAINED":
      return { type: "drained" };
    default:
      return assert.fail(`${path}.type ${type} is no frame type`);
  }
}

/** This codec's frame as a vector's `frame` object. */
export function frameToJson(frame: Frame): JsonObject {
  switch (frame.type) {
    case "hello": {
      const j: JsonObject = {
        type: "HELLO",
        version: frame.version,
        service: frame.service,
        instance: frame.instance,
        max_in_flight: frame.maxInFlight,
        credentials: frame.token === undefined ? 0 : 1,
      };
      if (frame.token !== undefined) j.token = frame.token;
      return j;
    }
    case "welcome": {
      const j: JsonObject = {
        type: "WELCOME",
        version: frame.version,
        connection_id: frame.connectionId,
        frame_bytes_max: frame.frameBytesMax,
        broker: frame.broker,
      };
      if (frame.service !== undefined) j.service = frame.service;
      return j;
    }
    case "send":
      return {
        type: "SEND",
        entries: frame.entries.map((e) => ({ seq: e.seq, quiet: e.quiet, message: messageToJson(e.message, e.quiet) })),
      };
    case "send_result":
      return {
        type: "SEND_RESULT",
        entries: frame.entries.map((e) => ({
          seq: e.seq,
          code: e.code,
          reason: e.reason,
          ...(e.logSeq !== undefined && e.logSeq !== 0n ? { log_seq: e.logSeq } : {}),
        })),
      };
    case "subscribe":
      return {
        type: "SUBSCRIBE",
        request: frame.request,
        pattern: frame.pattern,
        ack_deadline_ms: frame.ackDeadlineMs,
        max_deliveries: frame.maxDeliveries,
        start: frame.start.kind === "new" ? 0 : frame.start.kind === "beginning" ? 1 : 2,
        start_time: frame.start.kind === "time" ? frame.start.time : 0,
      };
    case "unsubscribe":
      return { type: "UNSUBSCRIBE", request: frame.request, pattern: frame.pattern };
    case "result":
      return { type: "RESULT", request: frame.request, code: frame.code, reason: frame.reason };
    case "deliver":
      return {
        type: "DELIVER",
        entries: frame.entries.map((e) => ({
          delivery: e.delivery,
          attempt: e.attempt,
          message: messageToJson(e.message, false),
        })),
      };
    case "ack":
      return { type: "ACK", entries: [...frame.deliveries] };
    case "nack":
      return { type: "NACK", entries: frame.entries.map((e) => ({ delivery: e.delivery, delay_ms: e.delayMs })) };
    case "flow":
      return { type: "FLOW", max_in_flight: frame.maxInFlight };
    case "ping":
      return { type: "PING", nonce: frame.nonce };
    case "pong":
      return { type: "PONG", nonce: frame.nonce };
    case "error":
      return { type: "ERROR", code: frame.code, message: frame.message };
    case "drain":
      return { type: "DRAIN" };
    case "drained":
      return { type: "DRAINED" };
  }
}

/** Integers as bigints, so that 7 and 7n compare equal. */
export function canonical(value: Json): Json {
  if (typeof value === "number" && Number.isInteger(value)) return BigInt(value);
  if (Array.isArray(value)) return value.map(canonical);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, canonical(v)]));
  }
  return value;
}

/**
 * The answer items of one frame from the broker: one per entry of a batch
 * frame (with the frame's type), else the frame itself. ACK's entries are
 * bare ids, so an ACK stays whole.
 */
export function answerItems(frame: Frame): JsonObject[] {
  const whole = frameToJson(frame);
  if (Array.isArray(whole.entries) && frame.type !== "ack") {
    return whole.entries.map((entry) => ({ ...(entry as JsonObject), type: whole.type! }));
  }
  return [whole];
}

/**
 * Whether `actual` has every field of `expected` with the same value
 * (objects field by field; a null field must be absent; `code_name` names
 * `code`).
 */
export function matches(expected: Json, actual: Json | undefined, codeName: (code: number) => string): boolean {
  if (expected !== null && typeof expected === "object" && !Array.isArray(expected)) {
    if (actual === null || typeof actual !== "object" || Array.isArray(actual)) return false;
    return Object.entries(expected).every(([key, want]) => {
      if (key === "code_name") {
        const code = actual.code;
        return typeof code === "number" && codeName(code) === want;
      }
      if (want === null) return !(key in actual);
      return key in actual && matches(want, actual[key], codeName);
    });
  }
  if (Array.isArray(expected)) {
    return (
      Array.isArray(actual) &&
      actual.length === expected.length &&
      expected.every((e, i) => matches(e, actual[i], codeName))
    );
  }
  const a = canonical(actual ?? null);
  const e = canonical(expected);
  return a === e;
}
