#!/usr/bin/env node
// Measures the TypeScript client from one Node process against a local
// broker: pipelined publishing (transient and quiet, durable) and
// consuming. Prints one line per workload with its rate in msg/s.
//
//   npm run build && node bench.mjs                 # starts its own broker
//   node bench.mjs --url 127.0.0.1:7700             # against a running one
//   node bench.mjs --count 50000 --payload 1024
//   node bench.mjs --url 127.0.0.1:7700 --json     # for `courier bench --only clients`
//
// --json runs the three workloads the Rust and Python clients run too
// (publish_quiet, publish_durable to a subscribed service,
// consume_durable) and prints one JSON object a line per workload:
// client, workload, count, seconds, cpu_seconds.
//
// The broker it starts is $COURIER_BIN, else the release build, else the
// debug build (much slower: the numbers then measure the debug broker).

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { Client } from "./dist/src/index.js";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    count: { type: "string", default: "200000" },
    payload: { type: "string", default: "100" },
    window: { type: "string", default: "10000" },
    fsync: { type: "string", default: "always" },
    json: { type: "boolean", default: false },
  },
});
const COUNT = Number(args.count);
const PAYLOAD_BYTES = Number(args.payload);
/** Durable sends awaiting their acceptance at once. */
const WINDOW = Number(args.window);

const here = dirname(fileURLToPath(import.meta.url));
const repoRoot = resolve(here, "..", "..");

function courierBin() {
  if (process.env.COURIER_BIN) return process.env.COURIER_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(repoRoot, "target");
  for (const profile of ["release", "debug"]) {
    const bin = join(target, profile, "courier");
    if (existsSync(bin)) {
      if (profile === "debug") {
        console.warn("bench: no release build; measuring against the debug broker (cargo build --release -p courier-cli)");
      }
      return bin;
    }
  }
  throw new Error("no courier binary: cargo build --release -p courier-cli, or set COURIER_BIN");
}

async function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

async function startBroker() {
  const bin = courierBin();
  const addr = `127.0.0.1:${await freePort()}`;
  const dataDir = mkdtempSync(join(tmpdir(), "courier-ts-bench-"));
  const help = await new Promise((done) => {
    const p = spawn(bin, ["serve", "--help"]);
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.on("close", () => done(out));
  });
  const extra = /--http\b/.test(help) ? ["--http", "off"] : [];
  const child = spawn(
    bin,
    ["serve", "--listen", addr, "--data-dir", dataDir, "--fsync", args.fsync, "--send-rate", "0", ...extra],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, COURIER_LOG: "warn" } },
  );
  await new Promise((ready, fail) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      if (line.startsWith("courier listening on")) ready();
    });
    child.once("exit", (code) => fail(new Error(`courier serve exited (${code})`)));
  });
  return {
    addr,
    bin,
    stop() {
      child.kill("SIGKILL");
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

const payload = Buffer.alloc(PAYLOAD_BYTES, 0x61);
const results = [];

/** The workloads --json names, by their human label's start. */
const JSON_NAMES = [
  ["publish transient quiet", "publish_quiet"],
  ["publish durable (window", "publish_durable"],
  ["consume durable backlog", "consume_durable"],
];
let cpuAtStart = process.cpuUsage();

function report(workload, count, ms) {
  const rate = Math.round((count / ms) * 1000);
  results.push({ workload, count, ms: Math.round(ms), rate });
  const cpu = process.cpuUsage(cpuAtStart);
  cpuAtStart = process.cpuUsage();
  if (args.json) {
    const named = JSON_NAMES.find(([label]) => workload.startsWith(label) && !workload.includes("no subscriber"));
    if (named) {
      const cpuSeconds = (cpu.user + cpu.system) / 1e6;
      console.log(JSON.stringify({ client: "typescript", workload: named[1], count, seconds: ms / 1000, cpu_seconds: cpuSeconds }));
    }
    return;
  }
  console.log(`${workload.padEnd(44)} ${String(count).padStart(8)} msgs ${(ms / 1000).toFixed(2).padStart(7)} s ${rate.toLocaleString("en-US").padStart(10)} msg/s`);
}

async function connect(url, service, options = {}) {
  return Client.connect({ url, service, logger: null, ...options });
}

/** Transient, quiet: no answer per message; one flush confirms them all. */
async function publishQuiet(url) {
  const client = await connect(url, "bench-quiet");
  cpuAtStart = process.cpuUsage();
  const started = performance.now();
  for (let i = 0; i < COUNT; i++) {
    await client.publish("bench.quiet", payload, { transient: true, quiet: true });
  }
  await client.flush();
  report("publish transient quiet (flush at the end)", COUNT, performance.now() - started);
  if (client.unheardRefusals !== 0) throw new Error(`${client.unheardRefusals} quiet sends refused`);
  await client.close();
}

/** Durable, pipelined: up to WINDOW acceptances outstanding. */
async function publishDurable(url, name, service) {
  const client = await connect(url, service);
  cpuAtStart = process.cpuUsage();
  const started = performance.now();
  let window = [];
  for (let i = 0; i < COUNT; i++) {
    window.push(client.enqueue("event", name, payload));
    if (window.length === WINDOW) {
      await Promise.all(window);
      window = [];
    }
  }
  await Promise.all(window);
  const ms = performance.now() - started;
  await client.close();
  return ms;
}

/** Events waiting for a service are delivered to a consumer that connects. */
async function consumeBacklog(url) {
  // The subscription exists before the events, so they wait for it.
  const setup = await connect(url, "bench-sink");
  await setup.on("bench.backlog", () => {});
  await setup.close();
  const ms = await publishDurable(url, "bench.backlog", "bench-backlog-source");
  report(`publish durable (window ${WINDOW}, subscribed service)`, COUNT, ms);
  let received = 0;
  let done;
  const all = new Promise((r) => (done = r));
  const consumer = await connect(url, "bench-sink", { maxInFlight: 4096 });
  cpuAtStart = process.cpuUsage();
  const started = performance.now();
  await consumer.on("bench.backlog", () => {
    if (++received === COUNT) done();
  });
  await all;
  report("consume durable backlog (ack each, max_in_flight 4096)", COUNT, performance.now() - started);
  await consumer.close();
}

/** Publisher and consumer at once, in this one process. */
async function pubSubLive(url) {
  let received = 0;
  let done;
  const all = new Promise((r) => (done = r));
  const consumer = await connect(url, "bench-live-sink", { maxInFlight: 4096 });
  await consumer.on("bench.live", () => {
    if (++received === COUNT) done();
  });
  const started = performance.now();
  const publishing = publishDurable(url, "bench.live", "bench-live-source");
  await Promise.all([publishing, all]);
  report("durable publish + consume at once (end to end)", COUNT, performance.now() - started);
  await consumer.close();
}

/** Requests one at a time: a round trip each. */
async function requestRoundTrips(url) {
  const responder = await connect(url, "bench-responder");
  await responder.on("bench.ask", (msg) => msg.reply("bench.answered", msg.payload));
  const asker = await connect(url, "bench-asker");
  const n = Math.min(COUNT, 20_000);
  const started = performance.now();
  for (let i = 0; i < n; i++) {
    await asker.request("bench.ask", payload, { transient: true });
  }
  report("request/reply, transient, one at a time", n, performance.now() - started);
  await asker.close();
  await responder.close();
}

const broker = args.url ? null : await startBroker();
const url = args.url ?? broker.addr;
if (!args.json) {
  console.log(
    `node ${process.version}, ${COUNT} messages of ${PAYLOAD_BYTES} bytes, broker ${args.url ? url : `${broker.bin} (--fsync ${args.fsync})`}`,
  );
}
try {
  await publishQuiet(url);
  if (!args.json) {
    report(`publish durable (window ${WINDOW}, no subscriber)`, COUNT, await publishDurable(url, "bench.durable", "bench-durable"));
  }
  await consumeBacklog(url);
  if (!args.json) {
    await pubSubLive(url);
    await requestRoundTrips(url);
  }
} finally {
  broker?.stop();
}
