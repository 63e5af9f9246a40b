//! Leases and the node registry against a real three-server nats-server
//! cluster (tests/common), with short max ages so that expiry is seen in
//! seconds.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::time::Duration;

use common::{wait_for, NatsCluster, Sync};
use courier_cluster::lease::{
    self, Acquired, Holding, Lease, LeaseError, LeaseKeeper, LeaseTiming,
};
use courier_cluster::nodes::{self, NodeRecord};
use courier_cluster::{provision, NodeId, Provisioned, Settings};
use tokio::time::Instant;

const ALL_SYNC: [Sync; 3] = [Sync::Always, Sync::Always, Sync::Always];
const MAX_AGE: Duration = Duration::from_secs(3);
const TIMING: LeaseTiming = LeaseTiming {
    renew_every: Duration::from_secs(1),
    valid_for: Duration::from_secs(2),
};
/// JetStream removes an aged-out key within this much after its max age.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);

fn settings() -> Settings {
    Settings {
        lease_max_age: MAX_AGE,
        nodes_max_age: MAX_AGE,
        ..Settings::default()
    }
}

async fn node(cluster: &NatsCluster, name: &str) -> (NodeId, Provisioned) {
    let connection = cluster.connect(&format!("courier node {name}")).await;
    let provisioned = provision(&connection, &settings())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    (NodeId::new(name).unwrap(), provisioned)
}

fn gained(acquired: Acquired) -> Box<Lease> {
    match acquired {
        Acquired::Gained(lease) => lease,
        Acquired::HeldBy { node, .. } => panic!("expected to gain the lease, {node} holds it"),
    }
}

#[tokio::test]
async fn two_nodes_contend_and_a_holder_with_a_stale_revision_cannot_renew() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (a, on_a) = node(&cluster, "a").await;
    let (b, on_b) = node(&cluster, "b").await;
    let key = courier_cluster::names::keyed_lane_lease("todo");

    let mut held = gained(
        Lease::acquire(&on_a.leases, &key, &a, TIMING)
            .await
            .unwrap(),
    );
    match Lease::acquire(&on_b.leases, &key, &b, TIMING)
        .await
        .unwrap()
    {
        Acquired::HeldBy { node, revision } => {
            assert_eq!(node, "a");
            assert_eq!(revision, held.revision());
        }
        Acquired::Gained(_) => panic!("two holders of one lease"),
    }
    let before = held.revision();
    held.renew().await.unwrap();
    assert!(
        held.revision() > before,
        "a renewal moves the fencing token"
    );
    assert!(held.is_valid_at(Instant::now()));

    // Both race for a free lease: exactly one wins.
    let (x, y) = tokio::join!(
        Lease::acquire(&on_a.leases, "scheduler", &a, TIMING),
        Lease::acquire(&on_b.leases, "scheduler", &b, TIMING),
    );
    let winners = [x.unwrap(), y.unwrap()]
        .into_iter()
        .filter(|r| matches!(r, Acquired::Gained(_)))
        .count();
    assert_eq!(winners, 1);

    // Node a stops renewing (paused): its own clock stops it first, then
    // the key ages out and b takes the lease.
    wait_for(
        "the paused holder's key ages out",
        MAX_AGE + EXPIRY_SLACK,
        || async {
            lease::holder(&on_b.leases, &key)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let gone_at = Instant::now();
    assert!(
        held.valid_until() < gone_at,
        "the holder stopped before its key went"
    );
    assert!(!held.is_valid_at(gone_at));
    let mut taken = gained(
        Lease::acquire(&on_b.leases, &key, &b, TIMING)
            .await
            .unwrap(),
    );

    // a wakes with a stale revision: its renewal is refused.
    match held.renew().await {
        Err(LeaseError::Lost { now_held_by, .. }) => assert_eq!(now_held_by.as_deref(), Some("b")),
        other => panic!("a stale holder renewed: {other:?}"),
    }
    taken.renew().await.unwrap();

    // A clean release frees the lease at once.
    taken.release().await.unwrap();
    assert!(lease::holder(&on_a.leases, &key).await.unwrap().is_none());
    gained(
        Lease::acquire(&on_a.leases, &key, &a, TIMING)
            .await
            .unwrap(),
    );
}

#[tokio::test]
async fn a_renewed_lease_stays_and_one_not_renewed_goes_after_its_max_age() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (a, on_a) = node(&cluster, "a").await;
    let mut held = gained(
        Lease::acquire(&on_a.leases, "reclaimer", &a, TIMING)
            .await
            .unwrap(),
    );

    // Renewed on time for twice the max age: still a's, same tenure.
    let until = Instant::now() + MAX_AGE * 2;
    while Instant::now() < until {
        tokio::time::sleep_until(held.renew_at()).await;
        held.renew().await.unwrap();
        let (value, revision) = lease::holder(&on_a.leases, "reclaimer")
            .await
            .unwrap()
            .expect("a renewed lease stays");
        assert_eq!(&value, held.value());
        assert_eq!(revision, held.revision());
    }

    // Not renewed any more: gone after the max age, not before.
    let last_renewal_sent_at = held.valid_until() - TIMING.valid_for;
    wait_for("the lease ages out", MAX_AGE + EXPIRY_SLACK, || async {
        lease::holder(&on_a.leases, "reclaimer")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let gone_after = last_renewal_sent_at.elapsed();
    assert!(
        gone_after >= MAX_AGE,
        "gone {gone_after:?} after its last renewal"
    );
    assert!(!held.is_valid_at(Instant::now()));
    assert!(matches!(
        held.renew().await,
        Err(LeaseError::Lost {
            now_held_by: None,
            ..
        })
    ));
}

#[tokio::test]
async fn nodes_are_listed_while_they_run_and_go_when_they_stop() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (a, on_a) = node(&cluster, "a").await;
    let (b, on_b) = node(&cluster, "b").await;
    let record_a = NodeRecord::starting_now("127.0.0.1:7701".into(), Some("127.0.0.1:7781".into()));
    let record_b = NodeRecord::starting_now("127.0.0.1:7702".into(), None);
    let every = Duration::from_secs(1);
    let running_a = nodes::register(on_a.nodes.clone(), a.clone(), record_a.clone(), every)
        .await
        .unwrap();
    let running_b = nodes::register(on_b.nodes.clone(), b.clone(), record_b.clone(), every)
        .await
        .unwrap();

    let both = vec![
        ("a".to_string(), record_a.clone()),
        ("b".to_string(), record_b),
    ];
    assert_eq!(nodes::list_nodes(&on_a.nodes).await.unwrap(), both);
    // Kept for twice the bucket's max age by the puts.
    let until = Instant::now() + MAX_AGE * 2;
    while Instant::now() < until {
        assert_eq!(nodes::list_nodes(&on_b.nodes).await.unwrap(), both);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A clean stop removes the key at once.
    running_b.deregister().await.unwrap();
    assert_eq!(
        nodes::list_nodes(&on_a.nodes).await.unwrap(),
        [("a".to_string(), record_a)]
    );
    // A node that dies (no more puts) is gone after the max age.
    let died_at = Instant::now();
    drop(running_a);
    wait_for(
        "the dead node's key ages out",
        MAX_AGE + EXPIRY_SLACK,
        || async {
            nodes::list_nodes(&on_b.nodes)
                .await
                .unwrap()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(
        died_at.elapsed() + every >= MAX_AGE,
        "gone too early: {:?}",
        died_at.elapsed()
    );
}

#[tokio::test]
async fn a_kept_lease_is_renewed_on_time_and_its_loss_is_reported() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (a, on_a) = node(&cluster, "a").await;
    let (b, on_b) = node(&cluster, "b").await;
    let key = courier_cluster::names::keyed_lane_lease("todo");
    let keeper = LeaseKeeper::keep(*gained(
        Lease::acquire(&on_a.leases, &key, &a, TIMING)
            .await
            .unwrap(),
    ));
    let mut holding = keeper.watch();

    // Kept for twice the max age: valid throughout, renewed (the
    // revision moves), and nobody else gets it.
    let until = Instant::now() + MAX_AGE * 2;
    let first = match &*holding.borrow() {
        Holding::Held { revision, .. } => *revision,
        lost => panic!("{lost:?}"),
    };
    while Instant::now() < until {
        assert!(keeper.is_valid_at(Instant::now()));
        assert!(matches!(
            Lease::acquire(&on_b.leases, &key, &b, TIMING)
                .await
                .unwrap(),
            Acquired::HeldBy { .. }
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let renewed = match &*holding.borrow_and_update() {
        Holding::Held { revision, .. } => *revision,
        lost => panic!("{lost:?}"),
    };
    assert!(renewed > first, "renewed: revision {first} → {renewed}");
    // A watch taken just after a renewal wakes at the next one, not for
    // those before.
    holding.changed().await.unwrap();
    holding.borrow_and_update();
    let mut fresh = keeper.watch();
    let waited = Instant::now();
    fresh.changed().await.unwrap();
    assert!(
        // (Not at once; renewals' round trips vary, so not a whole period.)
        waited.elapsed() >= TIMING.renew_every / 5,
        "woke after {:?}, renewals every {:?}",
        waited.elapsed(),
        TIMING.renew_every
    );

    // Someone takes the key from under it (an operator deleting it, here):
    // the next renewal is refused and the loss reported.
    on_b.leases.delete(&key).await.unwrap();
    let taken = gained(
        Lease::acquire(&on_b.leases, &key, &b, TIMING)
            .await
            .unwrap(),
    );
    let lost = tokio::time::timeout(TIMING.renew_every * 3, async {
        loop {
            holding.changed().await.unwrap();
            if let Holding::Lost { now_held_by } = &*holding.borrow_and_update() {
                return now_held_by.clone();
            }
        }
    })
    .await
    .expect("the loss is reported within a renewal or two");
    assert_eq!(lost.as_deref(), Some("b"));
    assert!(!keeper.is_valid_at(Instant::now()));
    keeper.release().await.unwrap();
    assert_eq!(
        lease::holder(&on_a.leases, &key)
            .await
            .unwrap()
            .map(|(v, _)| v.node),
        Some("b".to_string()),
        "a lost lease's release deletes nothing"
    );

    // A kept lease released frees the key at once.
    let keeper = LeaseKeeper::keep(*taken);
    keeper.release().await.unwrap();
    assert!(lease::holder(&on_a.leases, &key).await.unwrap().is_none());
}
