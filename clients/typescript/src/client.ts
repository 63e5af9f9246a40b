// The client: one connection to the broker on behalf of one service
// instance, reconnecting by itself. Built in layers: ClientCore (state and
// writer), SendingClient (sends and requests), and this one (subscriptions,
// deliveries, the connection's lifecycle).

import {
  ATTEMPT_KEY_START,
  FrameReader,
  FrameWriter,
  PIPELINED_KEYS_VERSION,
  type Frame,
  type Message,
  type StartFrom,
} from "./codec.js";
import { type ConnectionInfo, type Established, establish } from "./connect.js";
import { ClosedError, ConnectionError, RefusedError, TimeoutError } from "./errors.js";
import { type Handler, Handlers, type SubscribeOptions } from "./handlers.js";
import { IncomingMessage } from "./messages.js";
import { patternMatches, validatePattern } from "./names.js";
import { type ClientOptions, resolved } from "./options.js";
import { SendingClient } from "./sending.js";

export type { ConnectionInfo } from "./connect.js";
export type { From, Handler, SubscribeOptions } from "./handlers.js";
export { optionsFromEnv, QUIET_BUFFER_BYTES_MAX, type ClientOptions, type Logger, type TlsOptions } from "./options.js";
export { PendingAck, ReplyStream } from "./pending.js";

interface Subscription {
  pattern: string;
  start: StartFrom;
  handler: Handler;
  /** `on()` calls waiting for the broker's RESULT. */
  waiters: Array<{ resolve: () => void; reject: (e: Error) => void }>;
}

interface Operation {
  resolve: () => void;
  reject: (e: Error) => void;
  subscription: Subscription | null;
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
export class Client extends SendingClient {
  private readonly subscriptions: Subscription[] = [];
  private nextOp = 0n;
  private readonly operations = new Map<bigint, Operation>();
  private readonly handlers: Handlers;
  private lastReceivedAt = 0;
  private keepAlive: NodeJS.Timeout | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private reconnectWake: (() => void) | null = null;
  private drained: (() => void) | null = null;

  private constructor(options: ClientOptions) {
    super(options);
    this.handlers = new Handlers(
      this.opts.concurrency,
      this.opts.transientQueueMax,
      () => this.generation,
      (message, error) => {
        const text = error instanceof Error ? error.message : String(error);
        this.logger?.warn(`handler of ${message.name} failed; nacking for a retry: ${text}`);
      },
      (error, message) => this.events.emit("handlerError", error, message),
    );
  }

  /**
   * Connects and completes the handshake. Fails at once if the broker
   * cannot be reached or refuses; after that, the client reconnects by
   * itself.
   */
  static async connect(options: ClientOptions): Promise<Client> {
    const client = new Client(options);
    const { established, index } = await establish(client.addresses, undefined, client.opts);
    client.attach(established, index);
    return client;
  }

  /**
   * `host:port` of the broker this client is connected to, or was last
   * connected to while it reconnects: one of the addresses of `url`.
   */
  get brokerAddress(): string {
    return this.addresses[this.addressIndex]!.address;
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

  /** Transient deliveries dropped because more than `transientQueueMax` waited for a handler. */
  get droppedTransient(): number {
    return this.handlers.droppedTransient;
  }

  // Subscriptions and deliveries

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
        this.handlers.keyRefused(key, keyStart);
      }
      return;
    }
    const incoming = new IncomingMessage(message, attempt, this, this.generation, delivery);
    if (key !== undefined) {
      this.handlers.deliverKeyed({ handler: subscription.handler, message: incoming }, key, keyStart);
    } else {
      this.handlers.deliver({ handler: subscription.handler, message: incoming });
    }
  }

  /** A new connection is up: subscribe again and re-send what was not yet acknowledged. */
  private attach(established: Established, addressIndex: number): void {
    const { socket, reader, info } = established;
    if (this.state === "closed") {
      socket.destroy();
      return;
    }
    this.addressIndex = addressIndex;
    this.generation++;
    const generation = this.generation;
    this.socket = socket;
    this.info = info;
    this.frameBytesMax = info.frameBytesMax;
    this.writer = new FrameWriter(info.protocolVersion);
    // The broker took back every delivery of the last connection.
    this.handlers.connected();
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

  /**
   * Reconnects with exponential backoff and jitter until connected or
   * closed. Each attempt tries every address, from the one after the
   * broker connected to last (so a dead broker is tried last); all of
   * them failing is one failed attempt.
   */
  private async reconnect(): Promise<void> {
    let delay = this.opts.reconnectDelayMinMs;
    while (this.state === "open") {
      try {
        const { established, index } = await establish(this.addresses, this.addressIndex, this.opts);
        if (this.state === "open") {
          this.attach(established, index);
        } else {
          established.socket.destroy();
        }
        return;
      } catch (e) {
        const refusal = e instanceof RefusedError ? e : e instanceof Error ? e.cause : undefined;
        if (refusal instanceof RefusedError) {
          this.logger?.warn(`the broker refused the reconnect: ${(e as Error).message}`);
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
    if (!this.handlers.idle) {
      await until(this.handlers.whenIdle());
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
    this.handlers.clear();
  }
}
