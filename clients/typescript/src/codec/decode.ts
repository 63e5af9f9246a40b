// Bytes to frames and messages, every length and field checked.

import { isUtf8 } from "node:buffer";

import { readUuid } from "../uuid.js";
import {
  BATCH_ENTRIES_MAX,
  DecodeError,
  FRAME_BYTES_MAX_DEFAULT,
  Flag,
  FrameType,
  HEADERS_MAX,
  HELLO_MAGIC,
  LOG_SEQ_VERSION,
  MESSAGE_BYTES_MIN,
  PROTOCOL_VERSION,
  type Delivery,
  type Frame,
  type Message,
  type NackEntry,
  type SendEntry,
  type SendOutcome,
  type StartFrom,
} from "./frames.js";
import { KINDS, LENGTH_PREFIX_BYTES, messageFlags } from "./wire.js";

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
