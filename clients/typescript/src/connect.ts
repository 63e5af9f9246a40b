// Opening a connection: TCP or TLS, then HELLO and the broker's WELCOME.

import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import * as net from "node:net";
import * as tls from "node:tls";

import { FRAME_BYTES_MAX_DEFAULT, FrameReader, PROTOCOL_VERSION, encodeFrame, type Frame } from "./codec.js";
import { ConnectionError, CourierError, RefusedError } from "./errors.js";
import { type BrokerAddress, type ResolvedOptions, rotation } from "./options.js";

/** The ALPN protocol offered: Courier, version 1. */
export const ALPN = "courier/1";
/** Largest frame accepted from the broker. */
export const INBOUND_FRAME_BYTES_MAX = 64 * 1024 * 1024;

/** What a connection learned from the broker's WELCOME. */
export interface ConnectionInfo {
  connectionId: bigint;
  broker: string;
  service: string;
  frameBytesMax: number;
  /** The protocol version both ends speak on this connection (WELCOME's). */
  protocolVersion: number;
}

/** A connection that completed its handshake, paused until the client takes it over. */
export interface Established {
  socket: net.Socket;
  reader: FrameReader;
  info: ConnectionInfo;
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
 * An address's own failure to connect, for the error that names every
 * address tried: its reason without the advice that error gives once.
 */
const unreachable = new WeakMap<Error, { brief: string; refused: boolean }>();

/**
 * Connects to each of `addresses` in turn, from the one after `last` (the
 * index of the address connected to last; the first when undefined), and
 * completes HELLO/WELCOME with the first that answers. With one address,
 * its failure is the error; with several, all failing is one
 * ConnectionError naming each (its `cause` the first broker's refusal, if
 * one refused).
 */
export async function establish(
  addresses: readonly BrokerAddress[],
  last: number | undefined,
  opts: ResolvedOptions,
): Promise<{ established: Established; index: number }> {
  const failures: Array<{ address: string; error: Error }> = [];
  for (const index of rotation(addresses.length, last)) {
    const { address, host, port } = addresses[index]!;
    try {
      return { established: await establishAt(host, port, opts), index };
    } catch (e) {
      failures.push({ address, error: e instanceof Error ? e : new ConnectionError(String(e)) });
    }
  }
  if (failures.length <= 1) {
    throw failures[0]?.error ?? new ConnectionError("no broker address given");
  }
  const described = failures.map(({ address, error }) => `${address} (${unreachable.get(error)?.brief ?? error.message})`);
  const hint = failures.some(({ error }) => unreachable.get(error)?.refused) ? " — is 'courier serve' running?" : "";
  const refusal = failures.find(({ error }) => error instanceof RefusedError)?.error;
  throw new ConnectionError(
    `cannot reach a broker at ${described.join(", ")}${hint}`,
    refusal === undefined ? undefined : { cause: refusal },
  );
}

/** Connects to `host:port` and completes HELLO/WELCOME. */
export function establishAt(host: string, port: number, opts: ResolvedOptions): Promise<Established> {
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
      const refused = e.code === "ECONNREFUSED";
      const hint = refused ? " — is 'courier serve' running?" : tlsText;
      const error = new ConnectionError(`cannot reach broker at ${where}: ${e.message}${hint}`);
      unreachable.set(error, { brief: `${e.message}${tlsText}`, refused });
      fail(error);
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
