//! The service registry's bucket against a real three-server nats-server
//! cluster (tests/common): entries written and watched, bus entries of
//! gone nodes removed, and the markers removals leave purged.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::{NatsCluster, Sync};
use courier_cluster::service_registry::{self, entry_key};
use courier_cluster::{provision, NodeId, Settings};
use futures_util::{StreamExt as _, TryStreamExt as _};

const ALL_SYNC: [Sync; 3] = [Sync::Always, Sync::Always, Sync::Always];

#[tokio::test]
async fn entries_are_watched_gone_nodes_leave_and_old_removals_are_purged() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let connection = cluster.connect("courier registry test").await;
    let provisioned = provision(&connection, &Settings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let store = &provisioned.registry;
    let (alive, dead) = (NodeId::new("alive").unwrap(), NodeId::new("dead").unwrap());
    let registered = entry_key("db", "db-1", None);
    let on_alive = entry_key("todo", "todo-1", Some(&alive));
    let on_dead = entry_key("todo", "todo.2", Some(&dead));
    let removed_before = entry_key("db", "db-0", None);
    for key in [&removed_before, &registered, &on_alive, &on_dead] {
        service_registry::write(store, key, Some(Bytes::from(key.clone())))
            .await
            .unwrap();
    }
    service_registry::write(store, &removed_before, None)
        .await
        .unwrap();

    // A watch starts with every key's last entry, names parsed from the
    // keys: a removal made before it started is one too.
    let mut watch = Box::pin(service_registry::watch(&connection).await.unwrap());
    let mut seen = BTreeMap::new();
    while seen.len() < 4 {
        let (name, record) = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch gives every entry")
            .unwrap()
            .unwrap();
        seen.insert((name.service, name.id, name.node), record);
    }
    assert_eq!(
        seen.get(&("db".to_string(), "db-0".to_string(), None)),
        Some(&None),
        "the removal before the watch"
    );
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec![
            ("db".to_string(), "db-0".to_string(), None),
            ("db".to_string(), "db-1".to_string(), None),
            (
                "todo".to_string(),
                "todo-1".to_string(),
                Some("alive".to_string())
            ),
            (
                "todo".to_string(),
                "todo.2".to_string(),
                Some("dead".to_string())
            ),
        ]
    );

    // Only the dead node's bus entry goes; the watch sees it go.
    let removed = service_registry::remove_entries_of_gone_nodes(store, &["alive".to_string()])
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let (name, record) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch sees the removal")
        .unwrap()
        .unwrap();
    assert_eq!((name.id.as_str(), record), ("todo.2", None));

    // A removal, and a removal put back: only the first leaves a marker
    // to purge, and the value put back stays.
    service_registry::write(store, &registered, None)
        .await
        .unwrap();
    service_registry::write(store, &on_alive, None)
        .await
        .unwrap();
    service_registry::write(store, &on_alive, Some(Bytes::from_static(b"back")))
        .await
        .unwrap();
    let subjects = || async {
        let filter = format!("{}>", store.prefix);
        let subjects: Vec<String> = store
            .stream
            .info_with_subjects(&filter)
            .await
            .unwrap()
            .map_ok(|(subject, _)| subject)
            .try_collect()
            .await
            .unwrap();
        subjects.len()
    };
    assert_eq!(subjects().await, 4, "three markers and a value");
    let kept = service_registry::purge_old_removals(store, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(kept, 0, "markers younger than the age are kept");
    let purged = service_registry::purge_old_removals(store, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(purged, 3);
    assert_eq!(subjects().await, 1);
    assert_eq!(
        store.get(&on_alive).await.unwrap(),
        Some(Bytes::from_static(b"back"))
    );
}
