"""The codec against docs/protocol-vectors.json (PROTOCOL.md §12): every
frame vector decodes to its fields and encodes to its bytes, every
malformed vector is refused for its reason, every incomplete one waits; and
the broker cases run against a real broker, through this codec."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from support import Broker

from courier_client import protocol as p

VECTORS = Path(os.environ.get("COURIER_VECTORS", Path(__file__).resolve().parents[3] / "docs" / "protocol-vectors.json"))
DATA: dict[str, Any] = json.loads(VECTORS.read_text()) if VECTORS.exists() else {}
needs_vectors = pytest.mark.skipif(not DATA, reason=f"{VECTORS} does not exist")


def by_name(section: str) -> list[Any]:
    # A vector of a newer protocol version than this codec speaks (it says
    # so in its own protocol_version) is not for it; every other one is
    # read at its own version.
    return [
        pytest.param(v, id=v["name"])
        for v in DATA.get(section, [])
        if v.get("protocol_version", 1) <= p.PROTOCOL_VERSION
    ]


# --- vector fields → this codec's values, and back -----------------------------


def to_message(d: dict[str, Any]) -> p.Message:
    return p.Message(
        p.Kind(d["kind"]),
        d["name"],
        bytes.fromhex(d["payload"]),
        version=(d["version"]["major"], d["version"]["minor"]),
        id=uuid.UUID(d["id"]),
        activity_id=uuid.UUID(d["activity_id"]),
        timestamp=d["timestamp"],
        sender=d["sender"],
        response_to=uuid.UUID(d["response_to"]) if "response_to" in d else None,
        key=bytes.fromhex(d["key"]) if "key" in d else None,
        expires_at=d.get("expires_at"),
        deliver_at=d.get("deliver_at"),
        parent_id=uuid.UUID(d["parent_id"]) if "parent_id" in d else None,
        transient=d["transient"],
        final=d["final"],
        headers=[(k, v) for k, v in d["headers"]],
    )


def flags_of(m: p.Message, quiet: bool = False, version: int = p.PROTOCOL_VERSION) -> int:
    return p.encode_message(m, p.Flag.QUIET if quiet else 0, version)[1]


def from_message(m: p.Message, version: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "kind": int(m.kind),
        "flags": flags_of(m, False, version),
        "transient": m.transient,
        "final": m.final,
        "name": m.name,
        "version": {"major": m.version[0], "minor": m.version[1]},
        "id": str(m.id),
        "activity_id": str(m.activity_id),
        "timestamp": m.timestamp,
        "sender": m.sender,
        "headers": [[k, v] for k, v in m.headers],
        "payload": m.payload.hex(),
    }
    if m.response_to is not None:
        d["response_to"] = str(m.response_to)
    if m.key is not None:
        d["key"] = m.key.hex()
    if m.expires_at is not None:
        d["expires_at"] = m.expires_at
    if m.deliver_at is not None:
        d["deliver_at"] = m.deliver_at
    if m.parent_id is not None:
        d["parent_id"] = str(m.parent_id)
    return d


def to_frame(d: dict[str, Any], version: int) -> p.Frame:
    t = d["type"]
    if t == "HELLO":
        return p.Hello(d["service"], d["instance"], d["max_in_flight"], d.get("token"), d["version"])
    if t == "WELCOME":
        return p.Welcome(d["version"], d["connection_id"], d["frame_bytes_max"], d["broker"], d.get("service"))
    if t == "SEND":
        entries = []
        for e in d["entries"]:
            message = to_message(e["message"])
            assert flags_of(message, e["quiet"], version) == e["message"]["flags"], "flags follow from the fields"
            entries.append(p.SendEntry(e["seq"], message, e["quiet"]))
        return p.Send(entries)
    if t == "SEND_RESULT":
        return p.SendResult(
            [p.SendOutcome(e["seq"], e["code"], e["reason"], e.get("log_seq", 0)) for e in d["entries"]]
        )
    if t == "SUBSCRIBE":
        return p.Subscribe(
            d["request"], d["pattern"], d["ack_deadline_ms"], d["max_deliveries"], d["start"], d["start_time"]
        )
    if t == "UNSUBSCRIBE":
        return p.Unsubscribe(d["request"], d["pattern"])
    if t == "RESULT":
        return p.Result(d["request"], d["code"], d["reason"])
    if t == "DELIVER":
        deliveries = []
        for e in d["entries"]:
            message = to_message(e["message"])
            assert flags_of(message, False, version) == e["message"]["flags"], "flags follow from the fields"
            deliveries.append(p.Delivery(e["delivery"], e["attempt"], message))
        return p.Deliver(deliveries)
    if t == "ACK":
        return p.Ack(list(d["entries"]))
    if t == "NACK":
        return p.Nack([p.NackEntry(e["delivery"], e["delay_ms"]) for e in d["entries"]])
    if t == "FLOW":
        return p.Flow(d["max_in_flight"])
    if t == "PING":
        return p.Ping(d["nonce"])
    if t == "PONG":
        return p.Pong(d["nonce"])
    if t == "ERROR":
        return p.ErrorFrame(d["code"], d["message"])
    if t == "DRAIN":
        return p.Drain()
    if t == "DRAINED":
        return p.Drained()
    raise AssertionError(f"a frame type this test does not know: {t}")


def answer_items(frame: p.Frame, version: int) -> list[dict[str, Any]]:
    """A broker's answer as the vectors' items: one per frame, one per
    entry of a batch frame."""
    if isinstance(frame, p.Welcome):
        item: dict[str, Any] = {
            "type": "WELCOME",
            "version": frame.version,
            "connection_id": frame.connection_id,
            "frame_bytes_max": frame.frame_bytes_max,
            "broker": frame.broker,
        }
        if frame.service is not None:
            item["service"] = frame.service
        return [item]
    if isinstance(frame, p.SendResult):
        return [
            {"type": "SEND_RESULT", "seq": o.seq, "code": o.code, "reason": o.reason}
            | ({"log_seq": o.log_seq} if o.log_seq else {})
            for o in frame.entries
        ]
    if isinstance(frame, p.Result):
        return [{"type": "RESULT", "request": frame.request, "code": frame.code, "reason": frame.reason}]
    if isinstance(frame, p.Deliver):
        return [
            {"type": "DELIVER", "delivery": e.delivery, "attempt": e.attempt, "message": from_message(e.message, version)}
            for e in frame.entries
        ]
    if isinstance(frame, p.Pong):
        return [{"type": "PONG", "nonce": frame.nonce}]
    if isinstance(frame, p.Ping):
        return [{"type": "PING", "nonce": frame.nonce}]
    if isinstance(frame, p.ErrorFrame):
        return [{"type": "ERROR", "code": frame.code, "message": frame.message}]
    if isinstance(frame, p.Drained):
        return [{"type": "DRAINED"}]
    raise AssertionError(f"the broker sent a frame only clients send: {frame}")


def matches(expected: Any, got: Any) -> bool:
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return False
        for key, want in expected.items():
            if key in ("note",):
                continue
            if key == "code_name":
                if p.error_code_name(got.get("code", -1)) != want:
                    return False
            elif want is None:
                if key in got:
                    return False
            elif key not in got or not matches(want, got[key]):
                return False
        return True
    return bool(expected == got)


# --- the codec ------------------------------------------------------------------


def test_the_vectors_file_is_there_when_the_protocol_document_points_at_it() -> None:
    protocol = (Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md").read_text()
    if "protocol-vectors.json" not in protocol and not DATA:
        pytest.skip("this protocol document has no conformance vectors")
    assert DATA, f"PROTOCOL.md names {VECTORS.name}, which is missing"
    assert DATA["protocol_version"] >= p.PROTOCOL_VERSION
    assert {(c["code"], c["name"]) for c in DATA["error_codes"]} == {(int(c), c.wire_name) for c in p.ErrorCode}


@needs_vectors
@pytest.mark.parametrize("vector", by_name("frames"))
def test_frame_vectors_decode_to_their_fields_and_encode_to_their_bytes(vector: dict[str, Any]) -> None:
    version = vector.get("protocol_version", 1)
    wire = bytes.fromhex(vector["hex"])
    expected = to_frame(vector["frame"], version)
    assert p.decode_frame(wire, version=version) == (expected, len(wire))
    assert p.encode_frame(expected, version).hex() == vector["hex"]


@needs_vectors
@pytest.mark.parametrize("vector", by_name("malformed"))
def test_malformed_vectors_are_refused_for_their_reason(vector: dict[str, Any]) -> None:
    with pytest.raises(p.DecodeError) as refused:
        p.decode_frame(
            bytes.fromhex(vector["hex"]),
            vector.get("frame_bytes_max", p.FRAME_BYTES_MAX_DEFAULT),
            vector.get("protocol_version", 1),
        )
    assert refused.value.kind == vector["error"], refused.value
    assert refused.value.code == vector["code"]
    assert refused.value.code.wire_name == vector["code_name"]


@needs_vectors
@pytest.mark.parametrize("vector", by_name("incomplete"))
def test_incomplete_vectors_wait_for_more_bytes(vector: dict[str, Any]) -> None:
    wire = bytes.fromhex(vector["hex"])
    limit = vector.get("frame_bytes_max", p.FRAME_BYTES_MAX_DEFAULT)
    assert p.decode_frame(wire, limit, vector.get("protocol_version", 1)) is None


# --- the broker cases, through this codec ----------------------------------------------


def read_answers(sock: socket.socket, want: int | None, deadline: float, version: int) -> list[dict[str, Any]]:
    """Answers until ``want`` items came (or, with ``None``, the broker
    closed), read at the version WELCOME settles on (``version`` before)."""
    buf = b""
    items: list[dict[str, Any]] = []
    while want is None or len(items) < want:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except socket.timeout:
            raise AssertionError(f"the broker answered {len(items)} items in time: {items}") from None
        if not chunk:
            break
        buf += chunk
        while (got := p.decode_frame(buf, 64 * 1024 * 1024, version)) is not None:
            frame, used = got
            buf = buf[used:]
            if isinstance(frame, p.Welcome):
                version = frame.version
            items.extend(answer_items(frame, version))
    return items


def close_and_wait(sock: socket.socket, deadline: float) -> None:
    """Closes a connection left open and waits until the broker closed its
    side too: it forgets a connection (and takes back what it held) before
    it closes it, so the next connection cannot race the last one's end."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if not sock.recv(65536):
                return
    except (ConnectionResetError, BrokenPipeError):
        return
    except socket.timeout:
        raise AssertionError("the broker did not close a connection the client closed") from None


@needs_vectors
@pytest.mark.parametrize("case", by_name("broker"))
def test_broker_cases(case: dict[str, Any], start_broker: Callable[..., Broker], tmp_dir: Path) -> None:
    extra: list[str] = list(case.get("serve", []))
    if "manifest" in case:
        manifest = tmp_dir / "courier.toml"
        manifest.write_text(DATA["manifests"][case["manifest"]])
        extra += ["--manifest", str(manifest)]
    broker = start_broker(*extra)
    host, port = broker.addr.rsplit(":", 1)
    for connection in case["connections"]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # A connection speaks the version its HELLO asks for (the
            # broker speaks them all).
            version = next(
                (i["frame"]["version"] for i in connection["send"] if i.get("frame", {}).get("type") == "HELLO"), 1
            )
            for item in connection["send"]:
                if "hex" in item:
                    wire = bytes.fromhex(item["hex"])
                else:
                    wire = p.encode_frame(to_frame(item["frame"], version), version)
                try:
                    sock.sendall(wire)
                except (ConnectionResetError, BrokenPipeError):
                    break  # the broker already closed; its answers are still to be read
            expected = connection["expect"]
            closed = connection["then"] == "closed"
            got = read_answers(sock, None if closed else len(expected), time.monotonic() + 10, version)
            assert len(got) == len(expected), f"expected {expected}, got {got}"
            if connection.get("any_order"):
                left = list(got)
                for want in expected:
                    hit = next((g for g in left if matches(want, g)), None)
                    assert hit is not None, f"no answer matches {want} in {got}"
                    left.remove(hit)
            else:
                for want, answer in zip(expected, got):
                    assert matches(want, answer), f"expected {want}, got {answer}"
            if not closed:
                close_and_wait(sock, time.monotonic() + 10)
