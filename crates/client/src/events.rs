//! Changes of the connection to the broker, for whoever wants to show them.

use std::time::Duration;

use tokio::sync::broadcast;

/// Events kept for a reader that has not read them yet; an outage makes
/// three or four, so a reader this far behind only misses a past outage.
pub(crate) const CONNECTION_EVENTS_MAX: usize = 64;

/// A change of the client's connection to the broker, from
/// [`Client::connection_events`](crate::Client::connection_events).
///
/// An outage reads `Lost`, then zero or more `ReconnectFailed`, then
/// `Restored`. During it nothing is lost: sends wait (durable ones are sent
/// again with their ids once the connection is back, so the broker drops
/// any it had already accepted), deliveries pause, and subscriptions are
/// renewed on reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The connection broke; the client is reconnecting by itself.
    Lost {
        /// What ended the connection, in words.
        reason: String,
    },
    /// A reconnect attempt failed; the next one follows after `retry_in`.
    ReconnectFailed {
        /// Why the attempt failed, in words.
        error: String,
        retry_in: Duration,
    },
    /// Connected again: subscriptions are renewed and unacknowledged sends
    /// sent again.
    Restored,
}

/// The connection events of one [`Client`](crate::Client), from the moment
/// this was made; ends once the client is shut down.
///
/// ```no_run
/// # async fn run(client: courier_client::Client) {
/// use courier_client::ConnectionEvent;
/// let mut events = client.connection_events();
/// tokio::spawn(async move {
///     while let Some(event) = events.next().await {
///         match event {
///             ConnectionEvent::Lost { reason } => eprintln!("bus lost ({reason}); reconnecting"),
///             ConnectionEvent::Restored => eprintln!("bus back"),
///             _ => {}
///         }
///     }
/// });
/// # }
/// ```
pub struct ConnectionEvents {
    rx: broadcast::Receiver<ConnectionEvent>,
}

impl ConnectionEvents {
    pub(crate) fn new(rx: broadcast::Receiver<ConnectionEvent>) -> ConnectionEvents {
        ConnectionEvents { rx }
    }

    /// The next event; `None` once the client is shut down. A reader more
    /// than 64 events behind skips the oldest it missed;
    /// [`Client::is_connected`](crate::Client::is_connected) tells the
    /// state now.
    pub async fn next(&mut self) -> Option<ConnectionEvent> {
        loop {
            match self.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
