//! `courier up --watch`: notices when a service's files change, by
//! polling their modification times (no inotify limits to run into, and
//! the same on every file system), so the service can be rebuilt and
//! restarted.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);
/// Directories never watched: build output, VCS data, courier up's state.
const SKIPPED: [&str; 5] = ["target", ".git", ".courier", "node_modules", "__pycache__"];
/// Most files looked at per service; a larger tree is watched in part.
const FILES_MAX: usize = 100_000;

/// A digest of the paths, sizes and modification times of every file
/// under `roots`: it changes when a file is added, removed or written.
pub fn fingerprint(roots: &[PathBuf]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut files = 0;
    for root in roots {
        walk(root, &mut hasher, &mut files);
    }
    hasher.finish()
}

fn walk(path: &Path, hasher: &mut impl std::hash::Hasher, files: &mut usize) {
    if *files >= FILES_MAX {
        return;
    }
    let Ok(meta) = std::fs::metadata(path) else {
        // Gone (or not yet there): that is a state too.
        path.hash(hasher);
        return;
    };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut children: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| !SKIPPED.iter().any(|s| e.file_name() == *s))
            .map(|e| e.path())
            .collect();
        children.sort();
        for child in children {
            walk(&child, hasher, files);
        }
    } else {
        *files += 1;
        path.hash(hasher);
        meta.len().hash(hasher);
        meta.modified().ok().hash(hasher);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_or_written_file_changes_the_fingerprint_and_skipped_dirs_do_not() {
        let dir = std::env::temp_dir().join(format!("courier-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).expect("mkdir");
        std::fs::create_dir_all(dir.join("target")).expect("mkdir");
        let roots = [dir.clone()];
        let empty = fingerprint(&roots);
        std::fs::write(dir.join("src/main.rs"), "fn main() {}").expect("write");
        let one = fingerprint(&roots);
        assert_ne!(empty, one);
        assert_eq!(one, fingerprint(&roots), "stable while nothing changes");
        std::fs::write(dir.join("target/out"), "built").expect("write");
        assert_eq!(one, fingerprint(&roots), "build output is not watched");
        std::fs::write(dir.join("src/main.rs"), "fn main() { run() }").expect("write");
        assert_ne!(one, fingerprint(&roots), "a written file (longer) is seen");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
