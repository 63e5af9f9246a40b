// What can go wrong talking to the broker, and the one table of wire codes.

/** The protocol's error codes (docs/PROTOCOL.md §9), by number. */
export const ERROR_CODES: Readonly<Record<number, string>> = Object.freeze({
  0: "ok",
  1: "malformed_frame",
  2: "frame_too_large",
  3: "unsupported_version",
  4: "handshake_required",
  5: "invalid_name",
  6: "no_receiver",
  7: "expired",
  8: "unknown_delivery",
  9: "storage_failed",
  10: "unauthorized",
  11: "invalid_pattern",
  12: "unknown_request",
  13: "payload_too_large",
  14: "internal",
  15: "rate_limited",
  16: "shutting_down",
  17: "invalid_message",
  18: "handshake_timeout",
  19: "slow_consumer",
  20: "not_subscribed",
  21: "too_many_connections",
  22: "read_timeout",
  23: "stream_full",
  24: "ack_deadline_passed",
});

/**
 * The short name of a wire code (`no_receiver`); `unknown` for codes this
 * client does not know (a newer broker's), which are failures all the same.
 */
export function errorCodeName(code: number): string {
  return ERROR_CODES[code] ?? "unknown";
}

/** Every error this client raises. */
export class CourierError extends Error {
  override name = "CourierError";
}

/**
 * The broker refused a message, a subscription or the connection.
 * `code` is the code's name (`no_receiver`), `wireCode` its number.
 */
export class RefusedError extends CourierError {
  override name = "RefusedError";
  readonly code: string;
  readonly wireCode: number;
  readonly reason: string;

  constructor(wireCode: number, reason: string) {
    const code = errorCodeName(wireCode);
    super(`refused by the broker: ${reason} [${code} (${wireCode})]`);
    this.code = code;
    this.wireCode = wireCode;
    this.reason = reason;
  }
}

/** No answer (acceptance, reply, final reply) within the time allowed. */
export class TimeoutError extends CourierError {
  override name = "TimeoutError";
  readonly timeoutMs: number;

  constructor(what: string, timeoutMs: number) {
    super(`${what} within ${timeoutMs} ms`);
    this.timeoutMs = timeoutMs;
  }
}

/** The broker cannot be reached, or the connection to it was lost. */
export class ConnectionError extends CourierError {
  override name = "ConnectionError";
}

/** The client was closed (or is closing) and takes no more work. */
export class ClosedError extends CourierError {
  override name = "ClosedError";

  constructor(message = "the client is closed") {
    super(message);
  }
}

/** A message that cannot be sent as given (bad name, too large, bad option). */
export class InvalidMessageError extends CourierError {
  override name = "InvalidMessageError";
}

/**
 * Thrown by a handler to ask for redelivery no sooner than `delayMs` from
 * now (without `delayMs`, and for any other error, after the client's
 * `nackDelayMs`).
 *
 * ```ts
 * client.on("payment.charge", async (msg) => {
 *   if (!bankIsUp()) throw new Nack("bank down", { delayMs: 30_000 });
 * });
 * ```
 */
export class Nack extends Error {
  override name = "Nack";
  readonly delayMs: number | undefined;

  constructor(message = "nacked by the handler", options: { delayMs?: number; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.delayMs = options.delayMs;
  }
}
