//! Provisioning and the durability check against a real three-server
//! nats-server cluster (tests/common).
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::{wait_for, NatsCluster, Sync};
use courier_cluster::durability::{self, Durability, Finding};
use courier_cluster::{names, provision, ProvisionError, Settings};

const ALL_SYNC: [Sync; 3] = [Sync::Always, Sync::Always, Sync::Always];

fn all_streams() -> Vec<String> {
    let mut names = vec![
        names::MESSAGES_STREAM.to_string(),
        names::DEFERRED_STREAM.to_string(),
        names::DEAD_STREAM.to_string(),
        names::PARKED_STREAM.to_string(),
    ];
    for bucket in [
        names::SERVICES_BUCKET,
        names::INSTANCES_BUCKET,
        names::NODES_BUCKET,
        names::LEASES_BUCKET,
        names::ROUTES_BUCKET,
        names::REGISTRY_BUCKET,
    ] {
        names.push(format!("KV_{bucket}"));
    }
    names
}

#[tokio::test]
async fn every_object_gets_three_replicas_and_a_second_node_finds_them() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let a = cluster.connect("courier node a").await;
    let provisioned = provision(&a, &Settings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(provisioned.differences.is_empty());

    for name in all_streams() {
        let mut stream = a.jetstream.get_stream(&name).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{name}");
        assert_eq!(info.config.storage, stream::StorageType::File, "{name}");
        let placement = info.cluster.clone().expect("clustered");
        assert!(placement.leader.is_some(), "{name} has a leader");
        assert_eq!(
            placement.replicas.len(),
            2,
            "{name}: a leader and two followers"
        );
    }

    // A second node, on its own connection, finds them all equal.
    let b = cluster.connect("courier node b").await;
    let again = provision(&b, &Settings::default()).await.unwrap();
    assert!(again.differences.is_empty());
    let account = b.jetstream.query_account().await.unwrap();
    assert_eq!(
        account.streams as usize,
        all_streams().len(),
        "nothing created twice"
    );

    // Both nodes see one bucket: a write on one is read on the other.
    let revision = provisioned
        .services
        .put("todo", r#"{"patterns":{}}"#.into())
        .await
        .unwrap();
    let entry = again.services.entry("todo").await.unwrap().unwrap();
    assert_eq!(entry.revision, revision);

    // A node with another dedup window takes the cluster's and says so.
    let other = Settings {
        dedup_window: Duration::from_secs(300),
        ..Settings::default()
    };
    let taken = provision(&b, &other).await.unwrap();
    let said: Vec<String> = taken.differences.iter().map(ToString::to_string).collect();
    assert!(
        said.contains(&"stream COURIER_MSGS has duplicate_window 2m where this node was given 5m; the cluster's value is used".to_string()),
        "{said:?}"
    );
}

#[tokio::test]
async fn an_existing_object_with_a_weaker_config_is_refused_naming_the_fix() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let node = cluster.connect("courier node a").await;
    // Someone made the log with one replica, and the lease bucket with a
    // max age the lease timing does not fit.
    node.jetstream
        .create_stream(stream::Config {
            name: names::MESSAGES_STREAM.into(),
            subjects: vec![names::MESSAGES_SUBJECTS.into()],
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    node.jetstream
        .create_key_value(jetstream::kv::Config {
            bucket: names::LEASES_BUCKET.into(),
            max_age: Duration::from_secs(60),
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();

    let err = provision(&node, &Settings::default()).await.unwrap_err();
    let ProvisionError::Mismatch(found) = &err else {
        panic!("expected a mismatch, got {err}");
    };
    let text = err.to_string();
    assert!(
        text.contains("stream COURIER_MSGS exists with num_replicas 1, Courier needs at least 3: `nats stream edit COURIER_MSGS --replicas 3`"),
        "{text}"
    );
    assert!(
        text.contains("KV bucket courier_leases (stream KV_courier_leases) exists with max_age 1m, Courier needs 10s: `nats stream edit KV_courier_leases --max-age=10s --dupe-window=10s`"),
        "{text}"
    );
    // The log also lacks direct gets, per-message TTLs and schedules
    // (without a byte limit, `discard: old` is what Courier creates).
    let settings: Vec<(&str, &str)> = found
        .iter()
        .map(|m| (m.object.as_str(), m.setting))
        .collect();
    assert!(
        settings.contains(&("stream COURIER_MSGS", "allow_msg_schedules")),
        "{settings:?}"
    );
    assert!(
        settings.contains(&("stream COURIER_MSGS", "allow_direct")),
        "{settings:?}"
    );
    assert!(
        settings.contains(&("stream COURIER_MSGS", "allow_msg_ttl")),
        "{settings:?}"
    );
    assert!(settings.contains(&(
        "KV bucket courier_leases (stream KV_courier_leases)",
        "max_age"
    )));

    // The fixes it names make the next start succeed, messages kept.
    let ack = node
        .jetstream
        .publish("courier.m.e.kept", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut log = node
        .jetstream
        .get_stream(names::MESSAGES_STREAM)
        .await
        .unwrap();
    let mut config = log.info().await.unwrap().config.clone();
    config.num_replicas = 3;
    config.discard = stream::DiscardPolicy::Old;
    config.allow_direct = true;
    config.allow_message_ttl = true;
    config.allow_message_schedules = true;
    node.jetstream.update_stream(config).await.unwrap();
    let mut leases = node
        .jetstream
        .get_stream("KV_courier_leases")
        .await
        .unwrap();
    let mut config = leases.info().await.unwrap().config.clone();
    config.max_age = Duration::from_secs(10);
    config.duplicate_window = Duration::from_secs(10);
    node.jetstream.update_stream(config).await.unwrap();

    let provisioned = provision(&node, &Settings::default())
        .await
        .unwrap_or_else(|e| panic!("after the fixes: {e}"));
    let kept = provisioned
        .messages
        .get_raw_message(ack.sequence)
        .await
        .unwrap();
    assert_eq!(&kept.payload[..], b"kept");
}

#[tokio::test]
async fn the_durability_check_refuses_a_server_that_syncs_lazily_unless_accepted() {
    let cluster = NatsCluster::start([Sync::Always, Sync::Default, Sync::Always]).await;
    let system = cluster.system_client().await;

    let err = durability::check(Some(&system), false).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "refusing a backend weaker than single-node Courier (it acknowledges a send only after fsync):\n  \
         nats-server n2 syncs every 2m0s, not before acknowledging: set jetstream { sync_interval: always } on every server, or pass --accept-weaker-durability"
    );
    let accepted = durability::check(Some(&system), true).await.unwrap();
    assert_eq!(
        accepted,
        Durability::Weaker(vec![Finding::LazySync {
            server: "n2".into(),
            interval: Duration::from_secs(120)
        }])
    );

    // Without the system account the check cannot be made: refused too.
    let err = durability::check(None, false).await.unwrap_err();
    assert!(err.to_string().contains("--nats-system-user"), "{err}");
    // The account Courier's objects live in gets no answer on $SYS.
    let courier = cluster.connect("courier node a").await;
    let survey = durability::survey(&courier.client, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(durability::assess(&survey), [Finding::NoAnswer]);
}

#[tokio::test]
async fn the_durability_check_passes_a_cluster_syncing_always_and_names_a_dead_server() {
    let mut cluster = NatsCluster::start(ALL_SYNC).await;
    let system = cluster.system_client().await;
    assert_eq!(
        durability::check(Some(&system), false).await.unwrap(),
        Durability::AsSingleNode
    );
    // A server that is down cannot be vouched for.
    cluster.kill9(2);
    let system = cluster.system_client().await;
    let err = durability::check(Some(&system), false).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("nats-server n3 did not answer 4 pings of 2 s each"),
        "{err}"
    );
}

#[tokio::test]
async fn kill_9_of_the_log_leader_loses_nothing_acknowledged_and_dedup_holds() {
    let mut cluster = NatsCluster::start(ALL_SYNC).await;
    let setup = cluster.connect("courier node setup").await;
    let provisioned = provision(&setup, &Settings::default()).await.unwrap();
    let mut log = provisioned.messages.clone();
    let leader = log
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("the log has a leader");
    let victim = cluster.index_of(&leader);

    // The node's connection goes through the leader first, so the kill
    // takes both its server and the log's leader.
    let client = async_nats::ConnectOptions::with_user_and_password(
        common::COURIER_USER.into(),
        common::COURIER_PASSWORD.into(),
    )
    .retain_servers_order()
    .max_reconnects(None)
    .connect(
        [victim, (victim + 1) % 3, (victim + 2) % 3]
            .map(|i| cluster.url(i))
            .as_slice(),
    )
    .await
    .unwrap();
    assert_eq!(client.server_info().server_name, leader);
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(3));

    let publish = |id: &'static str, body: &'static str| {
        let js = js.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            js.publish_with_headers("courier.m.c.todo.create", headers, body.into())
                .await
                .ok()?
                .await
                .ok()
        }
    };
    let first = publish("id-before-the-kill", "before").await.unwrap();
    assert!(!first.duplicate);

    cluster.kill9(victim);

    // Publishing retries (same id) until a new leader acks: what the
    // node does with a send that failed `storage_failed` and was resent.
    let second = wait_for("a publish after the kill", Duration::from_secs(30), || {
        publish("id-after-the-kill", "after")
    })
    .await;
    assert_ne!(
        client.server_info().server_name,
        leader,
        "reconnected elsewhere"
    );
    let again = publish("id-after-the-kill", "after, resent").await.unwrap();
    assert!(again.duplicate, "a resend within the window is dropped");
    assert_eq!(again.sequence, second.sequence);
    let old = publish("id-before-the-kill", "before, resent")
        .await
        .unwrap();
    assert!(old.duplicate && old.sequence == first.sequence);

    let survivors = jetstream::new(client.clone());
    let log = survivors.get_stream(names::MESSAGES_STREAM).await.unwrap();
    let info = log.get_info().await.unwrap();
    assert_eq!(info.state.messages, 2, "both acknowledged, neither twice");
    let new_leader = info.cluster.and_then(|c| c.leader).expect("a new leader");
    assert_ne!(new_leader, leader);
    assert_eq!(
        &log.get_raw_message(first.sequence).await.unwrap().payload[..],
        b"before"
    );
    assert_eq!(
        &log.get_raw_message(second.sequence).await.unwrap().payload[..],
        b"after"
    );

    // The killed server comes back and provisioning still agrees.
    cluster.restart(victim).await;
    let restarted = cluster.connect("courier node restarted").await;
    let found = provision(&restarted, &Settings::default()).await.unwrap();
    assert!(found.differences.is_empty());
}
