// The wire codec of docs/PROTOCOL.md, versions 1 to 4: frames, messages,
// batching. No I/O.

export * from "./codec/frames.js";
export * from "./codec/encode.js";
export * from "./codec/decode.js";
