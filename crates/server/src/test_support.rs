//! Helpers the unit tests of several files share.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

use bytes::BytesMut;
use courier_proto::{decode_frame, Frame, FRAME_BYTES_MAX_DEFAULT};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Every frame that arrives on `peer` until it closes; the last one must
/// be whole.
pub(crate) async fn frames_until_closed(peer: &mut (impl AsyncRead + Unpin)) -> Vec<Frame> {
    let mut bytes = Vec::new();
    peer.read_to_end(&mut bytes).await.unwrap();
    let mut buf = BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    while let Some(frame) = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).unwrap() {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "the last frame was cut short");
    frames
}
