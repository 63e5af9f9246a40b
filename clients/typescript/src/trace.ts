// W3C Trace Context (`traceparent`) for messages, as the Rust SDK writes
// it (docs/PROTOCOL.md §8.9): a message sent while handling another
// carries a child of the handled message's trace, so tracing systems see
// one trace per activity across services.
//
// A message's own span id is taken from its id (the random half of its
// UUID v7): no random draw per message, and a span id found in a tracing
// system names its message. A message that starts an activity carries no
// header: its trace id is its activity id, which every message of the
// activity carries anyway.

import type { Message } from "./codec.js";

/** The header's name (lower case, as W3C Trace Context writes it). */
export const TRACEPARENT = "traceparent";

/** Bit 0 of the header's flags: the trace is sampled (recorded). */
const SAMPLED = 0x01;

/** The length of a version-00 header: `00-` 32 hex `-` 16 hex `-` 2 hex. */
const HEADER_LENGTH = 55;

const TRACE_ID = /^[0-9a-f]{32}$/;
const SPAN_ID = /^[0-9a-f]{16}$/;
const ZERO_TRACE_ID = "0".repeat(32);
const ZERO_SPAN_ID = "0".repeat(16);

/**
 * What Rust's `str::trim` takes off (Unicode White_Space), which is not
 * quite what `String.prototype.trim` does (that one keeps U+0085 and takes
 * U+FEFF): a header is read the same by every Courier client.
 */
const EDGE_SPACE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/g;

/** The value of two lower-case hex digits at `at`; -1 for anything else. */
function hexByte(text: string, at: number): number {
  const digit = (c: number): number => (c >= 0x30 && c <= 0x39 ? c - 0x30 : c >= 0x61 && c <= 0x66 ? c - 0x61 + 10 : -1);
  const hi = digit(text.charCodeAt(at));
  const lo = digit(text.charCodeAt(at + 1));
  return hi < 0 || lo < 0 ? -1 : (hi << 4) | lo;
}

/** Lower-case hex digits at `from` up to `to`, or undefined if any is not one. */
function hexRun(text: string, from: number, to: number): string | undefined {
  for (let i = from; i < to; i += 2) {
    if (hexByte(text, i) < 0) {
      return undefined;
    }
  }
  return text.slice(from, to);
}

/**
 * A span id from a message id: its last eight bytes, the random half of a
 * UUID v7 (all zero only by a 2^-62 chance, then made nonzero).
 */
function spanIdOf(id: string): string {
  // xxxxxxxx-xxxx-xxxx-XXXX-XXXXXXXXXXXX: bytes 8 to 15 are the last two groups.
  const span = (id.slice(19, 23) + id.slice(24, 36)).toLowerCase();
  return span === ZERO_SPAN_ID ? "0000000000000001" : span;
}

/** A trace id from an activity id: its 16 bytes (made nonzero for the nil UUID). */
function traceIdOf(activityId: string): string {
  const trace = activityId.replaceAll("-", "").toLowerCase();
  return trace === ZERO_TRACE_ID ? "00000000000000000000000000000001" : trace;
}

/**
 * The trace a message belongs to and the span that sent it: the fields of
 * a `traceparent` header (version 00), ids as lower-case hex.
 *
 * ```ts
 * const t = TraceParent.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
 * t?.toHeader(); // "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
 * TraceParent.parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"); // undefined
 * ```
 */
export class TraceParent {
  /**
   * `traceId` 32 and `spanId` 16 lower-case hex digits, neither all zero;
   * `flags` a byte. A RangeError names what is not.
   */
  constructor(
    readonly traceId: string,
    /** The sending span ("parent-id" in the header). */
    readonly spanId: string,
    readonly flags: number,
  ) {
    if (!TRACE_ID.test(traceId) || traceId === ZERO_TRACE_ID) {
      throw new RangeError(`trace id ${JSON.stringify(traceId)} is not 32 lower-case hex digits, not all zero`);
    }
    if (!SPAN_ID.test(spanId) || spanId === ZERO_SPAN_ID) {
      throw new RangeError(`span id ${JSON.stringify(spanId)} is not 16 lower-case hex digits, not all zero`);
    }
    if (!(Number.isInteger(flags) && flags >= 0 && flags <= 0xff)) {
      throw new RangeError(`trace flags ${String(flags)} are not a byte`);
    }
  }

  /**
   * Reads a `traceparent` value. Version 00 exactly; a higher version is
   * read by its version-00 prefix, as the specification asks; `ff`,
   * all-zero ids and malformed text (upper-case hex too) are undefined.
   */
  static parse(text: string): TraceParent | undefined {
    const t = text.replace(EDGE_SPACE, "");
    if (t.length < HEADER_LENGTH) {
      return undefined;
    }
    const version = hexByte(t, 0);
    if (version < 0 || version === 0xff || (version === 0 && t.length !== HEADER_LENGTH)) {
      return undefined;
    }
    if (version !== 0 && t.length > HEADER_LENGTH && t[HEADER_LENGTH] !== "-") {
      return undefined;
    }
    if (t[2] !== "-" || t[35] !== "-" || t[52] !== "-") {
      return undefined;
    }
    const traceId = hexRun(t, 3, 35);
    const spanId = hexRun(t, 36, 52);
    const flags = hexByte(t, 53);
    if (traceId === undefined || spanId === undefined || flags < 0) {
      return undefined;
    }
    if (traceId === ZERO_TRACE_ID || spanId === ZERO_SPAN_ID) {
      return undefined;
    }
    return new TraceParent(traceId, spanId, flags);
  }

  /**
   * The trace of `message`: its `traceparent` if it carries a valid one,
   * else the trace its activity started (trace id = activity id, span id
   * from the message's id, sampled).
   */
  static of(message: Message): TraceParent {
    const header = message.headers.find(([k]) => k === TRACEPARENT)?.[1];
    const carried = header === undefined ? undefined : TraceParent.parse(header);
    return carried ?? new TraceParent(traceIdOf(message.activityId), spanIdOf(message.id), SAMPLED);
  }

  /** The context a message with id `messageId` carries when this span sends it: same trace and flags, the message's own span id. */
  child(messageId: string): TraceParent {
    return new TraceParent(this.traceId, spanIdOf(messageId), this.flags);
  }

  /** The header's value: `00-<trace id>-<span id>-<flags>`, lower-case hex. */
  toHeader(): string {
    return `00-${this.traceId}-${this.spanId}-${this.flags.toString(16).padStart(2, "0")}`;
  }
}
