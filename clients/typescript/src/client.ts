// The client: one connection to the broker on behalf of one service
// instance, reconnecting by itself.

import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import * as net from "node:net";
import * as tls from "node:tls";

import {
  FRAME_BYTES_MAX_DEFAULT,
  FrameReader,
  FrameWriter,
  ATTEMPT_KEY_START,
  PIPELINED_KEYS_VERSION,
  PROTOCOL_VERSION,
  Flag,
  encodeFrame,
  encodeMessage,
  layoutMessage,
  type Frame,
  type Kind,
  type Message,
  type StartFrom,
} from "./codec.js";
import {
  ClosedError,
  ConnectionError,
  CourierError,
  InvalidMessageError,
  Nack,
  RefusedError,
  TimeoutError,
} from "./errors.js";
import {
  IncomingMessage,
  Reply,
  buildMessage,
  type DeliveryOwner,
  type PublishOptions,
  type ReplyOptions,
  type RequestOptions,
  type SendOptions,
} from "./messages.js";
import { nameProblem, patternMatches, validatePattern } from "./names.js";

/** TLS to the broker (TLS 1.3, ALPN `courier/1`). */
export interface TlsOptions {
  /** The CA that signs the broker's certificate, the only one trusted: PEM text or a file path (read at each connect). */
  ca: string | Buffer;
  /** A client certificate chain for brokers that authenticate by certificate (mTLS): PEM text or a file path. */
  cert?: string | Buffer;
  /** The private key of `cert`: PEM text or a file path. */
  key?: string | Buffer;
  /** The name the broker's certificate must carry; default the host of `url`. */
  serverName?: string;
}

/** Where warnings go; `null` in the options silences them. */
export interface Logger {
  warn(message: string): void;
}

export interface ClientOptions {
  /** `host:port` of the broker; default `$COURIER_URL`, else `127.0.0.1:7700`. */
  url?: string;
  /** The service this client acts for. May be empty with a token or client certificate under a manifest: they decide. */
  service: string;
  /** This instance's name; the broker makes one up when empty. */
  instance?: string;
  /** Credentials for brokers with a manifest. */
  token?: string;
  /** TLS to the broker; plain TCP without. */
  tls?: TlsOptions;
  /** Unacknowledged deliveries the broker may have outstanding on this connection (default 64). */
  maxInFlight?: number;
  /** Handlers running at once (default `maxInFlight`); further deliveries wait in order. */
  concurrency?: number;
  /** How long a send waits for the broker's acceptance (default 30 000). */
  sendTimeoutMs?: number;
  /** How long a request waits for its reply unless told otherwise (default 30 000). */
  requestTimeoutMs?: number;
  /** Ack deadline asked for this service's subscriptions; default the broker's. */
  ackDeadlineMs?: number;
  /** Deliveries of one message before it goes to the dead letters; default the broker's. */
  maxDeliveries?: number;
  /** Redelivery delay when a handler throws (default 1 000). */
  nackDelayMs?: number;
  /** First reconnect delay (default 50); doubles per failed attempt … */
  reconnectDelayMinMs?: number;
  /** … up to this (default 5 000); each delay is jittered. */
  reconnectDelayMaxMs?: number;
  /** TCP connect, TLS and HELLO/WELCOME must finish within this (default 10 000). */
  handshakeTimeoutMs?: number;
  /** A PING goes out this often (default 10 000) … */
  pingIntervalMs?: number;
  /** … and a connection on which nothing arrived for this long is given up and replaced (default 30 000). */
  idleTimeoutMs?: number;
  /** How long `close()` waits for running handlers and unanswered sends (default 30 000). */
  drainTimeoutMs?: number;
  /** Transient deliveries that may wait for a free handler before more are dropped (default 10 000). */
  transientQueueMax?: number;
  /** Warnings (lost connection, failed handler …); default `console`, `null` for none. */
  logger?: Logger | null;
}

/** Bytes of quiet sends that may wait for the socket before a quiet send waits for room. */
export const QUIET_BUFFER_BYTES_MAX = 1024 * 1024;
/** Replies buffered per request stream before further ones are dropped. */
const REPLY_BUFFER_MAX = 1024;
/** The ALPN protocol offered: Courier, version 1. */
const ALPN = "courier/1";
/** Largest frame accepted from the broker. */
const INBOUND_FRAME_BYTES_MAX = 64 * 1024 * 1024;

/**
 * Options from the environment, as the CLI and the Rust SDK read them:
 * `COURIER_URL` (default `127.0.0.1:7700`), `COURIER_TOKEN`, and with
 * `COURIER_TLS_CA` TLS trusting that CA, with the client certificate of
 * `COURIER_TLS_CERT` and `COURIER_TLS_KEY` when both are set. The service
 * is `COURIER_SERVICE`; without it a token or client certificate decides
 * (the service stays empty, the broker names it), else it is `cli`.
 */
export function optionsFromEnv(overrides: Partial<ClientOptions> = {}): ClientOptions {
  const env = process.env;
  const credentials = Boolean(env.COURIER_TOKEN) || Boolean(env.COURIER_TLS_CERT && env.COURIER_TLS_KEY);
  const options: ClientOptions = {
    url: env.COURIER_URL ?? "127.0.0.1:7700",
    service: env.COURIER_SERVICE ?? (credentials ? "" : "cli"),
  };
  if (env.COURIER_TOKEN) {
    options.token = env.COURIER_TOKEN;
  }
  if (env.COURIER_TLS_CA) {
    options.tls = { ca: env.COURIER_TLS_CA };
    if (env.COURIER_TLS_CERT && env.COURIER_TLS_KEY) {
      options.tls.cert = env.COURIER_TLS_CERT;
      options.tls.key = env.COURIER_TLS_KEY;
    }
  }
  return { ...options, ...overrides };
}

type Settled = { ok: true; id: string } | { ok: false; error: Error };

/**
 * The broker's answer to one queued message: await it (it is a thenable)
 * for the message's id once the broker accepted it, or the refusal. The id
 * is known at once. Nothing is raised for an answer never awaited.
 */
export class PendingAck implements PromiseLike<string> {
  private outcome: Settled | null = null;
  private promise: Promise<string> | null = null;
  private resolveFn: ((id: string) => void) | null = null;
  private rejectFn: ((error: Error) => void) | null = null;

  /** @internal */
  constructor(
    /** The message's id. */
    readonly id: string,
  ) {}

  /** @internal */
  settle(outcome: Settled): void {
    if (this.outcome !== null) {
      return;
    }
    this.outcome = outcome;
    if (outcome.ok) {
      this.resolveFn?.(outcome.id);
    } else {
      this.rejectFn?.(outcome.error);
    }
  }

  private settled(): Promise<string> {
    if (this.promise === null) {
      const outcome = this.outcome;
      if (outcome === null) {
        this.promise = new Promise<string>((resolve, reject) => {
          this.resolveFn = resolve;
          this.rejectFn = reject;
        });
      } else {
        this.promise = outcome.ok ? Promise.resolve(outcome.id) : Promise.reject(outcome.error);
      }
    }
    return this.promise;
  }

  then<A = string, B = never>(
    onFulfilled?: ((id: string) => A | PromiseLike<A>) | null,
    onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    return this.settled().then(onFulfilled, onRejected);
  }

  catch<B = never>(onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<string | B> {
    return this.settled().catch(onRejected);
  }
}

/**
 * The replies to one command, as an async iterable: it ends after the
 * final reply, or throws the {@link TimeoutError} when the request's
 * timeout passes first (or the refusal of the command, or the abort
 * reason). Leaving the loop early forgets the request.
 *
 * ```ts
 * for await (const reply of client.requestStream("file.copy", { from: "a" })) {
 *   console.log(reply.name, reply.json());
 * }
 * ```
 */
export class ReplyStream implements AsyncIterable<Reply> {
  private buffered: Reply[] = [];
  private error: Error | null = null;
  private ended = false;
  private waiter: { resolve: (r: IteratorResult<Reply>) => void; reject: (e: Error) => void } | null = null;
  private timer: NodeJS.Timeout | null = null;
  private dropped = 0;

  /** @internal */
  constructor(
    /** The id of the command these replies answer. */
    readonly commandId: string,
    private readonly forget: () => void,
    timeoutMs: number,
    signal: AbortSignal | undefined,
  ) {
    this.timer = setTimeout(() => {
      this.fail(new TimeoutError("no final reply", timeoutMs));
    }, timeoutMs);
    if (signal !== undefined) {
      const abort = (): void => {
        const reason: unknown = signal.reason;
        this.fail(reason instanceof Error ? reason : new CourierError("the request was aborted"));
      };
      if (signal.aborted) {
        abort();
      } else {
        signal.addEventListener("abort", abort, { once: true });
        // One signal may serve many requests: each takes its listener along.
        this.unlisten = () => signal.removeEventListener("abort", abort);
      }
    }
  }

  private unlisten: (() => void) | null = null;

  /** @internal A reply arrived; true if it was the final one. */
  push(reply: Reply): boolean {
    if (this.ended || this.error !== null) {
      return true;
    }
    if (reply.final) {
      this.finish();
      this.forget();
    }
    if (this.waiter !== null) {
      const waiter = this.waiter;
      this.waiter = null;
      waiter.resolve({ done: false, value: reply });
    } else if (this.buffered.length < REPLY_BUFFER_MAX || reply.final) {
      this.buffered.push(reply);
    } else {
      this.dropped++;
    }
    if (reply.final) {
      this.ended = true;
    }
    return reply.final;
  }

  /** @internal The request ends with `error` (after the replies already buffered). */
  fail(error: Error): void {
    if (this.ended || this.error !== null) {
      return;
    }
    this.finish();
    this.error = error;
    this.forget();
    if (this.waiter !== null) {
      const waiter = this.waiter;
      this.waiter = null;
      waiter.reject(error);
    }
  }

  /** Replies dropped because more than 1 024 waited unread. */
  get droppedReplies(): number {
    return this.dropped;
  }

  private finish(): void {
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    this.unlisten?.();
    this.unlisten = null;
  }

  /** Stops waiting for replies. */
  cancel(): void {
    if (!this.ended) {
      this.ended = true;
      this.finish();
      this.forget();
    }
    this.buffered = [];
    if (this.waiter !== null) {
      const waiter = this.waiter;
      this.waiter = null;
      waiter.resolve({ done: true, value: undefined });
    }
  }

  /** The next reply; `done` after the final one. */
  next(): Promise<IteratorResult<Reply>> {
    const reply = this.buffered.shift();
    if (reply !== undefined) {
      return Promise.resolve({ done: false, value: reply });
    }
    if (this.error !== null) {
      const error = this.error;
      this.ended = true;
      return Promise.reject(error);
    }
    if (this.ended) {
      return Promise.resolve({ done: true, value: undefined });
    }
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  [Symbol.asyncIterator](): AsyncIterator<Reply> {
    return {
      next: () => this.next(),
      return: () => {
        this.cancel();
        return Promise.resolve({ done: true, value: undefined });
      },
    };
  }
}

/** A handler for deliveries: resolving acks, throwing nacks. */
export type Handler = (message: IncomingMessage) => unknown;

/** Where a subscription new to the service starts: new messages only, every retained event, or those accepted since a time. */
export type From = "new" | "beginning" | Date;

export interface SubscribeOptions {
  /** Only when the broker does not know the subscription yet (default `"new"`). */
  from?: From;
}

interface Subscription {
  pattern: string;
  start: StartFrom;
  handler: Handler;
  /** `on()` calls waiting for the broker's RESULT. */
  waiters: Array<{ resolve: () => void; reject: (e: Error) => void }>;
}

interface PendingSend {
  seq: bigint;
  /** The encoded message, re-sent as it is after a reconnect. */
  bytes: Buffer;
  ack: PendingAck;
  deadline: number;
}

interface Operation {
  resolve: () => void;
  reject: (e: Error) => void;
  subscription: Subscription | null;
}

interface Flush {
  nonce: bigint;
  resolve: () => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

interface Job {
  handler: Handler;
  message: IncomingMessage;
  /** Keyed on a pipelined connection: its place in its key's line. */
  ticket?: KeyTicket;
}

/** A delivery's place among its key's on a pipelined connection (protocol version 4). */
interface KeyTicket {
  key: string;
  generation: number;
  /** The key start it came after ({@link KeyLine.run}). */
  run: number;
  /** Its arrival number within the key. */
  n: number;
}

/**
 * One ordering key on a pipelined connection (protocol version 4,
 * docs/PROTOCOL.md §8.4): the broker sends a key's next deliveries before
 * the earlier ones are acked, and this hands them to handlers one at a
 * time, in arrival order (which is the key's order). A nacked one makes
 * the broker take back every later delivery of the key; those that arrive
 * before the broker's next key start (bit 31 of `attempt`) are dropped
 * unhandled and unsettled.
 */
class KeyLine {
  /** Key starts seen. */
  run = 0;
  arrivals = 0;
  /** Deliveries of this run that arrived after this one are stale. */
  dropAfter: number | null = null;
  /** A delivery of the key is with a handler, or queued for one. */
  busy = false;
  /** Deliveries waiting for it, in order. */
  waiting: Job[] = [];

  live(ticket: KeyTicket): boolean {
    return ticket.run === this.run && (this.dropAfter === null || ticket.n <= this.dropAfter);
  }
}

/** Deliveries waiting for a free handler, first in first out, in O(1) per job. */
class JobQueue {
  private jobs: Array<Job | undefined> = [];
  private head = 0;

  get length(): number {
    return this.jobs.length - this.head;
  }

  push(job: Job): void {
    this.jobs.push(job);
  }

  shift(): Job | undefined {
    if (this.head === this.jobs.length) {
      return undefined;
    }
    const job = this.jobs[this.head];
    this.jobs[this.head++] = undefined;
    // Drop the consumed front once it is most of the array.
    if (this.head > 1024 && this.head * 2 > this.jobs.length) {
      this.jobs = this.jobs.slice(this.head);
      this.head = 0;
    }
    return job;
  }

  clear(): void {
    this.jobs = [];
    this.head = 0;
  }
}

/** What a connection learned from the broker's WELCOME. */
export interface ConnectionInfo {
  connectionId: bigint;
  broker: string;
  service: string;
  frameBytesMax: number;
  /** The protocol version both ends speak on this connection (WELCOME's). */
  protocolVersion: number;
}

interface Established {
  socket: net.Socket;
  reader: FrameReader;
  info: ConnectionInfo;
}

type State = "open" | "closing" | "closed";

/** `value` if `valid` says so; otherwise a RangeError naming the option. */
function resolved<T>(value: T, valid: (v: T) => boolean, what: string): T {
  if (!valid(value)) {
    throw new RangeError(`option ${what} is out of range: ${String(value)}`);
  }
  return value;
}

function splitUrl(url: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(url);
  const port = match ? Number(match[3]) : NaN;
  if (!match || !(port > 0 && port < 65536)) {
    throw new InvalidMessageError(`broker url ${JSON.stringify(url)} is not host:port (for example 127.0.0.1:7700)`);
  }
  return { host: match[1] ?? match[2]!, port };
}

/** PEM text as given, or read from the file it names. */
function pem(value: string | Buffer, what: string): string | Buffer {
  if (Buffer.isBuffer(value) || value.includes("-----BEGIN")) {
    return value;
  }
  try {
    return readFileSync(value);
  } catch (e) {
    throw new ConnectionError(`cannot read ${what} ${value}: ${(e as Error).message}`);
  }
}

/** Why a TLS session failed, in words that point at the fix. */
function tlsHint(error: NodeJS.ErrnoException): string {
  const code = error.code ?? "";
  if (code === "ERR_TLS_CERT_ALTNAME_INVALID") {
    return "; the broker's certificate does not name this host: connect by a name it carries, or set tls.serverName";
  }
  if (code.includes("CERT") || code.includes("SIGNATURE") || code === "UNABLE_TO_GET_ISSUER_CERT_LOCALLY") {
    return "; the broker's certificate is not signed by the trusted CA (tls.ca / COURIER_TLS_CA)";
  }
  if (code === "EPROTO" || /wrong version number|packet length too long/.test(error.message)) {
    return "; is the broker listening with TLS (courier serve --tls-cert --tls-key)?";
  }
  if (/alert/.test(error.message)) {
    return "; the broker refused the TLS session: is this client certificate signed by the broker's --tls-client-ca?";
  }
  return "";
}

/**
 * A connection to the broker on behalf of one service instance.
 *
 * ```ts
 * const todo = await Client.connect({ url: "127.0.0.1:7700", service: "todo" });
 * await todo.on("todo.create", async (msg) => {
 *   await msg.reply("todo.created", msg.json());
 * });
 * const web = await Client.connect({ url: "127.0.0.1:7700", service: "web" });
 * const reply = await web.request("todo.create", { text: "milk" });
 * ```
 */
export class Client implements DeliveryOwner {
  /** `connected` (ConnectionInfo), `disconnected` (Error), `handlerError` (Error, IncomingMessage). */
  readonly events = new EventEmitter();

  readonly nackDelayMs: number;
  private readonly opts: Required<
    Omit<ClientOptions, "tls" | "token" | "ackDeadlineMs" | "maxDeliveries" | "logger" | "url">
  > & {
    url: string;
    tls: TlsOptions | undefined;
    token: string | undefined;
    ackDeadlineMs: number | undefined;
    maxDeliveries: number | undefined;
  };
  private readonly host: string;
  private readonly port: number;
  private readonly logger: Logger | null;

  private state: State = "open";
  private socket: net.Socket | null = null;
  private info: ConnectionInfo | null = null;
  /** Counts connections; a delivery from an older one cannot be settled. */
  private generation = 0;
  private writer = new FrameWriter();
  private writeScheduled = false;
  private frameBytesMax = FRAME_BYTES_MAX_DEFAULT;
  private readonly keyLines = new Map<string, KeyLine>();
  private lastReceivedAt = 0;
  private keepAlive: NodeJS.Timeout | null = null;
  private sweeper: NodeJS.Timeout | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private reconnectWake: (() => void) | null = null;

  private nextSeq = 0n;
  private readonly pendingSends = new Map<bigint, PendingSend>();
  /** Transient requests' commands, sent QUIET: command id by seq (only a refusal is answered). */
  private readonly quietRequests = new Map<bigint, string>();
  private readonly requests = new Map<string, ReplyStream>();
  private readonly subscriptions: Subscription[] = [];
  private nextOp = 0n;
  private readonly operations = new Map<bigint, Operation>();
  private flushes: Flush[] = [];
  private nextFlush = 0n;
  private drained: (() => void) | null = null;
  private roomWaiters: Array<() => void> = [];

  private running = 0;
  private pumping = false;
  private readonly queue = new JobQueue();
  private idleWaiters: Array<() => void> = [];
  private refusalsUnheard = 0;
  private lastRefusal: RefusedError | undefined;
  private transientDropped = 0;

  private constructor(options: ClientOptions) {
    const url = options.url ?? process.env.COURIER_URL ?? "127.0.0.1:7700";
    const maxInFlight = options.maxInFlight ?? 64;
    const positive = (n: number): boolean => Number.isInteger(n) && n > 0;
    const nonNegative = (n: number): boolean => Number.isFinite(n) && n >= 0;
    this.opts = {
      url,
      service: options.service,
      instance: options.instance ?? "",
      token: options.token,
      tls: options.tls,
      maxInFlight: resolved(maxInFlight, (n) => Number.isInteger(n) && n >= 0 && n <= 0xffff_ffff, "maxInFlight"),
      concurrency: resolved(options.concurrency ?? Math.max(1, maxInFlight), positive, "concurrency"),
      sendTimeoutMs: resolved(options.sendTimeoutMs ?? 30_000, positive, "sendTimeoutMs"),
      requestTimeoutMs: resolved(options.requestTimeoutMs ?? 30_000, positive, "requestTimeoutMs"),
      ackDeadlineMs:
        options.ackDeadlineMs === undefined
          ? undefined
          : resolved(options.ackDeadlineMs, (n) => Number.isInteger(n) && n > 0 && n <= 0xffff_ffff, "ackDeadlineMs"),
      maxDeliveries:
        options.maxDeliveries === undefined
          ? undefined
          : resolved(options.maxDeliveries, (n) => Number.isInteger(n) && n > 0 && n <= 0xffff_ffff, "maxDeliveries"),
      nackDelayMs: resolved(options.nackDelayMs ?? 1_000, nonNegative, "nackDelayMs"),
      reconnectDelayMinMs: resolved(options.reconnectDelayMinMs ?? 50, positive, "reconnectDelayMinMs"),
      reconnectDelayMaxMs: resolved(options.reconnectDelayMaxMs ?? 5_000, positive, "reconnectDelayMaxMs"),
      handshakeTimeoutMs: resolved(options.handshakeTimeoutMs ?? 10_000, positive, "handshakeTimeoutMs"),
      pingIntervalMs: resolved(options.pingIntervalMs ?? 10_000, positive, "pingIntervalMs"),
      idleTimeoutMs: resolved(options.idleTimeoutMs ?? 30_000, positive, "idleTimeoutMs"),
      drainTimeoutMs: resolved(options.drainTimeoutMs ?? 30_000, nonNegative, "drainTimeoutMs"),
      transientQueueMax: resolved(options.transientQueueMax ?? 10_000, nonNegative, "transientQueueMax"),
    };
    this.nackDelayMs = this.opts.nackDelayMs;
    this.logger = options.logger === undefined ? { warn: (m) => console.warn(`courier: ${m}`) } : options.logger;
    ({ host: this.host, port: this.port } = splitUrl(url));
    const service = this.opts.service;
    // Empty with credentials: the broker takes the service from them.
    const credentials = this.opts.token !== undefined || this.opts.tls?.cert !== undefined;
    if (!(service === "" && credentials)) {
      const problem = nameProblem(service);
      if (problem !== null) {
        throw new InvalidMessageError(`service ${problem}`);
      }
    }
  }

  /**
   * Connects and completes the handshake. Fails at once if the broker
   * cannot be reached or refuses; after that, the client reconnects by
   * itself.
   */
  static async connect(options: ClientOptions): Promise<Client> {
    const client = new Client(options);
    const established = await client.establish();
    client.attach(established);
    return client;
  }

  /** The service this client acts for: the one the broker authenticated. */
  get service(): string {
    return this.info?.service ?? this.opts.service;
  }

  /** Whether a connection to the broker is up right now. */
  get connected(): boolean {
    return this.socket !== null;
  }

  /** What the broker said in its WELCOME on the latest connection. */
  get connection(): ConnectionInfo | null {
    return this.info;
  }

  /**
   * Refusals nobody awaited: of quiet sends, and of sends whose wait had
   * timed out when the broker answered.
   */
  get unheardRefusals(): number {
    return this.refusalsUnheard;
  }

  /** The latest refusal counted in {@link Client.unheardRefusals}. */
  get lastUnheardRefusal(): RefusedError | undefined {
    return this.lastRefusal;
  }

  /** Transient deliveries dropped because more than `transientQueueMax` waited for a handler. */
  get droppedTransient(): number {
    return this.transientDropped;
  }

  // -------------------------------------------------------------------------
  // Sending

  /**
   * Sends a command; resolves with its id once the broker accepted it (not
   * once it was handled). The message is queued at the call, so commands
   * sent one after another leave in that order and need no round trip each.
   * A payload is sent as JSON unless it is a `Uint8Array`.
   */
  send(name: string, payload?: unknown, options: PublishOptions = {}): Promise<string> {
    return this.sendKind("command", name, payload, options);
  }

  /** Publishes an event; resolves with its id once the broker accepted it. */
  publish(name: string, payload?: unknown, options: PublishOptions = {}): Promise<string> {
    return this.sendKind("event", name, payload, options);
  }

  private sendKind(kind: Kind, name: string, payload: unknown, options: PublishOptions): Promise<string> {
    try {
      const message = buildMessage(kind, name, payload, options);
      if (options.quiet) {
        return this.sendQuiet(message);
      }
      return this.enqueueMessage(message).then((id) => id);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Queues a command or event at once and returns the broker's answer to
   * await later: for pipelining many sends without a round trip each.
   * Throws at once for a message that cannot be sent (bad name, too large).
   *
   * ```ts
   * const acks = [];
   * for (let i = 0; i < 1000; i++) acks.push(client.enqueue("event", "metric.sampled", { i }));
   * await Promise.all(acks);
   * ```
   */
  enqueue(kind: "command" | "event", name: string, payload?: unknown, options: SendOptions = {}): PendingAck {
    return this.enqueueMessage(buildMessage(kind, name, payload, options));
  }

  /**
   * Resolves once the broker has answered everything this client sent
   * before the call: accepted durable messages are on disk, refusals of
   * quiet sends are counted in {@link Client.unheardRefusals}.
   */
  flush(): Promise<void> {
    if (this.state === "closed") {
      return Promise.reject(new ClosedError());
    }
    if (this.socket === null) {
      return Promise.reject(new ConnectionError("not connected to the broker"));
    }
    this.nextFlush += 1n;
    const nonce = this.nextFlush;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.flushes = this.flushes.filter((f) => f.nonce !== nonce);
        reject(new TimeoutError("the broker did not answer the flush", this.opts.sendTimeoutMs));
      }, this.opts.sendTimeoutMs);
      this.flushes.push({ nonce, resolve, reject, timer });
      this.writer.push({ type: "ping", nonce });
      this.scheduleWrite();
    });
  }

  /**
   * Sends a command and resolves with its first reply (within `timeoutMs`,
   * default the client's `requestTimeoutMs`). A transient command is sent
   * at most once; a durable one is re-sent after a reconnect.
   */
  async request(name: string, payload?: unknown, options: RequestOptions = {}): Promise<Reply> {
    const stream = this.requestStream(name, payload, options);
    try {
      const first = await stream.next();
      if (first.done) {
        throw new ClosedError("the request ended without a reply");
      }
      return first.value;
    } finally {
      stream.cancel();
    }
  }

  /**
   * Sends a command and returns its replies as an async iterable, which
   * ends after the final reply or throws when the timeout passes first.
   */
  requestStream(name: string, payload?: unknown, options: RequestOptions = {}): ReplyStream {
    this.checkOpen();
    const message = buildMessage("command", name, payload, options);
    const timeoutMs = resolved(
      options.timeoutMs ?? this.opts.requestTimeoutMs,
      (n) => Number.isFinite(n) && n > 0,
      "timeoutMs",
    );
    const layout = layoutMessage(message, message.transient ? Flag.QUIET : 0);
    this.checkSize(message.name, layout.length);
    if (options.signal?.aborted) {
      const reason: unknown = options.signal.reason;
      throw reason instanceof Error ? reason : new CourierError("the request was aborted");
    }
    const id = message.id;
    let quietSeq: bigint | null = null;
    const stream = new ReplyStream(
      id,
      () => {
        this.requests.delete(id);
        if (quietSeq !== null) {
          this.quietRequests.delete(quietSeq);
        }
      },
      timeoutMs,
      options.signal,
    );
    this.requests.set(id, stream);
    if (message.transient && this.socket !== null) {
      // Quiet: the broker's acceptance would come well before the reply
      // and say nothing the reply does not; only a refusal is answered.
      this.nextSeq += 1n;
      quietSeq = this.nextSeq;
      this.quietRequests.set(quietSeq, id);
      this.writer.pushSendMessage(quietSeq, message, layout);
      this.scheduleWrite();
    } else {
      const ack = this.enqueueEncoded(message.id, encodeMessage(message));
      ack.then(undefined, (error: unknown) => stream.fail(error as Error));
    }
    return stream;
  }

  /** @internal A reply to `to`, in its activity. */
  reply(to: Message, outcome: string, payload: unknown, options: ReplyOptions): PendingAck {
    const message = buildMessage("reply", outcome, payload, {
      ...(options.headers === undefined ? {} : { headers: options.headers }),
      ...(options.version === undefined ? {} : { version: options.version }),
      ...(options.id === undefined ? {} : { id: options.id }),
      activityId: to.activityId,
    });
    message.responseTo = to.id;
    message.final = options.final ?? true;
    return this.enqueueMessage(message);
  }

  private checkOpen(): void {
    if (this.state === "closed") {
      throw new ClosedError();
    }
  }

  private checkSize(name: string, messageBytes: number): void {
    // type, count and seq go around the message in a SEND frame of one entry.
    const frameLength = 1 + 4 + 8 + messageBytes;
    if (frameLength > this.frameBytesMax) {
      throw new RefusedError(
        13,
        `${name} is ${messageBytes} bytes encoded; the broker takes frames of at most ${this.frameBytesMax} bytes`,
      );
    }
  }

  private enqueueMessage(message: Message): PendingAck {
    this.checkOpen();
    const bytes = encodeMessage(message);
    this.checkSize(message.name, bytes.length);
    return this.enqueueEncoded(message.id, bytes);
  }

  /** Queues a checked, encoded message to be sent now and after every reconnect until answered. */
  private enqueueEncoded(id: string, bytes: Buffer): PendingAck {
    this.nextSeq += 1n;
    const seq = this.nextSeq;
    const ack = new PendingAck(id);
    this.pendingSends.set(seq, { seq, bytes, ack, deadline: Date.now() + this.opts.sendTimeoutMs });
    this.armSweeper();
    if (this.socket !== null) {
      this.writer.pushSend(seq, bytes);
      this.scheduleWrite();
    }
    return ack;
  }

  private async sendQuiet(message: Message): Promise<string> {
    this.checkOpen();
    const layout = layoutMessage(message, Flag.QUIET);
    this.checkSize(message.name, layout.length);
    for (;;) {
      const socket = this.socket;
      if (socket === null) {
        throw new ConnectionError(
          "not connected to the broker; a quiet send is not queued across reconnects (send it without quiet to have it re-sent)",
        );
      }
      if (socket.writableLength + this.writer.length < QUIET_BUFFER_BYTES_MAX) {
        this.nextSeq += 1n;
        this.writer.pushSendMessage(this.nextSeq, message, layout);
        this.scheduleWrite();
        return message.id;
      }
      if (this.writer.length > 0) {
        // A caller that never yields to the event loop (awaiting only
        // settled promises) would never let the scheduled write run.
        this.writeNow();
        continue;
      }
      await new Promise<void>((resolve) => this.roomWaiters.push(resolve));
    }
  }

  /** Fails sends whose acceptance did not come within `sendTimeoutMs`. */
  private armSweeper(): void {
    if (this.sweeper !== null) {
      return;
    }
    const every = Math.min(1_000, Math.max(10, Math.floor(this.opts.sendTimeoutMs / 10)));
    this.sweeper = setInterval(() => {
      const now = Date.now();
      // Deadlines grow with insertion order (one timeout for all sends).
      for (const [seq, pending] of this.pendingSends) {
        if (pending.deadline > now) {
          break;
        }
        this.pendingSends.delete(seq);
        pending.ack.settle({
          ok: false,
          error: new TimeoutError(
            this.socket === null ? "not connected to the broker" : "the broker did not accept the message",
            this.opts.sendTimeoutMs,
          ),
        });
      }
      if (this.pendingSends.size === 0 && this.sweeper !== null) {
        clearInterval(this.sweeper);
        this.sweeper = null;
      }
    }, every);
    this.sweeper.unref();
  }

  // -------------------------------------------------------------------------
  // Handlers

  /**
   * Handles every command or event whose name matches `pattern` (`*` one
   * segment, a last `>` the rest), subscribing the service. Resolves once
   * the subscription is durable. The handler's resolving acks the delivery,
   * its throwing nacks it for a redelivery (after a {@link Nack}'s
   * `delayMs`, else `nackDelayMs`), unless it settled it itself.
   */
  on(pattern: string, handler: Handler, options: SubscribeOptions = {}): Promise<void> {
    try {
      this.checkOpen();
      validatePattern(pattern);
    } catch (e) {
      return Promise.reject(e);
    }
    const from = options.from ?? "new";
    const start: StartFrom =
      from === "new"
        ? { kind: "new" }
        : from === "beginning"
          ? { kind: "beginning" }
          : { kind: "time", time: BigInt(from.getTime()) * 1_000_000n };
    const existing = this.subscriptions.findIndex((s) => s.pattern === pattern);
    if (existing >= 0) {
      this.subscriptions.splice(existing, 1);
    }
    const subscription: Subscription = { pattern, start, handler, waiters: [] };
    this.subscriptions.push(subscription);
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        subscription.waiters = subscription.waiters.filter((w) => w.resolve !== done);
        reject(new TimeoutError(`the broker did not confirm the subscription to ${pattern}`, this.opts.sendTimeoutMs));
      }, this.opts.sendTimeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        resolve();
      };
      subscription.waiters.push({
        resolve: done,
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      // Otherwise subscribed on the next connect.
      if (this.socket !== null) {
        this.pushSubscribe(subscription);
        this.scheduleWrite();
      }
    });
  }

  /**
   * Removes the service's subscription to `pattern` (for every instance);
   * messages waiting for it are discarded.
   */
  unsubscribe(pattern: string): Promise<void> {
    const index = this.subscriptions.findIndex((s) => s.pattern === pattern);
    if (index >= 0) {
      this.subscriptions.splice(index, 1);
    }
    if (this.socket === null) {
      return Promise.reject(new ConnectionError("not connected to the broker"));
    }
    this.nextOp += 1n;
    const request = this.nextOp;
    const answer = new Promise<void>((resolve, reject) => {
      this.operations.set(request, { resolve, reject, subscription: null });
    });
    this.writer.push({ type: "unsubscribe", request, pattern });
    this.scheduleWrite();
    return this.withTimeout(answer, `the broker did not confirm removing the subscription to ${pattern}`, () =>
      this.operations.delete(request),
    );
  }

  /** Changes how many unacknowledged deliveries the broker may have outstanding here. */
  setMaxInFlight(maxInFlight: number): void {
    resolved(maxInFlight, (n) => Number.isInteger(n) && n >= 0 && n <= 0xffff_ffff, "maxInFlight");
    this.opts.maxInFlight = maxInFlight;
    if (this.socket !== null) {
      this.writer.push({ type: "flow", maxInFlight });
      this.scheduleWrite();
    }
  }

  private withTimeout<T>(promise: Promise<T>, what: string, onTimeout: () => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        onTimeout();
        reject(new TimeoutError(what, this.opts.sendTimeoutMs));
      }, this.opts.sendTimeoutMs);
      promise.then(
        (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        (e: unknown) => {
          clearTimeout(timer);
          reject(e);
        },
      );
    });
  }

  private pushSubscribe(subscription: Subscription): void {
    this.nextOp += 1n;
    const request = this.nextOp;
    this.operations.set(request, {
      resolve: () => {
        for (const w of subscription.waiters.splice(0)) w.resolve();
      },
      reject: (e) => {
        const waiters = subscription.waiters.splice(0);
        if (waiters.length === 0) {
          this.logger?.warn(`re-subscription to ${subscription.pattern} refused: ${e.message}`);
        }
        for (const w of waiters) w.reject(e);
      },
      subscription,
    });
    this.writer.push({
      type: "subscribe",
      request,
      pattern: subscription.pattern,
      ackDeadlineMs: this.opts.ackDeadlineMs ?? 0,
      maxDeliveries: this.opts.maxDeliveries ?? 0,
      start: subscription.start,
    });
  }

  /** @internal Writes the ACK or NACK, if the delivery came on the current connection. */
  settle(generation: number, delivery: bigint, transient: boolean, nackDelayMs: number | undefined): void {
    // After a reconnect the broker has already taken the delivery back.
    if (transient || this.socket === null || generation !== this.generation) {
      return;
    }
    if (nackDelayMs === undefined) {
      this.writer.pushAck(delivery);
    } else {
      this.writer.pushNack(delivery, Math.min(Math.max(0, Math.round(nackDelayMs)), 0xffff_ffff));
    }
    this.scheduleWrite();
  }

  private dispatch(delivery: bigint, attempt: number, message: Message, pipelined: boolean): void {
    if (message.kind === "reply") {
      this.routeReply(message);
      return;
    }
    let keyStart = false;
    if (pipelined) {
      keyStart = attempt >= ATTEMPT_KEY_START;
      attempt = attempt & ~ATTEMPT_KEY_START;
    }
    const key = pipelined && message.key !== undefined && !message.transient ? message.key.toString("latin1") : undefined;
    const subscription = this.subscriptions.find((s) => patternMatches(s.pattern, message.name));
    if (subscription === undefined) {
      // Subscribed by another instance of this service, not here: let the
      // broker try elsewhere soon.
      this.settle(this.generation, delivery, message.transient, this.opts.nackDelayMs);
      if (key !== undefined) {
        this.keyRefused(key, keyStart);
      }
      return;
    }
    const incoming = new IncomingMessage(message, attempt, this, this.generation, delivery);
    if (key !== undefined) {
      this.deliverKeyed({ handler: subscription.handler, message: incoming }, key, keyStart);
      return;
    }
    if (message.transient && this.queue.length >= this.opts.transientQueueMax && this.running >= this.opts.concurrency) {
      this.transientDropped++;
      return;
    }
    this.queue.push({ handler: subscription.handler, message: incoming });
    this.pump();
  }

  /**
   * A keyed delivery on a pipelined connection goes to its handler once the
   * one before it of its key is settled, or is dropped if the broker took
   * it back (see {@link KeyLine}).
   */
  private deliverKeyed(job: Job, key: string, keyStart: boolean): void {
    let line = this.keyLines.get(key);
    if (line === undefined) {
      line = new KeyLine();
      this.keyLines.set(key, line);
    }
    if (keyStart) {
      // Whatever of an earlier run still waits was taken back.
      line.run++;
      line.dropAfter = null;
      line.waiting = [];
    }
    if (line.dropAfter !== null) {
      return; // stale: taken back after a nack; no ack or nack for it
    }
    line.arrivals++;
    job.ticket = { key, generation: this.generation, run: line.run, n: line.arrivals };
    if (line.busy) {
      line.waiting.push(job);
      return;
    }
    line.busy = true;
    this.queue.push(job);
    this.pump();
  }

  /** A keyed delivery no handler here takes was nacked: the broker takes back the key's later ones with it. */
  private keyRefused(key: string, keyStart: boolean): void {
    let line = this.keyLines.get(key);
    if (line === undefined) {
      line = new KeyLine();
      this.keyLines.set(key, line);
    }
    if (keyStart) {
      line.run++;
      line.waiting = [];
    }
    line.dropAfter = line.arrivals;
  }

  /** Whether a keyed delivery still goes to its handler: the broker may have taken it back since it arrived. */
  private keyLive(ticket: KeyTicket): boolean {
    return ticket.generation === this.generation && this.keyLines.get(ticket.key)?.live(ticket) === true;
  }

  /** A keyed delivery is done with (handled, or dropped unhandled): its key's next live one goes to a handler. */
  private keyNext(ticket: KeyTicket, nacked: boolean): void {
    if (ticket.generation !== this.generation) {
      return;
    }
    const line = this.keyLines.get(ticket.key);
    if (line === undefined) {
      return;
    }
    if (nacked && ticket.run === line.run) {
      // The broker takes back every later delivery of the key.
      line.dropAfter = line.dropAfter === null ? ticket.n : Math.min(line.dropAfter, ticket.n);
    }
    for (let next = line.waiting.shift(); next !== undefined; next = line.waiting.shift()) {
      if (next.ticket !== undefined && line.live(next.ticket)) {
        this.queue.push(next);
        return;
      }
    }
    line.busy = false;
    if (line.dropAfter === null) {
      this.keyLines.delete(ticket.key);
    }
  }

  /**
   * Starts queued handlers while there is room. A loop, not a recursion: a
   * run of handlers that finish at once must not grow the stack.
   */
  private pump(): void {
    if (this.pumping) {
      return;
    }
    this.pumping = true;
    while (this.running < this.opts.concurrency) {
      const job = this.queue.shift();
      if (job === undefined) {
        break;
      }
      this.run(job);
    }
    this.pumping = false;
    if (this.running === 0 && this.queue.length === 0) {
      for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  private run(job: Job): void {
    if (job.ticket !== undefined && !this.keyLive(job.ticket)) {
      // Taken back while it waited for a handler: not handled, not settled.
      this.keyNext(job.ticket, false);
      return;
    }
    this.running++;
    const { handler, message } = job;
    let outcome: unknown;
    try {
      outcome = message.inActivity(() => handler(message));
    } catch (e) {
      this.finishJob(job, e);
      return;
    }
    if (outcome instanceof Promise || (typeof outcome === "object" && outcome !== null && "then" in outcome)) {
      Promise.resolve(outcome).then(
        () => this.finishJob(job, undefined),
        (e: unknown) => this.finishJob(job, e ?? new Error("handler failed")),
      );
    } else {
      this.finishJob(job, undefined);
    }
  }

  private finishJob(job: Job, error: unknown): void {
    const message = job.message;
    if (error === undefined) {
      message.finish(null);
    } else {
      const delay = error instanceof Nack ? error.delayMs : undefined;
      if (!(error instanceof Nack)) {
        const text = error instanceof Error ? error.message : String(error);
        this.logger?.warn(`handler of ${message.name} failed; nacking for a retry: ${text}`);
      }
      this.events.emit("handlerError", error, message);
      message.finish(delay);
    }
    this.running--;
    if (job.ticket !== undefined) {
      this.keyNext(job.ticket, message.nacked);
    }
    this.pump();
  }

  private routeReply(message: Message): void {
    const command = message.responseTo;
    const stream = command === undefined ? undefined : this.requests.get(command);
    if (stream === undefined) {
      return; // nobody waits (any more): the request timed out or took its first reply
    }
    if (stream.push(new Reply(message))) {
      this.requests.delete(command!);
    }
  }

  // -------------------------------------------------------------------------
  // The connection

  private scheduleWrite(): void {
    if (this.writeScheduled) {
      return;
    }
    this.writeScheduled = true;
    // After the current turn of the event loop: everything queued by the
    // code now running (a loop of sends, the acks of a delivered batch)
    // leaves in one write.
    setImmediate(() => {
      this.writeScheduled = false;
      this.writeNow();
    });
  }

  private writeNow(): void {
    const socket = this.socket;
    if (socket === null) {
      return;
    }
    const bytes = this.writer.take();
    if (bytes !== null) {
      socket.write(bytes);
    }
  }

  /** Connects and completes HELLO/WELCOME. */
  private establish(): Promise<Established> {
    const { host, port } = this;
    const opts = this.opts;
    const where = `${host}:${port}`;
    return new Promise<Established>((resolve, reject) => {
      let socket: net.Socket | undefined;
      let settled = false;
      const reader = new FrameReader(INBOUND_FRAME_BYTES_MAX);
      const fail = (error: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket?.destroy();
        reject(error);
      };
      const timer = setTimeout(() => {
        fail(new ConnectionError(`no WELCOME from the broker at ${where} within ${opts.handshakeTimeoutMs} ms`));
      }, opts.handshakeTimeoutMs);
      const hello = (): void => {
        socket?.write(
          encodeFrame({
            type: "hello",
            version: PROTOCOL_VERSION,
            service: opts.service,
            instance: opts.instance,
            maxInFlight: opts.maxInFlight,
            token: opts.token,
          }),
        );
      };
      try {
        if (opts.tls === undefined) {
          socket = net.connect({ host, port, noDelay: true }, hello);
        } else {
          const t = opts.tls;
          const serverName = t.serverName ?? (isIP(host) === 0 ? host : undefined);
          socket = tls.connect(
            {
              host,
              port,
              ca: pem(t.ca, "the TLS CA file"),
              ...(t.cert === undefined ? {} : { cert: pem(t.cert, "the client certificate file") }),
              ...(t.key === undefined ? {} : { key: pem(t.key, "the client key file") }),
              ...(serverName === undefined ? {} : { servername: serverName }),
              ...(t.serverName === undefined
                ? {}
                : { checkServerIdentity: (_: string, cert: tls.PeerCertificate) => tls.checkServerIdentity(t.serverName!, cert) }),
              ALPNProtocols: [ALPN],
              minVersion: "TLSv1.3",
            },
            hello,
          );
          socket.setNoDelay(true);
        }
      } catch (e) {
        clearTimeout(timer);
        reject(e instanceof CourierError ? e : new ConnectionError(`cannot reach broker at ${where}: ${(e as Error).message}`));
        return;
      }
      socket.on("error", (e: NodeJS.ErrnoException) => {
        const tlsText = opts.tls !== undefined ? tlsHint(e) : "";
        const hint =
          e.code === "ECONNREFUSED" ? " — is 'courier serve' running?" : tlsText;
        fail(new ConnectionError(`cannot reach broker at ${where}: ${e.message}${hint}`));
      });
      socket.on("close", () => {
        fail(
          new ConnectionError(
            opts.tls !== undefined
              ? `broker at ${where} closed the connection during the handshake (did it refuse this client certificate?)`
              : `broker at ${where} closed the connection during the handshake`,
          ),
        );
      });
      const onData = (chunk: Buffer): void => {
        reader.push(chunk);
        let frame: Frame | null;
        try {
          frame = reader.next();
        } catch (e) {
          const looksTls = opts.tls === undefined && chunk[0] !== undefined && (chunk[0] === 0x15 || chunk[0] === 0x16) && chunk[1] === 0x03;
          fail(
            new ConnectionError(
              `broker sent a bad frame: ${(e as Error).message}${looksTls ? "; it looks like TLS: set tls.ca (COURIER_TLS_CA)" : ""}`,
            ),
          );
          return;
        }
        if (frame === null) {
          return;
        }
        if (frame.type === "welcome") {
          // What follows WELCOME is read as its version has it.
          reader.version = frame.version;
          settled = true;
          clearTimeout(timer);
          // Paused until attached, so that no byte after the WELCOME is lost.
          socket.pause();
          socket.off("data", onData);
          socket.removeAllListeners("close");
          socket.removeAllListeners("error");
          socket.on("error", () => {});
          resolve({
            socket,
            reader,
            info: {
              connectionId: frame.connectionId,
              broker: frame.broker,
              service: frame.service ?? opts.service,
              frameBytesMax: frame.frameBytesMax === 0 ? FRAME_BYTES_MAX_DEFAULT : frame.frameBytesMax,
              protocolVersion: frame.version,
            },
          });
        } else if (frame.type === "error") {
          fail(new RefusedError(frame.code, frame.message));
        } else {
          fail(new ConnectionError(`expected WELCOME from the broker, got ${frame.type.toUpperCase()}`));
        }
      };
      socket.on("data", onData);
    });
  }

  /** A new connection is up: subscribe again and re-send what was not yet acknowledged. */
  private attach(established: Established): void {
    const { socket, reader, info } = established;
    if (this.state === "closed") {
      socket.destroy();
      return;
    }
    this.generation++;
    const generation = this.generation;
    this.socket = socket;
    this.info = info;
    this.frameBytesMax = info.frameBytesMax;
    this.writer = new FrameWriter(info.protocolVersion);
    // The broker took back every delivery of the last connection.
    this.keyLines.clear();
    this.lastReceivedAt = Date.now();
    for (const subscription of this.subscriptions) {
      this.pushSubscribe(subscription);
    }
    // Same ids: the broker drops what it had accepted already.
    for (const pending of this.pendingSends.values()) {
      this.writer.pushSend(pending.seq, pending.bytes);
    }
    if (this.state === "closing") {
      this.writer.push({ type: "drain" });
    }
    this.writeNow();

    socket.on("data", (chunk: Buffer) => {
      if (generation !== this.generation) return;
      this.lastReceivedAt = Date.now();
      reader.push(chunk);
      this.readFrames(reader);
    });
    socket.on("drain", () => this.wakeRoomWaiters());
    socket.on("error", () => {
      // 'close' follows with the reason handled there.
    });
    socket.on("close", () => {
      if (generation === this.generation && this.socket === socket) {
        this.lost(new ConnectionError("the connection to the broker was lost"));
      }
    });
    this.keepAlive = setInterval(() => {
      if (Date.now() - this.lastReceivedAt > this.opts.idleTimeoutMs) {
        this.lost(new ConnectionError(`nothing received from the broker for ${this.opts.idleTimeoutMs} ms`));
        return;
      }
      this.writer.push({ type: "ping", nonce: 0n });
      this.scheduleWrite();
    }, this.opts.pingIntervalMs);
    this.keepAlive.unref();
    this.events.emit("connected", info);
    // Frames that came with the WELCOME.
    this.readFrames(reader);
    if (socket.destroyed) {
      this.lost(new ConnectionError("the connection to the broker was lost"));
    } else {
      socket.resume();
    }
  }

  private readFrames(reader: FrameReader): void {
    for (;;) {
      let frame: Frame | null;
      try {
        frame = reader.next();
      } catch (e) {
        this.lost(new ConnectionError(`bad frame from the broker: ${(e as Error).message}`));
        return;
      }
      if (frame === null) {
        return;
      }
      if (!this.handleFrame(frame)) {
        return;
      }
    }
  }

  /** False when the connection ended. */
  private handleFrame(frame: Frame): boolean {
    switch (frame.type) {
      case "send_result":
        for (const o of frame.entries) {
          this.sendResult(o.seq, o.code, o.reason);
        }
        return true;
      case "deliver": {
        // Version 4: a key's deliveries come pipelined (docs/PROTOCOL.md §8.4).
        const pipelined = (this.info?.protocolVersion ?? 1) >= PIPELINED_KEYS_VERSION;
        for (const d of frame.entries) {
          this.dispatch(d.delivery, d.attempt, d.message, pipelined);
        }
        return true;
      }
      case "result": {
        const op = this.operations.get(frame.request);
        if (op !== undefined) {
          this.operations.delete(frame.request);
          if (frame.code === 0) op.resolve();
          else op.reject(new RefusedError(frame.code, frame.reason));
        }
        return true;
      }
      case "ping":
        this.writer.push({ type: "pong", nonce: frame.nonce });
        this.scheduleWrite();
        return true;
      case "pong":
        while (this.flushes.length > 0 && this.flushes[0]!.nonce <= frame.nonce) {
          const f = this.flushes.shift()!;
          clearTimeout(f.timer);
          f.resolve();
        }
        return true;
      case "drained":
        this.drained?.();
        this.drained = null;
        return true;
      case "error":
        this.logger?.warn(`the broker closed the connection: ${frame.message} [${frame.code}]`);
        this.lost(new RefusedError(frame.code, frame.message));
        return false;
      default:
        this.lost(new ConnectionError(`unexpected ${frame.type.toUpperCase()} frame from the broker`));
        return false;
    }
  }

  private sendResult(seq: bigint, code: number, reason: string): void {
    const pending = this.pendingSends.get(seq);
    if (pending !== undefined) {
      this.pendingSends.delete(seq);
      pending.ack.settle(code === 0 ? { ok: true, id: pending.ack.id } : { ok: false, error: new RefusedError(code, reason) });
      return;
    }
    const command = this.quietRequests.get(seq);
    if (command !== undefined) {
      // Only a refusal is answered; the request ends with it.
      this.quietRequests.delete(seq);
      this.requests.get(command)?.fail(new RefusedError(code, reason));
      return;
    }
    if (code !== 0) {
      const refusal = new RefusedError(code, reason);
      this.refusalsUnheard++;
      this.lastRefusal = refusal;
      this.logger?.warn(`the broker refused a send nobody awaits: ${refusal.message}`);
    }
  }

  private wakeRoomWaiters(): void {
    for (const wake of this.roomWaiters.splice(0)) wake();
  }

  /** The connection ended: fail what cannot survive it and reconnect. */
  private lost(reason: Error): void {
    const socket = this.socket;
    if (socket === null) {
      return;
    }
    this.socket = null;
    this.generation++;
    socket.destroy();
    if (this.keepAlive !== null) {
      clearInterval(this.keepAlive);
      this.keepAlive = null;
    }
    for (const op of this.operations.values()) {
      // A subscription's waiters wait on: it is sent again on reconnect.
      if (op.subscription === null) {
        op.reject(new ConnectionError("the connection was lost before the broker answered"));
      }
    }
    this.operations.clear();
    for (const [, command] of this.quietRequests) {
      this.requests
        .get(command)
        ?.fail(
          new ConnectionError(
            "the connection was lost while the transient request waited for its reply; a transient command is sent at most once, so it was not sent again: send it again, or make it durable to have it re-sent across reconnects",
          ),
        );
    }
    this.quietRequests.clear();
    for (const f of this.flushes.splice(0)) {
      clearTimeout(f.timer);
      f.reject(new ConnectionError("the connection was lost before the broker answered the flush"));
    }
    this.drained?.();
    this.drained = null;
    this.wakeRoomWaiters();
    this.events.emit("disconnected", reason);
    if (this.state === "open") {
      this.logger?.warn(`connection to the broker lost (${reason.message}); reconnecting`);
      void this.reconnect();
    }
  }

  /** Reconnects with exponential backoff and jitter until connected or closed. */
  private async reconnect(): Promise<void> {
    let delay = this.opts.reconnectDelayMinMs;
    while (this.state === "open") {
      try {
        const established = await this.establish();
        if (this.state === "open") {
          this.attach(established);
        } else {
          established.socket.destroy();
        }
        return;
      } catch (e) {
        if (e instanceof RefusedError) {
          this.logger?.warn(`the broker refused the reconnect: ${e.message}`);
        }
      }
      // Equal jitter: instances that lost the broker together spread out.
      const sleep = delay / 2 + Math.random() * (delay / 2);
      await new Promise<void>((resolve) => {
        this.reconnectWake = resolve;
        this.reconnectTimer = setTimeout(resolve, sleep);
      });
      this.reconnectTimer = null;
      this.reconnectWake = null;
      delay = Math.min(delay * 2, this.opts.reconnectDelayMaxMs);
    }
  }

  /**
   * Stops taking deliveries (DRAIN), waits up to `drainTimeoutMs` for
   * running and queued handlers to finish and for the broker to answer
   * what was sent, then closes the connection. What is still unanswered
   * then fails with {@link ClosedError}; deliveries not settled are
   * redelivered to other instances.
   */
  async close(): Promise<void> {
    if (this.state !== "open") {
      return this.closed;
    }
    this.state = "closing";
    this.closed = this.shutDown();
    return this.closed;
  }

  private closed: Promise<void> = Promise.resolve();

  private async shutDown(): Promise<void> {
    const deadline = Date.now() + this.opts.drainTimeoutMs;
    const until = <T>(promise: Promise<T>): Promise<T | void> => {
      const left = deadline - Date.now();
      if (left <= 0) return Promise.resolve();
      let timer: NodeJS.Timeout | undefined;
      return Promise.race([
        promise,
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, left);
        }),
      ]).finally(() => clearTimeout(timer));
    };
    // No reconnect from here on.
    if (this.reconnectTimer !== null) {
      clearTimeout(this.reconnectTimer);
      this.reconnectWake?.();
    }
    if (this.socket !== null) {
      const drained = new Promise<void>((resolve) => {
        this.drained = resolve;
      });
      this.writer.push({ type: "drain" });
      this.scheduleWrite();
      await until(drained);
    }
    if (this.running > 0 || this.queue.length > 0) {
      await until(new Promise<void>((resolve) => this.idleWaiters.push(resolve)));
    }
    while (this.pendingSends.size > 0 && this.socket !== null && Date.now() < deadline) {
      await until(new Promise<void>((resolve) => setTimeout(resolve, 10)));
    }
    this.state = "closed";
    const socket = this.socket;
    if (socket !== null) {
      this.writeNow();
      this.socket = null;
      this.generation++;
      await until(
        new Promise<void>((resolve) => {
          socket.once("close", () => resolve());
          socket.end();
        }),
      );
      socket.destroy();
    }
    for (const timer of [this.keepAlive, this.sweeper]) {
      if (timer !== null) clearInterval(timer);
    }
    this.keepAlive = null;
    this.sweeper = null;
    const closed = new ClosedError("the client was closed before the broker answered");
    for (const pending of this.pendingSends.values()) {
      pending.ack.settle({ ok: false, error: closed });
    }
    this.pendingSends.clear();
    for (const stream of [...this.requests.values()]) {
      stream.fail(new ClosedError("the client was closed while the request waited for replies"));
    }
    for (const op of this.operations.values()) op.reject(closed);
    this.operations.clear();
    for (const s of this.subscriptions) {
      for (const w of s.waiters.splice(0)) w.reject(closed);
    }
    for (const f of this.flushes.splice(0)) {
      clearTimeout(f.timer);
      f.reject(closed);
    }
    this.wakeRoomWaiters();
    this.queue.clear();
  }
}
