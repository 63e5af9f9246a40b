// Frame and message types of the wire protocol, its constants and error
// kinds (docs/PROTOCOL.md §4, §5).

import { CourierError } from "../errors.js";

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

export type Kind = "command" | "event" | "reply";

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
