//! The atomics the handshakes in `handshake.rs` are made of: loom's under
//! `--cfg courier_loom` (its models explore every interleaving and every
//! value a load may read), the standard library's otherwise. A cfg of our
//! own rather than loom's usual `loom`: tokio reads that one too, and
//! builds without `tokio::net` under it.

#[cfg(courier_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
#[cfg(not(courier_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
