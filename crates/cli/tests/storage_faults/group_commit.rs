//! The group-commit path: acknowledgements wait for the fsync outside the broker.

use super::*;

/// The group-commit path of `courier serve`: the fsync runs outside the
/// broker (`start_sync`, `run`, `finish_sync`), sends of other connections
/// go on meanwhile, and no acknowledgement or delivery leaves before the
/// fsync that makes its record durable returned — counted on the disk
/// itself. A failing fsync refuses every send waiting for it.
#[test]
fn acknowledgements_wait_for_the_fsync_that_runs_outside_the_broker() {
    let disk = Disk::new(31);
    let (mut node, _) = disk.start(START);
    node.connect(WEB, "web", 0);
    node.connect(WORK, "work", 0);
    node.subscribe(WORK, "job.>");
    node.take();
    node.send(WEB, 1, command("first"));
    assert!(node.take_ready().is_empty(), "nothing before the fsync");
    let syncs = disk.fs.counts().syncs;
    let mut job = node.broker.start_sync().expect("an fsync to run");
    node.connect(AUDIT, "web", 0);
    node.send(AUDIT, 1, command("second"));
    assert!(node.take_ready().is_empty(), "begun is not durable");
    assert_eq!(disk.fs.counts().syncs, syncs, "no fsync ran yet");
    let result = job.run();
    assert_eq!(disk.fs.counts().syncs, syncs + 1);
    node.broker.finish_sync(job, result);
    let actions = node.take_ready();
    let codes: Vec<(u64, ErrorCode)> = results(&actions).into_iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        codes,
        vec![(1, ErrorCode::Ok)],
        "only what the fsync covered"
    );
    assert_eq!(payloads_to(&actions, WORK), vec!["first"]);

    // The next fsync fails: the send waiting for it is refused, never
    // delivered, and the broker says why.
    let mut job = node.broker.start_sync().expect("an fsync to run");
    disk.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    let result = job.run();
    assert!(result.is_err());
    node.broker.finish_sync(job, result);
    let actions = node.take_ready();
    let refused: Vec<(u64, ErrorCode)> =
        results(&actions).into_iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(refused, vec![(1, ErrorCode::StorageFailed)]);
    // The state was rebuilt from the log: what was in flight is delivered
    // again, what was refused never.
    assert_eq!(payloads_to(&actions, WORK), vec!["first"], "{actions:?}");
    assert!(
        node.alerts
            .iter()
            .any(|a| a.contains("storage sync failed")),
        "{:?}",
        node.alerts
    );
    // Acknowledged survives a crash; the refused one is not there.
    disk.crash(node);
    let (mut node, _) = disk.start(START + 1_000 * MS);
    node.connect(WORK, "work", 0);
    node.subscribe(WORK, "job.>");
    let actions = node.take();
    assert_eq!(payloads_to(&actions, WORK), vec!["first"]);
}
