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

const HEX: string[] = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/**
 * A fresh UUIDv7: the current Unix millisecond in the first 48 bits (ids
 * sort by creation time, which keeps the broker's dedup index local), then
 * 74 random bits.
 */
export function uuidv7(): string {
  const ms = Date.now();
  const random = randomBytes(ID_RANDOM_BYTES);
  const time = ms.toString(16).padStart(12, "0").slice(-12);
  const r = random;
  return (
    time.slice(0, 8) +
    "-" +
    time.slice(8, 12) +
    "-7" +
    HEX[r[0]! & 0x0f]!.slice(1) +
    HEX[r[1]!]! +
    "-" +
    HEX[0x80 | (r[2]! & 0x3f)]! +
    HEX[r[3]!]! +
    "-" +
    HEX[r[4]!]! +
    HEX[r[5]!]! +
    HEX[r[6]!]! +
    HEX[r[7]!]! +
    HEX[r[8]!]! +
    HEX[r[9]!]!
  );
}

const UUID_TEXT = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/** Whether `text` is a UUID in its text form (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`). */
export function isUuid(text: string): boolean {
  return UUID_TEXT.test(text);
}

/** Writes the 16 bytes of the UUID `text` at `offset`; returns the offset after them. */
export function writeUuid(buf: Buffer, offset: number, text: string): number {
  // Four hex runs between the dashes; Buffer.write stops at a bad digit,
  // so the length written tells whether the text was whole.
  let at = offset;
  at += buf.write(text.slice(0, 8), at, "hex");
  at += buf.write(text.slice(9, 13), at, "hex");
  at += buf.write(text.slice(14, 18), at, "hex");
  at += buf.write(text.slice(19, 23), at, "hex");
  at += buf.write(text.slice(24, 36), at, "hex");
  if (
    at - offset !== 16 ||
    text.length !== 36 ||
    text[8] !== "-" ||
    text[13] !== "-" ||
    text[18] !== "-" ||
    text[23] !== "-"
  ) {
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
