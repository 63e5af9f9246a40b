// UUIDs as the protocol carries them: 16 bytes in RFC 9562 order, shown
// to users in the usual text form.

import { randomFillSync } from "node:crypto";

/** Random bytes drawn from the OS in blocks: one system call per 409 ids. */
const POOL_BYTES = 4096;
const ID_RANDOM_BYTES = 10;

let pool = Buffer.alloc(0);
let poolOffset = POOL_BYTES;

function randomBytes(n: number): Buffer {
  if (poolOffset + n > pool.length) {
    pool = Buffer.allocUnsafe(POOL_BYTES);
    randomFillSync(pool);
    poolOffset = 0;
  }
  const bytes = pool.subarray(poolOffset, poolOffset + n);
  poolOffset += n;
  return bytes;
}

/** 16 bytes to fill per id: 48 bits of milliseconds, then the random rest. */
const scratch = Buffer.alloc(16);

/**
 * A fresh UUIDv7: the current Unix millisecond in the first 48 bits (ids
 * sort by creation time, which keeps the broker's dedup index local), then
 * 74 random bits.
 */
export function uuidv7(): string {
  const ms = Date.now();
  scratch.writeUIntBE(ms, 0, 6);
  randomBytes(ID_RANDOM_BYTES).copy(scratch, 6);
  scratch[6] = 0x70 | (scratch[6]! & 0x0f);
  scratch[8] = 0x80 | (scratch[8]! & 0x3f);
  return readUuid(scratch, 0);
}

const UUID_TEXT = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** Whether `text` is a UUID in its text form (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`). */
export function isUuid(text: string): boolean {
  return UUID_TEXT.test(text);
}

/** Hex digit values by character code; -1 for anything else. */
const HEX_VALUES = new Int8Array(128).fill(-1);
for (let i = 0; i < 16; i++) {
  HEX_VALUES["0123456789abcdef".charCodeAt(i)] = i;
  HEX_VALUES["0123456789ABCDEF".charCodeAt(i)] = i;
}
const DASH = 0x2d;

function hexValue(text: string, i: number): number {
  const c = text.charCodeAt(i);
  return c < 128 ? HEX_VALUES[c]! : -1;
}

/** Writes the 16 bytes of the UUID `text` at `offset`; returns the offset after them. */
export function writeUuid(buf: Buffer, offset: number, text: string): number {
  // Every message carries two or three: parsed by hand, without the
  // substrings and native calls of Buffer.write(…, "hex").
  let bad = text.length !== 36;
  let at = offset;
  for (let i = 0; i < 36 && !bad; ) {
    if (i === 8 || i === 13 || i === 18 || i === 23) {
      bad = text.charCodeAt(i) !== DASH;
      i++;
      continue;
    }
    const hi = hexValue(text, i);
    const lo = hexValue(text, i + 1);
    bad = (hi | lo) < 0;
    buf[at++] = (hi << 4) | lo;
    i += 2;
  }
  if (bad) {
    throw new TypeError(`${JSON.stringify(text)} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)`);
  }
  return at;
}

/** The UUID whose 16 bytes start at `offset`, in text form (lower case). */
export function readUuid(buf: Buffer, offset: number): string {
  const hex = buf.toString("hex", offset, offset + 16);
  return (
    hex.slice(0, 8) +
    "-" +
    hex.slice(8, 12) +
    "-" +
    hex.slice(12, 16) +
    "-" +
    hex.slice(16, 20) +
    "-" +
    hex.slice(20, 32)
  );
}
