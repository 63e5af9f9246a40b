//! `Client`: connecting, handlers and subscriptions, the connection's
//! events, shutdown.

use crate::handshake::{HandlersRunning, WriteWake};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use courier_proto::{validate_pattern, FrameWriter, Kind};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

use crate::pending::PendingSends;

use crate::options::check_advertised;
use crate::state::{Subscription, Subscriptions};
use crate::{
    connection, events, handler, BoxError, ClientOptions, ConnectionEvents, Connector, Error,
    Incoming, Inner, MessageBuilder, Result, StartFrom, State,
};

/// A connection to the broker on behalf of one service instance. Cheap to
/// clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl Client {
    /// Connects and completes the handshake. Fails at once if the broker
    /// cannot be reached; after that, the client reconnects by itself.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), courier_client::Error> {
    /// let client = courier_client::Client::connect(courier_client::ClientOptions::from_env()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(opts: ClientOptions) -> Result<Client> {
        Client::connect_via(opts, None).await
    }

    /// Connects like [`Client::connect`], but over the byte streams
    /// `connector` opens instead of TCP to [`ClientOptions::url`] (which
    /// then only names the broker in errors; TLS options do not apply).
    pub async fn connect_with(opts: ClientOptions, connector: Connector) -> Result<Client> {
        Client::connect_via(opts, Some(connector)).await
    }

    pub(crate) async fn connect_via(
        opts: ClientOptions,
        connector: Option<Connector>,
    ) -> Result<Client> {
        if let Some(address) = &opts.advertise {
            check_advertised(address)?;
        }
        let addresses = match connector {
            Some(_) => vec![opts.url.clone()],
            None => opts.addresses()?,
        };
        let first = connection::establish(&opts, &addresses, None, connector.as_ref()).await?;
        let (shutdown, _) = watch::channel(false);
        let (sequential, sequential_rx) = if opts.sequential {
            let (tx, rx) = mpsc::channel(opts.max_in_flight.max(1) as usize * 2);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let inner = Arc::new(Inner {
            sequential,
            state: Mutex::new(State {
                writer: FrameWriter::new(),
                direct: None,
                writing: false,
                generation: 0,
                connected: false,
                address: first.address,
                frame_bytes_max: first.frame_bytes_max,
                next_seq: 0,
                pending_sends: PendingSends::new(),
                requests: HashMap::new(),
                quiet_requests: HashMap::new(),
                subscriptions: Subscriptions::default(),
                next_op: 0,
                pending_ops: HashMap::new(),
                drained: None,
                shut_down: false,
                flushes: VecDeque::new(),
                next_flush: 0,
                unheard_refusals: 0,
                last_unheard_refusal: None,
                events: Some(broadcast::channel(events::CONNECTION_EVENTS_MAX).0),
                key_lines: HashMap::new(),
            }),
            service: first.service.clone(),
            opts,
            addresses,
            connector,
            writer_wake: Notify::new(),
            write_wake: WriteWake::new(),
            writer_drained: Notify::new(),
            handler_done: Notify::new(),
            handlers: HandlersRunning::new(),
            shutdown,
        });
        let mut first = first;
        connection::on_connected(&inner, &mut first);
        if let Some(mut rx) = sequential_rx {
            tokio::spawn(async move {
                while let Some((handler, incoming)) = rx.recv().await {
                    handler::run(handler, incoming).await;
                }
            });
        }
        tokio::spawn(connection::drive(inner.clone(), first));
        Ok(Client { inner })
    }

    /// `host:port` of the broker this client is connected to, or was last
    /// connected to while it reconnects: one of the addresses of
    /// [`ClientOptions::url`].
    pub fn broker_address(&self) -> String {
        let index = self.inner.lock().address;
        self.inner.address(index).to_string()
    }

    /// The service this client acts for: [`ClientOptions::service`], or,
    /// when that was left empty for the token or client certificate to
    /// decide, the service the broker authenticated it as.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// Starts a command with options (key, headers, TTL …).
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// client.command("todo.create").key("user-1").json(&serde_json::json!({"text": "milk"}))?.send().await?;
    /// # Ok(()) }
    /// ```
    pub fn command(&self, name: impl Into<String>) -> MessageBuilder {
        MessageBuilder::new(self.clone(), Kind::Command, name.into())
    }

    /// Starts an event with options.
    pub fn event(&self, name: impl Into<String>) -> MessageBuilder {
        MessageBuilder::new(self.clone(), Kind::Event, name.into())
    }

    /// Handles every command or event whose name matches `pattern` (`*` and
    /// `>` wildcards). The subscription belongs to the service: messages
    /// wait for it while no instance runs. The handler's `Ok` acks the
    /// delivery, its `Err` nacks it for a retry after
    /// [`ClientOptions::nack_delay`] — unless it settled it itself.
    ///
    /// A handler starts on the connection's reader and moves to a task of
    /// its own when it first has to wait, so one that finishes at once
    /// costs no task; put long CPU work in `tokio::task::spawn_blocking`,
    /// or it holds up the deliveries behind it.
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// client.on("todo.*", |msg| async move {
    ///     println!("{} from {}", msg.name(), msg.message().sender);
    ///     Ok::<(), courier_client::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn on<F, Fut, E>(&self, pattern: &str, handler: F) -> Result<()>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.on_from(pattern, StartFrom::New, handler).await
    }

    /// Like [`Client::on`], but a subscription the broker does not know
    /// yet starts at `start`: [`StartFrom::Beginning`] or
    /// [`StartFrom::Time`] first replays retained events (history).
    ///
    /// ```no_run
    /// # async fn run(client: courier_client::Client) -> Result<(), courier_client::Error> {
    /// use courier_client::StartFrom;
    /// client.on_from("todo.*", StartFrom::Beginning, |msg| async move {
    ///     println!("{}", msg.name());
    ///     Ok::<(), courier_client::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn on_from<F, Fut, E>(
        &self,
        pattern: &str,
        start: StartFrom,
        handler: F,
    ) -> Result<()>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        validate_pattern(pattern)?;
        let handler = handler::boxed(handler);
        let rx = {
            let mut state = self.inner.lock();
            state.subscriptions.subscribe(Subscription {
                pattern: pattern.to_string(),
                start,
                handler,
            });
            if state.connected {
                Some(connection::push_subscribe(
                    &self.inner,
                    &mut state,
                    pattern,
                    start,
                ))
            } else {
                None
            }
        };
        self.inner.wake_writer();
        match rx {
            Some(rx) => self.await_op(rx).await,
            // Subscribed on the next connect.
            None => Ok(()),
        }
    }

    /// Removes the service's subscription to `pattern` (for every
    /// instance); messages waiting for it are discarded.
    pub async fn unsubscribe(&self, pattern: &str) -> Result<()> {
        let rx = {
            let mut state = self.inner.lock();
            state.subscriptions.unsubscribe(pattern);
            state.next_op += 1;
            let request = state.next_op;
            let (tx, rx) = oneshot::channel();
            state.pending_ops.insert(request, tx);
            state.writer.push(&courier_proto::Frame::Unsubscribe {
                request,
                pattern: pattern.to_string(),
            })?;
            rx
        };
        self.inner.wake_writer();
        self.await_op(rx).await
    }

    pub(crate) async fn await_op(&self, rx: oneshot::Receiver<Result<()>>) -> Result<()> {
        let timeout = self.inner.opts.send_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed(
                "connection lost before the broker answered".into(),
            )),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Stops taking deliveries, waits (up to
    /// [`ClientOptions::drain_timeout`]) for running handlers to finish and
    /// their acks to be written, then closes the connection.
    pub async fn shutdown(&self) {
        let drained = {
            let mut state = self.inner.lock();
            if state.shut_down {
                return;
            }
            state.shut_down = true;
            if state.connected {
                let (tx, rx) = oneshot::channel();
                state.drained = Some(tx);
                let _ = state.writer.push(&courier_proto::Frame::Drain);
                Some(rx)
            } else {
                None
            }
        };
        self.inner.wake_writer();
        let deadline = tokio::time::Instant::now() + self.inner.opts.drain_timeout;
        if let Some(rx) = drained {
            let _ = tokio::time::timeout_at(deadline, rx).await;
        }
        // Either the last handler out sees this and notifies, or it is out
        // before and `none_running` sees it (`handshake::HandlersRunning`).
        self.inner.handlers.await_last();
        loop {
            let notified = self.inner.handler_done.notified();
            if self.inner.handlers.none_running() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("handlers still running at the drain timeout; closing anyway");
                break;
            }
        }
        let _ = self.inner.shutdown.send(true);
        self.inner.wake_writer();
    }

    /// Whether a connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().connected
    }

    /// The changes of the connection to the broker from now on: lost,
    /// reconnect attempts, restored (see [`ConnectionEvent`](crate::ConnectionEvent)). For telling
    /// a user that the bus is away rather than waiting silently; the client
    /// reconnects by itself whether anyone listens or not.
    pub fn connection_events(&self) -> ConnectionEvents {
        let rx = match &self.inner.lock().events {
            Some(events) => events.subscribe(),
            // Shut down: a stream that ends at once.
            None => broadcast::channel(1).1,
        };
        ConnectionEvents::new(rx)
    }
}
