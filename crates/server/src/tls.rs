//! TLS for the native protocol: loading the broker's certificate, key and
//! client CA into a rustls acceptor, and rendering a verified client
//! certificate's subject the way `courier.toml` writes it (`CN=web`).
//!
//! One crypto provider only: rustls' `ring` provider, passed explicitly, so
//! nothing depends on a process-wide default being installed. Only TLS 1.3
//! is built (rustls' `tls12` feature is off): both ends are Courier's own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

/// The ALPN protocol both ends offer: the Courier protocol, version 1.
pub const ALPN: &[u8] = b"courier/1";

/// Where the broker's TLS material lives (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The broker's certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// The broker's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (mTLS). A client
    /// certificate is *optional*: one that is presented must chain to this
    /// CA or the TLS handshake fails; a connection without one must then
    /// authenticate by token. This lets token-only clients in alongside
    /// certificate clients; the manifest decides who may connect at all.
    pub client_ca: Option<PathBuf>,
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no PEM CERTIFICATE block",
            path.display()
        ));
    }
    Ok(certs)
}

/// Builds the acceptor every connection's handshake goes through.
pub(crate) fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&settings.cert_chain, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| {
        format!(
            "cannot read a private key from --tls-key {}: {e}",
            settings.key.display()
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let builder = match &settings.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, "--tls-client-ca")? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "--tls-client-ca {} holds an unusable CA certificate: {e}",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "--tls-cert {} and --tls-key {} do not make a usable pair: {e}",
            settings.cert_chain.display(),
            settings.key.display()
        )
    })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Most bytes of a rendered subject; longer ones are refused (the manifest
/// does not accept longer subjects either).
const SUBJECT_BYTES_MAX: usize = 1024;

/// The subject of a DER certificate in RFC 4514 string form: RDNs from the
/// last to the first, separated by `,`; attributes of a multi-valued RDN
/// joined by `+`; well-known types by their short names (`CN`, `O`, `OU`,
/// `C`, `L`, `ST`, `STREET`, `DC`, `UID`), others in dotted-decimal with a
/// `#`-hex value; special characters escaped with `\`. So a certificate
/// whose subject is C=DE, O=Acme, CN=web renders as `CN=web,O=Acme,C=DE`
/// (as `openssl x509 -noout -subject -nameopt RFC2253` prints it).
///
/// Call only on a certificate rustls has verified; this parses, it does not
/// check signatures.
pub fn certificate_subject(der: &[u8]) -> Result<String, String> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|e| format!("the certificate is not valid DER: {e}"))?;
    let mut rdns = Vec::new();
    for rdn in certificate.subject().iter() {
        let mut attributes = Vec::new();
        for pair in rdn.iter() {
            let value = pair.attr_value();
            let tag = u8::try_from(value.tag().0).map_err(|_| {
                "the certificate is not valid DER: a tag beyond one byte".to_string()
            })?;
            attributes.push(attribute(pair.attr_type().as_bytes(), tag, value.data)?);
        }
        rdns.push(attributes.join("+"));
    }
    rdns.reverse();
    let subject = rdns.join(",");
    if subject.len() > SUBJECT_BYTES_MAX {
        return Err(format!(
            "the certificate's subject is longer than {SUBJECT_BYTES_MAX} bytes"
        ));
    }
    Ok(subject)
}

/// The DER encoding of an element with this tag and content (definite
/// length, short or long form).
fn der_element(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let len = content.len().to_be_bytes();
            let first = len.iter().position(|b| *b != 0).unwrap_or(len.len() - 1);
            out.push(0x80 | (len.len() - first) as u8);
            out.extend_from_slice(&len[first..]);
        }
    }
    out.extend_from_slice(content);
    out
}

/// `TYPE=value` for one attribute: its type's OID bytes, its value's tag
/// and content.
fn attribute(oid: &[u8], tag: u8, content: &[u8]) -> Result<String, String> {
    const SHORT_NAMES: &[(&[u8], &str)] = &[
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (&[0x55, 0x04, 0x0A], "O"),
        (&[0x55, 0x04, 0x0B], "OU"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x09], "STREET"),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x19],
            "DC",
        ),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x01],
            "UID",
        ),
    ];
    let short = SHORT_NAMES
        .iter()
        .find(|(bytes, _)| *bytes == oid)
        .map(|(_, name)| *name);
    let text = match (short, string_value(tag, content)) {
        (Some(name), Some(value)) => return Ok(format!("{name}={}", escape(&value))),
        (Some(name), None) => name.to_string(),
        (None, _) => dotted(oid)?,
    };
    // RFC 4514 §2.4: other types, or values that are no string, as `#`
    // followed by the hex of the value's whole BER (here DER) encoding.
    let element = der_element(tag, content);
    let hex: String = element.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{text}=#{hex}"))
}

fn string_value(tag: u8, content: &[u8]) -> Option<String> {
    match tag {
        // UTF8String; NumericString, PrintableString, IA5String, VisibleString (ASCII subsets)
        0x0C | 0x12 | 0x13 | 0x16 | 0x1A => std::str::from_utf8(content).ok().map(str::to_string),
        // BMPString: UTF-16BE
        0x1E => {
            if !content.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = content
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        // UniversalString: UTF-32BE
        0x1C => {
            if !content.len().is_multiple_of(4) {
                return None;
            }
            content
                .chunks_exact(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        }
        _ => None,
    }
}

/// RFC 4514 §2.4 escaping.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '#' if i == 0 => out.push_str("\\#"),
            c if c.is_control() => {
                let mut bytes = [0u8; 4];
                for b in c.encode_utf8(&mut bytes).bytes() {
                    out.push_str(&format!("\\{b:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// An OID's contents as dotted decimal, e.g. `2.5.4.3`.
fn dotted(oid: &[u8]) -> Result<String, String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in oid.iter().enumerate() {
        if value > (u64::MAX >> 7) {
            return Err("the certificate has an attribute type too long to show".to_string());
        }
        value = (value << 7) | u64::from(b & 0x7F);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else if i == oid.len() - 1 {
            return Err("the certificate is not valid DER: truncated attribute type".to_string());
        }
    }
    if arcs.is_empty() {
        return Err("the certificate is not valid DER: empty attribute type".to_string());
    }
    Ok(arcs
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join("."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

    fn subject_of(dn: DistinguishedName) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        certificate_subject(cert.der()).expect("subject")
    }

    #[test]
    fn der_elements_take_the_short_or_the_long_length_form() {
        assert_eq!(der_element(0x0C, b"x"), [0x0C, 0x01, b'x']);
        let long = der_element(0x04, &[7; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        assert_eq!(long.len(), 203);
        assert_eq!(
            &der_element(0x04, &[7; 300])[..4],
            &[0x04, 0x82, 0x01, 0x2C]
        );
    }

    #[test]
    fn subjects_render_in_rfc_4514_form() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "web");
        assert_eq!(subject_of(dn), "CN=web");

        // Encoded C, O, OU, CN: rendered from the last RDN to the first.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "DE");
        dn.push(DnType::OrganizationName, "Acme, Inc.");
        dn.push(DnType::OrganizationalUnitName, "ops");
        dn.push(DnType::CommonName, "web");
        assert_eq!(subject_of(dn), "CN=web,OU=ops,O=Acme\\, Inc.,C=DE");

        // Escapes: specials anywhere, a leading '#' or space, a trailing space.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "#a+b;c<d>\"e\\ ");
        assert_eq!(subject_of(dn), "CN=\\#a\\+b\\;c\\<d\\>\\\"e\\\\\\ ");

        // Other string types and an unknown attribute type.
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            DnValue::PrintableString("web".try_into().expect("printable")),
        );
        dn.push(
            DnType::CustomDnType(vec![1, 2, 3, 4]),
            DnValue::Utf8String("x".into()),
        );
        assert_eq!(subject_of(dn), "1.2.3.4=#0c0178,CN=web");

        // A look-alike does not render as the real thing.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "web\u{0}");
        assert_eq!(subject_of(dn), "CN=web\\00");
    }

    #[test]
    fn bad_der_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0x30, 0x03, 0x30, 0x01, 0x00],
            &[0x02, 0x01, 0x00],
        ] {
            assert!(certificate_subject(bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(dotted(&[0x2A, 0x86, 0x48]), Ok("1.2.840".to_string()));
        assert!(dotted(&[0x2A, 0x86]).is_err());
    }
}
