// The wire codec of docs/PROTOCOL.md: frames, messages, batching. No I/O.

import { isUtf8 } from "node:buffer";

import { CourierError } from "./errors.js";
import { readUuid, writeUuid } from "./uuid.js";

/** The newest protocol version this client speaks; it reads and writes 1 to 4, each as that version has it. */
export const PROTOCOL_VERSION = 4;
/** From this version on a message may carry `parentId` (flag 0x80). */
export const PARENT_ID_VERSION = 2;
/** From this version on a SEND_RESULT entry carries `log_seq`. */
export const LOG_SEQ_VERSION = 3;
/** From this version on the broker sends a key's deliveries ahead (docs/PROTOCOL.md §8.4). */
export const PIPELINED_KEYS_VERSION = 4;
/** Bit 31 of a DELIVER entry's `attempt` (version 4): the first delivery of its key this connection holds. */
export const ATTEMPT_KEY_START = 0x8000_0000;
/** `CRR1`: the first bytes of every HELLO body. */
export const HELLO_MAGIC = Buffer.from("CRR1", "latin1");
/** The frame limit a receiver applies unless told otherwise (8 MiB). */
export const FRAME_BYTES_MAX_DEFAULT = 8 * 1024 * 1024;
/** A batch frame takes more entries while it holds fewer bytes than this. */
export const BATCH_BYTES_TARGET = 256 * 1024;
/** Most entries in one batch frame. */
export const BATCH_ENTRIES_MAX = 65_536;
/** Most headers on one message. */
export const HEADERS_MAX = 64;
/** The smallest encoded message: empty name and sender, nothing optional. */
export const MESSAGE_BYTES_MIN = 54;

const LENGTH_PREFIX_BYTES = 4;
const U16_MAX = 0xffff;
const U32_MAX = 0xffff_ffff;
const U64_MAX = 0xffff_ffff_ffff_ffffn;

/** Frame type codes. */
export const FrameType = {
  HELLO: 0x01,
  WELCOME: 0x02,
  SEND: 0x03,
  SEND_RESULT: 0x04,
  SUBSCRIBE: 0x05,
  UNSUBSCRIBE: 0x06,
  RESULT: 0x07,
  DELIVER: 0x08,
  ACK: 0x09,
  NACK: 0x0a,
  FLOW: 0x0b,
  PING: 0x0c,
  PONG: 0x0d,
  ERROR: 0x0e,
  DRAIN: 0x0f,
  DRAINED: 0x10,
} as const;

/** Message flag bits. */
export const Flag = {
  TRANSIENT: 0x01,
  FINAL: 0x02,
  RESPONSE_TO: 0x04,
  KEY: 0x08,
  EXPIRES_AT: 0x10,
  DELIVER_AT: 0x20,
  /** Only in a SEND entry: answer only a refusal. */
  QUIET: 0x40,
  /** Version 2 on: the message carries the id of the message that caused it. */
  PARENT_ID: 0x80,
} as const;

/** The flags any message of version 1 may carry (QUIET only in SEND entries). */
const FLAGS_ALL = 0x3f;

/** The flags a message may carry on a connection of `version`. */
function messageFlags(version: number): number {
  return version >= PARENT_ID_VERSION ? FLAGS_ALL | Flag.PARENT_ID : FLAGS_ALL;
}

export type Kind = "command" | "event" | "reply";

const KIND_CODES: Record<Kind, number> = { command: 1, event: 2, reply: 3 };
const KINDS: readonly (Kind | undefined)[] = [undefined, "command", "event", "reply"];

/** A message contract's `MAJOR.MINOR`. */
export interface Version {
  major: number;
  minor: number;
}

/** One message: the envelope and its payload (docs/PROTOCOL.md §4). */
export interface Message {
  kind: Kind;
  name: string;
  version: Version;
  /** Unique per message (UUIDv7); the broker's dedup key. */
  id: string;
  /** Correlates the messages of one activity. */
  activityId: string;
  /** Unix nanoseconds at which the broker accepted the message (0 when sending). */
  timestamp: bigint;
  /** The authenticated service that sent it (set by the broker; empty when sending). */
  sender: string;
  /** The command a reply answers. */
  responseTo?: string | undefined;
  /** Ordering key. */
  key?: Buffer | undefined;
  /** Unix nanoseconds after which the message is dropped undelivered. */
  expiresAt?: bigint | undefined;
  /** Unix nanoseconds before which the message is not delivered. */
  deliverAt?: bigint | undefined;
  /** The message whose handling caused this one (version 2 on). */
  parentId?: string | undefined;
  /** At most once, in memory only. */
  transient: boolean;
  /** On a reply: no more replies follow. */
  final: boolean;
  headers: Array<[string, string]>;
  payload: Buffer;
}

/** Where a subscription new to the service starts. */
export type StartFrom = { kind: "new" } | { kind: "beginning" } | { kind: "time"; time: bigint };

export interface SendEntry {
  seq: bigint;
  quiet: boolean;
  message: Message;
}

export interface SendOutcome {
  seq: bigint;
  code: number;
  reason: string;
  /** Version 3 on: where the broker's log holds the accepted message (0: nowhere). Absent below version 3. */
  logSeq?: bigint;
}

export interface Delivery {
  delivery: bigint;
  attempt: number;
  message: Message;
}

export interface NackEntry {
  delivery: bigint;
  delayMs: number;
}

/** One frame, decoded. */
export type Frame =
  | {
      type: "hello";
      version: number;
      service: string;
      instance: string;
      maxInFlight: number;
      /** Absent: credentials kind 0 (none). */
      token?: string | undefined;
    }
  | {
      type: "welcome";
      version: number;
      connectionId: bigint;
      frameBytesMax: number;
      broker: string;
      /** Present only when the broker authenticated a service other than the one HELLO named. */
      service?: string | undefined;
    }
  | { type: "send"; entries: SendEntry[] }
  | { type: "send_result"; entries: SendOutcome[] }
  | {
      type: "subscribe";
      request: bigint;
      pattern: string;
      ackDeadlineMs: number;
      maxDeliveries: number;
      start: StartFrom;
    }
  | { type: "unsubscribe"; request: bigint; pattern: string }
  | { type: "result"; request: bigint; code: number; reason: string }
  | { type: "deliver"; entries: Delivery[] }
  | { type: "ack"; deliveries: bigint[] }
  | { type: "nack"; entries: NackEntry[] }
  | { type: "flow"; maxInFlight: number }
  | { type: "ping"; nonce: bigint }
  | { type: "pong"; nonce: bigint }
  | { type: "error"; code: number; message: string }
  | { type: "drain" }
  | { type: "drained" };

/** The reference decoder's names for why a frame is malformed. */
export type DecodeErrorKind =
  | "FrameTooLarge"
  | "EmptyFrame"
  | "UnknownFrameType"
  | "UnexpectedEof"
  | "TrailingBytes"
  | "InvalidUtf8"
  | "UnknownKind"
  | "UnknownFlags"
  | "UnknownStart"
  | "StrayStartTime"
  | "UnknownCredentials"
  | "BadMagic"
  | "EmptyBatch"
  | "TooManyEntries"
  | "TooManyHeaders";

/**
 * Bytes that are not a frame. `kind` is the reference decoder's name for the
 * failure; `wireCode` the code an ERROR frame carries for it. Offsets count
 * from the frame's type byte.
 */
export class DecodeError extends CourierError {
  override name = "DecodeError";
  readonly kind: DecodeErrorKind;
  readonly wireCode: number;
  /** The failure's numbers, by the reference decoder's field names (`offset`, `need`, `have` …). */
  readonly details: Readonly<Record<string, number>>;

  constructor(kind: DecodeErrorKind, message: string, details: Record<string, number> = {}) {
    super(message);
    this.kind = kind;
    this.wireCode = kind === "FrameTooLarge" ? 2 : 1;
    this.details = details;
  }
}

/** A value that cannot be encoded (a string too long for its length prefix …). */
export class EncodeError extends CourierError {
  override name = "EncodeError";
}

// ---------------------------------------------------------------------------
// Encoding

function strBytes(what: string, text: string, max: number): number {
  const len = Buffer.byteLength(text);
  if (len > max) {
    throw new EncodeError(`${what} is ${len} bytes; at most ${max} fit`);
  }
  return len;
}

function checkU16(what: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n > U16_MAX) {
    throw new EncodeError(`${what} must be an integer from 0 to ${U16_MAX}, not ${n}`);
  }
}

function checkU32(what: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n > U32_MAX) {
    throw new EncodeError(`${what} must be an integer from 0 to ${U32_MAX}, not ${n}`);
  }
}

function checkU64(what: string, n: bigint): void {
  if (n < 0n || n > U64_MAX) {
    throw new EncodeError(`${what} must be from 0 to ${U64_MAX}, not ${n}`);
  }
}

/** The bytes a human-readable reason takes: cut to 65 535 at a character boundary. */
function lossyText(text: string): Buffer {
  let bytes = Buffer.from(text, "utf8");
  if (bytes.length > U16_MAX) {
    let end = U16_MAX;
    // Back up to the first byte of a character (not a 10xxxxxx continuation).
    while (end > 0 && (bytes[end]! & 0xc0) === 0x80) {
      end--;
    }
    bytes = bytes.subarray(0, end);
  }
  return bytes;
}

/** Bytes {@link encodeMessage} writes for `m`. */
export function encodedMessageLength(m: Message): number {
  let len = MESSAGE_BYTES_MIN + Buffer.byteLength(m.name) + Buffer.byteLength(m.sender);
  if (m.responseTo !== undefined) len += 16;
  if (m.key !== undefined) len += 2 + m.key.length;
  if (m.expiresAt !== undefined) len += 8;
  if (m.deliverAt !== undefined) len += 8;
  if (m.parentId !== undefined) len += 16;
  for (const [k, v] of m.headers) {
    len += 1 + Buffer.byteLength(k) + 2 + Buffer.byteLength(v);
  }
  return len + m.payload.length;
}

/** A message checked for encoding: its encoded length and the bytes that depend on it. */
export interface MessageLayout {
  /** Bytes the message takes encoded. */
  length: number;
  code: number;
  flags: number;
  nameBytes: number;
  senderBytes: number;
}

/**
 * Checks that `m` can be encoded and works out its layout; `extraFlags`
 * may add QUIET. Below version 2 `parentId` is left out, as the broker
 * leaves it out. Throws {@link EncodeError} naming what does not fit.
 */
export function layoutMessage(m: Message, extraFlags = 0, version = PROTOCOL_VERSION): MessageLayout {
  const code = KIND_CODES[m.kind];
  if (code === undefined) {
    throw new EncodeError(`kind ${JSON.stringify(m.kind)} is not command, event or reply`);
  }
  if (m.headers.length > HEADERS_MAX) {
    throw new EncodeError(`message has ${m.headers.length} headers; at most ${HEADERS_MAX} are allowed`);
  }
  const nameBytes = strBytes("name", m.name, 255);
  const senderBytes = strBytes("sender", m.sender, 255);
  checkU16("version.major", m.version.major);
  checkU16("version.minor", m.version.minor);
  checkU64("timestamp", m.timestamp);
  if (m.key !== undefined && m.key.length > U16_MAX) {
    throw new EncodeError(`key is ${m.key.length} bytes; at most ${U16_MAX} fit`);
  }
  if (m.payload.length > U32_MAX) {
    throw new EncodeError(`payload is ${m.payload.length} bytes; at most ${U32_MAX} fit`);
  }
  let headersBytes = 0;
  for (const [k, v] of m.headers) {
    headersBytes += 1 + strBytes("header name", k, 255) + 2 + strBytes("header value", v, U16_MAX);
  }
  let flags = extraFlags;
  let length = MESSAGE_BYTES_MIN + nameBytes + senderBytes + headersBytes + m.payload.length;
  if (m.transient) flags |= Flag.TRANSIENT;
  if (m.final) flags |= Flag.FINAL;
  if (m.responseTo !== undefined) {
    flags |= Flag.RESPONSE_TO;
    length += 16;
  }
  if (m.key !== undefined) {
    flags |= Flag.KEY;
    length += 2 + m.key.length;
  }
  if (m.expiresAt !== undefined) {
    checkU64("expires_at", m.expiresAt);
    flags |= Flag.EXPIRES_AT;
    length += 8;
  }
  if (m.deliverAt !== undefined) {
    checkU64("deliver_at", m.deliverAt);
    flags |= Flag.DELIVER_AT;
    length += 8;
  }
  if (m.parentId !== undefined && version >= PARENT_ID_VERSION) {
    flags |= Flag.PARENT_ID;
    length += 16;
  }
  return { length, code, flags, nameBytes, senderBytes };
}

/** Writes `m`, laid out by {@link layoutMessage}, at `at` of `b` (room checked by the caller). */
function writeMessageAt(b: Buffer, start: number, m: Message, layout: MessageLayout): number {
  let at = start;
  b[at++] = layout.code;
  b[at++] = layout.flags;
  b[at++] = layout.nameBytes;
  at += b.write(m.name, at, "utf8");
  at = b.writeUInt16BE(m.version.major, at);
  at = b.writeUInt16BE(m.version.minor, at);
  at = writeUuid(b, at, m.id);
  at = writeUuid(b, at, m.activityId);
  at = b.writeBigUInt64BE(m.timestamp, at);
  b[at++] = layout.senderBytes;
  at += b.write(m.sender, at, "utf8");
  if (m.responseTo !== undefined) {
    at = writeUuid(b, at, m.responseTo);
  }
  if (m.key !== undefined) {
    at = b.writeUInt16BE(m.key.length, at);
    at += m.key.copy(b, at);
  }
  if (m.expiresAt !== undefined) {
    at = b.writeBigUInt64BE(m.expiresAt, at);
  }
  if (m.deliverAt !== undefined) {
    at = b.writeBigUInt64BE(m.deliverAt, at);
  }
  if ((layout.flags & Flag.PARENT_ID) !== 0) {
    at = writeUuid(b, at, m.parentId!);
  }
  at = b.writeUInt16BE(m.headers.length, at);
  for (const [k, v] of m.headers) {
    b[at++] = Buffer.byteLength(k);
    at += b.write(k, at, "utf8");
    at = b.writeUInt16BE(Buffer.byteLength(v), at);
    at += b.write(v, at, "utf8");
  }
  at = b.writeUInt32BE(m.payload.length, at);
  at += m.payload.copy(b, at);
  if (at - start !== layout.length) {
    throw new EncodeError(`internal: encoded ${at - start} bytes of a ${layout.length}-byte message`);
  }
  return at;
}

/**
 * Encodes one message (docs/PROTOCOL.md §4) into a buffer of its own, the
 * layout it has inside SEND and DELIVER entries. `extraFlags` may add QUIET.
 */
export function encodeMessage(m: Message, extraFlags = 0, version = PROTOCOL_VERSION): Buffer {
  const layout = layoutMessage(m, extraFlags, version);
  const b = Buffer.allocUnsafe(layout.length);
  writeMessageAt(b, 0, m, layout);
  return b;
}

interface OpenBatch {
  type: number;
  start: number;
  count: number;
}

/** Bytes a writer sets aside at first; it doubles as needed. */
const WRITER_INITIAL_BYTES = 64 * 1024;
/** Takes up to this size are copied out rather than handing the buffer over. */
const COPY_OUT_BYTES_MAX = 16 * 1024;

/**
 * Encodes frames into one buffer, merging consecutive batchable entries
 * (SEND, SEND_RESULT, DELIVER, ACK, NACK) into one frame while it holds
 * less than {@link BATCH_BYTES_TARGET}. What was pushed since the last
 * {@link FrameWriter.take} leaves in one socket write, so under load many
 * messages share a frame and a system call while a lone one leaves at once.
 */
export class FrameWriter {
  private buf: Buffer = Buffer.allocUnsafe(WRITER_INITIAL_BYTES);
  private len = 0;
  private open: OpenBatch | null = null;

  /** The protocol version of the connection the frames are for. */
  constructor(readonly version = PROTOCOL_VERSION) {}

  /** Bytes pushed and not yet taken. */
  get length(): number {
    return this.len;
  }

  /** Everything pushed so far, or null if nothing was; the writer starts afresh. */
  take(): Buffer | null {
    if (this.len === 0) {
      return null;
    }
    let out: Buffer;
    if (this.len <= COPY_OUT_BYTES_MAX) {
      // A few frames (a request, some acks): copied out, the buffer stays.
      out = Buffer.allocUnsafe(this.len);
      this.buf.copy(out, 0, 0, this.len);
    } else {
      // Handed over whole; the socket may hold it after write() returns.
      out = this.buf.subarray(0, this.len);
      this.buf = Buffer.allocUnsafe(Math.max(WRITER_INITIAL_BYTES, Math.min(this.buf.length, 4 * 1024 * 1024)));
    }
    this.len = 0;
    this.open = null;
    return out;
  }

  private reserve(n: number): void {
    if (this.len + n <= this.buf.length) {
      return;
    }
    let size = this.buf.length * 2;
    while (size < this.len + n) {
      size *= 2;
    }
    const bigger = Buffer.allocUnsafe(size);
    this.buf.copy(bigger, 0, 0, this.len);
    this.buf = bigger;
  }

  /** Starts (or continues) a batch frame of `type` for one more entry of `entryBytes`. */
  private batchEntry(type: number, entryBytes: number): number {
    const o = this.open;
    const continues =
      o !== null && o.type === type && this.len - o.start < BATCH_BYTES_TARGET && o.count < BATCH_ENTRIES_MAX;
    if (!continues) {
      this.reserve(9 + entryBytes);
      const start = this.len;
      this.buf.writeUInt32BE(0, start);
      this.buf[start + 4] = type;
      this.buf.writeUInt32BE(0, start + 5);
      this.len += 9;
      this.open = { type, start, count: 0 };
    } else {
      this.reserve(entryBytes);
    }
    return this.len;
  }

  /** Records the entry that ends at `end` in the open batch's count and length. */
  private endEntry(end: number): void {
    const o = this.open!;
    this.len = end;
    o.count++;
    this.buf.writeUInt32BE(this.len - o.start - LENGTH_PREFIX_BYTES, o.start);
    this.buf.writeUInt32BE(o.count, o.start + 5);
  }

  /**
   * A SEND entry for a message already encoded by {@link encodeMessage};
   * `quiet` sets the QUIET flag (the broker answers only a refusal).
   */
  pushSend(seq: bigint, message: Buffer, quiet = false): void {
    let at = this.batchEntry(FrameType.SEND, 8 + message.length);
    at = this.buf.writeBigUInt64BE(seq, at);
    const flagsAt = at + 1;
    at += message.copy(this.buf, at);
    if (quiet) {
      this.buf[flagsAt] = this.buf[flagsAt]! | Flag.QUIET;
    }
    this.endEntry(at);
  }

  /**
   * A SEND entry encoding `m` in place, laid out by {@link layoutMessage}
   * (with QUIET among its flags for a quiet send): one copy of the payload
   * fewer than encoding it on its own first.
   */
  pushSendMessage(seq: bigint, m: Message, layout: MessageLayout): void {
    let at = this.batchEntry(FrameType.SEND, 8 + layout.length);
    at = this.buf.writeBigUInt64BE(seq, at);
    this.endEntry(writeMessageAt(this.buf, at, m, layout));
  }

  pushSendOutcome(seq: bigint, code: number, reason: string, logSeq = 0n): void {
    checkU16("code", code);
    const text = lossyText(reason);
    const withLogSeq = this.version >= LOG_SEQ_VERSION;
    let at = this.batchEntry(FrameType.SEND_RESULT, 12 + text.length + (withLogSeq ? 8 : 0));
    at = this.buf.writeBigUInt64BE(seq, at);
    at = this.buf.writeUInt16BE(code, at);
    at = this.buf.writeUInt16BE(text.length, at);
    at += text.copy(this.buf, at);
    if (withLogSeq) {
      checkU64("log_seq", logSeq);
      at = this.buf.writeBigUInt64BE(logSeq, at);
    }
    this.endEntry(at);
  }

  pushDelivery(delivery: bigint, attempt: number, message: Buffer): void {
    checkU32("attempt", attempt);
    let at = this.batchEntry(FrameType.DELIVER, 12 + message.length);
    at = this.buf.writeBigUInt64BE(delivery, at);
    at = this.buf.writeUInt32BE(attempt, at);
    at += message.copy(this.buf, at);
    this.endEntry(at);
  }

  pushAck(delivery: bigint): void {
    const at = this.batchEntry(FrameType.ACK, 8);
    this.endEntry(this.buf.writeBigUInt64BE(delivery, at));
  }

  pushNack(delivery: bigint, delayMs: number): void {
    checkU32("delay_ms", delayMs);
    let at = this.batchEntry(FrameType.NACK, 12);
    at = this.buf.writeBigUInt64BE(delivery, at);
    this.endEntry(this.buf.writeUInt32BE(delayMs, at));
  }

  /** Appends any frame; batch frames entry by entry, so they merge with their neighbours. */
  push(frame: Frame): void {
    switch (frame.type) {
      case "send":
        for (const e of frame.entries) {
          checkU64("seq", e.seq);
          this.pushSend(e.seq, encodeMessage(e.message, 0, this.version), e.quiet);
        }
        return;
      case "send_result":
        for (const e of frame.entries) {
          checkU64("seq", e.seq);
          this.pushSendOutcome(e.seq, e.code, e.reason, e.logSeq);
        }
        return;
      case "deliver":
        for (const e of frame.entries) {
          checkU64("delivery", e.delivery);
          this.pushDelivery(e.delivery, e.attempt, encodeMessage(e.message, 0, this.version));
        }
        return;
      case "ack":
        for (const d of frame.deliveries) {
          checkU64("delivery", d);
          this.pushAck(d);
        }
        return;
      case "nack":
        for (const e of frame.entries) {
          checkU64("delivery", e.delivery);
          this.pushNack(e.delivery, e.delayMs);
        }
        return;
      default:
        this.pushSingle(encodeSingleBody(frame));
    }
  }

  private pushSingle(body: Buffer): void {
    this.open = null;
    this.reserve(LENGTH_PREFIX_BYTES + body.length);
    this.len = this.buf.writeUInt32BE(body.length, this.len);
    this.len += body.copy(this.buf, this.len);
  }
}

/** A small growable byte builder for the single (non-batch) frames. */
class Bytes {
  private parts: Buffer[] = [];

  u8(n: number): this {
    this.parts.push(Buffer.from([n]));
    return this;
  }
  u16(what: string, n: number): this {
    checkU16(what, n);
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16BE(n);
    this.parts.push(b);
    return this;
  }
  u32(what: string, n: number): this {
    checkU32(what, n);
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(n);
    this.parts.push(b);
    return this;
  }
  u64(what: string, n: bigint): this {
    checkU64(what, n);
    const b = Buffer.allocUnsafe(8);
    b.writeBigUInt64BE(n);
    this.parts.push(b);
    return this;
  }
  raw(b: Buffer): this {
    this.parts.push(b);
    return this;
  }
  str8(what: string, text: string): this {
    const len = strBytes(what, text, 255);
    return this.u8(len).raw(Buffer.from(text, "utf8"));
  }
  str16(what: string, text: string): this {
    const len = strBytes(what, text, U16_MAX);
    return this.u16(what, len).raw(Buffer.from(text, "utf8"));
  }
  lossy16(text: string): this {
    const bytes = lossyText(text);
    return this.u16("length", bytes.length).raw(bytes);
  }
  done(): Buffer {
    return Buffer.concat(this.parts);
  }
}

function encodeSingleBody(frame: Frame): Buffer {
  const b = new Bytes();
  switch (frame.type) {
    case "hello":
      b.u8(FrameType.HELLO).raw(HELLO_MAGIC).u16("version", frame.version);
      b.str8("service", frame.service).str8("instance", frame.instance).u32("max_in_flight", frame.maxInFlight);
      if (frame.token === undefined) {
        b.u8(0);
      } else {
        b.u8(1).str16("token", frame.token);
      }
      break;
    case "welcome":
      b.u8(FrameType.WELCOME).u16("version", frame.version).u64("connection_id", frame.connectionId);
      b.u32("frame_bytes_max", frame.frameBytesMax).str8("broker", frame.broker);
      if (frame.service !== undefined) {
        b.str8("service", frame.service);
      }
      break;
    case "subscribe": {
      b.u8(FrameType.SUBSCRIBE).u64("request", frame.request).str8("pattern", frame.pattern);
      b.u32("ack_deadline_ms", frame.ackDeadlineMs).u32("max_deliveries", frame.maxDeliveries);
      const start = frame.start;
      if (start.kind === "time") {
        b.u8(2).u64("start_time", start.time);
      } else {
        b.u8(start.kind === "beginning" ? 1 : 0).u64("start_time", 0n);
      }
      break;
    }
    case "unsubscribe":
      b.u8(FrameType.UNSUBSCRIBE).u64("request", frame.request).str8("pattern", frame.pattern);
      break;
    case "result":
      b.u8(FrameType.RESULT).u64("request", frame.request).u16("code", frame.code).lossy16(frame.reason);
      break;
    case "flow":
      b.u8(FrameType.FLOW).u32("max_in_flight", frame.maxInFlight);
      break;
    case "ping":
      b.u8(FrameType.PING).u64("nonce", frame.nonce);
      break;
    case "pong":
      b.u8(FrameType.PONG).u64("nonce", frame.nonce);
      break;
    case "error":
      b.u8(FrameType.ERROR).u16("code", frame.code).lossy16(frame.message);
      break;
    case "drain":
      b.u8(FrameType.DRAIN);
      break;
    case "drained":
      b.u8(FrameType.DRAINED);
      break;
    default:
      throw new EncodeError(`internal: ${frame.type} is a batch frame`);
  }
  return b.done();
}

/**
 * Encodes one frame on its own (a batch frame with all its entries in one
 * frame), as a connection of `version` carries it.
 */
export function encodeFrame(frame: Frame, version = PROTOCOL_VERSION): Buffer {
  const w = new FrameWriter(version);
  w.push(frame);
  return w.take() ?? Buffer.alloc(0);
}

// ---------------------------------------------------------------------------
// Decoding

/** Reads the fields of one frame body (type byte at offset 0). */
class Reader {
  pos = 0;
  /** The message flags the connection's version allows. */
  private readonly flags: number;
  constructor(
    readonly buf: Buffer,
    readonly version: number,
  ) {
    this.flags = messageFlags(version);
  }

  need(n: number): void {
    const have = this.buf.length - this.pos;
    if (have < n) {
      throw new DecodeError(
        "UnexpectedEof",
        `frame ends early at byte ${this.pos}: need ${n} more bytes, have ${have}`,
        { offset: this.pos, need: n, have },
      );
    }
  }
  u8(): number {
    this.need(1);
    return this.buf[this.pos++]!;
  }
  u16(): number {
    this.need(2);
    const n = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return n;
  }
  u32(): number {
    this.need(4);
    const n = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return n;
  }
  u64(): bigint {
    this.need(8);
    const n = this.buf.readBigUInt64BE(this.pos);
    this.pos += 8;
    return n;
  }
  uuid(): string {
    this.need(16);
    const id = readUuid(this.buf, this.pos);
    this.pos += 16;
    return id;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }
  text(n: number): string {
    this.need(n);
    const start = this.pos;
    const end = start + n;
    let ascii = true;
    for (let i = start; i < end; i++) {
      if (this.buf[i]! >= 0x80) {
        ascii = false;
        break;
      }
    }
    if (!ascii && !isUtf8(this.buf.subarray(start, end))) {
      throw new DecodeError("InvalidUtf8", `text at byte ${start} is not valid UTF-8`, { offset: start });
    }
    this.pos = end;
    return this.buf.toString(ascii ? "latin1" : "utf8", start, end);
  }
  str8(): string {
    return this.text(this.u8());
  }
  str16(): string {
    return this.text(this.u16());
  }
  /** A batch count, checked against what the rest of the body could hold. */
  count(entryBytesMin: number): number {
    const count = this.u32();
    if (count === 0) {
      throw new DecodeError("EmptyBatch", "batch frame has 0 entries; send no frame instead");
    }
    const fits = Math.floor((this.buf.length - this.pos) / entryBytesMin);
    const max = Math.min(fits, BATCH_ENTRIES_MAX);
    if (count > max) {
      throw new DecodeError("TooManyEntries", `batch claims ${count} entries; at most ${max} fit in this frame`, {
        count,
        max,
      });
    }
    return count;
  }

  /** A message that may also carry `extraFlags`; returns its flags too. */
  message(extraFlags = 0): [Message, number] {
    let offset = this.pos;
    const code = this.u8();
    const kind = KINDS[code];
    if (kind === undefined) {
      throw new DecodeError("UnknownKind", `unknown message kind ${code} at byte ${offset}`, { offset, code });
    }
    offset = this.pos;
    const flags = this.u8();
    if ((flags & ~(this.flags | extraFlags)) !== 0) {
      throw new DecodeError(
        "UnknownFlags",
        `unknown message flags 0x${flags.toString(16).padStart(2, "0")} at byte ${offset}`,
        { offset, flags },
      );
    }
    const name = this.str8();
    const major = this.u16();
    const minor = this.u16();
    const id = this.uuid();
    const activityId = this.uuid();
    const timestamp = this.u64();
    const sender = this.str8();
    const responseTo = flags & Flag.RESPONSE_TO ? this.uuid() : undefined;
    const key = flags & Flag.KEY ? this.bytes(this.u16()) : undefined;
    const expiresAt = flags & Flag.EXPIRES_AT ? this.u64() : undefined;
    const deliverAt = flags & Flag.DELIVER_AT ? this.u64() : undefined;
    const parentId = flags & Flag.PARENT_ID ? this.uuid() : undefined;
    const headerCount = this.u16();
    if (headerCount > HEADERS_MAX) {
      throw new DecodeError("TooManyHeaders", `message has ${headerCount} headers; at most ${HEADERS_MAX} are allowed`, {
        count: headerCount,
      });
    }
    const headers: Array<[string, string]> = [];
    for (let i = 0; i < headerCount; i++) {
      const k = this.str8();
      headers.push([k, this.str16()]);
    }
    const payload = this.bytes(this.u32());
    const message: Message = {
      kind,
      name,
      version: { major, minor },
      id,
      activityId,
      timestamp,
      sender,
      responseTo,
      key,
      expiresAt,
      deliverAt,
      parentId,
      transient: (flags & Flag.TRANSIENT) !== 0,
      final: (flags & Flag.FINAL) !== 0,
      headers,
      payload,
    };
    return [message, flags];
  }

  finish(): void {
    const extra = this.buf.length - this.pos;
    if (extra !== 0) {
      throw new DecodeError("TrailingBytes", `frame has ${extra} bytes left over after its body ends at byte ${this.pos}`, {
        offset: this.pos,
        extra,
      });
    }
  }
}

/**
 * Decodes a frame body (type byte first, no length prefix) as a connection
 * of `version` carries it. Payloads and keys are views of `body`, not copies.
 */
export function decodeBody(body: Buffer, version = PROTOCOL_VERSION): Frame {
  const r = new Reader(body, version);
  const type = r.u8();
  let frame: Frame;
  switch (type) {
    case FrameType.HELLO: {
      if (!r.bytes(4).equals(HELLO_MAGIC)) {
        throw new DecodeError("BadMagic", 'HELLO does not start with the magic bytes "CRR1"; is this a Courier client?');
      }
      const version = r.u16();
      const service = r.str8();
      const instance = r.str8();
      const maxInFlight = r.u32();
      const offset = r.pos;
      const credentials = r.u8();
      let token: string | undefined;
      if (credentials === 1) {
        token = r.str16();
      } else if (credentials !== 0) {
        throw new DecodeError("UnknownCredentials", `unknown credentials kind ${credentials} at byte ${offset}`, {
          offset,
          code: credentials,
        });
      }
      frame = { type: "hello", version, service, instance, maxInFlight, token };
      break;
    }
    case FrameType.WELCOME: {
      const version = r.u16();
      const connectionId = r.u64();
      const frameBytesMax = r.u32();
      const broker = r.str8();
      // The one optional field no flag announces: present iff bytes remain.
      const service = r.pos < body.length ? r.str8() : undefined;
      frame = { type: "welcome", version, connectionId, frameBytesMax, broker, service };
      break;
    }
    case FrameType.SEND: {
      const count = r.count(8 + MESSAGE_BYTES_MIN);
      const entries: SendEntry[] = [];
      for (let i = 0; i < count; i++) {
        const seq = r.u64();
        const [message, flags] = r.message(Flag.QUIET);
        entries.push({ seq, quiet: (flags & Flag.QUIET) !== 0, message });
      }
      frame = { type: "send", entries };
      break;
    }
    case FrameType.SEND_RESULT: {
      const withLogSeq = version >= LOG_SEQ_VERSION;
      const count = r.count(withLogSeq ? 20 : 12);
      const entries: SendOutcome[] = [];
      for (let i = 0; i < count; i++) {
        const seq = r.u64();
        const code = r.u16();
        const reason = r.str16();
        entries.push(withLogSeq ? { seq, code, reason, logSeq: r.u64() } : { seq, code, reason });
      }
      frame = { type: "send_result", entries };
      break;
    }
    case FrameType.SUBSCRIBE: {
      const request = r.u64();
      const pattern = r.str8();
      const ackDeadlineMs = r.u32();
      const maxDeliveries = r.u32();
      const offset = r.pos;
      const code = r.u8();
      const time = r.u64();
      let start: StartFrom;
      if ((code === 0 || code === 1) && time !== 0n) {
        throw new DecodeError(
          "StrayStartTime",
          `subscription start ${code} carries a start_time; it must be 0 unless start is 2 (time)`,
          { code },
        );
      } else if (code === 0) {
        start = { kind: "new" };
      } else if (code === 1) {
        start = { kind: "beginning" };
      } else if (code === 2) {
        start = { kind: "time", time };
      } else {
        throw new DecodeError("UnknownStart", `unknown subscription start ${code} at byte ${offset}`, { offset, code });
      }
      frame = { type: "subscribe", request, pattern, ackDeadlineMs, maxDeliveries, start };
      break;
    }
    case FrameType.UNSUBSCRIBE: {
      const request = r.u64();
      frame = { type: "unsubscribe", request, pattern: r.str8() };
      break;
    }
    case FrameType.RESULT: {
      const request = r.u64();
      const code = r.u16();
      frame = { type: "result", request, code, reason: r.str16() };
      break;
    }
    case FrameType.DELIVER: {
      const count = r.count(12 + MESSAGE_BYTES_MIN);
      const entries: Delivery[] = [];
      for (let i = 0; i < count; i++) {
        const delivery = r.u64();
        const attempt = r.u32();
        entries.push({ delivery, attempt, message: r.message()[0] });
      }
      frame = { type: "deliver", entries };
      break;
    }
    case FrameType.ACK: {
      const count = r.count(8);
      const deliveries: bigint[] = [];
      for (let i = 0; i < count; i++) {
        deliveries.push(r.u64());
      }
      frame = { type: "ack", deliveries };
      break;
    }
    case FrameType.NACK: {
      const count = r.count(12);
      const entries: NackEntry[] = [];
      for (let i = 0; i < count; i++) {
        const delivery = r.u64();
        entries.push({ delivery, delayMs: r.u32() });
      }
      frame = { type: "nack", entries };
      break;
    }
    case FrameType.FLOW:
      frame = { type: "flow", maxInFlight: r.u32() };
      break;
    case FrameType.PING:
      frame = { type: "ping", nonce: r.u64() };
      break;
    case FrameType.PONG:
      frame = { type: "pong", nonce: r.u64() };
      break;
    case FrameType.ERROR: {
      const code = r.u16();
      frame = { type: "error", code, message: r.str16() };
      break;
    }
    case FrameType.DRAIN:
      frame = { type: "drain" };
      break;
    case FrameType.DRAINED:
      frame = { type: "drained" };
      break;
    default:
      throw new DecodeError("UnknownFrameType", `unknown frame type 0x${type.toString(16).padStart(2, "0")}`, {
        frame_type: type,
      });
  }
  r.finish();
  return frame;
}

/** Decodes one message encoded by {@link encodeMessage} (nothing may follow it). */
export function decodeMessage(bytes: Buffer, version = PROTOCOL_VERSION): Message {
  const r = new Reader(bytes, version);
  const [message] = r.message();
  r.finish();
  return message;
}

/** Checks a frame's length prefix before anything is buffered for it. */
function checkLength(len: number, frameBytesMax: number): void {
  if (len === 0) {
    throw new DecodeError("EmptyFrame", "frame length is 0; a frame has at least its type byte");
  }
  if (len > frameBytesMax) {
    throw new DecodeError("FrameTooLarge", `frame of ${len} bytes exceeds the limit of ${frameBytesMax} bytes`, {
      len,
      max: frameBytesMax,
    });
  }
}

/**
 * Decodes the frame at the front of `bytes`: the frame and the bytes it
 * took, or null when more bytes are needed.
 */
export function decodeFrame(
  bytes: Buffer,
  frameBytesMax = FRAME_BYTES_MAX_DEFAULT,
  version = PROTOCOL_VERSION,
): { frame: Frame; size: number } | null {
  if (bytes.length < LENGTH_PREFIX_BYTES) {
    return null;
  }
  const len = bytes.readUInt32BE(0);
  checkLength(len, frameBytesMax);
  const size = LENGTH_PREFIX_BYTES + len;
  if (bytes.length < size) {
    return null;
  }
  return { frame: decodeBody(bytes.subarray(LENGTH_PREFIX_BYTES, size), version), size };
}

/**
 * Cuts a byte stream into frames: {@link FrameReader.push} each chunk as it
 * arrives, then take frames with {@link FrameReader.next} until it returns
 * null. A frame's chunks are joined once, when the frame is complete.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Bytes the frame at the front needs in all, once its prefix is known. */
  private needed = 0;
  /** The protocol version frames are read at: set it from WELCOME. */
  version = PROTOCOL_VERSION;

  constructor(private readonly frameBytesMax = FRAME_BYTES_MAX_DEFAULT) {}

  /** Bytes received and not yet taken as frames. */
  get pending(): number {
    return this.buffered;
  }

  push(chunk: Buffer): void {
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
  }

  /** The next whole frame, or null until more bytes arrive. Throws {@link DecodeError}. */
  next(): Frame | null {
    if (this.buffered < LENGTH_PREFIX_BYTES || this.buffered < this.needed) {
      return null;
    }
    let head = this.chunks[0]!;
    if (head.length < LENGTH_PREFIX_BYTES) {
      head = this.join();
    }
    const len = head.readUInt32BE(0);
    checkLength(len, this.frameBytesMax);
    const size = LENGTH_PREFIX_BYTES + len;
    if (this.buffered < size) {
      this.needed = size;
      return null;
    }
    this.needed = 0;
    if (head.length < size) {
      head = this.join();
    }
    const body = head.subarray(LENGTH_PREFIX_BYTES, size);
    if (head.length === size) {
      this.chunks.shift();
    } else {
      this.chunks[0] = head.subarray(size);
    }
    this.buffered -= size;
    return decodeBody(body, this.version);
  }

  private join(): Buffer {
    const joined = Buffer.concat(this.chunks, this.buffered);
    this.chunks = [joined];
    return joined;
  }
}
