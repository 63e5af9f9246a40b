//! Fuzzes the frame decoder: arbitrary bytes must never panic, and every
//! frame that does decode must survive a round trip through the encoder.
//!
//! Properties checked for each decoded frame:
//! 1. `FrameWriter::push` accepts it (whatever the decoder produces, the
//!    encoder can write);
//! 2. the re-encoded bytes decode to exactly one frame, equal to it;
//! 3. the re-encoded bytes are identical to the bytes it was decoded from
//!    (the encoding is canonical: the decoder accepts no alternative forms).
#![no_main]

use bytes::BytesMut;
use courier_proto::{decode_frame, FrameWriter};
use libfuzzer_sys::fuzz_target;

/// Frame limit for the fuzzer: small, so a length prefix near it is reachable.
const FRAME_BYTES_MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Decode frames until the input runs out, is incomplete, or is malformed.
    loop {
        let start = data.len() - buf.len();
        let frame = match decode_frame(&mut buf, FRAME_BYTES_MAX) {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        let original = &data[start..data.len() - buf.len()];

        let mut writer = FrameWriter::new();
        writer
            .push(&frame)
            .expect("a decoded frame must encode again");
        let encoded = writer.take();

        let mut again = encoded.clone();
        let decoded = decode_frame(&mut again, FRAME_BYTES_MAX)
            .expect("a re-encoded frame must decode")
            .expect("re-encoding must produce one whole frame");
        assert_eq!(decoded, frame, "round trip changed the frame");
        assert!(
            again.is_empty(),
            "re-encoding produced {} bytes after the first frame",
            again.len()
        );
        assert_eq!(
            &encoded[..],
            original,
            "re-encoded bytes differ from the decoded ones"
        );
    }
});
