// The client's connection state and its writer, beneath everything it does
// (sending, handling, the connection's lifecycle, each a layer above).

import { EventEmitter } from "node:events";
import type * as net from "node:net";

import { FRAME_BYTES_MAX_DEFAULT, FrameWriter, PROTOCOL_VERSION } from "./codec.js";
import type { ConnectionInfo } from "./connect.js";
import { ClosedError, InvalidMessageError, RefusedError } from "./errors.js";
import type { DeliveryOwner, HandlingScope, ReplyOptions } from "./messages.js";
import { nameProblem } from "./names.js";
import {
  type BrokerAddress,
  type ClientOptions,
  type Logger,
  type ResolvedOptions,
  parseAddresses,
  resolveOptions,
} from "./options.js";
import type { PendingAck } from "./pending.js";

export type State = "open" | "closing" | "closed";

/** What every layer of the client works on: its options, the connection of the moment and its writer. */
export abstract class ClientCore implements DeliveryOwner {
  /** `connected` (ConnectionInfo), `disconnected` (Error), `handlerError` (Error, IncomingMessage). */
  readonly events = new EventEmitter();

  readonly nackDelayMs: number;
  protected readonly opts: ResolvedOptions;
  /** The brokers of `url`, tried in turn. */
  protected readonly addresses: readonly BrokerAddress[];
  /** The index in `addresses` of the broker connected to now, or last. */
  protected addressIndex = 0;
  protected readonly logger: Logger | null;

  protected state: State = "open";
  protected socket: net.Socket | null = null;
  protected info: ConnectionInfo | null = null;
  /** Counts connections; a delivery from an older one cannot be settled. */
  protected generation = 0;
  protected writer = new FrameWriter();
  private writeScheduled = false;
  protected frameBytesMax = FRAME_BYTES_MAX_DEFAULT;

  protected constructor(options: ClientOptions) {
    this.opts = resolveOptions(options);
    this.nackDelayMs = this.opts.nackDelayMs;
    this.logger = options.logger === undefined ? { warn: (m) => console.warn(`courier: ${m}`) } : options.logger;
    this.addresses = parseAddresses(this.opts.url);
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

  /** The protocol version of the connection of the moment (the newest before the first). */
  protected get protocolVersion(): number {
    return this.info?.protocolVersion ?? PROTOCOL_VERSION;
  }

  /** @internal A reply to `to.handled`, in its activity. */
  abstract reply(to: HandlingScope, outcome: string, payload: unknown, options: ReplyOptions): PendingAck;

  protected checkOpen(): void {
    if (this.state === "closed") {
      throw new ClosedError();
    }
  }

  protected checkSize(name: string, messageBytes: number): void {
    // type, count and seq go around the message in a SEND frame of one entry.
    const frameLength = 1 + 4 + 8 + messageBytes;
    if (frameLength > this.frameBytesMax) {
      throw new RefusedError(
        13,
        `${name} is ${messageBytes} bytes encoded; the broker takes frames of at most ${this.frameBytesMax} bytes`,
      );
    }
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

  protected scheduleWrite(): void {
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

  protected writeNow(): void {
    const socket = this.socket;
    if (socket === null) {
      return;
    }
    const bytes = this.writer.take();
    if (bytes !== null) {
      socket.write(bytes);
    }
  }
}
