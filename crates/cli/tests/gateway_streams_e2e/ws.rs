//! The WebSocket side of a test: open a subscription, read and write
//! JSON frames. Shared by every module that speaks to `/v1/ws`.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Frame;

use super::{addr_of, T};

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/v1/ws?{query}` and waits for its `subscribed` frame.
pub(crate) async fn open(http: &str, query: &str) -> Socket {
    let url = format!("ws://{}/v1/ws?{query}", addr_of(http));
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("a WebSocket");
    let first = next(&mut socket).await;
    assert_eq!(first["type"], "subscribed", "{first}");
    socket
}

/// The next text frame, as JSON (other frames are skipped).
pub(crate) async fn next(socket: &mut Socket) -> serde_json::Value {
    loop {
        let frame = tokio::time::timeout(T, socket.next())
            .await
            .expect("a frame in time")
            .expect("the socket open")
            .expect("a good frame");
        if let Frame::Text(text) = frame {
            return serde_json::from_str(text.as_str()).expect("JSON");
        }
    }
}

/// Sends `frame` as a text frame.
pub(crate) async fn put(socket: &mut Socket, frame: serde_json::Value) {
    socket
        .send(Frame::Text(frame.to_string().into()))
        .await
        .expect("send a frame");
}
