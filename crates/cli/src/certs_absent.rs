//! `courier dev-certs` in a build without the `dev-certs` feature (which
//! brings the certificate generator, rcgen): the command stays, and says
//! how to get a build that has it.

/// Always an error naming the build that writes certificates.
pub(crate) fn dev_certs(
    _dir: &std::path::Path,
    _services: Vec<String>,
    _force: bool,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "this courier was built without the dev-certs feature; build one with it (on by default): \
         `cargo build --release -p courier-cli` or `cargo install --path crates/cli`, without \
         --no-default-features (or add --features dev-certs)"
    )
}
