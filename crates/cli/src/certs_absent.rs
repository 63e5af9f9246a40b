//! `courier dev-certs` in a build without the `dev-certs` feature (which
//! brings the certificate generator, rcgen): the command stays, and says
//! how to get a build that has it.

use std::path::{Path, PathBuf};

/// The client certificates written when no `--service` is given.
pub const DEFAULT_SERVICES: &[&str] = &["web", "todo", "admin"];

/// Always an error naming the build that writes certificates.
pub fn write_dev_certs(
    _dir: &Path,
    _services: &[String],
    _force: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::bail!(
        "this courier was built without the dev-certs feature; build one with it (on by default): \
         `cargo build --release -p courier-cli` or `cargo install --path crates/cli`, without \
         --no-default-features (or add --features dev-certs)"
    )
}
