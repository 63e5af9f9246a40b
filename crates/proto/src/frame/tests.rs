use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use uuid::Uuid;

use super::decode::*;
use super::writer::*;
use super::*;
use crate::envelope::{Kind, Message, Version};
use crate::ErrorCode;

fn sample(kind: Kind) -> Message {
    let mut m = Message::new(kind, "todo.create", &b"{\"text\":\"milk\"}"[..]);
    m.sender = "web".into();
    m.timestamp = 42;
    m.key = Some(Bytes::from_static(b"user-1"));
    m.expires_at = Some(1_000);
    m.deliver_at = Some(500);
    m.response_to = Some(Uuid::now_v7());
    m.parent_id = Some(Uuid::now_v7());
    m.headers
        .push(("content-type".into(), "application/json".into()));
    m
}

fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
    let mut w = FrameWriter::new();
    for f in frames {
        w.push(f).expect("encodes");
    }
    let mut buf = w.take();
    let mut out = Vec::new();
    while let Some(f) = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).expect("decodes") {
        out.push(f);
    }
    assert!(buf.is_empty());
    out
}

#[test]
fn a_batch_shares_one_copy_of_a_repeated_name() {
    let entry = |seq, name: &str| SendEntry {
        seq,
        quiet: true,
        message: Arc::new(Message::new(Kind::Event, name, "x")),
    };
    let frames = roundtrip(&[Frame::Send(vec![
        entry(1, "todo.created"),
        entry(2, "todo.created"),
        entry(3, "todo.deleted"),
        entry(4, "todo.deleted"),
    ])]);
    let [Frame::Send(entries)] = frames.as_slice() else {
        panic!("one SEND frame: {frames:?}");
    };
    let names: Vec<&str> = entries.iter().map(|e| e.message.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "todo.created",
            "todo.created",
            "todo.deleted",
            "todo.deleted"
        ]
    );
    let same_copy =
        |a: usize, b: usize| entries[a].message.name.as_ptr() == entries[b].message.name.as_ptr();
    assert!(same_copy(0, 1) && same_copy(2, 3));
    assert!(!same_copy(1, 2));
}

#[test]
fn every_frame_roundtrips() {
    let frames = vec![
        Frame::Hello(Hello {
            version: 1,
            service: "web".into(),
            instance: "web-1".into(),
            max_in_flight: 64,
            credentials: Credentials::Token("secret".into()),
        }),
        Frame::Welcome(Welcome {
            version: 1,
            connection_id: 9,
            frame_bytes_max: 1024,
            broker: "courier".into(),
            service: None,
        }),
        Frame::Welcome(Welcome {
            version: 1,
            connection_id: 10,
            frame_bytes_max: 1024,
            broker: "courier".into(),
            service: Some("web".into()),
        }),
        Frame::Send(vec![
            SendEntry {
                seq: 1,
                message: Arc::new(sample(Kind::Command)),
                quiet: false,
            },
            SendEntry {
                seq: 2,
                message: Arc::new(sample(Kind::Event)),
                quiet: true,
            },
        ]),
        Frame::SendResult(vec![SendOutcome {
            seq: 1,
            code: ErrorCode::NoReceiver,
            reason: "no service receives todo.create".into(),
            log_seq: 0,
        }]),
        Frame::Subscribe(Subscribe {
            request: 3,
            pattern: "todo.*".into(),
            ack_deadline_ms: 100,
            max_deliveries: 4,
            start: StartFrom::Time(12),
        }),
        Frame::Unsubscribe {
            request: 4,
            pattern: "todo.>".into(),
        },
        Frame::Result(OpResult {
            request: 3,
            code: ErrorCode::Ok,
            reason: String::new(),
        }),
        Frame::Deliver(vec![Delivery {
            delivery: 5,
            attempt: 2,
            message: sample(Kind::Reply),
        }]),
        Frame::Ack(vec![5]),
        Frame::Nack(vec![Nack {
            delivery: 5,
            delay_ms: 10,
        }]),
        Frame::Flow { max_in_flight: 8 },
        Frame::Ping(1),
        Frame::Pong(1),
        Frame::Error(ErrorFrame {
            code: ErrorCode::MalformedFrame,
            message: "bad".into(),
        }),
        Frame::Drain,
        Frame::Drained,
    ];
    assert_eq!(roundtrip(&frames), frames);
}

#[test]
fn welcome_names_the_service_only_when_it_carries_one() {
    // PROTOCOL.md §10.2: WELCOME without the service field, as a client
    // that named itself in HELLO gets it (and as older brokers sent it).
    let plain: &[u8] = &[
        0, 0, 0, 0x17, 0x02, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x80, 0, 0, 7, b'c', b'o', b'u',
        b'r', b'i', b'e', b'r',
    ];
    let welcome = |service: Option<&str>| {
        Frame::Welcome(Welcome {
            version: 1,
            connection_id: 1,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            broker: "courier".into(),
            service: service.map(str::to_string),
        })
    };
    let decode = |bytes: &[u8]| decode_frame(&mut BytesMut::from(bytes), u32::MAX);
    assert_eq!(decode(plain), Ok(Some(welcome(None))));
    let mut w = FrameWriter::new();
    w.push(&welcome(None)).expect("encodes");
    assert_eq!(&w.take()[..], plain);

    // The same with `service` appended: a str8 after `broker`.
    let mut named = plain.to_vec();
    named[3] += 4;
    named.extend_from_slice(&[3, b'w', b'e', b'b']);
    assert_eq!(decode(&named), Ok(Some(welcome(Some("web")))));
    w.push(&welcome(Some("web"))).expect("encodes");
    assert_eq!(&w.take()[..], &named[..]);

    // Nothing may follow it.
    let mut longer = named.clone();
    longer[3] += 1;
    longer.push(0);
    assert_eq!(
        decode(&longer),
        Err(DecodeError::TrailingBytes {
            offset: 27,
            extra: 1
        })
    );
}

#[test]
fn consecutive_entries_share_one_frame() {
    let mut w = FrameWriter::new();
    for i in 0..100 {
        w.push_send(i, &Message::new(Kind::Event, "a.b", "x"))
            .expect("encodes");
    }
    w.push_ack(1);
    w.push_ack(2);
    let mut buf = w.take();
    let first = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT)
        .expect("ok")
        .expect("frame");
    match first {
        Frame::Send(entries) => assert_eq!(entries.len(), 100),
        other => panic!("expected one SEND of 100, got {other:?}"),
    }
    assert_eq!(
        decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).expect("ok"),
        Some(Frame::Ack(vec![1, 2]))
    );
    assert!(buf.is_empty());
}

#[test]
fn unwritten_bytes_leave_first_and_nothing_merges_into_them() {
    let mut w = FrameWriter::new();
    w.push_send(1, &Message::new(Kind::Event, "a.b", "x"))
        .expect("encodes");
    w.push_send(2, &Message::new(Kind::Event, "a.b", "y"))
        .expect("encodes");
    let taken = w.take();
    // A direct write took the first 5 bytes only.
    w.push_unwritten(&taken[5..]);
    w.push_send(3, &Message::new(Kind::Event, "a.b", "z"))
        .expect("encodes");
    let mut wire = BytesMut::from(&taken[..5]);
    wire.extend_from_slice(&w.take());
    let seqs = |frame: Frame| match frame {
        Frame::Send(entries) => entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        other => panic!("expected SEND, got {other:?}"),
    };
    let first = decode_frame(&mut wire, FRAME_BYTES_MAX_DEFAULT)
        .expect("ok")
        .expect("frame");
    assert_eq!(seqs(first), [1, 2]);
    let second = decode_frame(&mut wire, FRAME_BYTES_MAX_DEFAULT)
        .expect("ok")
        .expect("frame");
    assert_eq!(
        seqs(second),
        [3],
        "a new frame, not merged into the put-back one"
    );
    assert!(wire.is_empty());
}

#[test]
fn oversized_length_is_refused_before_buffering() {
    for len in [u32::MAX, (1u32 << 31) - 1, FRAME_BYTES_MAX_DEFAULT + 1] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        assert!(matches!(
            decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        assert!(
            buf.capacity() < 1024,
            "must not reserve for a hostile length"
        );
    }
}

#[test]
fn truncated_and_garbage_frames_are_errors_not_panics() {
    let mut w = FrameWriter::new();
    w.push_send(1, &sample(Kind::Command)).expect("encodes");
    let whole = w.take().freeze();
    // Every prefix of the body, re-framed with a matching length, must fail cleanly.
    for cut in 1..whole.len() - 4 {
        let body = whole.slice(4..4 + cut);
        assert!(decode_body(body).is_err(), "prefix of {cut} bytes decoded");
    }
    assert_eq!(
        decode_body(Bytes::from_static(&[0x7f])),
        Err(DecodeError::UnknownFrameType { frame_type: 0x7f })
    );
    let mut stray = vec![frame_type::SUBSCRIBE];
    stray.extend_from_slice(&[0; 8]); // request
    stray.extend_from_slice(&[1, b'a']); // pattern
    stray.extend_from_slice(&[0; 8]); // deadline, max deliveries
    stray.push(0); // start: new
    stray.extend_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        decode_body(Bytes::from(stray)),
        Err(DecodeError::StrayStartTime { code: 0 }),
        "found by the fuzzer: a start time only goes with start 2"
    );
    assert_eq!(
        decode_body(Bytes::from_static(&[frame_type::ACK, 0, 0, 0, 0])),
        Err(DecodeError::EmptyBatch),
        "found by the fuzzer: an empty batch has no encoding"
    );
    let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
    assert_eq!(decode_frame(&mut zero, 100), Err(DecodeError::EmptyFrame));
}

#[test]
fn lying_batch_count_is_refused() {
    let mut body = BytesMut::new();
    body.put_u8(frame_type::ACK);
    body.put_u32(u32::MAX);
    body.put_u64(1);
    assert!(matches!(
        decode_body(body.freeze()),
        Err(DecodeError::TooManyEntries {
            count: u32::MAX,
            max: 1
        })
    ));
}

#[test]
fn encoded_len_is_exact() {
    let m = sample(Kind::Command);
    let mut b = BytesMut::new();
    put_message(&mut b, &m).expect("encodes");
    assert_eq!(b.len(), encoded_message_len(&m));
    let plain = Message::new(Kind::Event, "x", "");
    let mut b = BytesMut::new();
    put_message(&mut b, &plain).expect("encodes");
    assert_eq!(b.len(), encoded_message_len(&plain));
}

/// A message whose DELIVER frame of one entry is exactly `len` long.
fn message_delivered_as(len: usize) -> Message {
    let mut m = Message::new(Kind::Event, "a.b", "");
    m.sender = "svc".into();
    let fixed = delivery_frame_len(&m);
    m.payload = Bytes::from(vec![7u8; len - fixed]);
    assert_eq!(delivery_frame_len(&m), len);
    m
}

#[test]
fn frame_lengths_of_one_message_are_what_the_writer_writes() {
    let m = sample(Kind::Reply);
    let mut w = FrameWriter::new();
    w.push_delivery(1, 1, &m).expect("encodes");
    let frame = w.take();
    assert_eq!(frame.len(), 4 + delivery_frame_len(&m));
    w.push_send(1, &m).expect("encodes");
    let frame = w.take();
    assert_eq!(frame.len(), 4 + send_frame_len(&m));
    assert_eq!(
        delivery_frame_len(&m) - send_frame_len(&m),
        4,
        "delivery id and attempt (12 bytes) take the place of seq (8)"
    );
}

#[test]
fn a_frame_of_exactly_the_limit_is_written_and_one_byte_more_is_refused() {
    let limit = 1_000u32;
    let mut w = FrameWriter::with_frame_bytes_max(limit);
    w.push_ack(9);
    let fits = message_delivered_as(limit as usize);
    w.push_delivery(1, 1, &fits)
        .expect("exactly the limit fits");
    let over = message_delivered_as(limit as usize + 1);
    assert_eq!(
        w.push_delivery(2, 1, &over),
        Err(EncodeError::FrameTooLarge {
            len: limit as usize + 1,
            max: limit
        })
    );
    let mut buf = w.take();
    assert_eq!(
        decode_frame(&mut buf, limit).expect("ok"),
        Some(Frame::Ack(vec![9]))
    );
    let prefix = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    assert_eq!(prefix, limit, "the DELIVER frame is exactly the limit");
    match decode_frame(&mut buf, limit).expect("ok") {
        Some(Frame::Deliver(entries)) => {
            assert_eq!(entries.len(), 1, "the refused entry left nothing behind");
            assert_eq!(entries[0].message, fits);
        }
        other => panic!("expected one DELIVER, got {other:?}"),
    }
    assert!(buf.is_empty());
    let mut single = FrameWriter::with_frame_bytes_max(8);
    assert!(matches!(
        single.push(&Frame::Ping(1)),
        Err(EncodeError::FrameTooLarge { len: 9, max: 8 })
    ));
    assert!(single.is_empty());
}

#[test]
fn an_entry_that_would_take_a_batch_over_the_limit_starts_the_next_frame() {
    let limit = 1_000u32;
    let mut w = FrameWriter::with_frame_bytes_max(limit);
    let small = message_delivered_as(300);
    let large = message_delivered_as(900);
    w.push_delivery(1, 1, &small).expect("encodes");
    w.push_delivery(2, 1, &small).expect("encodes");
    w.push_delivery(3, 1, &large).expect("encodes");
    w.push_delivery(4, 1, &small).expect("encodes");
    let mut buf = w.take();
    let mut batches = Vec::new();
    while buf.len() >= 4 {
        let prefix = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        assert!(prefix <= limit, "a frame of {prefix} bytes");
        match decode_frame(&mut buf, limit).expect("decodes") {
            Some(Frame::Deliver(entries)) => {
                batches.push(entries.iter().map(|e| e.delivery).collect::<Vec<_>>())
            }
            other => panic!("expected DELIVER, got {other:?}"),
        }
    }
    assert!(buf.is_empty());
    assert_eq!(batches, vec![vec![1, 2], vec![3], vec![4]]);
}

fn arb_message() -> impl Strategy<Value = Message> {
    (
        0u8..3,
        "[a-z]{1,8}(\\.[a-z0-9_-]{1,8}){0,3}",
        any::<(u16, u16, u128, u128, u64)>(),
        proptest::option::of(any::<u128>()),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::option::of(any::<u64>()),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u128>()),
        ),
        any::<(bool, bool)>(),
        proptest::collection::vec(("[a-z-]{1,10}", "\\PC{0,20}"), 0..4),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(
            |(
                kind,
                name,
                (major, minor, id, activity, ts),
                resp,
                key,
                exp,
                (at, parent),
                (tr, fin),
                headers,
                payload,
            )| {
                Message {
                    kind: Kind::from_code(kind + 1).expect("1..=3"),
                    name: name.into(),
                    version: Version::new(major, minor),
                    id: Uuid::from_u128(id),
                    timestamp: ts,
                    activity_id: Uuid::from_u128(activity),
                    parent_id: parent.map(Uuid::from_u128),
                    response_to: resp.map(Uuid::from_u128),
                    sender: "svc".into(),
                    key: key.map(Bytes::from),
                    expires_at: exp,
                    deliver_at: at,
                    transient: tr,
                    is_final: fin,
                    headers,
                    payload: Bytes::from(payload),
                }
            },
        )
}

/// Where a lone SEND entry's message starts: after length (4), type
/// (1), count (4) and seq (8).
const SEND_MESSAGE_AT: usize = 4 + 1 + 4 + 8;

#[test]
fn parent_id_is_flag_0x80_and_16_bytes_after_deliver_at() {
    let mut m = Message::new(Kind::Event, "a.b", "x");
    m.deliver_at = Some(7);
    let parent = Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
    m.parent_id = Some(parent);
    let mut w = FrameWriter::new();
    w.push_send(1, &m).expect("encodes");
    let bytes = w.take();
    let message = &bytes[SEND_MESSAGE_AT..];
    assert_eq!(message[1], 0x80 | 0x20, "PARENT_ID and DELIVER_AT");
    // kind, flags, name "a.b", version, id, activity_id, timestamp,
    // empty sender, deliver_at: then the parent's 16 bytes.
    let parent_at = 1 + 1 + 4 + 4 + 16 + 16 + 8 + 1 + 8;
    assert_eq!(&message[parent_at..parent_at + 16], parent.as_bytes());
    assert_eq!(message.len(), encoded_message_len(&m));

    let frames = roundtrip(&[Frame::Send(vec![SendEntry {
        seq: 1,
        message: Arc::new(m.clone()),
        quiet: false,
    }])]);
    let [Frame::Send(entries)] = frames.as_slice() else {
        panic!("one SEND: {frames:?}");
    };
    assert_eq!(entries[0].message.parent_id, Some(parent));
    assert_eq!(*entries[0].message, m);

    let root = Message::new(Kind::Event, "a.b", "x");
    let mut w = FrameWriter::new();
    w.push_send(2, &root).expect("encodes");
    let bytes = w.take();
    assert_eq!(bytes[SEND_MESSAGE_AT + 1] & 0x80, 0, "no parent, no flag");
    let frames = roundtrip(&[Frame::Send(vec![SendEntry {
        seq: 2,
        message: Arc::new(root),
        quiet: false,
    }])]);
    let [Frame::Send(entries)] = frames.as_slice() else {
        panic!("one SEND: {frames:?}");
    };
    assert_eq!(entries[0].message.parent_id, None);
}

/// `docs/PROTOCOL.md` §10.5, byte for byte.
#[test]
fn the_documented_reply_with_its_parent_encodes_as_written() {
    let command = Uuid::parse_str("017f22e2-79b0-7cc3-98c4-dc0c0c07398f").expect("uuid");
    let mut m = Message::new(Kind::Reply, "todo.created", "ok");
    m.id = Uuid::parse_str("017f22e2-79b1-7cc3-98c4-dc0c0c073991").expect("uuid");
    m.activity_id = command;
    m.timestamp = 1_700_000_000_000_000_000;
    m.sender = "todo".into();
    m.response_to = Some(command);
    m.parent_id = Some(command);
    let mut w = FrameWriter::new();
    w.push_delivery(1, 1, &m).expect("encodes");
    let hex: Vec<String> = w.take().iter().map(|b| format!("{b:02x}")).collect();
    let documented = "00 00 00 79 08 00 00 00 01 00 00 00 00 00 00 00 \
         01 00 00 00 01 03 86 0c 74 6f 64 6f 2e 63 72 65 \
         61 74 65 64 00 01 00 00 01 7f 22 e2 79 b1 7c c3 \
         98 c4 dc 0c 0c 07 39 91 01 7f 22 e2 79 b0 7c c3 \
         98 c4 dc 0c 0c 07 39 8f 17 97 9c fe 36 2a 00 00 \
         04 74 6f 64 6f 01 7f 22 e2 79 b0 7c c3 98 c4 dc \
         0c 0c 07 39 8f 01 7f 22 e2 79 b0 7c c3 98 c4 dc \
         0c 0c 07 39 8f 00 00 00 00 00 02 6f 6b";
    assert_eq!(
        hex.join(" "),
        documented.split_whitespace().collect::<Vec<_>>().join(" ")
    );
}

#[test]
fn a_version_1_writer_never_sets_the_parent_flag() {
    let m = sample(Kind::Command);
    assert!(m.parent_id.is_some());
    let mut w = FrameWriter::for_version(1);
    w.push_send(1, &m).expect("encodes");
    w.push_quiet_send(2, &m).expect("encodes");
    w.push_delivery(3, 1, &m).expect("encodes");
    let mut bytes = w.take();
    let whole = bytes.clone();
    let mut seen = 0;
    while let Some(frame) = decode_frame_as(&mut bytes, FRAME_BYTES_MAX_DEFAULT, 1)
        .expect("a version-1 reader takes what a version-1 writer wrote")
    {
        let messages: Vec<Message> = match frame {
            Frame::Send(entries) => entries.iter().map(|e| (*e.message).clone()).collect(),
            Frame::Deliver(entries) => entries.into_iter().map(|e| e.message).collect(),
            other => panic!("unexpected {other:?}"),
        };
        for got in messages {
            seen += 1;
            assert_eq!(got.parent_id, None);
            assert_eq!(
                got,
                Message {
                    parent_id: None,
                    ..m.clone()
                }
            );
        }
    }
    assert_eq!(seen, 3);
    // The SEND entry's flags byte, and the whole message 16 bytes
    // shorter than at version 2.
    assert_eq!(whole[SEND_MESSAGE_AT + 1] & 0x80, 0);
    let mut v2 = FrameWriter::new();
    v2.push_send(1, &m).expect("encodes");
    assert_eq!(v2.take().len(), {
        let mut one = FrameWriter::for_version(1);
        one.push_send(1, &m).expect("encodes");
        one.take().len() + 16
    });
}

#[test]
fn a_version_1_reader_refuses_the_parent_flag() {
    let mut m = Message::new(Kind::Event, "a.b", "x");
    m.parent_id = Some(Uuid::now_v7());
    let mut w = FrameWriter::new();
    w.push_delivery(1, 1, &m).expect("encodes");
    let bytes = w.take();
    match decode_frame_as(&mut bytes.clone(), FRAME_BYTES_MAX_DEFAULT, 1) {
        Err(DecodeError::UnknownFlags { flags, .. }) => assert_eq!(flags, 0x80),
        other => panic!("bit 7 must stay malformed at version 1, got {other:?}"),
    }
    assert!(decode_frame_as(&mut bytes.clone(), FRAME_BYTES_MAX_DEFAULT, 2).is_ok());
}

#[test]
fn quiet_is_a_send_entry_flag_and_malformed_anywhere_else() {
    let message = sample(Kind::Event);
    let mut w = FrameWriter::new();
    w.push_quiet_send(7, &message).expect("encodes");
    let mut buf = w.take();
    // kind and flags follow length (4), type (1), count (4) and seq (8).
    let flags_at = 4 + 1 + 4 + 8 + 1;
    assert_eq!(buf[flags_at] & 0x40, 0x40, "the wire flag is 0x40");
    let quiet_entry = buf.clone();
    match decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT) {
        Ok(Some(Frame::Send(entries))) => {
            assert_eq!(entries.len(), 1);
            assert!(entries[0].quiet);
            assert_eq!(*entries[0].message, message);
        }
        other => panic!("expected one SEND entry, got {other:?}"),
    }

    // The same message bytes in a DELIVER entry (delivery + attempt
    // take the place of seq, 4 bytes longer) are refused.
    let mut deliver = BytesMut::new();
    let body = &quiet_entry[4 + 1 + 4 + 8..];
    deliver.put_u32((1 + 4 + 12 + body.len()) as u32);
    deliver.put_u8(frame_type::DELIVER);
    deliver.put_u32(1);
    deliver.put_u64(1);
    deliver.put_u32(1);
    deliver.put_slice(body);
    match decode_frame(&mut deliver, FRAME_BYTES_MAX_DEFAULT) {
        Err(DecodeError::UnknownFlags { flags, .. }) => assert_eq!(flags & 0x40, 0x40),
        other => panic!("QUIET in a delivery must be malformed, got {other:?}"),
    }
    assert!(matches!(
        decode_message(Bytes::copy_from_slice(body)),
        Err(DecodeError::UnknownFlags { .. })
    ));
}

proptest! {
    #[test]
    fn messages_roundtrip(messages in proptest::collection::vec(arb_message(), 1..20)) {
        let frame = Frame::Deliver(messages.into_iter().enumerate().map(|(i, message)| Delivery {
            delivery: i as u64,
            attempt: 1,
            message,
        }).collect());
        prop_assert_eq!(roundtrip(std::slice::from_ref(&frame)), vec![frame]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_frame(&mut buf, 4096) {}
    }
}
