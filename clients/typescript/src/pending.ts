// The broker's answers a caller awaits: the acceptance of one send, and
// the replies to one command.

import { CourierError, TimeoutError } from "./errors.js";
import type { Reply } from "./messages.js";

/** Replies buffered per request stream before further ones are dropped. */
const REPLY_BUFFER_MAX = 1024;

/** How a send ended. */
export type Settled = { ok: true; id: string } | { ok: false; error: Error };

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
