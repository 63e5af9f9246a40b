//! What `courier up` keeps beside the application's `courier.toml`, in
//! `.courier/`: the lock that makes one `courier up` per directory, the
//! generated tokens (never printed), the manifest the broker is started
//! with (the application's, with those tokens' hashes added), and the
//! broker's data.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use courier_manifest::{generate_token, hash_token, Manifest};

/// The key of the admin token in `tokens.toml` (no service may be named so).
const ADMIN_KEY: &str = "admin";

/// `.courier/` of the application in `dir`.
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn open(app_dir: &Path) -> anyhow::Result<StateDir> {
        let path = app_dir.join(".courier");
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "cannot create {}; is the directory writable?",
                path.display()
            )
        })?;
        Ok(StateDir(path))
    }

    pub fn tokens_path(&self) -> PathBuf {
        self.0.join("tokens.toml")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.0.join("up.pid")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.0.join("data")
    }

    /// The token of every service and of the admin role, generated once and
    /// kept in `tokens.toml` (readable by the owner only).
    pub fn tokens(&self, manifest: &Manifest) -> anyhow::Result<BTreeMap<String, String>> {
        let path = self.tokens_path();
        let mut tokens: BTreeMap<String, String> = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| {
                format!(
                    "{} is damaged; delete it and new tokens are made",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let wanted = manifest
            .services()
            .keys()
            .map(String::as_str)
            .chain([ADMIN_KEY]);
        let mut changed = false;
        for name in wanted {
            if !tokens.contains_key(name) {
                tokens.insert(name.to_string(), generate_token()?);
                changed = true;
            }
        }
        if changed {
            let mut text = String::from(
                "# Tokens courier up made for this application's services; keep them secret.\n",
            );
            for (name, token) in &tokens {
                let _ = writeln!(text, "{} = {}", quote(name), quote(token));
            }
            write_private(&path, text.as_bytes())?;
        }
        Ok(tokens)
    }

    /// The manifest the broker runs with: the application's rules and
    /// credentials, plus each generated token's hash.
    pub fn write_manifest(
        &self,
        manifest: &Manifest,
        tokens: &BTreeMap<String, String>,
    ) -> anyhow::Result<PathBuf> {
        let mut text = String::from(
            "# Written by courier up from the application's courier.toml and the tokens in\n# tokens.toml; edit courier.toml instead.\n",
        );
        for (name, spec) in manifest.services() {
            let _ = writeln!(text, "\n[services.{}]", quote(name));
            let list = |items: Vec<String>| {
                let quoted: Vec<String> = items.iter().map(|i| quote(i)).collect();
                format!("[{}]", quoted.join(", "))
            };
            let rules = |rules: &[courier_manifest::NameRule]| {
                list(rules.iter().map(ToString::to_string).collect())
            };
            let _ = writeln!(text, "sends = {}", rules(&spec.sends));
            let _ = writeln!(text, "publishes = {}", rules(&spec.publishes));
            let _ = writeln!(text, "receives = {}", rules(&spec.receives));
            let mut hashes: Vec<String> = spec.tokens.iter().map(ToString::to_string).collect();
            hashes.extend(tokens.get(name).map(|t| hash_token(t)));
            let _ = writeln!(text, "tokens = {}", list(hashes));
            let _ = writeln!(text, "certificates = {}", list(spec.certificates.clone()));
        }
        let admin = manifest.admin();
        let mut hashes: Vec<String> = admin.tokens.iter().map(ToString::to_string).collect();
        hashes.extend(tokens.get(ADMIN_KEY).map(|t| hash_token(t)));
        let quoted: Vec<String> = hashes.iter().map(|h| quote(h)).collect();
        let _ = writeln!(text, "\n[admin]\ntokens = [{}]", quoted.join(", "));
        let certs: Vec<String> = admin.certificates.iter().map(|c| quote(c)).collect();
        let _ = writeln!(text, "certificates = [{}]", certs.join(", "));
        // Checked as the broker will read it, before the broker does.
        Manifest::parse(&text).map_err(|e| {
            anyhow::anyhow!("internal: the manifest written for the broker is refused: {e}")
        })?;
        let path = self.0.join("manifest.toml");
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }
}

impl StateDir {
    /// `.courier/SERVICE.env` (owner-only): a compose service's secrets.
    pub fn write_env_file(&self, service: &str, text: &str) -> anyhow::Result<()> {
        write_private(&self.0.join(format!("{service}.env")), text.as_bytes())
    }
}

/// Held while `courier up` runs: `.courier/up.pid` with its pid. A second
/// `courier up` (or a `courier down`) finds it; one left by a process that
/// is gone is taken over.
pub struct Lock(PathBuf);

impl Lock {
    pub fn take(state: &StateDir, app: &Path) -> anyhow::Result<Lock> {
        let path = state.lock_path();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    writeln!(file, "{}", std::process::id())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(Lock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match running_pid(&path) {
                    Some(pid) => bail!(
                        "courier up is already running for {} (pid {pid}); stop it with `courier down {}` or Ctrl-C in its terminal",
                        app.display(),
                        app.display()
                    ),
                    None => {
                        // Left by a courier up that is gone.
                        let _ = std::fs::remove_file(&path);
                    }
                },
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        bail!(
            "cannot take {}: another courier up is starting",
            path.display()
        )
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pid in a lock file, if that process still runs `courier`.
pub fn running_pid(lock: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(lock).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("courier")
        .then_some(pid)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_reads_back_as_itself() {
        for text in ["plain", "with \"quotes\" and \\", "tab\there", "é"] {
            let value: BTreeMap<String, String> =
                toml::from_str(&format!("k = {}", quote(text))).expect("valid TOML");
            assert_eq!(value["k"], text);
        }
    }
}
