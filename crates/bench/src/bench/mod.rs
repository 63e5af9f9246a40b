//! `courier-bench` (also run as `courier bench`): the workloads W1–W13, and with `--against nats`
//! the same workloads against nats-server (core NATS and JetStream) side by
//! side, with the ratio and the target per row.
//!
//! Every run starts a real broker process (`courier serve`, the `courier`
//! binary beside this program unless `--courier` names another) on a
//! free loopback port with a fresh data directory, drives it through the
//! SDK, and kills it afterwards — also on error, timeout or Ctrl-C (the
//! process and the directory are owned by guards that clean up on drop).
//!
//! Results are kept per *system* (one column each in the table, one key
//! each in the JSON), so `--against nats` can add a second [`System`]
//! whose runs interleave with Courier's without changing the output code.
//!
//! The files, by concern: `options` (the flags), `workload`, `rows` and
//! `plan` (what is measured, the table's rows and targets, the message
//! counts), `runner` (the runs, interleaved), `report`, `figures` and
//! `machine` (what is printed); `side` (the one trait both systems
//! offer, and its extensions) with the workloads written once against it
//! (`transient`: W1–W3, `w4`: W4 and W12, `publish`: W5, W11, W13,
//! `backlog`: W6 and W8, `restart`: W7, `w9`: W9, `w10`: W10), and its
//! two implementations,
//! `courier*` and `nats*`; `curves` (`--curves`) runs those workloads at
//! growing sizes.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use courier_client::{Client, ClientOptions, PendingAck};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

mod backlog;
mod clients;
mod cluster;
mod courier;
mod courier_transient;
mod curves;
mod figures;
mod gateway;
mod ids;
mod machine;
mod nats;
mod nats_backlog;
mod nats_server;
mod nats_transient;
mod options;
mod outbox;
mod plan;
mod process;
mod publish;
mod registry;
mod report;
mod restart;
mod rows;
mod runner;
mod scrape;
mod side;
mod transient;
mod w10;
mod w4;
mod w9;
mod workload;

use backlog::*;
use courier::*;
use courier_transient::*;
use figures::*;
use machine::*;
use options::*;
use plan::*;
use process::*;
use report::*;
use rows::*;
use side::Side;
use workload::*;

pub use options::BenchArgs;
pub use runner::run;

/// Message sizes and client settings; printed with the table.
const TINY_BYTES: usize = 16;
const SMALL_BYTES: usize = 128;
const LARGE_BYTES: usize = 1024;
/// Unacknowledged sends kept in flight by the pipelined workloads.
const WINDOW: usize = 256;
/// Requests W4b keeps in flight.
const REQUESTS_IN_FLIGHT: usize = 64;
/// Deliveries the W6 consumer takes at once.
const MAX_IN_FLIGHT: u32 = 1024;
/// W13: publishing connections at once, each awaiting every ack.
const W13_CONNECTIONS: [usize; 4] = [1, 4, 16, 64];
/// W10's events through the routing table, before --quick and --scale.
const W10_MESSAGES: u64 = 200_000;
/// The broker's `--fsync` for every run (its default).
const FSYNC: &str = "always";
/// `--quick` divides every message count by this.
const QUICK_DIVISOR: f64 = 20.0;
/// No workload runs with fewer messages than this, however small the scale.
const MIN_MESSAGES: u64 = 10;
/// A broker must print its ready line within this.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// A consumer that handles nothing for this long has stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// W7a polls `Client::connect` this often while the broker restarts.
const CONNECT_POLL: Duration = Duration::from_millis(1);
/// Lines of the broker's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 8;
