"""The codec against the worked examples of docs/PROTOCOL.md §10, every frame
type both ways, and every way a frame can be malformed (§2.2)."""

from __future__ import annotations

import random
import struct
import uuid

import pytest

from courier_client import protocol as p
from courier_client._ids import new_id_bytes
from courier_client.names import pattern_matches, validate_name, validate_pattern
from courier_client.errors import InvalidName


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


HELLO_WIRE = hexbytes(
    """00 00 00 1b 01 43 52 52 31 00 01 03 77 65 62 05
       77 65 62 2d 31 00 00 00 40 01 00 03 74 6f 6b"""
)
WELCOME_WIRE = hexbytes(
    """00 00 00 17 02 00 01 00 00 00 00 00 00 00 01 00
       80 00 00 07 63 6f 75 72 69 65 72"""
)
SEND_WIRE = hexbytes(
    """00 00 00 55 03 00 00 00 01 00 00 00 00 00 00 00
       01 02 08 0c 74 6f 64 6f 2e 63 72 65 61 74 65 64
       00 01 00 00 01 7f 22 e2 79 b0 7c c3 98 c4 dc 0c
       0c 07 39 8f 01 7f 22 e2 79 b0 7c c3 98 c4 dc 0c
       0c 07 39 90 00 00 00 00 00 00 00 00 00 00 02 75
       31 00 00 00 00 00 02 68 69"""
)
SEND_RESULT_WIRE = hexbytes("00 00 00 11 04 00 00 00 01 00 00 00 00 00 00 00 01 00 00 00 00")
ACK_WIRE = hexbytes("00 00 00 15 09 00 00 00 02 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 02")


def roundtrip(wire: bytes, version: int = 1) -> p.Frame:
    """The worked examples are of version 1 (they read the same at 2)."""
    got = p.decode_frame(wire, version=version)
    assert got is not None
    frame, used = got
    assert used == len(wire)
    assert p.encode_frame(frame, version) == wire
    return frame


def test_worked_example_hello() -> None:
    frame = roundtrip(HELLO_WIRE)
    assert frame == p.Hello("web", "web-1", 64, "tok", version=1)
    no_token = p.encode_frame(p.Hello("web", "web-1", 64))
    assert no_token[:4] == b"\x00\x00\x00\x16" and no_token.endswith(b"\x00\x00\x00\x40\x00")


def test_worked_example_welcome() -> None:
    assert roundtrip(WELCOME_WIRE) == p.Welcome(1, 1, 8 * 1024 * 1024, "courier")


def test_welcome_that_names_the_authenticated_service() -> None:
    wire = p.encode_frame(p.Welcome(1, 7, 1024, "courier 0.2", "web"))
    assert roundtrip(wire) == p.Welcome(1, 7, 1024, "courier 0.2", "web")


def test_worked_example_send() -> None:
    frame = roundtrip(SEND_WIRE)
    assert isinstance(frame, p.Send)
    (entry,) = frame.entries
    m = entry.message
    assert entry.seq == 1 and not entry.quiet
    assert (m.kind, m.name, m.version, m.key, m.payload) == (p.Kind.EVENT, "todo.created", (1, 0), b"u1", b"hi")
    assert m.id == uuid.UUID("017f22e2-79b0-7cc3-98c4-dc0c0c07398f")
    assert m.activity_id == uuid.UUID("017f22e2-79b0-7cc3-98c4-dc0c0c073990")
    assert (m.timestamp, m.sender, m.response_to, m.headers, m.final, m.transient) == (0, "", None, [], False, False)
    rebuilt = p.Message(
        p.Kind.EVENT,
        "todo.created",
        b"hi",
        id=uuid.UUID("017f22e2-79b0-7cc3-98c4-dc0c0c07398f"),
        activity_id=uuid.UUID("017f22e2-79b0-7cc3-98c4-dc0c0c073990"),
        key=b"u1",
    )
    assert p.encode_frame(p.Send([p.SendEntry(1, rebuilt)])) == SEND_WIRE


def test_worked_examples_send_result_and_ack() -> None:
    assert roundtrip(SEND_RESULT_WIRE) == p.SendResult([p.SendOutcome(1, 0, "")])
    assert roundtrip(ACK_WIRE) == p.Ack([1, 2])


def full_message(kind: p.Kind = p.Kind.REPLY) -> p.Message:
    return p.Message(
        kind,
        "file.copy.progress",
        b"\x00\xffpayload",
        version=(2, 7),
        timestamp=1_700_000_000_123_456_789,
        sender="files",
        response_to=uuid.uuid4(),
        key=b"\x01key",
        expires_at=2**63,
        deliver_at=1,
        transient=True,
        final=False,
        headers=[("content-type", "application/json"), ("x-é", "ü" * 300)],
    )


@pytest.mark.parametrize(
    "frame",
    [
        p.Hello("web", "", 0),
        p.Welcome(1, 2**64 - 1, 1, ""),
        p.Send([p.SendEntry(1, full_message(p.Kind.COMMAND)), p.SendEntry(2**64 - 1, full_message(), quiet=True)]),
        p.SendResult([p.SendOutcome(3, 6, "no service receives x"), p.SendOutcome(4, 0, "duplicate")]),
        p.Subscribe(9, "todo.>", 30_000, 5, 2, 123),
        p.Subscribe(9, "todo.*", 0, 0, 1, 0),
        p.Unsubscribe(10, "todo.*"),
        p.Result(9, 11, "bad pattern"),
        p.Deliver([p.Delivery(1, 1, full_message()), p.Delivery(2, 3, p.Message(p.Kind.EVENT, "a"))]),
        p.Ack([7]),
        p.Nack([p.NackEntry(1, 0), p.NackEntry(2, 2**32 - 1)]),
        p.Flow(256),
        p.Ping(0),
        p.Pong(2**64 - 1),
        p.ErrorFrame(21, "too many connections"),
        p.Drain(),
        p.Drained(),
    ],
    ids=lambda f: type(f).__name__,
)
def test_every_frame_type_round_trips(frame: p.Frame) -> None:
    wire = p.encode_frame(frame)
    assert struct.unpack(">I", wire[:4])[0] == len(wire) - 4
    assert p.decode_frame(wire) == (frame, len(wire))
    assert p.decode_frame(wire[:-1]) is None, "an incomplete frame waits for more bytes"


def test_message_encoding_has_the_documented_size() -> None:
    assert len(p.encode_message(p.Message(p.Kind.EVENT, ""))) == p.MESSAGE_BYTES_MIN
    m = full_message()
    headers = sum(1 + len(k.encode()) + 2 + len(v.encode()) for k, v in m.headers)
    expected = 54 + len(m.name) + len(m.sender) + 16 + (2 + len(m.key or b"")) + 8 + 8 + headers + len(m.payload)
    assert len(p.encode_message(m)) == expected
    assert p.decode_message(p.encode_message(m)) == m


def body(frame_type: int, payload: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(payload), frame_type) + payload


def message_bytes(kind: int = 2, flags: int = 0, headers: int = 0) -> bytes:
    return (
        bytes((kind, flags))
        + b"\x01a"
        + b"\x00\x01\x00\x00"
        + bytes(32)
        + bytes(8)
        + b"\x00"
        + struct.pack(">H", headers)
        + b"".join(b"\x01k\x00\x01v" for _ in range(headers))
        + b"\x00\x00\x00\x00"
    )


@pytest.mark.parametrize(
    "wire, kind",
    [
        (b"\x00\x00\x00\x00", "EmptyFrame"),
        (b"\x00\x80\x00\x01\x0c", "FrameTooLarge"),
        (body(0x11, b""), "UnknownFrameType"),
        (body(0x00, b""), "UnknownFrameType"),
        (body(0x0C, b"\x00" * 7), "UnexpectedEof"),
        (body(0x0C, b"\x00" * 9), "TrailingBytes"),
        (body(0x0F, b"\x00"), "TrailingBytes"),
        (body(0x0E, b"\x00\x01\x00\x02\xff\xfe"), "InvalidUtf8"),
        (body(0x01, b"CRR2\x00\x01\x01a\x00\x00\x00\x00\x00\x00"), "BadMagic"),
        (body(0x01, b"CRR1\x00\x01\x01a\x00\x00\x00\x00\x00\x02"), "UnknownCredentials"),
        (body(0x03, b"\x00\x00\x00\x01" + bytes(8) + message_bytes(kind=4)), "UnknownKind"),
        (body(0x08, b"\x00\x00\x00\x01" + bytes(12) + message_bytes(flags=0x40)), "UnknownFlags"),
        (body(0x03, b"\x00\x00\x00\x01" + bytes(8) + message_bytes(headers=65)), "TooManyHeaders"),
        (body(0x09, b"\x00\x00\x00\x00"), "EmptyBatch"),
        (body(0x09, b"\x00\x00\x00\x02" + bytes(8)), "TooManyEntries"),
        (body(0x09, b"\x00\x01\x00\x01" + bytes(8 * 65537)), "TooManyEntries"),
        (body(0x05, bytes(8) + b"\x01a" + bytes(8) + b"\x00" + b"\x00" * 7 + b"\x01"), "StrayStartTime"),
        (body(0x05, bytes(8) + b"\x01a" + bytes(8) + b"\x03" + bytes(8)), "UnknownStart"),
    ],
)
def test_malformed_frames_are_refused_with_their_reason(wire: bytes, kind: str) -> None:
    with pytest.raises(p.DecodeError) as refused:
        p.decode_frame(wire, p.FRAME_BYTES_MAX_DEFAULT if kind != "TooManyEntries" else 2**30)
    assert refused.value.kind == kind, refused.value
    expected = p.ErrorCode.FRAME_TOO_LARGE if kind == "FrameTooLarge" else p.ErrorCode.MALFORMED_FRAME
    assert refused.value.code == expected


def test_flag_bit_7_is_parent_id_from_version_2_and_unknown_before() -> None:
    wire = body(0x03, b"\x00\x00\x00\x01" + bytes(8) + message_bytes(flags=0x80))
    with pytest.raises(p.DecodeError) as refused:
        p.decode_frame(wire, version=1)
    assert refused.value.kind == "UnknownFlags"
    # Version 2 on, the 16 bytes of parent_id are read from what follows.
    with pytest.raises(p.DecodeError) as refused:
        p.decode_frame(wire, version=2)
    assert refused.value.kind == "UnexpectedEof"


def test_parent_id_travels_from_version_2_and_is_left_out_below() -> None:
    cause = uuid.uuid4()
    m = p.Message(p.Kind.EVENT, "todo.created", b"hi", parent_id=cause)
    frame = p.Send([p.SendEntry(1, m)])
    decoded = p.decode_frame(p.encode_frame(frame, version=2), version=2)
    assert decoded is not None and isinstance(decoded[0], p.Send)
    assert decoded[0].entries[0].message.parent_id == cause
    old = p.decode_frame(p.encode_frame(frame, version=1), version=1)
    assert old is not None and isinstance(old[0], p.Send)
    assert old[0].entries[0].message.parent_id is None


def test_send_result_carries_log_seq_from_version_3() -> None:
    frame = p.SendResult([p.SendOutcome(1, 0, "", 42)])
    assert p.decode_frame(p.encode_frame(frame, version=3), version=3) == (frame, 29)
    # Below version 3 the field is not on the wire.
    assert p.decode_frame(p.encode_frame(frame, version=2), version=2) == (p.SendResult([p.SendOutcome(1, 0, "")]), 21)


def test_quiet_is_accepted_only_in_send_entries() -> None:
    wire = body(0x03, b"\x00\x00\x00\x01" + bytes(8) + message_bytes(flags=p.Flag.QUIET))
    frame, _ = p.decode_frame(wire) or (None, 0)
    assert isinstance(frame, p.Send) and frame.entries[0].quiet


def test_values_that_do_not_fit_are_refused_when_encoding() -> None:
    with pytest.raises(p.EncodeError):
        p.encode_message(p.Message(p.Kind.EVENT, "a" * 256))
    with pytest.raises(p.EncodeError):
        p.encode_message(p.Message(p.Kind.EVENT, "a", headers=[("h", "v")] * 65))
    with pytest.raises(p.EncodeError):
        p.encode_message(p.Message(p.Kind.EVENT, "a", key=bytes(65536)))
    with pytest.raises(p.EncodeError):
        p.encode_frame(p.Ack([]))
    long_reason = "é" * 40_000
    frame, _ = p.decode_frame(p.encode_frame(p.ErrorFrame(14, long_reason))) or (None, 0)
    assert isinstance(frame, p.ErrorFrame) and long_reason.startswith(frame.message) and len(frame.message) == 32767


def test_frame_writer_merges_consecutive_entries_and_splits_big_batches() -> None:
    w = p.FrameWriter()
    m = p.encode_message(p.Message(p.Kind.EVENT, "a.b", b"x" * 1000))
    for seq in range(1, 401):
        w.push_send(seq, m, quiet=seq % 2 == 0)
    w.push(p.Ping(5))
    w.push_ack(1)
    w.push_ack(2)
    w.push_nack(3, 250)
    wire = w.take()
    assert len(w) == 0
    frames = []
    while wire:
        got = p.decode_frame(wire)
        assert got is not None
        frames.append(got[0])
        wire = wire[got[1] :]
    sends = [f for f in frames if isinstance(f, p.Send)]
    assert len(sends) == 2, "400 KiB of sends is two batch frames of about 256 KiB"
    entries = [e for f in sends for e in f.entries]
    assert [e.seq for e in entries] == list(range(1, 401))
    assert [e.quiet for e in entries[:4]] == [False, True, False, True]
    assert frames[2:] == [p.Ping(5), p.Ack([1, 2]), p.Nack([p.NackEntry(3, 250)])]


def test_frame_writer_keeps_frames_within_the_peer_limit() -> None:
    w = p.FrameWriter(frame_bytes_max=4096)
    m = p.encode_message(p.Message(p.Kind.EVENT, "a", b"x" * 1000))
    for seq in range(10):
        w.push_send(seq, m)
    wire = w.take()
    count = 0
    while wire:
        got = p.decode_frame(wire, 4096)
        assert got is not None
        count += 1
        wire = wire[got[1] :]
    assert count == 4


def test_ids_are_uuid_v7_unique_and_time_ordered() -> None:
    ids = [uuid.UUID(bytes=new_id_bytes()) for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    millis = [i.int >> 80 for i in ids]
    assert millis == sorted(millis)


def test_error_codes_keep_unknown_values() -> None:
    assert p.error_code(6) is p.ErrorCode.NO_RECEIVER
    assert p.ErrorCode.NO_RECEIVER.wire_name == "no_receiver"
    assert p.error_code(999) == 999 and p.error_code_name(999) == "unknown"


@pytest.mark.parametrize("name", ["todo.create", "file.copy.in-progress", "a_b.c-d.9", "x" * 255])
def test_valid_names(name: str) -> None:
    validate_name(name)


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        ("x" * 256, "256 bytes"),
        ("todo..create", "empty segment"),
        (".todo", "empty segment"),
        ("Todo.create", "character 'T'"),
        ("todo.*", "character '*'"),
    ],
)
def test_invalid_names_say_why(name: str, why: str) -> None:
    with pytest.raises(InvalidName, match=why.replace("*", r"\*")):
        validate_name(name)


def test_patterns() -> None:
    for good in ["todo.*", "todo.>", ">", "*.created", "a.*.c"]:
        validate_pattern(good)
    for bad, why in [("todo.>.x", "before its last"), ("todo.cr*", "whole segment"), ("todo.", "empty segment")]:
        with pytest.raises(InvalidName, match=why):
            validate_pattern(bad)
    assert pattern_matches("todo.*", "todo.created")
    assert not pattern_matches("todo.*", "todo")
    assert not pattern_matches("todo.*", "todo.item.created")
    assert pattern_matches("todo.>", "todo.a.b.c")
    assert not pattern_matches("todo.>", "todo")
    assert pattern_matches(">", "anything.at.all")
    assert pattern_matches("a.b", "a.b") and not pattern_matches("a.b", "a.c")


def random_message(rng: random.Random) -> p.Message:
    names = ["a", "todo.created", "todo.create", "é"]
    return p.Message(
        rng.choice([p.Kind.COMMAND, p.Kind.EVENT, p.Kind.REPLY]),
        rng.choice(names),
        rng.randbytes(rng.choice([0, 1, 50])),
        version=(rng.randrange(3), rng.randrange(3)),
        timestamp=rng.randrange(2**64),
        sender=rng.choice(["", "todo", "todoo", "ü"]),
        response_to=uuid.uuid4() if rng.random() < 0.3 else None,
        key=rng.randbytes(rng.randrange(4)) if rng.random() < 0.5 else None,
        expires_at=rng.randrange(2**64) if rng.random() < 0.2 else None,
        deliver_at=rng.randrange(2**64) if rng.random() < 0.2 else None,
        transient=rng.random() < 0.5,
        final=rng.random() < 0.5,
        headers=[(rng.choice(["k", "ñ"]), "v" * rng.randrange(3)) for _ in range(rng.choice([0, 0, 1, 3]))],
    )


def test_random_batches_decode_to_what_was_encoded_and_every_truncation_is_refused() -> None:
    rng = random.Random(20261205)
    for _ in range(200):
        entries = [p.Delivery(rng.randrange(2**64), rng.randrange(1, 9), random_message(rng)) for _ in range(rng.randrange(1, 5))]
        wire = p.encode_frame(p.Deliver(entries))
        assert p.decode_frame(wire) == (p.Deliver(entries), len(wire))
        for cut in rng.sample(range(5, len(wire)), min(20, len(wire) - 5)):
            with pytest.raises(p.DecodeError):
                p.decode_body(wire[4:cut])
        with pytest.raises(p.DecodeError, match="left over"):
            p.decode_body(wire[4:] + b"\x00")
