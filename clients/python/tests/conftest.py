"""Real ``courier serve`` processes for the tests.

The binary comes from ``$COURIER_BIN``; without it, ``cargo build -p
courier-cli`` in the repository builds it once per test run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
from support import Broker

REPO = Path(__file__).resolve().parents[3]


def _build_courier() -> str:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.exit("set COURIER_BIN to a courier binary, or install cargo to build one", returncode=2)
    subprocess.run([cargo, "build", "-q", "-p", "courier-cli"], cwd=REPO, check=True)
    meta = subprocess.run(
        [cargo, "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    target = json.loads(meta.stdout)["target_directory"]
    return str(Path(target) / "debug" / "courier")


@pytest.fixture(scope="session")
def courier_bin() -> str:
    path = os.environ.get("COURIER_BIN") or _build_courier()
    if not os.access(path, os.X_OK):
        pytest.exit(f"courier binary {path} is missing or not executable", returncode=2)
    return path


@pytest.fixture(scope="session")
def serve_flags(courier_bin: str) -> list[str]:
    """Flags every test broker gets: no HTTP port where the binary has one."""
    help_text = subprocess.run([courier_bin, "serve", "--help"], capture_output=True, text=True).stdout
    return ["--http", "off"] if "--http " in help_text or "--http <" in help_text else []


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="courier-py-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_broker(courier_bin: str, serve_flags: list[str], tmp_dir: Path) -> Iterator[Callable[..., Broker]]:
    """Starts brokers with extra ``serve`` flags; all are killed at the end."""
    started: list[Broker] = []

    def start(*extra: str) -> Broker:
        data = tmp_dir / f"data-{len(started)}"
        data.mkdir()
        broker = Broker(courier_bin, serve_flags, data, list(extra))
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.kill9()


@pytest.fixture
def broker(start_broker: Callable[..., Broker]) -> Broker:
    """A broker with a durable store in a temporary directory."""
    return start_broker()
