"""Measures pipelined publish and consume rates of one Python process.

    python bench.py                      # starts `courier serve` itself (temp data dir)
    python bench.py --url 127.0.0.1:7700 # against a running broker
    python bench.py --count 200000 --payload 100

Workloads, one after another:

- quiet/transient publish: ``event(..., transient=True).send_quiet()`` in
  a loop, then one ``flush()`` (the broker answers only refusals);
- durable publish: ``event(...).enqueue()`` with up to ``--window`` sends
  awaiting their acceptance (persisted by the broker) at once;
- consume: the durable events, queued meanwhile for a subscribed service,
  handled by a plain-function handler (acked) with ``--max-in-flight``
  deliveries outstanding (default 4096).

The broker is started with ``$COURIER_BIN`` or ``--courier`` (default: the
release build, else the debug build, under the repository's target dir).

``--json`` prints one JSON object a line per workload instead (``client``,
``workload``: publish_quiet, publish_durable or consume_durable, ``count``,
``seconds``, ``cpu_seconds``): what ``courier bench --only clients`` reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from courier_client import Client, Incoming, PendingAck, connect


def find_courier(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("COURIER_BIN"):
        return os.environ["COURIER_BIN"]
    repo = Path(__file__).resolve().parents[2]
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    for profile in ("release", "debug"):
        candidate = target / profile / "courier"
        if candidate.exists():
            return str(candidate)
    sys.exit("no courier binary: pass --courier PATH, set COURIER_BIN, or cargo build --release -p courier-cli")


def start_broker(courier: str, data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    help_text = subprocess.run([courier, "serve", "--help"], capture_output=True, text=True).stdout
    http_off = ["--http", "off"] if "--http <" in help_text else []
    proc = subprocess.Popen(
        [courier, "serve", "--listen", addr, "--data-dir", data_dir, "--send-rate", "0", *http_off],
        stdout=subprocess.PIPE,
        env={**os.environ, "COURIER_LOG": "warn"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if addr.encode() not in line:
        proc.kill()
        sys.exit(f"courier serve did not start: {line!r}")
    return proc, addr


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rate(count: int, seconds: float, cpu: float) -> str:
    """Messages per second of wall time, and this process's CPU time per
    message (what the client costs, whatever else the machine runs)."""
    return f"{count / seconds:>12,.0f} msg/s  ({count:,} in {seconds:.2f} s; python {cpu / count * 1e6:.1f} µs CPU/msg)"


async def publish_quiet(client: Client, count: int, payload: bytes) -> float:
    started = time.perf_counter()
    event = client.event
    for _ in range(count):
        await event("bench.quiet", payload, transient=True).send_quiet()
    await client.flush()
    elapsed = time.perf_counter() - started
    if client.unheard_refusals:
        sys.exit(f"the broker refused {client.unheard_refusals} quiet sends: {client.last_unheard_refusal}")
    return elapsed


async def publish_durable(client: Client, count: int, payload: bytes, window: int) -> float:
    started = time.perf_counter()
    waiting: list[PendingAck] = []
    event = client.event
    for _ in range(count):
        waiting.append(event("bench.durable", payload).enqueue())
        if len(waiting) >= window:
            # Await the older half; the newer half stays in flight.
            half = window // 2
            for ack in waiting[:half]:
                await ack
            del waiting[:half]
    for ack in waiting:
        await ack
    return time.perf_counter() - started


async def consume(url: str, count: int, max_in_flight: int) -> float:
    received = 0
    done = asyncio.get_running_loop().create_future()

    def handle(msg: Incoming) -> None:
        nonlocal received
        received += 1
        if received == count and not done.done():
            done.set_result(None)

    async with connect(url, "bench-sink", max_in_flight=max_in_flight) as sink:
        started = time.perf_counter()
        await sink.on("bench.durable", handle)
        await asyncio.wait_for(done, timeout=max(60.0, count / 5000))
        return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running broker (default: start one)")
    parser.add_argument("--courier", help="the courier binary to start")
    parser.add_argument("--count", type=int, default=200_000, help="messages per workload")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes per message")
    parser.add_argument("--window", type=int, default=10_000, help="durable sends awaiting acceptance at once")
    parser.add_argument("--max-in-flight", type=int, default=4096, help="deliveries the consumer takes at once")
    parser.add_argument("--json", action="store_true", help="one JSON object a line per workload")
    args = parser.parse_args()

    def say(workload: str, label: str, seconds: float, cpu: float, extra: str = "") -> None:
        if args.json:
            record = {"client": "python", "workload": workload, "count": args.count, "seconds": seconds, "cpu_seconds": cpu}
            print(json.dumps(record), flush=True)
        else:
            print(f"{label:<24} {rate(args.count, seconds, cpu)}{extra}")

    proc = None
    data_dir = None
    url = args.url
    if url is None:
        courier = find_courier(args.courier)
        data_dir = tempfile.mkdtemp(prefix="courier-pybench-")
        proc, url = start_broker(courier, data_dir)
        if not args.json:
            print(f"broker: {courier} serve (durable store in {data_dir}, fsync always)")
    payload = b"x" * args.payload
    try:
        # The consumer's service subscribes first, so durable events queue for it.
        async with connect(url, "bench-sink") as sink:
            await sink.on("bench.durable", lambda msg: None)
        async with connect(url, "bench-pub") as pub:
            if not args.json:
                print(f"python {sys.version.split()[0]}, {args.count:,} messages of {args.payload} bytes, one process")
            cpu = cpu_seconds()
            quiet = await publish_quiet(pub, args.count, payload)
            say("publish_quiet", "publish quiet/transient", quiet, cpu_seconds() - cpu)
            cpu = cpu_seconds()
            durable = await publish_durable(pub, args.count, payload, args.window)
            say("publish_durable", "publish durable", durable, cpu_seconds() - cpu, f"  window {args.window:,}")
        cpu = cpu_seconds()
        consumed = await consume(url, args.count, args.max_in_flight)
        say(
            "consume_durable",
            "consume durable (acked)",
            consumed,
            cpu_seconds() - cpu,
            f"  max_in_flight {args.max_in_flight:,}",
        )
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
