// Frames and messages to bytes, and the batching writer.

import { writeUuid } from "../uuid.js";
import {
  BATCH_BYTES_TARGET,
  BATCH_ENTRIES_MAX,
  EncodeError,
  Flag,
  FrameType,
  HEADERS_MAX,
  HELLO_MAGIC,
  LOG_SEQ_VERSION,
  MESSAGE_BYTES_MIN,
  PARENT_ID_VERSION,
  PROTOCOL_VERSION,
  type Frame,
  type Message,
} from "./frames.js";
import { KIND_CODES, LENGTH_PREFIX_BYTES, U16_MAX, U32_MAX, U64_MAX } from "./wire.js";

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
