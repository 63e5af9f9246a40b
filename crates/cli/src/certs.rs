//! `courier dev-certs`: a throw-away CA, a broker certificate and client
//! certificates for development and tests (rcgen, ECDSA P-256).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The client certificates written when no `--service` is given.
pub const DEFAULT_SERVICES: &[&str] = &["web", "todo", "admin"];

/// Writes `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem` and
/// `<service>.pem`, `<service>-key.pem` per service into `dir`; returns the
/// files written. Existing files are only replaced with `force`.
pub fn write_dev_certs(
    dir: &Path,
    services: &[String],
    force: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    for service in services {
        courier_proto::validate_name(service).map_err(|e| {
            anyhow::anyhow!("--service {service:?} is not a valid service name: {e}")
        })?;
        if ["ca", "server"].contains(&service.as_str()) {
            anyhow::bail!("--service {service} would overwrite {service}.pem; pick another name");
        }
    }
    let mut files: Vec<(PathBuf, String, bool)> = Vec::new();
    let mut plan = |name: &str, pem: String, secret: bool| {
        files.push((dir.join(name), pem, secret));
    };

    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("Courier development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    plan("ca-key.pem", ca_key.serialize_pem(), true);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
        .context("cannot make the CA certificate")?;
    plan("ca.pem", ca.pem(), false);

    let server_key = KeyPair::generate().context("cannot generate the server key")?;
    let mut server_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .context("cannot describe the server certificate")?;
    server_params.distinguished_name = dn("localhost");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    let server = server_params
        .signed_by(&server_key, &ca)
        .context("cannot sign the server certificate")?;
    plan("server.pem", server.pem(), false);
    plan("server-key.pem", server_key.serialize_pem(), true);

    for service in services {
        let key = KeyPair::generate().context("cannot generate a client key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(service);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &ca)
            .with_context(|| format!("cannot sign the client certificate of {service}"))?;
        plan(&format!("{service}.pem"), cert.pem(), false);
        plan(&format!("{service}-key.pem"), key.serialize_pem(), true);
    }

    if !force {
        let existing: Vec<String> = files
            .iter()
            .filter(|(path, _, _)| path.exists())
            .map(|(path, _, _)| path.display().to_string())
            .collect();
        if !existing.is_empty() {
            anyhow::bail!(
                "refusing to overwrite {}; pass --force or pick another directory",
                existing.join(", ")
            );
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    for (path, pem, secret) in &files {
        write_file(path, pem, *secret)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(files.into_iter().map(|(path, _, _)| path).collect())
}

/// A distinguished name of one common name: `CN=<name>`.
fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Private keys are readable by their owner only.
fn write_file(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

pub(crate) fn dev_certs(
    dir: &std::path::Path,
    services: Vec<String>,
    force: bool,
) -> anyhow::Result<()> {
    let services = if services.is_empty() {
        DEFAULT_SERVICES.iter().map(|s| s.to_string()).collect()
    } else {
        services
    };
    let written = write_dev_certs(dir, &services, force)?;
    for path in &written {
        println!("{}", path.display());
    }
    let d = dir.display();
    let first = services.first().map_or("web", String::as_str);
    eprintln!(
        "courier: development certificates only (the CA key is in {d}/ca-key.pem).\n\
         broker:  courier serve --tls-cert {d}/server.pem --tls-key {d}/server-key.pem --tls-client-ca {d}/ca.pem\n\
         clients: --tls-ca {d}/ca.pem --tls-cert {d}/{first}.pem --tls-key {d}/{first}-key.pem\n\
         manifest: certificates = [\"CN={first}\"] under [services.{first}]"
    );
    Ok(())
}
