//! What `courier up` runs: the services of `courier.toml` that have a
//! `run` command, after `courier check`; and the state kept in `.courier/`
//! beside the file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use courier_manifest::{Manifest, ProcessSpec};

/// The manifest's file name in an application's directory.
pub const MANIFEST_FILE: &str = "courier.toml";

/// The directory beside the manifest where `courier up` keeps its state.
pub const STATE_DIR: &str = ".courier";

/// An application ready to run: consistent, with its services' processes.
pub struct App {
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// Its directory; services' `dir`s are relative to it.
    pub root: PathBuf,
    pub manifest: Manifest,
    /// The services that have a `run` command, by name, with `--scale`
    /// and `--port` applied.
    pub services: BTreeMap<String, ProcessSpec>,
}

/// `DIR` or `DIR/courier.toml`.
pub fn manifest_path(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = if dir.is_dir() {
        dir.join(MANIFEST_FILE)
    } else {
        dir.to_path_buf()
    };
    if !path.is_file() {
        bail!(
            "{} does not exist; courier up needs the application's {MANIFEST_FILE} \
             (give its directory, e.g. courier up examples/todo)",
            path.display()
        );
    }
    Ok(path)
}

/// `SERVICE=N`.
pub fn parse_scale(text: &str) -> Result<(String, u32), String> {
    let (service, n) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not SERVICE=N, e.g. worker=4"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{n:?} is not a number of instances; write e.g. worker=4"))?;
    if !(1..=courier_manifest::INSTANCES_MAX).contains(&n) {
        return Err(format!(
            "{n} instances: 1 to {} are allowed",
            courier_manifest::INSTANCES_MAX
        ));
    }
    Ok((service.to_string(), n))
}

/// `SERVICE=PORT`.
pub fn parse_port(text: &str) -> Result<(String, u16), String> {
    let (service, port) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not SERVICE=PORT, e.g. web=3000"))?;
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((service.to_string(), port)),
        _ => Err(format!("{port:?} is not a TCP port; write e.g. web=3000")),
    }
}

impl App {
    /// Reads the manifest, refuses it when `courier check` finds errors
    /// (listing every problem), and applies `--scale` and `--port`.
    pub fn load(
        dir: &Path,
        scale: &[(String, u32)],
        ports: &[(String, u16)],
    ) -> anyhow::Result<App> {
        let manifest_path = manifest_path(dir)?;
        let root = manifest_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let (manifest, _) =
            courier_server::load_manifest(&manifest_path).map_err(|e| anyhow::anyhow!(e))?;
        let origin = manifest_path.display().to_string();
        // courier up gives every service a generated token, so a service
        // without credentials is no problem here.
        let problems: Vec<courier_manifest::Problem> = courier_manifest::check(&manifest)
            .into_iter()
            .filter(|p| {
                !p.display_in(&origin)
                    .to_string()
                    .contains("neither tokens nor certificates")
            })
            .collect();
        if courier_manifest::has_errors(&problems) {
            let mut listed = String::new();
            for p in &problems {
                let _ = write!(listed, "\n  {}", p.display_in(&origin));
            }
            bail!(
                "{origin} is inconsistent, so nothing was started ({} problem(s)):{listed}\n\
                 fix the errors above (courier check {origin} lists them) and run courier up again",
                problems.len()
            );
        }
        for p in &problems {
            eprintln!("courier: {}", p.display_in(&origin));
        }
        let mut services: BTreeMap<String, ProcessSpec> = manifest
            .services()
            .iter()
            .filter_map(|(name, spec)| Some((name.clone(), spec.process.clone()?)))
            .collect();
        if services.is_empty() {
            bail!(
                "no service in {origin} has a run command, so there is nothing to start; \
                 add run = \"…\" (the command that starts it) under [services.NAME]"
            );
        }
        let known = services.keys().cloned().collect::<Vec<_>>().join(", ");
        for (name, n) in scale {
            let Some(spec) = services.get_mut(name) else {
                bail!("--scale {name}={n}: {origin} runs no service {name}; its services with a run command are {known}");
            };
            spec.instances = *n;
        }
        for (name, port) in ports {
            let Some(spec) = services.get_mut(name) else {
                bail!("--port {name}={port}: {origin} runs no service {name}; its services with a run command are {known}");
            };
            spec.http_port = Some(*port);
        }
        Ok(App {
            manifest_path,
            root,
            manifest: (*manifest).clone(),
            services,
        })
    }

    /// A service's working directory.
    pub fn service_dir(&self, spec: &ProcessSpec) -> PathBuf {
        self.root.join(&spec.dir)
    }
}

/// `.courier/` beside the manifest: the generated credentials, the
/// broker's manifest (the application's, with their hashes), its data.
pub struct StateDir {
    pub path: PathBuf,
    /// Each service's token, and the admin's under [`ADMIN_KEY`].
    pub tokens: BTreeMap<String, String>,
}

/// The admin's entry in `tokens.toml`: not a valid service name, so it
/// never clashes with one.
pub const ADMIN_KEY: &str = "_admin";

impl StateDir {
    pub fn for_manifest(manifest_path: &Path) -> PathBuf {
        manifest_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            .join(STATE_DIR)
    }

    /// Creates `.courier/`, keeps the tokens generated before (so running
    /// services and scripts keep working) and makes any missing, and
    /// writes the broker's manifest.
    pub fn prepare(app: &App) -> anyhow::Result<StateDir> {
        let path = StateDir::for_manifest(&app.manifest_path);
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "cannot create {} for courier up's state; check the directory's permissions",
                path.display()
            )
        })?;
        // Nothing in it belongs in version control.
        let ignore = path.join(".gitignore");
        if !ignore.exists() {
            std::fs::write(&ignore, "*\n")
                .with_context(|| format!("cannot write {}", ignore.display()))?;
        }
        let tokens_path = path.join("tokens.toml");
        let mut tokens: BTreeMap<String, String> = match std::fs::read_to_string(&tokens_path) {
            Ok(text) => toml::from_str(&text).with_context(|| {
                format!(
                    "{} is damaged; delete it and courier up makes new tokens",
                    tokens_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).context(format!("cannot read {}", tokens_path.display())),
        };
        let wanted = app
            .manifest
            .services()
            .keys()
            .cloned()
            .chain([ADMIN_KEY.to_string()]);
        let mut changed = false;
        for name in wanted {
            if let std::collections::btree_map::Entry::Vacant(entry) = tokens.entry(name) {
                let token = courier_manifest::generate_token()
                    .context("cannot read random bytes from the OS for a token")?;
                entry.insert(token);
                changed = true;
            }
        }
        if changed || !tokens_path.exists() {
            let mut text = String::from(
                "# Generated by courier up: each service's token (COURIER_TOKEN) and the admin's.\n\
                 # Secret: keep this file to yourself; delete it to make new ones.\n",
            );
            for (name, token) in &tokens {
                let _ = writeln!(text, "{} = {}", quote(name), quote(token));
            }
            write_private(&tokens_path, &text)?;
        }
        let state = StateDir { path, tokens };
        let broker_manifest = state.broker_manifest(&app.manifest);
        write_private(&state.broker_manifest_path(), &broker_manifest)?;
        Ok(state)
    }

    pub fn broker_manifest_path(&self) -> PathBuf {
        self.path.join("manifest.toml")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.path.join("up.lock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path.join("data")
    }

    pub fn admin_token(&self) -> Option<&str> {
        self.tokens.get(ADMIN_KEY).map(String::as_str)
    }

    /// The application's manifest as the broker reads it: the same rules
    /// and credentials, plus the hashes of the generated tokens.
    fn broker_manifest(&self, manifest: &Manifest) -> String {
        let mut text = String::from(
            "# Generated by courier up from the application's courier.toml; edits are overwritten.\n",
        );
        let hash = |name: &str| {
            self.tokens
                .get(name)
                .map(|t| courier_manifest::hash_token(t))
        };
        for (name, spec) in manifest.services() {
            let _ = writeln!(text, "\n[services.{}]", quote(name));
            let list = |items: Vec<String>| {
                let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
                format!("[{}]", quoted.join(", "))
            };
            let rules = |r: &[courier_manifest::NameRule]| {
                list(r.iter().map(ToString::to_string).collect())
            };
            let _ = writeln!(text, "sends = {}", rules(&spec.sends));
            let _ = writeln!(text, "publishes = {}", rules(&spec.publishes));
            let _ = writeln!(text, "receives = {}", rules(&spec.receives));
            let tokens = spec
                .tokens
                .iter()
                .map(ToString::to_string)
                .chain(hash(name));
            let _ = writeln!(text, "tokens = {}", list(tokens.collect()));
            let _ = writeln!(text, "certificates = {}", list(spec.certificates.clone()));
        }
        let admin = manifest.admin();
        let tokens = admin
            .tokens
            .iter()
            .map(ToString::to_string)
            .chain(hash(ADMIN_KEY));
        let quoted: Vec<String> = tokens.map(|t| quote(&t)).collect();
        let _ = writeln!(text, "\n[admin]\ntokens = [{}]", quoted.join(", "));
        let certs: Vec<String> = admin.certificates.iter().map(|c| quote(c)).collect();
        let _ = writeln!(text, "certificates = [{}]", certs.join(", "));
        text
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
pub fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Writes a file only its owner may read: it holds or guards secrets.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_and_port_flags_name_the_right_form() {
        assert_eq!(parse_scale("worker=4"), Ok(("worker".into(), 4)));
        assert!(parse_scale("worker")
            .expect_err("refused")
            .contains("worker=4"));
        assert!(parse_scale("worker=0")
            .expect_err("refused")
            .contains("1 to 256"));
        assert_eq!(parse_port("web=3001"), Ok(("web".into(), 3001)));
        assert!(parse_port("web=x")
            .expect_err("refused")
            .contains("web=3000"));
    }

    #[test]
    fn the_broker_manifest_keeps_the_rules_and_adds_the_generated_hashes() {
        let manifest = Manifest::parse(
            "[services.web]\nsends = [\"todo.create@1\"]\nrun = \"x\"\n\
             [services.todo]\nreceives = [\"todo.create@1\"]\npublishes = [\"todo.>\"]\n",
        )
        .expect("valid");
        let tokens: BTreeMap<String, String> =
            [("web", "crr_w"), ("todo", "crr_t"), (ADMIN_KEY, "crr_a")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        let state = StateDir {
            path: PathBuf::from("."),
            tokens,
        };
        let broker = Manifest::parse(&state.broker_manifest(&manifest)).expect("parses");
        assert_eq!(
            broker.authenticate_token("crr_w"),
            Some(courier_manifest::Identity::Service("web".into()))
        );
        assert_eq!(
            broker.authenticate_token("crr_a"),
            Some(courier_manifest::Identity::Admin)
        );
        assert!(broker.may_send("web", "todo.create", 1).is_ok());
        assert!(broker.may_send("todo", "todo.created", 1).is_ok());
        assert!(broker.may_receive("todo", "todo.create", 1).is_ok());
        assert!(
            broker.services()["web"].process.is_none(),
            "the broker needs no run"
        );
    }
}
