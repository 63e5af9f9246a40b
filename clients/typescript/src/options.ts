// What a client is told: its options, resolved and checked once, and the
// options read from the environment.

import { InvalidMessageError } from "./errors.js";

/** TLS to the broker (TLS 1.3, ALPN `courier/1`). */
export interface TlsOptions {
  /** The CA that signs the broker's certificate, the only one trusted: PEM text or a file path (read at each connect). */
  ca: string | Buffer;
  /** A client certificate chain for brokers that authenticate by certificate (mTLS): PEM text or a file path. */
  cert?: string | Buffer;
  /** The private key of `cert`: PEM text or a file path. */
  key?: string | Buffer;
  /** The name every broker's certificate must carry; default the host of the address connected to. */
  serverName?: string;
}

/** Where warnings go; `null` in the options silences them. */
export interface Logger {
  warn(message: string): void;
}

export interface ClientOptions {
  /**
   * `host:port` of the broker, or of several (the nodes of a cluster)
   * separated by commas: `127.0.0.1:7701,127.0.0.1:7702`; default
   * `$COURIER_URL`, else `127.0.0.1:7700`. Each connection attempt, the
   * first and every reconnect, tries them in turn, starting after the one
   * connected to last, each within `handshakeTimeoutMs`.
   */
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

/** The options as the client keeps them: defaults filled in, every number checked. */
export type ResolvedOptions = Required<
  Omit<ClientOptions, "tls" | "token" | "ackDeadlineMs" | "maxDeliveries" | "logger" | "url">
> & {
  url: string;
  tls: TlsOptions | undefined;
  token: string | undefined;
  ackDeadlineMs: number | undefined;
  maxDeliveries: number | undefined;
};

/** Fills in the defaults of `options` and checks every number; a RangeError names the one out of range. */
export function resolveOptions(options: ClientOptions): ResolvedOptions {
  const url = options.url ?? process.env.COURIER_URL ?? "127.0.0.1:7700";
  const maxInFlight = options.maxInFlight ?? 64;
  const positive = (n: number): boolean => Number.isInteger(n) && n > 0;
  const nonNegative = (n: number): boolean => Number.isFinite(n) && n >= 0;
  return {
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
}

/** `value` if `valid` says so; otherwise a RangeError naming the option. */
export function resolved<T>(value: T, valid: (v: T) => boolean, what: string): T {
  if (!valid(value)) {
    throw new RangeError(`option ${what} is out of range: ${String(value)}`);
  }
  return value;
}

/** One broker address of `url`, as written and as its parts. */
export interface BrokerAddress {
  address: string;
  host: string;
  port: number;
}

/**
 * The broker addresses of `url`, in the order written, each trimmed and
 * checked by {@link splitUrl}; an empty entry (`a:1,,b:2`, a trailing
 * comma) is an error that says what to write.
 */
export function parseAddresses(url: string): BrokerAddress[] {
  const addresses = url.split(",").map((a) => a.trim());
  if (addresses.some((a) => a === "")) {
    throw new InvalidMessageError(
      `the broker address ${JSON.stringify(url)} (COURIER_URL or the url option) has an empty entry; write HOST:PORT, or several separated by commas: 127.0.0.1:7701,127.0.0.1:7702`,
    );
  }
  return addresses.map((address) => ({ address, ...splitUrl(address) }));
}

/**
 * The order in which one connection attempt tries `count` addresses: from
 * the one after `last` (the address connected to last), round to `last`
 * itself, so a client whose broker died tries the others before it; from
 * the first when none was connected to yet.
 */
export function rotation(count: number, last: number | undefined): number[] {
  const start = last === undefined ? 0 : last + 1;
  return Array.from({ length: count }, (_, k) => (start + k) % count);
}

/** `host:port` (an IPv6 host in brackets) as its parts. */
export function splitUrl(url: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(url);
  const port = match ? Number(match[3]) : NaN;
  if (!match || !(port > 0 && port < 65536)) {
    throw new InvalidMessageError(`broker url ${JSON.stringify(url)} is not host:port (for example 127.0.0.1:7700)`);
  }
  return { host: match[1] ?? match[2]!, port };
}
