//! Fuzzes the handshake: arbitrary bytes are decoded as the first frame a
//! broker reads (HELLO, with the handshake's small limit) and, when they are
//! a HELLO, authenticated against a fixed manifest and against none, with
//! and without a client-certificate subject taken from the input.
//!
//! Properties: nothing panics; an accepted identity is always one the
//! manifest knows (its service, or the admin), never the name the client
//! claimed unless the credentials prove it; without credentials nothing is
//! accepted under a manifest; without a manifest only valid names pass.
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use courier_manifest::{authenticate, hash_token, Manifest};
use courier_proto::{decode_frame, validate_name, Credentials, Frame};
use libfuzzer_sys::fuzz_target;

/// The broker's limit for a HELLO (crates/server, HELLO_BYTES_MAX).
const HELLO_BYTES_MAX: u32 = 70 * 1024;

fn manifest() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let text = format!(
            "[services.web]\nsends = [\"todo.create@1\"]\ntokens = [\"{}\"]\ncertificates = [\"CN=web\"]\n\n\
             [services.todo]\nreceives = [\"todo.create@1\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            hash_token("web-token"),
            hash_token("todo-token"),
            hash_token("admin-token"),
        );
        Manifest::parse(&text).expect("the fixed manifest parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let (subject_len, frame) = match data.split_first() {
        Some((n, rest)) => ((*n as usize) % 16, rest),
        None => return,
    };
    let subject = std::str::from_utf8(&frame[..subject_len.min(frame.len())]).ok();
    let mut buf = BytesMut::from(&frame[subject_len.min(frame.len())..]);
    let Ok(Some(Frame::Hello(hello))) = decode_frame(&mut buf, HELLO_BYTES_MAX) else {
        return;
    };
    let m = manifest();
    for certificate in [None, subject, Some("CN=web")] {
        if let Ok(who) = authenticate(Some(m), &hello, certificate) {
            assert!(
                who.admin && who.service == "admin" || !who.admin && m.service(&who.service).is_some(),
                "accepted an identity the manifest does not have: {who:?}"
            );
            let has_credentials = matches!(hello.credentials, Credentials::Token(_))
                || certificate.is_some_and(|c| m.authenticate_certificate(c).is_some());
            assert!(has_credentials, "accepted without credentials: {hello:?}");
            if !hello.service.is_empty() && !who.admin {
                assert_eq!(who.service, hello.service, "a claimed name other than the proven one passed");
            }
        }
    }
    if let Ok(who) = authenticate(None, &hello, subject) {
        assert!(validate_name(&who.service).is_ok() && !who.admin, "{who:?}");
    }
});
