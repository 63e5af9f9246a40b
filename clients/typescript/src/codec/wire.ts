// What the encoder and the decoder share and the codec does not export.

import { Flag, PARENT_ID_VERSION, type Kind } from "./frames.js";

export const LENGTH_PREFIX_BYTES = 4;
export const U16_MAX = 0xffff;
export const U32_MAX = 0xffff_ffff;
export const U64_MAX = 0xffff_ffff_ffff_ffffn;

export const FLAGS_ALL = 0x3f;

/** The flags a message may carry on a connection of `version`. */
export function messageFlags(version: number): number {
  return version >= PARENT_ID_VERSION ? FLAGS_ALL | Flag.PARENT_ID : FLAGS_ALL;
}

export const KIND_CODES: Record<Kind, number> = { command: 1, event: 2, reply: 3 };
export const KINDS: readonly (Kind | undefined)[] = [undefined, "command", "event", "reply"];
