//! The SDK against a broker that does not hold replies back (one older
//! than flow-controlled reply streams), played by this test over TCP: a
//! stream that overflows its buffer never skips a reply and goes on — it
//! ends with an error that says how many replies were lost.

use std::time::Duration;

use bytes::BytesMut;
use courier_client::proto::{
    decode_frame, Delivery, ErrorCode, Frame, FrameWriter, Kind, Message, SendOutcome, Welcome,
    FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION, REPLY_WINDOW_HEADER,
};
use courier_client::{Client, ClientOptions, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn next_frame(socket: &mut TcpStream, buf: &mut BytesMut) -> Frame {
    loop {
        if let Some(frame) =
            decode_frame(buf, FRAME_BYTES_MAX_DEFAULT).expect("client frames decode")
        {
            return frame;
        }
        let n = socket.read_buf(buf).await.expect("read");
        assert!(n > 0, "the client closed the connection");
    }
}

/// Accepts one client, answers its command, then sends `replies` replies
/// and a final one without waiting for any credit.
async fn broker_without_flow_control(listener: TcpListener, replies: u64) -> Option<String> {
    let (mut socket, _) = listener.accept().await.expect("accept");
    let mut buf = BytesMut::new();
    assert!(matches!(
        next_frame(&mut socket, &mut buf).await,
        Frame::Hello(_)
    ));
    let mut out = FrameWriter::new();
    out.push(&Frame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        connection_id: 1,
        frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        broker: "courier 0.0.1".into(),
        service: None,
    }))
    .expect("encode");
    socket.write_all(&out.take()).await.expect("write");
    let (seq, command) = loop {
        if let Frame::Send(mut entries) = next_frame(&mut socket, &mut buf).await {
            let entry = entries.remove(0);
            break (entry.seq, entry.message);
        }
    };
    out.push(&Frame::SendResult(vec![SendOutcome {
        seq,
        code: ErrorCode::Ok,
        reason: String::new(),
        log_seq: 0,
    }]))
    .expect("encode");
    for i in 0..=replies {
        let mut reply = Message::new(Kind::Reply, "file.copy.progress", i.to_string());
        reply.response_to = Some(command.id);
        reply.is_final = i == replies;
        out.push(&Frame::Deliver(vec![Delivery {
            delivery: 100 + i,
            attempt: 1,
            message: reply,
        }]))
        .expect("encode");
    }
    socket.write_all(&out.take()).await.expect("write");
    // Keep the connection open until the client is done.
    let _ = socket.read_buf(&mut buf).await;
    command.header(REPLY_WINDOW_HEADER).map(str::to_string)
}

#[tokio::test]
async fn a_stream_that_overflows_its_buffer_ends_saying_how_many_replies_were_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let broker = tokio::spawn(broker_without_flow_control(listener, 40));
    let mut opts = ClientOptions::new(addr, "web");
    opts.reply_window = 8;
    let client = Client::connect(opts).await.expect("connect");
    let mut stream = client
        .request_stream("file.copy", &())
        .await
        .expect("accepted");
    // Let every reply arrive before the application reads any: the buffer
    // is full (8) and the error that ends the stream waits behind it.
    tokio::time::timeout(Duration::from_secs(10), async {
        while stream.buffered() < 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the buffer fills");
    let mut received = Vec::new();
    let end = loop {
        match stream.next_reply().await {
            Some(Ok(reply)) => received.push(String::from_utf8_lossy(reply.payload()).into_owned()),
            Some(Err(e)) => break e,
            None => panic!("the stream ended without saying what was lost"),
        }
    };
    let expected: Vec<String> = (0..8).map(|i| i.to_string()).collect();
    assert_eq!(received, expected, "the replies before the loss, in order");
    match end {
        Error::RepliesLost(lost) => assert_eq!(lost, 33, "replies 8 to 39 and the final one"),
        other => panic!("expected RepliesLost, got {other}"),
    }
    assert!(
        end.to_string()
            .contains("33 replies of this stream were lost"),
        "{end}"
    );
    assert!(stream.next_reply().await.is_none());
    drop(client);
    let header = broker.await.expect("fake broker");
    assert_eq!(
        header.as_deref(),
        Some("8"),
        "the command asked for the window"
    );
}
