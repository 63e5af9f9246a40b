//! Segment rolls whose seal (the sealed segment's fdatasync, its index
//! file, the directory fsync) runs after the roll, with the next sync:
//! appends go on while it runs, no record past the roll is durable before
//! it finished, a failure undoes what it must, and a crash at any point of
//! it loses no acknowledged record.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{append_n, expected_record, Env};
use courier_log::{Damage, Fault, FaultOp, FileSystem, Log, LogFile, OpenMode};

/// Records of 40 body bytes: 15 fill a 1 KiB segment, the 16th rolls.
const PER_SEGMENT: u64 = 15;

fn first_index(env: &Env) -> PathBuf {
    env.segments_dir().join("00000000000000000001.idx")
}

/// Holds the first fdatasync of one file until released, and says when
/// it began.
#[derive(Debug)]
struct Hold {
    path: PathBuf,
    began: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Hold {
    fn wait_if_held(&self, path: &Path) {
        if path != self.path {
            return;
        }
        let Some(began) = self.began.lock().expect("hold").take() else {
            return;
        };
        began.send(()).expect("the test waits for it");
        if let Some(release) = self.release.lock().expect("hold").take() {
            release.recv().expect("released");
        }
    }
}

#[derive(Debug)]
struct HoldFs {
    inner: Arc<dyn FileSystem>,
    hold: Arc<Hold>,
}

struct HoldFile {
    inner: Box<dyn LogFile>,
    path: PathBuf,
    hold: Arc<Hold>,
}

impl FileSystem for HoldFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn LogFile>> {
        Ok(Box::new(HoldFile {
            inner: self.inner.open(path, mode)?,
            path: path.to_path_buf(),
            hold: Arc::clone(&self.hold),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
}

impl LogFile for HoldFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_at(offset, buf)
    }
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.append(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.hold.wait_if_held(&self.path);
        self.inner.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn try_clone(&self) -> io::Result<Box<dyn LogFile>> {
        Ok(Box::new(HoldFile {
            inner: self.inner.try_clone()?,
            path: self.path.clone(),
            hold: Arc::clone(&self.hold),
        }))
    }
}

#[test]
fn a_roll_does_no_fsync_and_appends_go_on_while_its_seal_is_held() {
    let env = Env::small(21);
    let (began_tx, began_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let hold = Arc::new(Hold {
        path: env.segments_dir().join("00000000000000000001.log"),
        began: Mutex::new(Some(began_tx)),
        release: Mutex::new(Some(release_rx)),
    });
    let fs = Arc::new(HoldFs {
        inner: Arc::new(env.fs.clone()),
        hold,
    });
    let (mut log, damage) = Log::open_with(env.config.clone(), fs).expect("open");
    assert!(damage.is_empty(), "{damage:?}");
    append_n(&mut log, PER_SEGMENT as usize, 40);
    let syncs_before = env.fs.counts().syncs;
    append_n(&mut log, 1, 40);
    assert_eq!(log.segments().len(), 2, "record 16 rolled the segment");
    assert_eq!(
        env.fs.counts().syncs,
        syncs_before,
        "the roll fsyncs nothing"
    );
    assert!(!first_index(&env).exists(), "the index waits for the seal");

    // The commit thread's job: the seal, then the new segment's fsync.
    let mut job = log.begin_sync().expect("begin").expect("a seal to run");
    assert_eq!(job.covers(), 17);
    let runner = thread::spawn(move || {
        let result = job.run();
        (job, result)
    });
    began_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the seal's fdatasync began");
    // The seal's fdatasync is held open: the log's owner appends to the
    // new segment and reads, and nothing it does waits for the disk.
    let syncs_held = env.fs.counts().syncs;
    append_n(&mut log, 10, 40);
    for seq in 1..=26 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    assert_eq!(env.fs.counts().syncs, syncs_held);
    assert!(!first_index(&env).exists());
    release_tx.send(()).expect("release");
    let (job, result) = runner.join().expect("the job's thread");
    log.finish_sync(job, result).expect("finish");
    assert!(first_index(&env).exists(), "sealed");
    // The next sync of the new segment covers what was appended meanwhile.
    log.sync().expect("sync");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 27);
    assert_eq!(log.verify().expect("verify"), 26);
}

#[test]
fn no_record_past_a_roll_is_durable_before_its_seal_finished() {
    let env = Env::small(22);
    let mut log = env.open_clean();
    append_n(&mut log, PER_SEGMENT as usize + 3, 40);
    let job = log.begin_sync().expect("begin").expect("a seal to run");
    assert_eq!(job.covers(), 19);
    // Finishing a job that never ran claims nothing: its seal is still to
    // run, and the next sync runs it.
    assert!(log.finish_sync(job, Ok(())).is_err());
    assert!(!first_index(&env).exists());
    let syncs_before = env.fs.counts().syncs;
    log.sync().expect("sync");
    assert_eq!(
        env.fs.counts().syncs - syncs_before,
        4,
        "the segment, its index, the directory, the new segment"
    );
    assert!(first_index(&env).exists());
}

#[test]
fn a_failed_fsync_of_a_segment_rolled_away_from_undoes_the_roll() {
    let env = Env::small(23);
    let mut log = env.open_clean();
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    append_n(&mut log, 3, 40);
    // An fsync of segment 1 runs outside the log and fails; the log hears
    // of it only after records 14..=18 rolled the segment.
    let mut job = log.begin_sync().expect("begin").expect("an fsync");
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    let result = job.run();
    assert!(result.is_err());
    append_n(&mut log, 5, 40);
    assert_eq!(log.segments().len(), 2);
    assert!(log.finish_sync(job, result).is_err());
    assert_eq!(log.next_seq(), 11, "back to the last successful fsync");
    assert_eq!(log.segments().len(), 1, "the roll is undone");
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), 20);
}

/// Where the disk stops: every operation of that kind from the n-th on
/// fails, as if the machine had died there, and then it crashes.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// Before the seal runs at all.
    BeforeTheSeal,
    At(FaultOp, u64),
}

/// Ten records durable, five not, the roll, three in the new segment;
/// then the next sync runs into `stop`, and the machine crashes. If
/// `entry_durable`, the new segment's records were written and its
/// directory entry made durable by something else (a checkpoint's
/// removal, the file system's own journal) before the seal ran.
fn crash_during_a_seal(seed: u64, stop: Stop, entry_durable: bool) {
    let env = Env::small(seed);
    let mut log = env.open_clean();
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    append_n(&mut log, 8, 40);
    assert_eq!(log.segments().len(), 2);
    if entry_durable {
        drop(log.begin_sync().expect("write the buffer"));
        env.fs.sync_dir(&env.segments_dir()).expect("fsync dir");
    }
    let acknowledged = match stop {
        Stop::BeforeTheSeal => 11,
        Stop::At(op, nth) => {
            env.fs.fail_from(op, nth, Fault::Io);
            match log.sync() {
                Ok(()) => 19,
                Err(_) => 11,
            }
        }
    };
    drop(log);
    env.fs.crash().expect("crash");
    env.fs.clear_faults();
    let context = format!("seed {seed}, {stop:?}, entry durable: {entry_durable}");
    let (mut log, damage) = env.open();
    for d in &damage {
        assert!(matches!(d, Damage::TornTail { .. }), "{context}: {d}");
    }
    let next = log.next_seq();
    assert!(
        (acknowledged..=19).contains(&next),
        "{context}: the log goes on at {next}"
    );
    for seq in 1..next {
        assert_eq!(
            log.read(seq).expect("read"),
            Some(expected_record(seq, 40)),
            "{context}"
        );
    }
    append_n(&mut log, 20, 40);
    log.sync().expect("sync");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), next + 19, "{context}");
}

#[test]
fn a_crash_at_any_point_of_a_seal_keeps_every_acknowledged_record() {
    // The seal's operations, in order: the segment's fdatasync (sync 1),
    // the index written (write 2, after the new segment's records, write
    // 1) and fsynced (sync 2), renamed, the directory fsynced (sync 3);
    // then the new segment's fdatasync (sync 4).
    let stops = [
        Stop::BeforeTheSeal,
        Stop::At(FaultOp::Sync, 1),
        Stop::At(FaultOp::Write, 1),
        Stop::At(FaultOp::Write, 2),
        Stop::At(FaultOp::Sync, 2),
        Stop::At(FaultOp::Sync, 3),
        Stop::At(FaultOp::Sync, 4),
        Stop::At(FaultOp::Sync, 5),
    ];
    for seed in 0..8 {
        for stop in stops {
            for entry_durable in [false, true] {
                crash_during_a_seal(seed, stop, entry_durable);
            }
        }
    }
}

#[test]
fn open_finishes_a_seal_that_a_crash_interrupted_after_the_segment_was_whole() {
    let env = Env::small(24);
    let mut log = env.open_clean();
    append_n(&mut log, 18, 40);
    // Written to the OS, never fsynced, the seal never run: a process
    // that dies here leaves the page cache, and so whole files.
    drop(log.begin_sync().expect("write the buffer"));
    drop(log);
    let mut log = env.open_clean();
    assert!(first_index(&env).exists(), "open ran the seal");
    assert_eq!(log.next_seq(), 19);
    append_n(&mut log, 1, 40);
    log.sync().expect("sync");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), 19);
}
