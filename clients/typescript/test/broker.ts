// Real `courier serve` processes for the tests: on free loopback ports,
// with a temporary data directory, ready when they print their ready line.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (this file runs from clients/typescript/dist/test). */
const repoRoot = resolve(here, "..", "..", "..", "..");

/** The `courier` binary: $COURIER_BIN, else the cargo debug build. */
export function courierBin(): string {
  const bin =
    process.env.COURIER_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(repoRoot, "target"), "debug", "courier");
  if (!existsSync(bin)) {
    throw new Error(
      `no courier binary at ${bin}: build it with 'cargo build -p courier-cli' or point COURIER_BIN at one`,
    );
  }
  return bin;
}

let serveFlags: string | null = null;

/** Flags that keep a test broker to its one port (no HTTP listener, if the binary has one). */
function quietFlags(): string[] {
  serveFlags ??= spawnSync(courierBin(), ["serve", "--help"], { encoding: "utf8" }).stdout ?? "";
  return /--http\b/.test(serveFlags) ? ["--http", "off"] : [];
}

/** Runs a `courier` command to its end; its stdout, or an error with its stderr. */
export function courier(args: string[]): string {
  const out = spawnSync(courierBin(), args, { encoding: "utf8" });
  if (out.status !== 0) {
    throw new Error(`courier ${args.join(" ")} failed (${out.status}): ${out.stderr}`);
  }
  return out.stdout;
}

/** A loopback port nobody listens on right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

/** A directory removed by {@link removeDir}. */
export function tempDir(tag: string): string {
  return mkdtempSync(join(tmpdir(), `courier-ts-${tag}-`));
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

/** One line of `courier services`. */
export interface ServiceState {
  name: string;
  backlog: number;
  in_flight: number;
  dead_letters: number;
  instances: string[];
  patterns: string[];
}

export interface BrokerOptions {
  /** Extra `serve` flags. */
  args?: string[];
  /** Keep nothing on disk. */
  inMemory?: boolean;
}

const READY_TIMEOUT_MS = 20_000;

/** A running `courier serve`. */
export class Broker {
  private constructor(
    private child: ChildProcess,
    readonly addr: string,
    readonly dataDir: string,
    private readonly options: BrokerOptions,
    private stderr: string[],
  ) {}

  static async start(options: BrokerOptions = {}): Promise<Broker> {
    const addr = `127.0.0.1:${await freePort()}`;
    return Broker.startAt(addr, tempDir("broker"), options);
  }

  private static async startAt(addr: string, dataDir: string, options: BrokerOptions): Promise<Broker> {
    const args = ["serve", "--listen", addr, ...quietFlags()];
    args.push(...(options.inMemory ? ["--in-memory"] : ["--data-dir", dataDir]));
    args.push(...(options.args ?? []));
    const child = spawn(courierBin(), args, {
      env: { ...process.env, COURIER_LOG: "warn" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const stderr: string[] = [];
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => {
      stderr.push(text);
    });
    const lines = createInterface({ input: child.stdout! });
    await new Promise<void>((ready, fail) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        fail(new Error(`courier serve printed no ready line within ${READY_TIMEOUT_MS} ms: ${stderr.join("")}`));
      }, READY_TIMEOUT_MS);
      lines.on("line", (line) => {
        if (line.startsWith("courier listening on")) {
          clearTimeout(timer);
          ready();
        }
      });
      child.once("exit", (code) => {
        clearTimeout(timer);
        fail(new Error(`courier serve exited (${code}) before it was ready: ${stderr.join("")}`));
      });
    });
    return new Broker(child, addr, dataDir, options, stderr);
  }

  /** The broker's view of `service` (`courier services`): backlog, in flight, dead letters. */
  service(name: string): ServiceState {
    const lines = courier(["services", "--url", this.addr]).trim().split("\n");
    const states = lines.filter((l) => l !== "").map((l) => JSON.parse(l) as ServiceState);
    const state = states.find((s) => s.name === name);
    if (state === undefined) {
      throw new Error(`the broker knows no service ${name}: ${lines.join(" ")}`);
    }
    return state;
  }

  /** What the broker wrote to stderr so far. */
  get log(): string {
    return this.stderr.join("");
  }

  /** SIGSTOP: the broker holds its connections open and answers nothing. */
  freeze(): void {
    this.child.kill("SIGSTOP");
  }

  /** `kill -9`: no chance to flush or say goodbye. */
  async kill(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return;
    }
    const exited = new Promise((done) => this.child.once("exit", done));
    this.child.kill("SIGKILL");
    await exited;
  }

  /** Starts the broker again on the same address and data directory. */
  async restart(): Promise<void> {
    await this.kill();
    const again = await Broker.startAt(this.addr, this.dataDir, this.options);
    this.child = again.child;
    this.stderr = again.stderr;
  }

  /** Kills the broker and removes its data. */
  async stop(): Promise<void> {
    await this.kill();
    removeDir(this.dataDir);
  }
}

/** Resolves when `condition` holds, polling; fails with `what` after `timeoutMs`. */
export async function eventually(what: string, condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A promise with its resolve function, for handlers to signal tests. */
export function signal<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolveFn!: (value: T) => void;
  const promise = new Promise<T>((r) => {
    resolveFn = r;
  });
  return { promise, resolve: resolveFn };
}
