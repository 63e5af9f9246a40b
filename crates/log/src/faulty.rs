//! A [`FileSystem`] wrapper that makes the disk fail on command and
//! simulates a machine crash, for tests of the log's recovery rules.
//!
//! The crash model: a file's bytes are durable up to the size it had at its
//! last successful `sync_data`; on [`FaultyFs::crash`] every file keeps its
//! durable bytes plus a random-length prefix of the rest (a torn write), and
//! a file created since the last successful `sync_dir` of its directory
//! disappears. Simplifications, each on the side of the real OS being
//! kinder or equal for the log's purposes: shrinking a file (`set_len`) and
//! `rename`/`remove_file` are durable at once.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fs::{FileSystem, LogFile, OpenMode};

/// Which operation an injected fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `LogFile::append`; a failing write first writes a random-length
    /// prefix of its buffer, as a real disk filling up does.
    Write,
    /// `LogFile::sync_data` and `FileSystem::sync_dir`.
    Sync,
    /// `LogFile::set_len`.
    Truncate,
}

/// The error an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// ENOSPC: no space left on the device.
    NoSpace,
    /// EIO: an input/output error.
    Io,
}

impl Fault {
    fn error(self) -> io::Error {
        match self {
            Fault::NoSpace => io::Error::new(
                io::ErrorKind::StorageFull,
                "injected fault: no space left on device (ENOSPC)",
            ),
            Fault::Io => io::Error::other("injected fault: input/output error (EIO)"),
        }
    }
}

/// Operations seen so far (attempts, including failed ones), and bytes read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub writes: u64,
    pub syncs: u64,
    pub truncates: u64,
    pub bytes_read: u64,
}

#[derive(Debug)]
struct Rule {
    op: FaultOp,
    /// The operation count (of `op`) from which the rule fires.
    from: u64,
    /// Fires once, or on every operation from `from` until cleared.
    persistent: bool,
    fault: Fault,
}

#[derive(Debug)]
struct Tracked {
    /// Size at the last successful `sync_data` (or as found).
    synced_len: u64,
    /// Created since the last successful `sync_dir` of its directory.
    created_unsynced: bool,
}

#[derive(Debug)]
struct State {
    rng: u64,
    counts: FaultCounts,
    rules: Vec<Rule>,
    files: HashMap<PathBuf, Tracked>,
}

impl State {
    /// xorshift64*: deterministic per seed, good enough to pick tear points.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Counts one `op` and returns the fault to inject for it, if any.
    fn check(&mut self, op: FaultOp) -> Option<Fault> {
        let count = match op {
            FaultOp::Write => &mut self.counts.writes,
            FaultOp::Sync => &mut self.counts.syncs,
            FaultOp::Truncate => &mut self.counts.truncates,
        };
        *count += 1;
        let now = *count;
        let hit = self.rules.iter().position(|rule| {
            rule.op == op && (now == rule.from || (rule.persistent && now >= rule.from))
        })?;
        let fault = self.rules[hit].fault;
        if !self.rules[hit].persistent {
            self.rules.remove(hit);
        }
        Some(fault)
    }

    fn count_of(&self, op: FaultOp) -> u64 {
        match op {
            FaultOp::Write => self.counts.writes,
            FaultOp::Sync => self.counts.syncs,
            FaultOp::Truncate => self.counts.truncates,
        }
    }
}

/// Wraps a [`FileSystem`] (normally [`crate::RealFs`] on a temporary
/// directory), injects ENOSPC or EIO into chosen writes, syncs and
/// truncations, and simulates crashes. Seeded, so a failing test replays.
#[derive(Debug, Clone)]
pub struct FaultyFs {
    inner: Arc<dyn FileSystem>,
    state: Arc<Mutex<State>>,
}

impl FaultyFs {
    pub fn new(inner: Arc<dyn FileSystem>, seed: u64) -> FaultyFs {
        FaultyFs {
            inner,
            state: Arc::new(Mutex::new(State {
                // xorshift must not start at 0.
                rng: seed | 1,
                counts: FaultCounts::default(),
                rules: Vec::new(),
                files: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The `n`-th next `op` (1 = the very next one) fails once with `fault`.
    pub fn fail_nth(&self, op: FaultOp, n: u64, fault: Fault) {
        let mut state = self.lock();
        let from = state.count_of(op) + n.max(1);
        state.rules.push(Rule {
            op,
            from,
            persistent: false,
            fault,
        });
    }

    /// Every `op` from the `n`-th next one on fails with `fault` until
    /// [`FaultyFs::clear_faults`].
    pub fn fail_from(&self, op: FaultOp, n: u64, fault: Fault) {
        let mut state = self.lock();
        let from = state.count_of(op) + n.max(1);
        state.rules.push(Rule {
            op,
            from,
            persistent: true,
            fault,
        });
    }

    /// Removes every pending fault: the disk has space and works again.
    pub fn clear_faults(&self) {
        self.lock().rules.clear();
    }

    /// Faults armed and not yet fired (a persistent one counts until
    /// cleared).
    pub fn pending_faults(&self) -> usize {
        self.lock().rules.len()
    }

    pub fn counts(&self) -> FaultCounts {
        self.lock().counts
    }

    /// Simulates a machine crash and restart: every file keeps the bytes it
    /// had at its last successful sync plus a random-length prefix of the
    /// bytes written after it; files created since their directory's last
    /// sync vanish. Drop every `Log` using this file system first (or at
    /// least never use one again): their view of the files is stale.
    pub fn crash(&self) -> io::Result<()> {
        let mut state = self.lock();
        let mut paths: Vec<PathBuf> = state.files.keys().cloned().collect();
        // HashMap order is random per process; sort so a seed replays.
        paths.sort();
        for path in paths {
            let Some(tracked) = state.files.get(&path) else {
                continue;
            };
            if tracked.created_unsynced {
                match self.inner.remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                state.files.remove(&path);
                continue;
            }
            let synced_len = tracked.synced_len;
            let mut file = match self.inner.open(&path, OpenMode::Append) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    state.files.remove(&path);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let len = file.size()?;
            let kept = if len > synced_len {
                let unsynced = len - synced_len;
                let keep = state.next_random() % (unsynced + 1);
                file.set_len(synced_len + keep)?;
                synced_len + keep
            } else {
                len
            };
            if let Some(tracked) = state.files.get_mut(&path) {
                tracked.synced_len = kept;
            }
        }
        Ok(())
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the state from the others.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FileSystem for FaultyFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn LogFile>> {
        let existed = match mode {
            OpenMode::Create => self.inner.open(path, OpenMode::Read).is_ok(),
            OpenMode::Read | OpenMode::Append => true,
        };
        let inner = self.inner.open(path, mode)?;
        let mut state = self.lock();
        match mode {
            OpenMode::Read => {}
            OpenMode::Append => {
                if !state.files.contains_key(path) {
                    // A file the test did not see written: what is there now
                    // survives a crash.
                    let synced_len = inner.size()?;
                    state.files.insert(
                        path.to_path_buf(),
                        Tracked {
                            synced_len,
                            created_unsynced: false,
                        },
                    );
                }
            }
            OpenMode::Create => {
                let created_unsynced = !existed
                    || state
                        .files
                        .get(path)
                        .is_some_and(|tracked| tracked.created_unsynced);
                state.files.insert(
                    path.to_path_buf(),
                    Tracked {
                        synced_len: 0,
                        created_unsynced,
                    },
                );
            }
        }
        Ok(Box::new(FaultyFile {
            inner,
            path: path.to_path_buf(),
            state: Arc::clone(&self.state),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)?;
        let mut state = self.lock();
        if let Some(mut tracked) = state.files.remove(from) {
            tracked.created_unsynced = false;
            state.files.insert(to.to_path_buf(), tracked);
        } else {
            state.files.remove(to);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)?;
        self.lock().files.remove(path);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        if let Some(fault) = self.lock().check(FaultOp::Sync) {
            return Err(fault.error());
        }
        self.inner.sync_dir(path)?;
        let mut state = self.lock();
        for (file, tracked) in state.files.iter_mut() {
            if file.parent() == Some(path) {
                tracked.created_unsynced = false;
            }
        }
        Ok(())
    }
}

struct FaultyFile {
    inner: Box<dyn LogFile>,
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

impl LogFile for FaultyFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read_at(offset, buf)?;
        lock(&self.state).counts.bytes_read += n as u64;
        Ok(n)
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let injected = {
            let mut state = lock(&self.state);
            state
                .check(FaultOp::Write)
                .map(|fault| (fault, state.next_random()))
        };
        if let Some((fault, random)) = injected {
            let written = usize::try_from(random % (buf.len() as u64 + 1)).unwrap_or(0);
            self.inner.append(&buf[..written])?;
            return Err(fault.error());
        }
        self.inner.append(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        if let Some(fault) = lock(&self.state).check(FaultOp::Sync) {
            return Err(fault.error());
        }
        self.inner.sync_data()?;
        let len = self.inner.size()?;
        if let Some(tracked) = lock(&self.state).files.get_mut(&self.path) {
            tracked.synced_len = len;
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if let Some(fault) = lock(&self.state).check(FaultOp::Truncate) {
            return Err(fault.error());
        }
        self.inner.set_len(len)?;
        if let Some(tracked) = lock(&self.state).files.get_mut(&self.path) {
            tracked.synced_len = tracked.synced_len.min(len);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn try_clone(&self) -> io::Result<Box<dyn LogFile>> {
        Ok(Box::new(FaultyFile {
            inner: self.inner.try_clone()?,
            path: self.path.clone(),
            state: Arc::clone(&self.state),
        }))
    }
}
