use std::time::Duration;

use courier_proto::ErrorCode;
use thiserror::Error;

/// What can go wrong talking to the broker.
#[derive(Debug, Error)]
pub enum Error {
    /// The broker refused the message or operation; `code` says why.
    #[error("refused by the broker: {reason} [{code}]")]
    Refused { code: ErrorCode, reason: String },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach broker at {addr}: {source} — is 'courier serve' running?")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// Every address of a [`ClientOptions::url`](crate::ClientOptions::url)
    /// with several failed, in one round of attempts: each address with
    /// its failure, in the order tried. (With a single address, its
    /// failure is the error.)
    #[error(
        "cannot reach a broker at {} — is 'courier serve' running?",
        describe_failures(.failures)
    )]
    Unreachable { failures: Vec<(String, Error)> },
    #[error("the connection to the broker ended: {0}")]
    Closed(String),
    /// [`crate::ClientOptions`] hold something the client cannot use.
    #[error("invalid client options: {0}")]
    Options(String),
    #[error("the client is shut down")]
    Shutdown,
    #[error("payload is not valid JSON for the expected type: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message cannot be encoded: {0}")]
    Encode(#[from] courier_proto::EncodeError),
    #[error("invalid name: {0}")]
    Name(#[from] courier_proto::NameError),
    #[error("this delivery was already acked or nacked")]
    AlreadySettled,
    /// Replies of a stream arrived while its buffer was full: the replies
    /// before them were delivered in order, these and the rest of the
    /// stream were not. Only a broker without flow control of reply
    /// streams (PROTOCOL §8.8) sends more than the buffer holds.
    #[error(
        "{0} replies of this stream were lost: they arrived while the client's reply buffer was full \
         (the broker did not hold them back; is it older than this client?); the replies before them arrived in order"
    )]
    RepliesLost(u64),
    /// A registry lookup of [`Client::discover`](crate::Client::discover)
    /// failed.
    #[error("service discovery through the broker's HTTP port {http}: {reason}")]
    Discovery { http: String, reason: String },
}

impl Error {
    /// The broker's error code, when the broker refused.
    /// For [`Error::Unreachable`], that of the first broker that refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            Error::Unreachable { failures } => failures.iter().find_map(|(_, e)| e.code()),
            _ => None,
        }
    }
}

/// `a:1 (connection refused), b:2 (…)`: an address's own failure without
/// the advice the whole message gives once.
fn describe_failures(failures: &[(String, Error)]) -> String {
    let described: Vec<String> = failures
        .iter()
        .map(|(address, error)| match error {
            Error::Connect { source, .. } => format!("{address} ({source})"),
            other => format!("{address} ({other})"),
        })
        .collect();
    described.join(", ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
