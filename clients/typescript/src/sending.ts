// Sending: pipelined, quiet and flushed sends, their acceptance, requests
// and the replies routed to them.

import { Flag, encodeMessage, layoutMessage, type Kind, type Message } from "./codec.js";
import { ClientCore } from "./core.js";
import { ClosedError, ConnectionError, CourierError, RefusedError, TimeoutError } from "./errors.js";
import {
  type HandlingScope,
  Reply,
  buildMessage,
  type PublishOptions,
  type ReplyOptions,
  type RequestOptions,
  type SendOptions,
} from "./messages.js";
import { QUIET_BUFFER_BYTES_MAX, resolved } from "./options.js";
import { PendingAck, ReplyStream } from "./pending.js";

interface PendingSend {
  seq: bigint;
  /** The encoded message, re-sent as it is after a reconnect. */
  bytes: Buffer;
  ack: PendingAck;
  deadline: number;
}

interface Flush {
  nonce: bigint;
  resolve: () => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/** The client's sending layer: what goes out, and the broker's answers to it. */
export abstract class SendingClient extends ClientCore {
  protected nextSeq = 0n;
  protected readonly pendingSends = new Map<bigint, PendingSend>();
  /** Transient requests' commands, sent QUIET: command id by seq (only a refusal is answered). */
  protected readonly quietRequests = new Map<bigint, string>();
  protected readonly requests = new Map<string, ReplyStream>();
  protected flushes: Flush[] = [];
  private nextFlush = 0n;
  protected sweeper: NodeJS.Timeout | null = null;
  private roomWaiters: Array<() => void> = [];
  private refusalsUnheard = 0;
  private lastRefusal: RefusedError | undefined;

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
    const layout = layoutMessage(message, message.transient ? Flag.QUIET : 0, this.protocolVersion);
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
      const ack = this.enqueueEncoded(message.id, encodeMessage(message, 0, this.protocolVersion));
      ack.then(undefined, (error: unknown) => stream.fail(error as Error));
    }
    return stream;
  }

  /** @internal A reply to `to.handled`, in its activity, its parent the command it answers. */
  reply(to: HandlingScope, outcome: string, payload: unknown, options: ReplyOptions): PendingAck {
    const message = buildMessage(
      "reply",
      outcome,
      payload,
      {
        ...(options.headers === undefined ? {} : { headers: options.headers }),
        ...(options.version === undefined ? {} : { version: options.version }),
        ...(options.id === undefined ? {} : { id: options.id }),
      },
      to,
    );
    message.responseTo = to.handled.id;
    message.final = options.final ?? true;
    return this.enqueueMessage(message);
  }

  private enqueueMessage(message: Message): PendingAck {
    this.checkOpen();
    const bytes = encodeMessage(message, 0, this.protocolVersion);
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
    const layout = layoutMessage(message, Flag.QUIET, this.protocolVersion);
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

  protected routeReply(message: Message): void {
    const command = message.responseTo;
    const stream = command === undefined ? undefined : this.requests.get(command);
    if (stream === undefined) {
      return; // nobody waits (any more): the request timed out or took its first reply
    }
    if (stream.push(new Reply(message))) {
      this.requests.delete(command!);
    }
  }

  protected sendResult(seq: bigint, code: number, reason: string): void {
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

  protected wakeRoomWaiters(): void {
    for (const wake of this.roomWaiters.splice(0)) wake();
  }

  /** The connection ended: fail what cannot survive it and reconnect. */
}
