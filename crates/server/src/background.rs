//! The server's background work: the timer that drives `Broker::tick`
//! and checkpoints, manifest reloads, the scrub, trace queries.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use courier_broker::ConnId;
use courier_proto::{ErrorCode, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use crate::shared::say_alerts;
use crate::{auth, load_manifest, trace, wall_nanos, Outbox, ScrubSettings, ServerHandle, Shared};

/// Answers a `courier.trace.*` command off the broker's lock (a tree
/// may take a while to build) with one final reply; on a cluster, with
/// every node's part (`cluster_edge/traces.rs`).
pub(crate) fn answer_trace_query(
    tracer: trace::Tracer,
    cluster: Option<Arc<crate::cluster_edge::ClusterNode>>,
    outbox: Arc<Outbox>,
    request: uuid::Uuid,
    activity_id: uuid::Uuid,
    query: courier_broker::TraceQuery,
) {
    tokio::spawn(async move {
        let answered = match cluster {
            Some(node) => crate::cluster_edge::traces::answer(&node, &tracer, &query).await,
            None => match tokio::task::spawn_blocking(move || tracer.answer(&query)).await {
                Ok(answered) => answered,
                Err(e) => {
                    warn!(error = %e, "a trace query failed");
                    return;
                }
            },
        };
        let (outcome, body) = answered;
        let mut reply = broker_reply(request, activity_id, outcome, &body);
        let limit = outbox.lock().writer.frame_bytes_max() as usize;
        let size = courier_proto::delivery_frame_len(&reply);
        if size > limit {
            // The connection could not take it: say so instead.
            let why = serde_json::json!({
                "reason": format!(
                    "the answer is {size} bytes, more than this connection's frame limit of {limit}; read it over HTTP (GET /v1/activities on the broker's HTTP port)"
                ),
            });
            reply.name = "courier.trace.too-large".into();
            reply.payload = why.to_string().into();
        }
        outbox.deliver(&reply, usize::MAX);
    });
}

/// A final reply from the broker itself (`sender` "courier", JSON) to
/// the admin command `request`.
fn broker_reply(
    request: uuid::Uuid,
    activity_id: uuid::Uuid,
    outcome: &str,
    body: &serde_json::Value,
) -> courier_proto::Message {
    let mut reply =
        courier_proto::Message::new(courier_proto::Kind::Reply, outcome, body.to_string());
    reply.response_to = Some(request);
    reply.activity_id = activity_id;
    reply.sender = "courier".into();
    reply.timestamp = wall_nanos();
    reply
        .headers
        .push(("content-type".into(), "application/json".into()));
    reply
}

/// Answers `courier.services.list` on a cluster: the core's listing
/// (the cluster's services, this node's instances) with every other
/// node's instances added; nodes that did not answer are named in the
/// reply's `courier-partial` header (the payload stays the one listing).
/// Only a core on a cluster asks; without one the listing goes as it is.
pub(crate) fn answer_services_query(
    node: Option<Arc<crate::cluster_edge::ClusterNode>>,
    outbox: Arc<Outbox>,
    request: uuid::Uuid,
    activity_id: uuid::Uuid,
    listing: serde_json::Value,
) {
    tokio::spawn(async move {
        let (listing, partial) = match node {
            Some(node) => crate::cluster_edge::views::listing_everywhere(&node, listing).await,
            None => (listing, Vec::new()),
        };
        let mut reply = broker_reply(request, activity_id, "courier.services.listing", &listing);
        if !partial.is_empty() {
            reply
                .headers
                .push(("courier-partial".into(), partial.join(",")));
        }
        outbox.deliver(&reply, usize::MAX);
    });
}

pub(crate) fn reload_manifest(shared: &Shared) -> Result<(), String> {
    let Some(path) = &shared.config.manifest_path else {
        return Err("no --manifest was given; nothing to reload".to_string());
    };
    let (manifest, modified) = load_manifest(path)?;
    *shared
        .manifest_modified
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = modified;
    let credentials: Vec<(ConnId, (courier_proto::Credentials, Option<String>))> = shared
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(c, cred)| (*c, cred.clone()))
        .collect();
    let mut revoked = Vec::new();
    {
        let mut core = shared.core();
        for (conn, (cred, subject)) in credentials {
            let hello = courier_proto::Hello {
                version: PROTOCOL_VERSION,
                service: String::new(),
                instance: String::new(),
                max_in_flight: 0,
                credentials: cred,
            };
            let still = auth::authenticate(Some(&manifest), &hello, subject.as_deref());
            let current = core.connection_service(conn);
            let same = matches!((&still, &current), (Ok(a), Some(s)) if a.service == *s);
            if !same {
                revoked.push(conn);
            }
        }
        core.set_manifest(Some(manifest));
    }
    let outboxes = shared.outboxes();
    for conn in &revoked {
        if let Some(outbox) = outboxes.get(conn) {
            outbox.fail(
                ErrorCode::Unauthorized,
                "the reloaded manifest no longer accepts this connection's credentials".to_string(),
            );
        }
    }
    info!(path = %path.display(), revoked = revoked.len(), "manifest reloaded");
    Ok(())
}

/// Reloads the manifest on SIGHUP and when its file changes.
pub(crate) async fn watch_manifest(shared: Arc<Shared>) {
    /// How often the file's modification time is checked.
    const MANIFEST_POLL_MS: u64 = 1_000;
    let Some(path) = shared.config.manifest_path.clone() else {
        return;
    };
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; the manifest reloads only when its file changes");
            None
        }
    };
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = signalled => true,
            _ = tokio::time::sleep(Duration::from_millis(MANIFEST_POLL_MS)) => false,
        };
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let known = *shared
            .manifest_modified
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if forced || (modified.is_some() && modified != known) {
            if let Err(e) = reload_manifest(&shared) {
                warn!("manifest reload refused, the previous manifest stays in force: {e}");
                *shared
                    .manifest_modified
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = modified;
            }
        }
    }
}

pub(crate) async fn run_timer(shared: Arc<Shared>) {
    /// Housekeeping (dedup and reply-route expiry, the periodic fsync of
    /// `--fsync interval:MS`) runs at least this often.
    const TICK_INTERVAL_MAX_MS: u64 = 100;
    let mut next_checkpoint = shared.clock.now() + shared.config.checkpoint_interval_ms * 1_000_000;
    loop {
        let now = shared.clock.now();
        let next = {
            let mut core = shared.core();
            core.next_timer()
        };
        let due = next
            .unwrap_or(u64::MAX)
            .min(now + TICK_INTERVAL_MAX_MS * 1_000_000);
        shared.timer_due.store(due, Ordering::Relaxed);
        let wait = Duration::from_nanos(due.saturating_sub(now));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.timer_wake.notified() => {}
        }
        shared.with_core_deferred(|core, now| {
            core.tick(now);
            shared.resume_drained(core, now);
            shared.backend_syncs.give_up_overdue(core);
        });
        let due = shared.core().checkpoint_due();
        if due || shared.clock.now() >= next_checkpoint {
            next_checkpoint = shared.clock.now() + shared.config.checkpoint_interval_ms * 1_000_000;
            let handle = ServerHandle {
                shared: shared.clone(),
            };
            if let Err(e) = handle.checkpoint() {
                warn!(error = %e, "checkpoint failed; recovery will replay more of the log");
            }
        }
    }
}

/// The background scrub, on a thread of its own (it paces itself by
/// sleeping): passes over the sealed segments at the configured rate;
/// damage is reported once and counted. Ends when the server is gone.
pub(crate) fn run_scrub(shared: std::sync::Weak<Shared>, settings: ScrubSettings) {
    let mut scrubber = courier_store::Scrubber::new(&settings.log_dir, settings.bytes_per_sec);
    let interval = Duration::from_millis(settings.pass_interval_ms);
    loop {
        let started = std::time::Instant::now();
        let mut found = |damage: courier_store::Damage| {
            if let Some(shared) = shared.upgrade() {
                let mut core = shared.core();
                core.report_scrub_damage(damage.to_string());
                say_alerts(&mut core);
            }
        };
        let mut read = |bytes: u64| {
            if let Some(shared) = shared.upgrade() {
                shared.core().metrics_mut().scrub_bytes += bytes;
            }
        };
        let result = scrubber.pass(&mut found, &mut read);
        let Some(alive) = shared.upgrade() else {
            return;
        };
        match result {
            Ok(bytes) => {
                alive.core().metrics_mut().scrub_passes += 1;
                debug!(
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "scrub pass done"
                );
            }
            Err(e) => warn!(error = %e, "a scrub pass failed; the next one tries again"),
        }
        drop(alive);
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}
