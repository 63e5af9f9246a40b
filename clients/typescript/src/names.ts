// Message names and subscription patterns (docs/PROTOCOL.md §8.2).

import { InvalidMessageError } from "./errors.js";

/** Longest accepted message name or pattern, in bytes. */
export const NAME_BYTES_MAX = 255;

/** A name: dot-separated segments of `[a-z0-9_-]`. */
const NAME = /^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$/;

function printable(text: string): string {
  return JSON.stringify(text.length > 80 ? text.slice(0, 80) : text);
}

/** Why `text` is neither a valid name nor pattern in its common parts, or null. */
function commonProblem(text: string, what: string): string | null {
  if (text.length === 0) {
    return `${what} is empty`;
  }
  const bytes = Buffer.byteLength(text);
  if (bytes > NAME_BYTES_MAX) {
    return `${what} is ${bytes} bytes long; at most ${NAME_BYTES_MAX} are allowed`;
  }
  if (text.startsWith(".") || text.endsWith(".") || text.includes("..")) {
    return `${what} ${printable(text)} has an empty segment (two dots in a row, or a dot at an end)`;
  }
  return null;
}

function badCharacter(text: string, what: string, allowed: (ch: string) => boolean): string | null {
  let offset = 0;
  for (const ch of text) {
    if (!allowed(ch)) {
      return `${what} ${printable(text)} has the character ${JSON.stringify(ch)} at byte ${offset}; names use only a-z, 0-9, '.', '_' and '-'`;
    }
    offset += Buffer.byteLength(ch);
  }
  return null;
}

const isNameChar = (ch: string): boolean => /^[a-z0-9_.-]$/.test(ch);

/** Why `name` is not a valid message or service name, or null if it is. */
export function nameProblem(name: string): string | null {
  if (name.length <= NAME_BYTES_MAX && NAME.test(name)) {
    return null;
  }
  return commonProblem(name, "name") ?? badCharacter(name, "name", isNameChar) ?? `name ${printable(name)} is not valid`;
}

/** Why `pattern` is not a valid subscription pattern, or null if it is. */
export function patternProblem(pattern: string): string | null {
  const common = commonProblem(pattern, "pattern");
  if (common !== null) {
    return common;
  }
  const segments = pattern.split(".");
  for (let i = 0; i < segments.length; i++) {
    const segment = segments[i]!;
    if (segment === "*") {
      continue;
    }
    if (segment === ">") {
      if (i === segments.length - 1) {
        continue;
      }
      return `pattern ${printable(pattern)} uses '>' before its last segment; '>' matches the rest and must come last`;
    }
    if (segment.includes("*") || segment.includes(">")) {
      return `pattern ${printable(pattern)} mixes a wildcard with other characters in one segment; use '*' or '>' as a whole segment`;
    }
  }
  return badCharacter(pattern, "pattern", (ch) => isNameChar(ch) || ch === "*" || ch === ">");
}

/** Throws an {@link InvalidMessageError} naming the problem if `name` is not a valid name. */
export function validateName(name: string): void {
  const problem = nameProblem(name);
  if (problem !== null) {
    throw new InvalidMessageError(`invalid name: ${problem}`);
  }
}

/** Throws an {@link InvalidMessageError} naming the problem if `pattern` is not a valid pattern. */
export function validatePattern(pattern: string): void {
  const problem = patternProblem(pattern);
  if (problem !== null) {
    throw new InvalidMessageError(`invalid pattern: ${problem}`);
  }
}

/**
 * Whether a valid `name` matches a valid `pattern`: `*` matches exactly one
 * segment, a last `>` one or more.
 */
export function patternMatches(pattern: string, name: string): boolean {
  if (!pattern.includes("*") && !pattern.includes(">")) {
    return pattern === name;
  }
  const names = name.split(".");
  const segments = pattern.split(".");
  for (let i = 0; i < segments.length; i++) {
    const segment = segments[i]!;
    if (segment === ">") {
      return names.length > i;
    }
    if (i >= names.length) {
      return false;
    }
    if (segment !== "*" && segment !== names[i]) {
      return false;
    }
  }
  return names.length === segments.length;
}
