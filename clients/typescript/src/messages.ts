// Messages as users build and receive them: options, payload encodings,
// replies, and the activity that flows from a handled message.

import { AsyncLocalStorage } from "node:async_hooks";

import type { Kind, Message, Version } from "./codec.js";
import { CourierError, InvalidMessageError } from "./errors.js";
import { validateName } from "./names.js";
import { TRACEPARENT, TraceParent } from "./trace.js";
import { isUuid, uuidv7 } from "./uuid.js";

/** What a message sent now inherits: an activity, and the message being handled if there is one. */
export interface ActivityScope {
  activityId: string;
  /** The message being handled: the `parentId` of what is sent meanwhile, and the parent of its trace. */
  handled?: Message;
  /** The handled message's trace, read once when first needed. */
  trace?: TraceParent;
}

/** The scope of a message being handled. */
export type HandlingScope = ActivityScope & { handled: Message };

const activityStorage = new AsyncLocalStorage<ActivityScope>();

/**
 * The activity a message sent now would belong to: the one of the message
 * being handled (anywhere in the handler's async call tree), or the one
 * started by {@link withActivity}; undefined elsewhere (a new message then
 * starts an activity of its own).
 */
export function currentActivity(): string | undefined {
  return activityStorage.getStore()?.activityId;
}

/** Runs `fn` so that everything it sends belongs to the activity `activityId`. */
export function withActivity<T>(activityId: string, fn: () => T): T {
  if (!isUuid(activityId)) {
    throw new InvalidMessageError(`activity id ${JSON.stringify(activityId)} is not a UUID`);
  }
  return activityStorage.run({ activityId }, fn);
}

/** Options of every message sent. */
export interface SendOptions {
  /** Ordering key: messages with the same key are handled in order, one at a time per service. */
  key?: string | Uint8Array;
  /** Dropped undelivered if not delivered within this many milliseconds. */
  ttlMs?: number;
  /** Not delivered before this many milliseconds have passed (deferred delivery). */
  delayMs?: number;
  /** At most once, in memory only: lowest latency, no redelivery. */
  transient?: boolean;
  /** Headers, in order (`content-type`, `traceparent` …). */
  headers?: Record<string, string> | ReadonlyArray<readonly [string, string]>;
  /** The contract version, `"MAJOR.MINOR"` or `{ major, minor }`; default 1.0. */
  version?: string | Version;
  /** The message id (a UUID; default a fresh UUIDv7). The broker drops a second message with an id it accepted. */
  id?: string;
  /** The activity the message belongs to; default the current one (see {@link currentActivity}). */
  activityId?: string;
}

/** Options of `send` and `publish`. */
export interface PublishOptions extends SendOptions {
  /**
   * Don't ask for the broker's acceptance: the promise resolves once the
   * message is queued for the socket, the broker answers only a refusal
   * (counted in `client.unheardRefusals`), and `client.flush()` confirms
   * everything sent before it. Nothing is re-sent after a reconnect, so
   * meant for transient messages; fails at once while disconnected.
   */
  quiet?: boolean;
}

/** Options of `request` and `requestStream`. */
export interface RequestOptions extends SendOptions {
  /** How long to wait for the (final) reply; default the client's `requestTimeoutMs`. */
  timeoutMs?: number;
  /** Aborts the wait (the command stays sent). */
  signal?: AbortSignal;
}

/** Options of a reply. */
export interface ReplyOptions {
  /** Whether this is the last reply (default true); false for a streaming reply that more follow. */
  final?: boolean;
  headers?: SendOptions["headers"];
  version?: SendOptions["version"];
  id?: string;
}

const JSON_CONTENT_TYPE = "application/json";

/** Unix nanoseconds, `ms` milliseconds from now. */
function nanosFromNow(ms: number, what: string): bigint {
  if (!Number.isFinite(ms) || ms < 0) {
    throw new InvalidMessageError(`${what} must be a number of milliseconds ≥ 0, not ${ms}`);
  }
  return BigInt(Date.now() + Math.round(ms)) * 1_000_000n;
}

function parseVersion(version: string | Version): Version {
  if (typeof version !== "string") {
    return version;
  }
  const match = /^(\d+)(?:\.(\d+))?$/.exec(version);
  const major = match ? Number(match[1]) : NaN;
  const minor = match ? Number(match[2] ?? "0") : NaN;
  if (!(major <= 0xffff && minor <= 0xffff)) {
    throw new InvalidMessageError(`version ${JSON.stringify(version)} is not MAJOR.MINOR (for example "1.2")`);
  }
  return { major, minor };
}

function headerList(headers: SendOptions["headers"]): Array<[string, string]> {
  if (headers === undefined) {
    return [];
  }
  const list: Array<[string, string]> = Array.isArray(headers)
    ? headers.map(([k, v]) => [k, v] as [string, string])
    : Object.entries(headers as Record<string, string>);
  for (const [k, v] of list) {
    if (typeof k !== "string" || typeof v !== "string") {
      throw new InvalidMessageError(`header ${String(k)} must have a string name and value`);
    }
  }
  return list;
}

/**
 * The payload's bytes: a `Uint8Array` (or `Buffer`) as it is, `undefined`
 * as nothing, anything else as JSON (and `content-type: application/json`).
 */
export function encodePayload(payload: unknown): { bytes: Buffer; json: boolean } {
  if (payload === undefined) {
    return { bytes: Buffer.alloc(0), json: false };
  }
  if (payload instanceof Uint8Array) {
    return {
      bytes: Buffer.isBuffer(payload) ? payload : Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength),
      json: false,
    };
  }
  const text = JSON.stringify(payload);
  if (text === undefined) {
    throw new InvalidMessageError(`payload of type ${typeof payload} cannot be encoded as JSON`);
  }
  return { bytes: Buffer.from(text, "utf8"), json: true };
}

/**
 * Builds the envelope of a message to send (timestamp and sender are the
 * broker's). It inherits from `cause`, else from the activity in scope
 * unless `options.activityId` names another.
 */
export function buildMessage(
  kind: Kind,
  name: string,
  payload: unknown,
  options: SendOptions = {},
  cause?: ActivityScope,
): Message {
  validateName(name);
  const { bytes, json } = encodePayload(payload);
  const headers = headerList(options.headers);
  if (json && !headers.some(([k]) => k === "content-type")) {
    headers.push(["content-type", JSON_CONTENT_TYPE]);
  }
  // Only ids from the caller are checked: generated ones, and activities
  // (checked by withActivity or decoded from a delivery), are well formed.
  if (options.id !== undefined && !isUuid(options.id)) {
    throw new InvalidMessageError(`message id ${JSON.stringify(options.id)} is not a UUID`);
  }
  if (options.activityId !== undefined && !isUuid(options.activityId)) {
    throw new InvalidMessageError(`activity id ${JSON.stringify(options.activityId)} is not a UUID`);
  }
  const id = options.id ?? uuidv7();
  // A new activity is named after the message that starts it; one sent
  // while handling another inherits its activity, names it as parent and
  // continues its trace (unless the sender set a traceparent itself).
  const scope = cause ?? (options.activityId === undefined ? activityStorage.getStore() : undefined);
  const activityId = scope?.activityId ?? options.activityId ?? id;
  const handled = scope?.handled;
  if (scope !== undefined && handled !== undefined && !headers.some(([k]) => k === TRACEPARENT)) {
    scope.trace ??= TraceParent.of(handled);
    headers.push([TRACEPARENT, scope.trace.child(id).toHeader()]);
  }
  const key =
    options.key === undefined
      ? undefined
      : typeof options.key === "string"
        ? Buffer.from(options.key, "utf8")
        : Buffer.from(options.key);
  return {
    kind,
    name,
    version: options.version === undefined ? { major: 1, minor: 0 } : parseVersion(options.version),
    id,
    activityId,
    timestamp: 0n,
    sender: "",
    responseTo: undefined,
    key,
    expiresAt: options.ttlMs === undefined ? undefined : nanosFromNow(options.ttlMs, "ttlMs"),
    deliverAt: options.delayMs === undefined ? undefined : nanosFromNow(options.delayMs, "delayMs"),
    parentId: handled?.id,
    transient: options.transient ?? false,
    final: kind === "reply",
    headers,
    payload: bytes,
  };
}

/** Readers shared by deliveries and replies. */
abstract class Received {
  constructor(
    /** The whole envelope as delivered. */
    readonly envelope: Message,
  ) {}

  get name(): string {
    return this.envelope.name;
  }
  get id(): string {
    return this.envelope.id;
  }
  get activityId(): string {
    return this.envelope.activityId;
  }
  /** The message whose handling caused this one, when the sender said (protocol version 2 on). */
  get parentId(): string | undefined {
    return this.envelope.parentId;
  }
  /** The service that sent it, as the broker authenticated it. */
  get sender(): string {
    return this.envelope.sender;
  }
  /** When the broker accepted it. */
  get timestamp(): Date {
    return new Date(Number(this.envelope.timestamp / 1_000_000n));
  }
  get headers(): ReadonlyArray<[string, string]> {
    return this.envelope.headers;
  }
  /** The first header named `name`. */
  header(name: string): string | undefined {
    return this.envelope.headers.find(([k]) => k === name)?.[1];
  }
  /** The raw payload bytes, whatever their encoding. */
  get payload(): Buffer {
    return this.envelope.payload;
  }
  /** The payload as UTF-8 text. */
  text(): string {
    return this.envelope.payload.toString("utf8");
  }
  /** The payload decoded from JSON. */
  json<T = unknown>(): T {
    try {
      return JSON.parse(this.text()) as T;
    } catch (e) {
      throw new CourierError(`payload of ${this.name} is not valid JSON: ${(e as Error).message}`);
    }
  }
}

/** One reply to a command. */
export class Reply extends Received {
  /** No more replies follow. */
  get final(): boolean {
    return this.envelope.final;
  }
  /** The id of the command this reply answers. */
  get responseTo(): string | undefined {
    return this.envelope.responseTo;
  }
}

/** What a delivery needs from its client. */
export interface DeliveryOwner {
  settle(generation: number, delivery: bigint, transient: boolean, nackDelayMs: number | undefined): void;
  reply(to: HandlingScope, outcome: string, payload: unknown, options: ReplyOptions): PromiseLike<string>;
  readonly nackDelayMs: number;
}

/**
 * A delivered command or event, and the means to answer it. Messages sent
 * while it is handled carry its `activityId`, its id as their `parentId`
 * and a child of its trace as their `traceparent`.
 */
export class IncomingMessage extends Received {
  private settledAs: "ack" | "nack" | null = null;
  /** What its replies, and what is sent while it is handled, inherit. */
  private readonly scope: HandlingScope;

  /** @internal */
  constructor(
    envelope: Message,
    /** 1 on the first delivery; more when redelivered. */
    readonly attempt: number,
    private readonly owner: DeliveryOwner,
    private readonly generation: number,
    private readonly delivery: bigint,
  ) {
    super(envelope);
    this.scope = { activityId: envelope.activityId, handled: envelope };
  }

  get kind(): Kind {
    return this.envelope.kind;
  }
  /** The ordering key, if the message has one. */
  get key(): Buffer | undefined {
    return this.envelope.key;
  }
  /** Whether it was acked or nacked already (by the handler, or for it). */
  get settled(): boolean {
    return this.settledAs !== null;
  }
  /** @internal Whether it was nacked. */
  get nacked(): boolean {
    return this.settledAs === "nack";
  }

  /**
   * Replies to this command with `outcome` (its name in domain language,
   * e.g. `todo.created`); final unless `{ final: false }` (a streaming
   * reply, more follow). Resolves once the broker accepted the reply.
   */
  reply(outcome: string, payload?: unknown, options: ReplyOptions = {}): PromiseLike<string> {
    return this.owner.reply(this.scope, outcome, payload, options);
  }

  /** Marks the delivery handled. Done for you when the handler resolves. */
  ack(): void {
    this.settle("ack", undefined);
  }

  /**
   * Asks for redelivery no sooner than `delayMs` from now (default the
   * client's `nackDelayMs`). Done for you when the handler throws.
   */
  nack(delayMs?: number): void {
    this.settle("nack", delayMs ?? this.owner.nackDelayMs);
  }

  private settle(as: "ack" | "nack", nackDelayMs: number | undefined): void {
    if (this.settledAs !== null) {
      throw new CourierError(`this delivery of ${this.name} was already ${this.settledAs}ed`);
    }
    this.settledAs = as;
    this.owner.settle(this.generation, this.delivery, this.envelope.transient, nackDelayMs);
  }

  /** @internal Settles unless the handler did: ack on success, nack on failure. */
  finish(nackDelayMs: number | undefined | null): void {
    if (this.settledAs === null) {
      if (nackDelayMs === null) {
        this.settle("ack", undefined);
      } else {
        this.settle("nack", nackDelayMs ?? this.owner.nackDelayMs);
      }
    }
  }

  /** @internal Runs `fn` in this message's activity. */
  inActivity<T>(fn: () => T): T {
    return activityStorage.run(this.scope, fn);
  }
}
