//! The reference codec against the conformance vectors,
//! `docs/protocol-vectors.json` (format: `docs/PROTOCOL.md` §12): every
//! frame vector decodes to its fields and its fields encode to its bytes,
//! every malformed one fails with the decoder error it names, and the file
//! covers every frame type and field variant. The broker's side is
//! `crates/cli/tests/conformance_e2e.rs`.
//!
//! Each test reports every failing vector at once, with what the codec
//! produced, so adding vectors is: write the fields, run, compare.

#[path = "support/vectors.rs"]
mod vectors;

use std::collections::BTreeSet;

use bytes::BytesMut;
use courier_proto::{
    decode_frame_as, Credentials, ErrorCode, Frame, FrameWriter, FRAME_BYTES_MAX_DEFAULT,
    PROTOCOL_VERSION,
};
use serde_json::Value;
use vectors::{
    decode_error_from_json, decode_error_to_json, frame_from_json, frame_to_json, hex_decode,
    hex_encode, matches, name_of, section, type_name, Fields, FRAME_TYPES,
};

fn report(what: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} {what}:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The protocol version a vector is read at: its own `protocol_version`,
/// else 1.
fn version(fields: &mut Fields<'_>) -> u16 {
    fields
        .opt_u64("protocol_version")
        .map_or(1, |v| u16::try_from(v).expect("protocol_version fits u16"))
}

#[test]
fn the_file_covers_the_codec_s_protocol_version() {
    let all = vectors::load();
    assert_eq!(all["protocol_version"], u64::from(PROTOCOL_VERSION));
    // A version-2 vector is one a version-1 codec cannot read.
    let newer = ["frames", "malformed", "broker"]
        .iter()
        .flat_map(|s| section(&all, s))
        .filter(|v| v["protocol_version"] == 2)
        .count();
    assert!(newer >= 5, "{newer} vectors of version 2");
}

/// A vector's `frame_bytes_max`, else the default limit.
fn limit(fields: &mut Fields<'_>) -> u32 {
    fields
        .opt_u64("frame_bytes_max")
        .map_or(FRAME_BYTES_MAX_DEFAULT, |max| {
            u32::try_from(max).expect("frame_bytes_max fits u32")
        })
}

#[test]
fn every_frame_vector_decodes_to_its_fields_and_encodes_to_its_bytes() {
    let all = vectors::load();
    let mut failures = Vec::new();
    let mut names = BTreeSet::new();
    for vector in section(&all, "frames") {
        let name = name_of(vector);
        assert!(names.insert(name), "two frame vectors are named {name:?}");
        let mut fields = Fields::new(format!("frames[{name:?}]"), vector);
        fields.str("name");
        let direction = fields.str("direction");
        let bytes = fields.hex("hex");
        let expected = frame_from_json(&fields.path("frame"), fields.get("frame"));
        let version = version(&mut fields);
        fields.optional("note");
        fields.done();

        let (_, wanted) = FRAME_TYPES
            .iter()
            .find(|(t, _)| *t == type_name(&expected))
            .expect("a known type");
        if direction != *wanted {
            failures.push(format!(
                "{name}: a {} goes {wanted}, not {direction}",
                type_name(&expected)
            ));
        }

        let mut buf = BytesMut::from(&bytes[..]);
        match decode_frame_as(&mut buf, FRAME_BYTES_MAX_DEFAULT, version) {
            Ok(Some(decoded)) if decoded == expected && buf.is_empty() => {
                // Back to JSON too: the vector's fields are exactly the frame's.
                let json = frame_to_json(&decoded);
                if &json != vector.get("frame").expect("read above") {
                    failures.push(format!("{name}: the frame reads back as {json}"));
                }
            }
            Ok(Some(decoded)) if decoded == expected => failures.push(format!(
                "{name}: {} bytes are left after the frame",
                buf.len()
            )),
            Ok(Some(decoded)) => failures.push(format!(
                "{name}: the bytes decode to {}",
                frame_to_json(&decoded)
            )),
            Ok(None) => failures.push(format!("{name}: the bytes are not a whole frame")),
            Err(e) => failures.push(format!("{name}: the bytes do not decode: {e}")),
        }

        let mut writer = FrameWriter::for_version(version);
        match writer.push(&expected) {
            Ok(()) => {
                let encoded = writer.take();
                if encoded[..] != bytes[..] {
                    failures.push(format!(
                        "{name}: the fields encode to\n  {}\nnot\n  {}",
                        hex_encode(&encoded),
                        hex_encode(&bytes)
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: the fields do not encode: {e}")),
        }
    }
    report("frame vectors fail", failures);
}

#[test]
fn every_malformed_vector_fails_with_the_error_it_names() {
    let all = vectors::load();
    let mut failures = Vec::new();
    for vector in section(&all, "malformed") {
        let name = name_of(vector);
        let mut fields = Fields::new(format!("malformed[{name:?}]"), vector);
        fields.str("name");
        let bytes = fields.hex("hex");
        let max = limit(&mut fields);
        let error_name = fields.str("error");
        let expected = decode_error_from_json(
            &fields.path("error"),
            error_name,
            fields.optional("details"),
        );
        let code = fields.u16("code");
        let code_name = fields.str("code_name");
        let version = version(&mut fields);
        fields.optional("note");
        fields.done();
        if code_name != ErrorCode::from_u16(code).as_str() {
            failures.push(format!("{name}: code {code} is not named {code_name:?}"));
        }
        match decode_frame_as(&mut BytesMut::from(&bytes[..]), max, version) {
            Err(e) if e == expected && e.code().as_u16() == code => {}
            Err(e) => {
                let (error, details) = decode_error_to_json(&e);
                failures.push(format!(
                    "{name}: the decoder says \"error\": {error:?}, \"details\": {details}, \"code\": {} ({e})",
                    e.code().as_u16()
                ));
            }
            Ok(Some(frame)) => {
                failures.push(format!("{name}: decodes as {}", frame_to_json(&frame)))
            }
            Ok(None) => failures.push(format!("{name}: the decoder waits for more bytes")),
        }
    }
    report("malformed vectors fail", failures);
}

#[test]
fn every_incomplete_vector_waits_for_more_bytes() {
    let all = vectors::load();
    let mut failures = Vec::new();
    for vector in section(&all, "incomplete") {
        let name = name_of(vector);
        let mut fields = Fields::new(format!("incomplete[{name:?}]"), vector);
        fields.str("name");
        let bytes = fields.hex("hex");
        let max = limit(&mut fields);
        let version = version(&mut fields);
        fields.optional("note");
        fields.done();
        let mut buf = BytesMut::from(&bytes[..]);
        match decode_frame_as(&mut buf, max, version) {
            Ok(None) if buf[..] == bytes[..] => {}
            other => failures.push(format!("{name}: {other:?}")),
        }
    }
    report("incomplete vectors fail", failures);
}

#[test]
fn the_error_code_table_is_the_codec_s() {
    let all = vectors::load();
    let table: Vec<(u64, &str)> = section(&all, "error_codes")
        .iter()
        .map(|row| {
            let mut fields = Fields::new("error_codes[]", row);
            let entry = (fields.u64("code"), fields.str("name"));
            fields.done();
            entry
        })
        .collect();
    let codec: Vec<(u64, &str)> = ErrorCode::ALL
        .iter()
        .map(|c| (u64::from(c.as_u16()), c.as_str()))
        .collect();
    assert_eq!(table, codec);
}

/// The byte strings printed in PROTOCOL.md §10 must be vectors, so the
/// document and the vectors say the same bytes.
#[test]
fn the_worked_examples_of_protocol_md_are_vectors() {
    let doc = std::fs::read_to_string(vectors::repository_root().join("docs/PROTOCOL.md"))
        .expect("read PROTOCOL.md");
    let start = doc.find("\n## 10. ").expect("PROTOCOL.md has §10");
    let end = doc[start..]
        .find("\n## 11. ")
        .map_or(doc.len(), |e| start + e);
    let examples: Vec<String> = doc[start..end]
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| hex_encode(&hex_decode(block)))
        .collect();
    assert!(examples.len() >= 5, "found {} examples", examples.len());
    let all = vectors::load();
    let known: BTreeSet<String> = section(&all, "frames")
        .iter()
        .map(|v| hex_encode(&hex_decode(v["hex"].as_str().unwrap_or_default())))
        .collect();
    for example in examples {
        assert!(
            known.contains(&example),
            "PROTOCOL.md §10 shows {example}, which no frame vector has"
        );
    }
}

#[test]
fn the_vectors_cover_every_frame_type_and_field_variant() {
    let all = vectors::load();
    let frames: Vec<Frame> = section(&all, "frames")
        .iter()
        .map(|v| frame_from_json(name_of(v), &v["frame"]))
        .collect();
    let mut seen = BTreeSet::new();
    let mut seen_batched = BTreeSet::new();
    let mut messages = Vec::new();
    let mut variants = BTreeSet::new();
    for frame in &frames {
        seen.insert(type_name(frame));
        let entries = match frame {
            Frame::Send(e) => e.len(),
            Frame::SendResult(e) => e.len(),
            Frame::Deliver(e) => e.len(),
            Frame::Ack(e) => e.len(),
            Frame::Nack(e) => e.len(),
            _ => 1,
        };
        if entries > 1 {
            seen_batched.insert(type_name(frame));
        }
        match frame {
            Frame::Hello(h) => {
                variants.insert(format!(
                    "HELLO token {}",
                    matches!(h.credentials, Credentials::Token(_))
                ));
                variants.insert(format!("HELLO service empty {}", h.service.is_empty()));
            }
            Frame::Welcome(w) => {
                variants.insert(format!("WELCOME service {}", w.service.is_some()));
            }
            Frame::Send(entries) => {
                for e in entries {
                    variants.insert(format!("SEND quiet {}", e.quiet));
                    messages.push((*e.message).clone());
                }
            }
            Frame::Deliver(entries) => messages.extend(entries.iter().map(|e| e.message.clone())),
            Frame::SendResult(entries) => {
                for e in entries {
                    let kind = match (e.code, e.reason.as_str()) {
                        (ErrorCode::Ok, "") => "ok",
                        (ErrorCode::Ok, "duplicate") => "duplicate",
                        (ErrorCode::Unknown(_), _) => "unknown code",
                        _ => "refused",
                    };
                    variants.insert(format!("SEND_RESULT {kind}"));
                }
            }
            Frame::Subscribe(s) => {
                variants.insert(format!(
                    "SUBSCRIBE start {:?}",
                    std::mem::discriminant(&s.start)
                ));
            }
            _ => {}
        }
    }
    for m in &messages {
        variants.insert(format!("kind {}", m.kind.as_str()));
        variants.insert(format!("transient {}", m.transient));
        variants.insert(format!("final {}", m.is_final));
        variants.insert(format!("response_to {}", m.response_to.is_some()));
        variants.insert(format!(
            "key {}",
            m.key
                .as_ref()
                .map_or("absent", |k| if k.is_empty() { "empty" } else { "present" })
        ));
        variants.insert(format!("expires_at {}", m.expires_at.is_some()));
        variants.insert(format!("deliver_at {}", m.deliver_at.is_some()));
        variants.insert(format!("parent_id {}", m.parent_id.is_some()));
        variants.insert(format!("headers {}", !m.headers.is_empty()));
        variants.insert(format!("version 1.0 {}", m.version == Default::default()));
        variants.insert(format!("sender set {}", !m.sender.is_empty()));
    }
    let types: BTreeSet<&str> = FRAME_TYPES.iter().map(|(t, _)| *t).collect();
    assert_eq!(seen, types, "every frame type has a vector");
    assert_eq!(
        seen_batched,
        ["ACK", "DELIVER", "NACK", "SEND", "SEND_RESULT"].into(),
        "every batch frame type has a vector of several entries"
    );
    let mut missing = Vec::new();
    for both in [
        "HELLO token",
        "HELLO service empty",
        "WELCOME service",
        "SEND quiet",
        "transient",
        "final",
        "response_to",
        "expires_at",
        "deliver_at",
        "parent_id",
        "headers",
        "version 1.0",
        "sender set",
    ] {
        for value in ["true", "false"] {
            let variant = format!("{both} {value}");
            if !variants.contains(&variant) {
                missing.push(variant);
            }
        }
    }
    for variant in [
        "kind command",
        "kind event",
        "kind reply",
        "key absent",
        "key empty",
        "key present",
        "SEND_RESULT ok",
        "SEND_RESULT duplicate",
        "SEND_RESULT refused",
        "SEND_RESULT unknown code",
    ] {
        if !variants.contains(variant) {
            missing.push(variant.to_string());
        }
    }
    let starts = variants
        .iter()
        .filter(|v| v.starts_with("SUBSCRIBE start"))
        .count();
    if starts != 3 {
        missing.push(format!("SUBSCRIBE with each start (have {starts} of 3)"));
    }
    assert!(missing.is_empty(), "no frame vector has: {missing:?}");

    let errors: BTreeSet<&str> = section(&all, "malformed")
        .iter()
        .filter_map(|v| v["error"].as_str())
        .collect();
    let every_error: BTreeSet<&str> = [
        "FrameTooLarge",
        "EmptyFrame",
        "UnknownFrameType",
        "UnexpectedEof",
        "TrailingBytes",
        "InvalidUtf8",
        "UnknownKind",
        "UnknownFlags",
        "UnknownStart",
        "StrayStartTime",
        "UnknownCredentials",
        "BadMagic",
        "EmptyBatch",
        "TooManyEntries",
        "TooManyHeaders",
    ]
    .into();
    assert_eq!(
        errors, every_error,
        "every decoder error has a malformed vector"
    );
}

/// The broker cases are checked against a real broker by
/// `crates/cli/tests/conformance_e2e.rs`; here only that they are well
/// formed, so a mistake shows without starting one.
#[test]
fn every_broker_case_is_well_formed() {
    let all = vectors::load();
    let manifests = all["manifests"].as_object().expect("a manifests object");
    let mut codes = BTreeSet::new();
    let mut names = BTreeSet::new();
    for case in section(&all, "broker") {
        let name = name_of(case);
        assert!(names.insert(name), "two broker cases are named {name:?}");
        let mut fields = Fields::new(format!("broker[{name:?}]"), case);
        fields.str("name");
        fields.optional("note");
        version(&mut fields);
        if let Some(manifest) = fields.opt_str("manifest") {
            assert!(
                manifests.contains_key(manifest),
                "{name}: no manifest {manifest:?}"
            );
        }
        if let Some(flags) = fields.optional("serve") {
            assert!(
                flags
                    .as_array()
                    .is_some_and(|f| f.iter().all(Value::is_string)),
                "{name}: serve is a list of flags"
            );
        }
        for (i, connection) in fields.array("connections").iter().enumerate() {
            let mut c = Fields::new(format!("broker[{name:?}].connections[{i}]"), connection);
            let sends = c.path("send");
            for (j, item) in c.array("send").iter().enumerate() {
                let mut s = Fields::new(format!("{sends}[{j}]"), item);
                match (s.optional("frame"), s.opt_str("hex")) {
                    (Some(frame), None) => {
                        frame_from_json(&s.path("frame"), frame);
                    }
                    (None, Some(hex)) => {
                        hex_decode(hex);
                    }
                    _ => panic!("{sends}[{j}]: give either frame or hex"),
                }
                s.done();
            }
            for answer in c.array("expect") {
                let t = answer["type"].as_str().unwrap_or_default();
                assert!(
                    FRAME_TYPES.iter().any(|(known, _)| *known == t),
                    "{name}: an answer of type {t:?}"
                );
                if let Some(code) = answer.get("code").and_then(Value::as_u64) {
                    codes.insert(code);
                    assert!(
                        matches(
                            &serde_json::json!({"code_name": answer["code_name"]}),
                            answer
                        ),
                        "{name}: code {code} is not named {}",
                        answer["code_name"]
                    );
                }
            }
            match c.str("then") {
                "closed" | "open" => {}
                other => panic!("{name}: then is closed or open, not {other:?}"),
            }
            c.optional("any_order");
            c.done();
        }
        fields.done();
    }
    for code in [1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 15, 17, 20] {
        assert!(codes.contains(&code), "no broker case answers code {code}");
    }
}
