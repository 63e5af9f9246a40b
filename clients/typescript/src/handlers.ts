// Handlers: deliveries handed to them within the concurrency limit, in
// order per ordering key on pipelined connections, then acked or nacked.

import { Nack } from "./errors.js";
import type { IncomingMessage } from "./messages.js";

/** A handler for deliveries: resolving acks, throwing nacks. */
export type Handler = (message: IncomingMessage) => unknown;

/** Where a subscription new to the service starts: new messages only, every retained event, or those accepted since a time. */
export type From = "new" | "beginning" | Date;

export interface SubscribeOptions {
  /** Only when the broker does not know the subscription yet (default `"new"`). */
  from?: From;
}

/** A delivery and the handler it goes to. */
export interface Job {
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

/** Runs deliveries' handlers: at most `concurrency` at once, the rest waiting in order. */
export class Handlers {
  private running = 0;
  private pumping = false;
  private readonly queue = new JobQueue();
  private idleWaiters: Array<() => void> = [];
  private readonly keyLines = new Map<string, KeyLine>();
  private transientDropped = 0;

  constructor(
    private readonly concurrency: number,
    private readonly transientQueueMax: number,
    /** The client's connection count: a ticket of an older connection is stale. */
    private readonly generation: () => number,
    /** A handler failed (not with a {@link Nack}): for the log. */
    private readonly failed: (message: IncomingMessage, error: unknown) => void,
    /** A handler threw or rejected, a {@link Nack} too: for the `handlerError` event. */
    private readonly handlerError: (error: unknown, message: IncomingMessage) => void,
  ) {}

  /** Transient deliveries dropped because more than `transientQueueMax` waited for a handler. */
  get droppedTransient(): number {
    return this.transientDropped;
  }

  /** No handler runs and none waits. */
  get idle(): boolean {
    return this.running === 0 && this.queue.length === 0;
  }

  /** Resolves when {@link Handlers.idle} next holds. */
  whenIdle(): Promise<void> {
    return new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  /** A new connection: the broker took back every delivery of the last one. */
  connected(): void {
    this.keyLines.clear();
  }

  /** Forgets what waits for a handler (the client is closed). */
  clear(): void {
    this.queue.clear();
  }

  /** An unkeyed delivery (or one of versions 1 to 3) goes to its handler when one is free. */
  deliver(job: Job): void {
    const transient = job.message.envelope.transient;
    if (transient && this.queue.length >= this.transientQueueMax && this.running >= this.concurrency) {
      this.transientDropped++;
      return;
    }
    this.queue.push(job);
    this.pump();
  }

  /**
   * A keyed delivery on a pipelined connection goes to its handler once the
   * one before it of its key is settled, or is dropped if the broker took
   * it back (see {@link KeyLine}).
   */
  deliverKeyed(job: Job, key: string, keyStart: boolean): void {
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
    job.ticket = { key, generation: this.generation(), run: line.run, n: line.arrivals };
    if (line.busy) {
      line.waiting.push(job);
      return;
    }
    line.busy = true;
    this.queue.push(job);
    this.pump();
  }

  /** A keyed delivery no handler here takes was nacked: the broker takes back the key's later ones with it. */
  keyRefused(key: string, keyStart: boolean): void {
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
    return ticket.generation === this.generation() && this.keyLines.get(ticket.key)?.live(ticket) === true;
  }

  /** A keyed delivery is done with (handled, or dropped unhandled): its key's next live one goes to a handler. */
  private keyNext(ticket: KeyTicket, nacked: boolean): void {
    if (ticket.generation !== this.generation()) {
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
    while (this.running < this.concurrency) {
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
        this.failed(message, error);
      }
      this.handlerError(error, message);
      message.finish(delay);
    }
    this.running--;
    if (job.ticket !== undefined) {
      this.keyNext(job.ticket, message.nacked);
    }
    this.pump();
  }
}
