"""Real ``courier serve`` processes and waiting helpers for the tests."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """A ``courier serve`` process on a free loopback port."""

    def __init__(self, courier_bin: str, flags: list[str], data_dir: Path, extra: list[str]) -> None:
        self.bin = courier_bin
        self.flags = flags
        self.data_dir = data_dir
        self.extra = extra
        self.addr = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = data_dir.parent / f"{data_dir.name}.stderr"
        self.start()

    def start(self) -> None:
        """Starts the process and waits for its ready line."""
        stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [self.bin, "serve", "--listen", self.addr, "--data-dir", str(self.data_dir), *self.flags, *self.extra],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "COURIER_LOG": "warn"},
        )
        stderr.close()
        assert self.proc.stdout is not None
        out = self.proc.stdout
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"courier serve did not get ready: {line!r}\n{self.stderr_text()}")
            ready, _, _ = select.select([out], [], [], left)
            if ready:
                chunk = os.read(out.fileno(), 1)
                if not chunk:
                    raise RuntimeError(f"courier serve exited: {line!r}\n{self.stderr_text()}")
                line += chunk
        assert self.addr.encode() in line, line
        # Keep draining stdout so the broker never writes into a full pipe.
        threading.Thread(target=lambda: out.read(), daemon=True).start()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """``kill -9``, then the same address and data directory again."""
        self.kill9()
        self.start()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def cli(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs a ``courier`` client command against this broker."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("COURIER_")}
        full_env["COURIER_URL"] = self.addr
        full_env.update(env or {})
        done = subprocess.run([self.bin, *args], capture_output=True, text=True, env=full_env, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"courier {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    def cli_json(self, *args: str, env: dict[str, str] | None = None) -> list[Any]:
        return [json.loads(line) for line in self.cli(*args, env=env).stdout.splitlines() if line.strip()]


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Polls ``check`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        await asyncio.sleep(0.02)
