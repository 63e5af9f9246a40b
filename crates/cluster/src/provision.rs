//! Creating, or finding and checking, the streams and KV buckets every
//! node needs (docs/SCALE-OUT.md §2, §3, §7, §8, §10, §11).
//!
//! Every node runs this at start. Creating a stream whose equal already
//! exists is a no-op in JetStream, so nodes starting together need no
//! coordination; an existing object whose config would weaken what
//! Courier promises (fewer replicas, memory storage, a policy that drops
//! messages) is refused with the command that fixes it. Settings that are
//! the cluster's to choose (the dedup window, the log's byte limit) are
//! taken from what exists and reported as [`Difference`]s.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{CreateStreamErrorKind, GetStreamErrorKind},
    kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
    ErrorCode,
};

use crate::names::*;

/// What the objects are created with. [`Settings::default`] is the design's.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Replicas of every stream and bucket; existing objects may have more.
    pub replicas: usize,
    /// `duplicate_window` of the message streams (`--dedup-window`).
    pub dedup_window: Duration,
    /// The largest stored message (`max_msg_size`): the frame limit.
    pub max_message_bytes: i32,
    /// `max_bytes` of `COURIER_MSGS` (`--retention-bytes`); `None`: no limit.
    pub retention_bytes: Option<i64>,
    /// Replies parked per service; the oldest go first beyond it.
    pub parked_per_service_max: i64,
    /// Max age of `courier_leases`: a holder that stops renewing loses its
    /// lease this long after its last renewal.
    pub lease_max_age: Duration,
    /// Max age of `courier_nodes`: a node that stops putting its key is gone
    /// from the list this long after.
    pub nodes_max_age: Duration,
    pub instances_max_age: Duration,
    /// A reply route's lifetime.
    pub routes_max_age: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            replicas: 3,
            dedup_window: Duration::from_secs(120),
            max_message_bytes: i32::try_from(courier_proto::FRAME_BYTES_MAX_DEFAULT)
                .unwrap_or(i32::MAX),
            retention_bytes: None,
            parked_per_service_max: 10_000,
            lease_max_age: Duration::from_secs(10),
            nodes_max_age: Duration::from_secs(15),
            instances_max_age: Duration::from_secs(30),
            routes_max_age: Duration::from_secs(600),
        }
    }
}

/// What one object must look like.
#[derive(Clone, Debug)]
struct Spec {
    /// The stream's config as created.
    config: stream::Config,
    /// The bucket's name when the stream backs a KV bucket.
    bucket: Option<&'static str>,
}

fn message_stream(name: &str, subjects: &str, settings: &Settings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![subjects.to_string()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        max_consumers: -1,
        max_message_size: settings.max_message_bytes,
        duplicate_window: settings.dedup_window,
        ..Default::default()
    }
}

fn bucket(name: &'static str, max_age: Duration, settings: &Settings) -> Spec {
    // What async-nats's `create_key_value` makes of a `kv::Config` with
    // history 1, built here so that buckets are created and checked by
    // the same path as streams.
    Spec {
        config: stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: settings.replicas,
            max_messages: -1,
            max_bytes: -1,
            max_messages_per_subject: 1,
            max_consumers: -1,
            max_age,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            ..Default::default()
        },
        bucket: Some(name),
    }
}

/// The objects of the design: the four streams, then the buckets.
struct Specs {
    messages: Spec,
    deferred: Spec,
    dead: Spec,
    parked: Spec,
    buckets: Vec<Spec>,
}

#[cfg(test)]
impl Specs {
    fn all(&self) -> impl Iterator<Item = &Spec> {
        [&self.messages, &self.deferred, &self.dead, &self.parked]
            .into_iter()
            .chain(&self.buckets)
    }
}

fn specs(settings: &Settings) -> Specs {
    let mut messages = message_stream(MESSAGES_STREAM, MESSAGES_SUBJECTS, settings);
    messages.max_bytes = settings.retention_bytes.unwrap_or(-1);
    messages.allow_direct = true;
    // `Nats-TTL` on sends with `expires_at` frees their space early (§8).
    messages.allow_message_ttl = true;
    if settings.retention_bytes.is_some() {
        // A full log refuses sends (they fail `storage_failed`) rather
        // than dropping stored messages nobody has consumed yet. JetStream
        // schedules no messages in such a stream: deferred sends are
        // refused then.
        messages.discard = DiscardPolicy::New;
    } else {
        // Without a limit nothing is ever discarded, and a send with
        // `deliver_at` is a schedule the servers fire (§8), which JetStream
        // allows only with this policy.
        messages.discard = DiscardPolicy::Old;
        messages.allow_message_schedules = true;
    }

    let mut deferred = message_stream(DEFERRED_STREAM, DEFERRED_SUBJECTS, settings);
    deferred.discard = DiscardPolicy::New;

    let mut dead = message_stream(DEAD_STREAM, DEAD_SUBJECTS, settings);
    dead.discard = DiscardPolicy::New;
    dead.allow_direct = true;

    let mut parked = message_stream(PARKED_STREAM, PARKED_SUBJECTS, settings);
    parked.discard = DiscardPolicy::Old;
    parked.max_messages_per_subject = settings.parked_per_service_max;

    let stream = |config| Spec {
        config,
        bucket: None,
    };
    Specs {
        messages: stream(messages),
        deferred: stream(deferred),
        dead: stream(dead),
        parked: stream(parked),
        buckets: vec![
            bucket(SERVICES_BUCKET, Duration::ZERO, settings),
            bucket(INSTANCES_BUCKET, settings.instances_max_age, settings),
            bucket(NODES_BUCKET, settings.nodes_max_age, settings),
            bucket(LEASES_BUCKET, settings.lease_max_age, settings),
            bucket(ROUTES_BUCKET, settings.routes_max_age, settings),
            bucket(REGISTRY_BUCKET, Duration::ZERO, settings),
        ],
    }
}

/// An existing object whose config Courier cannot run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// `stream COURIER_MSGS` or `KV bucket courier_leases (stream KV_courier_leases)`.
    pub object: String,
    pub setting: &'static str,
    pub found: String,
    pub needed: String,
    /// The command that fixes it.
    pub fix: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exists with {} {}, Courier needs {}: {}",
            self.object, self.setting, self.found, self.needed, self.fix
        )
    }
}

/// A cluster-wide setting that differs from this node's: the cluster's
/// value is used (the first node to start chose it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub object: String,
    pub setting: &'static str,
    pub cluster: String,
    pub node: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} has {} {} where this node was given {}; the cluster's value is used",
            self.object, self.setting, self.cluster, self.node
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "{} existing JetStream object(s) do not fit Courier:\n  {}",
        .0.len(),
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
    )]
    Mismatch(Vec<Mismatch>),
    #[error("cannot create {object}: {source}{hint}")]
    Create {
        object: String,
        hint: &'static str,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error(
        "cannot read the config of {object}: {source}; is JetStream enabled for this account?"
    )]
    Read {
        object: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot open KV bucket {bucket}: {source}")]
    Bucket {
        bucket: &'static str,
        #[source]
        source: jetstream::context::KeyValueError,
    },
    #[error(
        "the NATS server {server} takes messages of at most {server_max} bytes (max_payload), but Courier stores messages of up to {needed} bytes: set max_payload: 8MB in every server's config"
    )]
    PayloadLimit {
        server: String,
        server_max: usize,
        needed: i32,
    },
}

/// The objects, found or created and checked.
#[derive(Clone, Debug)]
pub struct Provisioned {
    pub messages: stream::Stream,
    pub deferred: stream::Stream,
    pub dead: stream::Stream,
    pub parked: stream::Stream,
    pub services: kv::Store,
    pub instances: kv::Store,
    pub nodes: kv::Store,
    pub leases: kv::Store,
    pub routes: kv::Store,
    pub registry: kv::Store,
    /// Cluster-wide settings taken from the cluster, not from this node.
    pub differences: Vec<Difference>,
}

/// Finds, or creates, every stream and bucket of the design and checks
/// each against `settings`. Idempotent: nodes may run it at once.
pub async fn provision(
    connection: &crate::Connection,
    settings: &Settings,
) -> Result<Provisioned, ProvisionError> {
    let server = connection.client.server_info();
    if i64::try_from(server.max_payload).unwrap_or(i64::MAX) < i64::from(settings.max_message_bytes)
    {
        return Err(ProvisionError::PayloadLimit {
            server: server.server_name,
            server_max: server.max_payload,
            needed: settings.max_message_bytes,
        });
    }
    let js = &connection.jetstream;
    let specs = specs(settings);
    let mut report = Report::default();
    let messages = report.check(js, &specs.messages).await?;
    let deferred = report.check(js, &specs.deferred).await?;
    let dead = report.check(js, &specs.dead).await?;
    let parked = report.check(js, &specs.parked).await?;
    for spec in &specs.buckets {
        report.check(js, spec).await?;
    }
    if !report.mismatches.is_empty() {
        return Err(ProvisionError::Mismatch(report.mismatches));
    }
    for d in &report.differences {
        tracing::warn!("{d}");
    }
    let open = |bucket: &'static str| async move {
        js.get_key_value(bucket)
            .await
            .map_err(|source| ProvisionError::Bucket { bucket, source })
    };
    Ok(Provisioned {
        messages,
        deferred,
        dead,
        parked,
        services: open(SERVICES_BUCKET).await?,
        instances: open(INSTANCES_BUCKET).await?,
        nodes: open(NODES_BUCKET).await?,
        leases: open(LEASES_BUCKET).await?,
        routes: open(ROUTES_BUCKET).await?,
        registry: open(REGISTRY_BUCKET).await?,
        differences: report.differences,
    })
}

/// What the checks found over all objects: every mismatch is reported at
/// once, so one start names everything to fix.
#[derive(Default)]
struct Report {
    mismatches: Vec<Mismatch>,
    differences: Vec<Difference>,
}

impl Report {
    async fn check(
        &mut self,
        js: &jetstream::Context,
        spec: &Spec,
    ) -> Result<stream::Stream, ProvisionError> {
        let stream = find_or_create(js, spec).await?;
        let (m, d) = compare(spec, &stream.cached_info().config);
        self.mismatches.extend(m);
        self.differences.extend(d);
        Ok(stream)
    }
}

fn object_name(spec: &Spec) -> String {
    match spec.bucket {
        Some(bucket) => format!("KV bucket {bucket} (stream {})", spec.config.name),
        None => format!("stream {}", spec.config.name),
    }
}

/// Finds or creates one object, retrying for up to [`CLUSTER_SETTLE_WAIT`]
/// what a cluster that is still forming answers: timeouts (no meta leader
/// yet, a route not up) and "no suitable peers" (a peer not yet, or for a
/// moment no longer, seen online). Nodes and servers are often started
/// together; a node must not fail because it came first.
async fn find_or_create(
    js: &jetstream::Context,
    spec: &Spec,
) -> Result<stream::Stream, ProvisionError> {
    let until = tokio::time::Instant::now() + CLUSTER_SETTLE_WAIT;
    let mut pause = Duration::from_millis(100);
    loop {
        let error = match try_find_or_create(js, spec).await {
            Ok(stream) => return Ok(stream),
            Err(e) if is_transient(&e) && tokio::time::Instant::now() + pause < until => e,
            Err(e) => return Err(e),
        };
        tracing::info!("{error}; retrying in {pause:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// How long one read of an object's config may take before it is tried
/// again.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How long provisioning waits out a cluster that is still forming.
pub const CLUSTER_SETTLE_WAIT: Duration = Duration::from_secs(30);

fn is_transient(e: &ProvisionError) -> bool {
    match e {
        ProvisionError::Read { source, .. } => {
            matches!(source.kind(), GetStreamErrorKind::Request)
        }
        ProvisionError::Create { source, .. } => match source.kind() {
            CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
            CreateStreamErrorKind::JetStream(err) => {
                err.error_code() == ErrorCode::CLUSTER_NO_PEERS
            }
            _ => false,
        },
        _ => false,
    }
}

async fn try_find_or_create(
    js: &jetstream::Context,
    spec: &Spec,
) -> Result<stream::Stream, ProvisionError> {
    let name = &spec.config.name;
    // Bounded well below the context's timeout: a read sent through a
    // server that lost its routes goes unanswered, and another attempt
    // (through a server that answers) is quicker than waiting it out.
    let read = tokio::time::timeout(READ_TIMEOUT, js.get_stream(name))
        .await
        .unwrap_or_else(|_| {
            Err(jetstream::context::GetStreamError::with_source(
                GetStreamErrorKind::Request,
                format!("no answer within {READ_TIMEOUT:?}"),
            ))
        });
    match read {
        Ok(stream) => return Ok(stream),
        Err(e) if is_not_found(&e) => {}
        Err(source) => {
            return Err(ProvisionError::Read {
                object: object_name(spec),
                source,
            })
        }
    }
    match js.create_stream(spec.config.clone()).await {
        Ok(stream) => {
            tracing::info!("created {}", object_name(spec));
            Ok(stream)
        }
        Err(e) => {
            // Another node created it a moment ago with another config:
            // read it, and let the comparison say what differs.
            if let CreateStreamErrorKind::JetStream(err) = e.kind() {
                if err.error_code() == ErrorCode::STREAM_NAME_EXIST {
                    return js
                        .get_stream(name)
                        .await
                        .map_err(|source| ProvisionError::Read {
                            object: object_name(spec),
                            source,
                        });
                }
            }
            Err(ProvisionError::Create {
                object: object_name(spec),
                hint: create_hint(&e),
                source: e,
            })
        }
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn create_hint(e: &jetstream::context::CreateStreamError) -> &'static str {
    match e.kind() {
        CreateStreamErrorKind::JetStream(err)
            if err.error_code() == ErrorCode::INSUFFICIENT_RESOURCES
                || err.error_code() == ErrorCode::CLUSTER_NO_PEERS
                || err.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED =>
        {
            "; replicas = 3 needs a JetStream cluster of at least 3 servers with room for the stream (docs/SCALE-OUT.md §19 starts one)"
        }
        CreateStreamErrorKind::TimedOut => {
            "; the cluster did not answer in time: is a JetStream meta leader elected (a majority of the servers up)?"
        }
        _ => "",
    }
}

/// What in `found` Courier cannot run on, and which cluster-wide settings
/// differ from `spec`.
fn compare(spec: &Spec, found: &stream::Config) -> (Vec<Mismatch>, Vec<Difference>) {
    let want = &spec.config;
    let object = object_name(spec);
    let name = &want.name;
    let mut mismatches = Vec::new();
    let mut refuse = |setting: &'static str, found: String, needed: String, fix: String| {
        mismatches.push(Mismatch {
            object: object.clone(),
            setting,
            found,
            needed,
            fix,
        })
    };
    let recreate = format!(
        "this cannot be changed in place; remove it (`nats stream rm {name}`, its messages go with it) and start a node to create it anew"
    );
    if found.storage != StorageType::File {
        refuse(
            "storage",
            format!("{:?}", found.storage).to_lowercase(),
            "file".into(),
            recreate.clone(),
        );
    }
    if found.num_replicas < want.num_replicas {
        refuse(
            "num_replicas",
            found.num_replicas.to_string(),
            format!("at least {}", want.num_replicas),
            format!("`nats stream edit {name} --replicas {}`", want.num_replicas),
        );
    }
    let mut found_subjects = found.subjects.clone();
    found_subjects.sort();
    let mut want_subjects = want.subjects.clone();
    want_subjects.sort();
    if found_subjects != want_subjects {
        refuse(
            "subjects",
            format!("{found_subjects:?}"),
            format!("{want_subjects:?}"),
            format!(
                "`nats stream edit {name} --subjects '{}'`",
                want.subjects.join(",")
            ),
        );
    }
    if found.retention != want.retention {
        refuse(
            "retention",
            format!("{:?}", found.retention).to_lowercase(),
            format!("{:?}", want.retention).to_lowercase(),
            recreate.clone(),
        );
    }
    if found.discard != want.discard {
        refuse(
            "discard",
            format!("{:?}", found.discard).to_lowercase(),
            format!("{:?}", want.discard).to_lowercase(),
            format!(
                "`nats stream edit {name} --discard {}`",
                format!("{:?}", want.discard).to_lowercase()
            ),
        );
    }
    if found.max_messages != want.max_messages {
        refuse(
            "max_msgs",
            found.max_messages.to_string(),
            "no limit (-1)".into(),
            format!("`nats stream edit {name} --max-msgs=-1`"),
        );
    }
    if found.max_messages_per_subject != want.max_messages_per_subject {
        refuse(
            "max_msgs_per_subject",
            found.max_messages_per_subject.to_string(),
            want.max_messages_per_subject.to_string(),
            format!(
                "`nats stream edit {name} --max-msgs-per-subject={}`",
                want.max_messages_per_subject
            ),
        );
    }
    if found.max_age != want.max_age {
        refuse(
            "max_age",
            human(found.max_age),
            human(want.max_age),
            max_age_fix(spec),
        );
    }
    if want.allow_direct && !found.allow_direct {
        refuse(
            "allow_direct",
            "false".into(),
            "true".into(),
            format!("`nats stream edit {name} --allow-direct`"),
        );
    }
    if want.allow_message_ttl && !found.allow_message_ttl {
        refuse(
            "allow_msg_ttl",
            "false".into(),
            "true".into(),
            format!("`nats stream edit {name} --allow-msg-ttl`"),
        );
    }
    if want.allow_message_schedules && !found.allow_message_schedules {
        refuse(
            "allow_msg_schedules",
            "false".into(),
            "true".into(),
            format!("`nats stream edit {name} --allow-schedules`"),
        );
    }

    let mut differences = Vec::new();
    if spec.bucket.is_none() {
        let mut differ = |setting: &'static str, cluster: String, node: String| {
            if cluster != node {
                differences.push(Difference {
                    object: object.clone(),
                    setting,
                    cluster,
                    node,
                })
            }
        };
        differ(
            "duplicate_window",
            human(found.duplicate_window),
            human(want.duplicate_window),
        );
        differ(
            "max_bytes",
            found.max_bytes.to_string(),
            want.max_bytes.to_string(),
        );
        differ(
            "max_msg_size",
            found.max_message_size.to_string(),
            want.max_message_size.to_string(),
        );
    }
    (mismatches, differences)
}

/// JetStream refuses a duplicate window longer than the max age, and a
/// bucket's window is its max age when that is shorter than 2 minutes.
fn max_age_fix(spec: &Spec) -> String {
    let name = &spec.config.name;
    let max_age = spec.config.max_age;
    if spec.bucket.is_some() && !max_age.is_zero() {
        let window = max_age.min(Duration::from_secs(120));
        format!(
            "`nats stream edit {name} --max-age={} --dupe-window={}`",
            human(max_age),
            human(window)
        )
    } else {
        format!("`nats stream edit {name} --max-age={}`", human(max_age))
    }
}

/// `2m`, `10s`, `0s` (none), `1.5s`: how `nats stream edit` takes durations.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    fn spec_named(name: &str) -> Spec {
        specs(&Settings::default())
            .all()
            .find(|s| s.config.name == name)
            .unwrap()
            .clone()
    }

    #[test]
    fn every_object_is_replicated_on_file_storage() {
        let specs = specs(&Settings::default());
        let all: Vec<&Spec> = specs.all().collect();
        assert_eq!(all.len(), 10);
        for spec in &all {
            assert_eq!(spec.config.num_replicas, 3, "{}", spec.config.name);
            assert_eq!(spec.config.storage, StorageType::File);
        }
        // Subjects of distinct streams must not overlap (JetStream refuses).
        let subjects: Vec<_> = all.iter().flat_map(|s| s.config.subjects.clone()).collect();
        for (i, a) in subjects.iter().enumerate() {
            for b in &subjects[i + 1..] {
                let (a, b) = (a.trim_end_matches('>'), b.trim_end_matches('>'));
                assert!(!a.starts_with(b) && !b.starts_with(a), "{a}> overlaps {b}>");
            }
        }
    }

    #[test]
    fn an_equal_config_passes() {
        for spec in specs(&Settings::default()).all() {
            let (m, d) = compare(spec, &spec.config);
            assert!(
                m.is_empty() && d.is_empty(),
                "{}: {m:?} {d:?}",
                spec.config.name
            );
        }
    }

    #[test]
    fn more_replicas_pass_fewer_are_refused_with_the_fix() {
        let spec = spec_named(MESSAGES_STREAM);
        let mut found = spec.config.clone();
        found.num_replicas = 5;
        assert!(compare(&spec, &found).0.is_empty());
        found.num_replicas = 1;
        let (m, _) = compare(&spec, &found);
        assert_eq!(m.len(), 1);
        assert_eq!(
            m[0].to_string(),
            "stream COURIER_MSGS exists with num_replicas 1, Courier needs at least 3: `nats stream edit COURIER_MSGS --replicas 3`"
        );
    }

    #[test]
    fn weakening_settings_are_each_named() {
        let spec = spec_named(MESSAGES_STREAM);
        let mut found = spec.config.clone();
        found.storage = StorageType::Memory;
        found.discard = DiscardPolicy::New;
        found.max_age = Duration::from_secs(3600);
        found.allow_message_ttl = false;
        found.subjects = vec!["other.>".into()];
        let (m, _) = compare(&spec, &found);
        let settings: Vec<_> = m.iter().map(|m| m.setting).collect();
        assert_eq!(
            settings,
            ["storage", "subjects", "discard", "max_age", "allow_msg_ttl"]
        );
        assert!(m[0].fix.contains("nats stream rm COURIER_MSGS"), "{}", m[0]);
        assert!(m[3].fix.contains("--max-age=0s"), "{}", m[3]);
    }

    #[test]
    fn a_lease_bucket_with_another_max_age_is_refused() {
        let spec = spec_named("KV_courier_leases");
        let mut found = spec.config.clone();
        found.max_age = Duration::from_secs(60);
        let (m, _) = compare(&spec, &found);
        assert_eq!(
            m[0].to_string(),
            "KV bucket courier_leases (stream KV_courier_leases) exists with max_age 1m, Courier needs 10s: `nats stream edit KV_courier_leases --max-age=10s --dupe-window=10s`"
        );
    }

    #[test]
    fn cluster_wide_settings_differ_without_refusal() {
        let spec = spec_named(MESSAGES_STREAM);
        let mut found = spec.config.clone();
        found.duplicate_window = Duration::from_secs(300);
        found.max_bytes = 1 << 30;
        let (m, d) = compare(&spec, &found);
        assert!(m.is_empty());
        assert_eq!(
            d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "stream COURIER_MSGS has duplicate_window 5m where this node was given 2m; the cluster's value is used",
                "stream COURIER_MSGS has max_bytes 1073741824 where this node was given -1; the cluster's value is used",
            ]
        );
    }
}
