// @courier/client: a native TypeScript client of the Courier message bus.

export {
  Client,
  PendingAck,
  QUIET_BUFFER_BYTES_MAX,
  ReplyStream,
  optionsFromEnv,
  type ClientOptions,
  type ConnectionInfo,
  type From,
  type Handler,
  type Logger,
  type SubscribeOptions,
  type TlsOptions,
} from "./client.js";
export {
  IncomingMessage,
  Reply,
  currentActivity,
  withActivity,
  type PublishOptions,
  type ReplyOptions,
  type RequestOptions,
  type SendOptions,
} from "./messages.js";
export {
  ClosedError,
  ConnectionError,
  CourierError,
  ERROR_CODES,
  InvalidMessageError,
  Nack,
  RefusedError,
  TimeoutError,
  errorCodeName,
} from "./errors.js";
export { NAME_BYTES_MAX, patternMatches, validateName, validatePattern } from "./names.js";
export { TRACEPARENT, TraceParent } from "./trace.js";
export { uuidv7 } from "./uuid.js";
export * as codec from "./codec.js";
export type { Kind, Message, Version } from "./codec.js";
