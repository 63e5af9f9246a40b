//! A client given several broker addresses (`ClientOptions::url` =
//! `a,b,c`), against brokers this test plays over TCP: which one each
//! connection goes to, what is sent again after a failover, and what the
//! error says when none answers.

use std::time::Duration;

use bytes::BytesMut;
use courier_client::proto::{
    decode_frame, ErrorCode, Frame, FrameWriter, SendOutcome, Welcome, FRAME_BYTES_MAX_DEFAULT,
    PROTOCOL_VERSION,
};
use courier_client::{Client, ClientOptions, ConnectionEvent, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// A connection a fake broker welcomed.
struct Accepted {
    socket: TcpStream,
    buf: BytesMut,
}

impl Accepted {
    async fn next_frame(&mut self) -> Frame {
        loop {
            if let Some(frame) =
                decode_frame(&mut self.buf, FRAME_BYTES_MAX_DEFAULT).expect("client frames decode")
            {
                return frame;
            }
            let n = self.socket.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "the client closed the connection");
        }
    }

    async fn write(&mut self, frame: &Frame) {
        let mut out = FrameWriter::new();
        out.push(frame).expect("encode");
        self.socket.write_all(&out.take()).await.expect("write");
    }
}

/// A broker that welcomes every client and hands the connection over.
struct FakeBroker {
    address: String,
    accepted: mpsc::UnboundedReceiver<Accepted>,
}

impl FakeBroker {
    async fn start() -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let (tx, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let mut connection = Accepted {
                    socket,
                    buf: BytesMut::new(),
                };
                assert!(matches!(connection.next_frame().await, Frame::Hello(_)));
                connection
                    .write(&Frame::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        connection_id: 1,
                        frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
                        broker: "courier 0.0.1".into(),
                        service: None,
                    }))
                    .await;
                if tx.send(connection).is_err() {
                    return;
                }
            }
        });
        FakeBroker { address, accepted }
    }

    async fn connection(&mut self) -> Accepted {
        tokio::time::timeout(T, self.accepted.recv())
            .await
            .expect("a connection within 10 s")
            .expect("the fake broker runs")
    }

    fn no_connection(&mut self) -> bool {
        self.accepted.try_recv().is_err()
    }
}

/// A port nobody listens on (bound, then freed).
async fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn a_dead_address_is_passed_over_for_the_next() {
    let dead = dead_address().await;
    let mut live = FakeBroker::start().await;
    let client = Client::connect(ClientOptions::new(
        format!("{dead} , {}", live.address),
        "web",
    ))
    .await
    .expect("connects to the live one");
    let _connection = live.connection().await;
    assert_eq!(client.broker_address(), live.address);
}

#[tokio::test]
async fn each_reconnect_starts_after_the_broker_connected_to_last_and_sends_again_there() {
    let mut brokers = [
        FakeBroker::start().await,
        FakeBroker::start().await,
        FakeBroker::start().await,
    ];
    let url = brokers
        .iter()
        .map(|b| b.address.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut opts = ClientOptions::new(url, "web");
    opts.reconnect_delay_min = Duration::from_millis(10);
    let client = Client::connect(opts).await.expect("connect");
    let mut events = client.connection_events();
    let mut a = brokers[0].connection().await;
    assert_eq!(client.broker_address(), brokers[0].address);

    // A send the first broker reads and never answers …
    let sending = {
        let client = client.clone();
        tokio::spawn(async move { client.send("todo.create", &"milk").await })
    };
    let sent = loop {
        if let Frame::Send(mut entries) = a.next_frame().await {
            break entries.remove(0).message.id;
        }
    };
    // … goes again, with its id, to the next broker once the first one is gone.
    drop(a);
    let mut b = brokers[1].connection().await;
    let (seq, again) = loop {
        if let Frame::Send(mut entries) = b.next_frame().await {
            let entry = entries.remove(0);
            break (entry.seq, entry.message.id);
        }
    };
    assert_eq!(again, sent, "the same message, so a broker can drop a copy");
    b.write(&Frame::SendResult(vec![SendOutcome {
        seq,
        code: ErrorCode::Ok,
        reason: String::new(),
        log_seq: 0,
    }]))
    .await;
    let id = tokio::time::timeout(T, sending)
        .await
        .expect("answered")
        .expect("task")
        .expect("accepted");
    assert_eq!(id, sent);
    assert_eq!(client.broker_address(), brokers[1].address);
    assert!(brokers[0].no_connection(), "the lost broker is tried last");
    assert!(brokers[2].no_connection());

    // Round the list: after the second, the third; after the third, the first.
    drop(b);
    let c = brokers[2].connection().await;
    drop(c);
    let _a = brokers[0].connection().await;
    let (mut lost, mut restored) = (0, 0);
    while restored < 3 {
        match tokio::time::timeout(T, events.next()).await.expect("event") {
            Some(ConnectionEvent::Lost { .. }) => lost += 1,
            Some(ConnectionEvent::Restored) => restored += 1,
            Some(_) => {}
            None => panic!("events ended"),
        }
    }
    assert_eq!(lost, 3);
    assert_eq!(client.broker_address(), brokers[0].address);
    assert!(brokers[1].no_connection(), "{}", brokers[1].address);
}

#[tokio::test]
async fn when_every_address_fails_the_error_names_each_one() {
    let (first, second) = (dead_address().await, dead_address().await);
    let error = Client::connect(ClientOptions::new(format!("{first},{second}"), "web"))
        .await
        .err()
        .expect("nobody listens");
    let text = error.to_string();
    match &error {
        Error::Unreachable { failures } => {
            let tried: Vec<&str> = failures.iter().map(|(a, _)| a.as_str()).collect();
            assert_eq!(tried, [first.as_str(), second.as_str()], "in order");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(
        text.starts_with(&format!("cannot reach a broker at {first} (")),
        "{text}"
    );
    assert!(text.contains(&format!(", {second} (")), "{text}");
    assert!(text.ends_with("is 'courier serve' running?"), "{text}");

    // One address fails as it always did.
    let error = Client::connect(ClientOptions::new(first.clone(), "web"))
        .await
        .err()
        .expect("nobody listens");
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot reach broker at {first}: ")),
        "{error}"
    );
}

#[tokio::test]
async fn an_empty_address_in_the_list_says_what_to_write() {
    let error = Client::connect(ClientOptions::new("127.0.0.1:7701,,127.0.0.1:7702", "web"))
        .await
        .err()
        .expect("refused before connecting");
    assert!(matches!(error, Error::Options(_)), "{error:?}");
    assert!(
        error.to_string().contains("127.0.0.1:7701,127.0.0.1:7702"),
        "{error}"
    );
}
